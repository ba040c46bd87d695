"""The workers' torch process group, with its rendezvous store bound to the master's address only.

Ray Train's ``TorchConfig`` has rank 0 host torch's TCPStore, which listens on every interface (``[::]``)
whatever ``MASTER_ADDR`` says. Peers only ever dial ``MASTER_ADDR`` (the rank-0 node's address: 127.0.0.1
on the local Ray raytune-it starts), so ``BoundTorchConfig`` has rank 0 open the store on a socket bound
to that address and hand it to torch (``master_listen_fd``): nothing listens beyond it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


def bind_store_to_master_address() -> None:
    """In a worker, before its process group starts: rank 0's store listens on MASTER_ADDR alone."""
    import importlib

    from torch.distributed import TCPStore

    # (the module: ``torch.distributed.rendezvous`` as an attribute is the function of that name)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = rendezvous._create_c10d_store
    if getattr(create, "bound_to_master", False):
        return

    def create_store(hostname: str, port: int, rank: int, world_size: int, timeout: Any,
                     use_libuv: bool = True) -> Any:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            address = None  # a name may stand for several addresses: torch's own store, as before
        if rank != 0 or address is None or rendezvous._torchelastic_use_agent_store():
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((hostname, port))
        listener.listen(max(world_size, 128))
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, master_listen_fd=listener.detach(), use_libuv=use_libuv)

    create_store.bound_to_master = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store  # type: ignore[attr-defined]


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        worker_group.execute(bind_store_to_master_address)
        super().on_start(worker_group, backend_config)


@dataclass
class BoundTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig``, but rank 0's rendezvous store listens on the master address only."""

    @property
    def backend_cls(self) -> type:
        return _BoundTorchBackend
