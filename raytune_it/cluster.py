"""Connecting to Ray, and checking that the cluster can place a job's workers.

``RAY_ADDRESS`` (set by ``ray job submit`` and by users of a running cluster)
selects an existing cluster; otherwise a local Ray is started for the run and
stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from raytune_it.errors import UserError
from raytune_it.hardware import SERVER_TYPES


@contextlib.contextmanager
def ray_session(min_cpus: int = 0) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # Logical CPUs: Ray Train reserves whole CPUs for workers, and Ray Data needs some left over
        # to read the shards; on a small machine the reservation would otherwise starve it.
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus + 2), log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def wait_for_server_type(name: str, needed: int, timeout_s: float, key: str = "scaling.server_type") -> None:
    """Fail clearly, within ``timeout_s``, when no node of the server type is in the cluster.

    Ray would otherwise leave the workers pending forever. An autoscaling cluster
    adds nodes while we wait.
    """
    import ray

    if name == "any":
        return
    resource = SERVER_TYPES[name].resource
    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources().get(resource, 0)
        if total >= needed:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    offered = sorted(key for key in ray.cluster_resources() if key.startswith("server_type:"))
    raise UserError(
        f"{key}={name}: the cluster offers {total:g} of resource {resource!r} and the job needs {needed} "
        f"(waited {timeout_s:g}s). Server types in this cluster: {', '.join(offered) or 'none'}. "
        f"Start nodes of that type (see cluster/), choose another {key}, or use 'any'.")
