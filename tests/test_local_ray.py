"""The local Ray that raytune-it starts when no cluster is given (RAY_ADDRESS unset)."""

import pytest

pytestmark = pytest.mark.integration


def test_the_local_ray_raytune_it_starts_listens_on_loopback_only():
    """Every TCP port the local Ray's processes listen on is on 127.0.0.1, none on another interface."""
    import psutil

    from raytune_it.cluster import ray_session

    with ray_session():
        import ray

        assert ray.is_initialized()
        listening = []
        for process in psutil.Process().children(recursive=True):
            try:
                connections = process.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listening += [(process.name(), c.laddr.ip, c.laddr.port) for c in connections
                          if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 3, "the GCS, the raylet and the agents listen somewhere"
    exposed = [entry for entry in listening if entry[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER, "a later Ray in this process may join a cluster again"
