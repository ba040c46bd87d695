"""Connecting to Ray, and checking that the cluster can place a job's workers.

``RAY_ADDRESS`` (set by ``ray job submit`` and by users of a running cluster)
selects an existing cluster; otherwise a local Ray is started for the run and
stopped after it. Jobs for a server type ask the cluster for their nodes before
launch (:func:`wait_for_resources`), so an autoscaler brings them up.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from raytune_it.errors import UserError
from raytune_it.hardware import SERVER_TYPES

LOOPBACK = "127.0.0.1"


# Ray's own switch for a machine that is not part of a cluster (it sets it on macOS and Windows): the node's
# address is the loopback one, and every server Ray starts binds it.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_session(min_cpus: int = 0) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    # Logical CPUs: Ray Train reserves whole CPUs for workers, and Ray Train's controller, Tune's trial
    # drivers and the progress queue need a little left over; on a small machine they would otherwise wait.
    with _single_machine():
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus + 2), log_to_driver=True,
                 _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK,
                 runtime_env={"worker_process_setup_hook": f"{__name__}.{loopback_grpc_servers.__name__}"})
        try:
            yield
        finally:
            ray.shutdown()


def loopback_grpc_servers() -> None:
    """Set up each worker of the local Ray so that the gRPC servers Ray opens in it on every interface
    (``[::]:0``: each Serve replica's inter-deployment server) bind 127.0.0.1 instead, the node's address
    and so the one its peers dial. Ray's helper is replaced before Serve's replica module imports it."""
    import sys

    from ray._common import tls_utils

    add_port = tls_utils.add_port_to_grpc_server
    if getattr(add_port, "loopback_only", False):
        return

    def add_loopback_port(server: Any, address: str) -> int:
        host, _, port = address.rpartition(":")
        return add_port(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    add_loopback_port.loopback_only = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_loopback_port
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:
        replica.add_port_to_grpc_server = add_loopback_port  # type: ignore[attr-defined]


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """The local Ray raytune-it starts is for this process alone: its GCS, raylet, object manager, workers,
    agents and dashboard listen on 127.0.0.1, not on every interface (Ray otherwise swaps 127.0.0.1 for the
    machine's address and binds wildcards). Restored afterwards, for a later Ray in the same process."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which read the variable at import
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


def wait_for_resources(bundles: list[dict[str, float]], server_type: str, timeout_s: float,
                       key: str = "scaling.server_type") -> None:
    """Ask the cluster for the job's workers of ``server_type`` and fail clearly if they do not come.

    A placement group of the workers' bundles is a resource demand the autoscaler
    sees (``ray status`` lists it), so an autoscaling cluster adds nodes of that
    type while we wait; without this, Ray would leave the workers pending forever
    on a cluster that never gets such nodes. The group is removed once placed:
    Ray Train then places its own workers on the nodes that came up.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if server_type == "any":
        return
    group = placement_group(bundles, strategy="PACK")  # unnamed: concurrent sweep trials each wait
    try:
        ready, _ = ray.wait([group.ready()], timeout=max(timeout_s, 1.0))
    finally:
        remove_placement_group(group)
    if ready:
        return
    resource = SERVER_TYPES[server_type].resource
    needed = sum(bundle.get(resource, 0) for bundle in bundles)
    total = ray.cluster_resources().get(resource, 0)
    offered = sorted(name for name in ray.cluster_resources() if name.startswith("server_type:"))
    busy = " (enough in total, but in use by other jobs)" if total >= needed else ""
    raise UserError(
        f"{key}={server_type}: the cluster offers {total:g} of resource {resource!r} and the job needs "
        f"{needed:g}{busy} (waited {timeout_s:g}s; an autoscaler was asked for them). Server types in this "
        f"cluster: {', '.join(offered) or 'none'}. Start nodes of that type (see cluster/ and docs/cluster.md), "
        f"raise scaling.placement_timeout_s if they take longer to boot, choose another {key}, or use 'any'.")


def warn_if_storage_is_not_shared(location: Any, console: Any) -> None:
    """A local run.storage on a cluster of several nodes splits the run across their disks: say so once."""
    import ray

    if not location.is_local:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        console.print(f"warning: run.storage is a local folder ({location.path}) and this cluster has "
                      f"{len(nodes)} nodes: workers on other nodes write checkpoints to their own disks unless "
                      "every node mounts that folder. Use s3://bucket/prefix or gs://bucket/prefix "
                      "(docs/cluster.md).", style="yellow", markup=False, highlight=False)
