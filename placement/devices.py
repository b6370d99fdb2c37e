"""Which CUDA device a rank process drives: pure functions over what Ray assigned.

A unit's bundles are {GPU: 1} each, so Ray gives every rank actor one GPU id. How that id
becomes a device index depends on what the process can see:
  - Ray's default sets CUDA_VISIBLE_DEVICES to the one assigned id: the rank drives cuda:0, and
    no peer GPU is visible (NCCL still works; CUDA IPC to a peer's memory, which DeepEP's
    NVLink buffers need, does not).
  - With RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (what units set on CUDA machines, as vLLM
    does) Ray leaves CUDA_VISIBLE_DEVICES alone: the process sees every GPU of its node and drives
    the assigned one by index, so peers on the node are reachable over NVLink.
Worked example: 2 ranks on one 8-GPU node, Ray assigns ids "3" and "5". Default: both drive
cuda:0 (different physical GPUs). NOSET, CUDA_VISIBLE_DEVICES unset: cuda:3 and cuda:5. NOSET,
CUDA_VISIBLE_DEVICES="2,3,4,5": cuda:1 and cuda:3.
Never: touches CUDA or Ray (actors/rank.py reads the ids and sets the device).
"""
from __future__ import annotations

from epserve.errors import DeviceAssignmentError

NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def local_device_index(assigned: list[str], visible: str | None) -> int:
    """Ray's GPU ids for this process (exactly one) and CUDA_VISIBLE_DEVICES -> torch device index."""
    if len(assigned) != 1:
        raise DeviceAssignmentError(f"a rank needs exactly one GPU, Ray assigned {assigned!r}")
    gpu = str(assigned[0])
    if visible is None or visible.strip() == "":
        return int(gpu)                          # every GPU of the node visible, in physical order
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if gpu not in ids:
        raise DeviceAssignmentError(f"assigned GPU {gpu} is not in CUDA_VISIBLE_DEVICES={visible!r}")
    return ids.index(gpu)


def check_distinct_gpus(ranks: list[tuple[str, list[str]]]) -> None:
    """(node id, Ray GPU ids) per rank -> raises if two ranks of a unit hold the same GPU of a node."""
    owner: dict[tuple[str, str], int] = {}
    for r, (node, gpus) in enumerate(ranks):
        if len(gpus) != 1:
            raise DeviceAssignmentError(f"rank {r} holds GPUs {gpus!r} on node {node[:8]}; it needs exactly one")
        key = (node, str(gpus[0]))
        if key in owner:
            raise DeviceAssignmentError(f"ranks {owner[key]} and {r} both hold GPU {gpus[0]} of node {node[:8]}")
        owner[key] = r


def data_backend(device: str) -> str:
    """The process-group backend of a unit's data collectives: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"
