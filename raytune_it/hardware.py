"""The two GPU server types of the survey's Table 8, defined once.

Ray's accelerator detection knows neither the A800 nor the RTX 3090, so each node
of a type advertises a custom resource named here. Ray Train placement, Serve
placement, the planner, ``cluster/`` and ``infra/`` all read these names and
numbers from this module, and a test checks that the YAMLs agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ServerTypeName = Literal["a800-80g", "rtx3090-24g"]
ServerTypeChoice = Literal["a800-80g", "rtx3090-24g", "any"]


@dataclass(frozen=True)
class ServerType:
    """One kind of GPU server: what a node of it offers and how fast it is."""

    name: ServerTypeName
    gpu_model: str
    gpus_per_node: int
    gpu_memory_gib: float
    #: HBM/GDDR bandwidth, bytes/s: bounds batch-1 decoding (weights read once per token).
    memory_bandwidth: float
    #: Dense BF16 tensor-core peak, FLOP/s.
    peak_bf16_flops: float
    #: Node-to-node network per node, bytes/s (ZeRO-3 gathers cross it once a job spans servers).
    interconnect_bandwidth: float
    #: Planner assumption: the bus bandwidth NCCL reaches inside one server for ZeRO-3's per-layer
    #: all-gathers and reduce-scatters (messages of tens of MB, well below the large-message peak).
    collective_bandwidth: float
    #: Planner assumption: the fraction of ``peak_bf16_flops`` a tuning step sustains (model FLOPs
    #: utilization). A measured run replaces it: ``raytune-it plan --calibrate RUN_DIR``.
    sustained_mfu: float
    #: Substrings of the CUDA device name that identify this type's GPU.
    gpu_name_patterns: tuple[str, ...] = ()

    @property
    def resource(self) -> str:
        """The Ray custom resource each GPU of this type carries (one unit per GPU)."""
        return f"server_type:{self.name}"


SERVER_TYPES: dict[str, ServerType] = {
    "a800-80g": ServerType(
        name="a800-80g",
        gpu_model="NVIDIA A800-SXM4-80GB",
        gpus_per_node=8,
        gpu_memory_gib=80.0,
        memory_bandwidth=2.039e12,
        peak_bf16_flops=312e12,
        interconnect_bandwidth=100e9,  # 4 x 200 Gb/s InfiniBand HDR, the usual HGX A800 fit-out
        # NVLink on the A800 is capped at 400 GB/s (A100: 600); ZeRO-3's ~50 MB messages reach about a
        # third of the large-message bus bandwidth.
        collective_bandwidth=50e9,
        sustained_mfu=0.25,
        gpu_name_patterns=("A800",),
    ),
    "rtx3090-24g": ServerType(
        name="rtx3090-24g",
        gpu_model="NVIDIA GeForce RTX 3090",
        gpus_per_node=8,
        gpu_memory_gib=24.0,
        memory_bandwidth=936e9,
        peak_bf16_flops=71e12,
        interconnect_bandwidth=12.5e9,  # one 100 Gb/s NIC
        # GeForce cards have no NVLink switch and no PCIe peer-to-peer: collectives go through host memory.
        collective_bandwidth=8e9,
        sustained_mfu=0.25,
        gpu_name_patterns=("3090",),
    ),
}


def server_type(name: str) -> ServerType:
    """Look a server type up by name, with an error that lists the known ones."""
    try:
        return SERVER_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(SERVER_TYPES))
        raise KeyError(f"unknown server type {name!r}; known: {known}") from None


def autoscaler_node_resources(name: str, cpus: int) -> dict[str, float]:
    """What a node of this server type offers the autoscaler (``available_node_types.<name>.resources`` in
    ``cluster/*.yaml``, the worker groups' resources in KubeRay): its GPUs, and one unit of its type per GPU.
    CPUs differ by machine, so the caller gives them."""
    kind = SERVER_TYPES[name]
    return {"CPU": cpus, "GPU": kind.gpus_per_node, kind.resource: kind.gpus_per_node}


def node_resources(gpu_names: list[str]) -> dict[str, float]:
    """The custom resources a node with these GPUs advertises (``ray start --resources``).

    Used by the start commands in ``cluster/`` so that each server, whatever list
    it was started from, announces its own type.
    """
    resources: dict[str, float] = {}
    for name in gpu_names:
        for kind in SERVER_TYPES.values():
            if any(pattern in name for pattern in kind.gpu_name_patterns):
                resources[kind.resource] = resources.get(kind.resource, 0) + 1
    return resources


def local_gpu_names() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build or no driver: no GPUs to announce
        return []
