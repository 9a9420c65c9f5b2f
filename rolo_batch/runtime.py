"""Connecting to Ray: the cluster named by ``RAY_ADDRESS``, or an embedded local Ray bound to loopback."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

_LOCAL_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class ClusterResources:
    """What the connected Ray cluster offers: CPUs and GPUs (logical or physical)."""

    cpus: float
    gpus: float


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) names an existing cluster; without one (or with ``"local"``) a local
    Ray starts, bound to 127.0.0.1 so it is reachable from this machine only. ``num_cpus``/``num_gpus`` size
    a local Ray (logical GPUs let a machine without any test GPU pinning). Does nothing when Ray is already
    initialised.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # With the pinned Ray on Linux, this makes a local Ray use 127.0.0.1 rather than the routable address.
    os.environ.setdefault(_LOCAL_RAY_LOOPBACK_ENV, "0")
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)


def cluster_resources() -> ClusterResources:
    """CPUs and GPUs of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return ClusterResources(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)))


def torch_device_for_actor() -> str:
    """The torch device of the calling Ray worker: ``cuda`` when Ray assigned it a GPU that torch can see
    (Ray sets CUDA_VISIBLE_DEVICES, so it is always device 0 of what is visible), else ``cpu`` (also when the
    GPUs are only logical, as in tests)."""
    import ray
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    return "cpu"
