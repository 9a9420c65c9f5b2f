"""Connecting to Ray: the cluster named by ``RAY_ADDRESS``, or an embedded local Ray of this process's own.

**A local Ray is private to the command that starts it**, so two rolo-batch commands, or one next to a
``ray start --head``, run side by side on one machine without joining or disturbing each other:

- ``ray.init(address="local")``: always a new Ray, never one found on the machine (with no address, Ray joins
  the cluster the last ``ray start`` recorded in ``/tmp/ray/ray_current_cluster``).
- Its own temp dir, ``/tmp/rolo-ray-<pid>-<random>`` (kept short: Ray's Unix sockets live in it, and their
  paths are limited to about 100 characters), removed when the process exits; ``$RAY_TMPDIR`` moves it.
- None of Ray's fixed default ports, which belong to a ``ray start --head`` on this machine: the dashboard
  agent takes a free port, not 52365 (a head whose agent finds 52365 taken has no job agent and refuses every
  job submission), and the dashboard, which serves nothing here (``include_dashboard=False``), records port 0,
  not 8265 (where another cluster's dashboard may answer). The GCS port is free too, picked just before.
- Its workers find it by ``RAY_ADDRESS`` (set in the job's runtime env). Code in a worker that looks up "the"
  cluster without an address (Ray Train's PlacementGroupCleaner asks the state API) would otherwise scan the
  machine for GCS processes and read ``/tmp/ray/ray_current_cluster``: with two Rays it warns or fails with
  "Found multiple active Ray instances", or picks the other cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"
_LOCAL_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head's GCS
_TEMP_ROOT = "/tmp"
_TEMP_PREFIX = "rolo-ray-"


@dataclass(frozen=True)
class ClusterResources:
    """What the connected Ray cluster offers: CPUs and GPUs (logical or physical)."""

    cpus: float
    gpus: float


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) names an existing cluster; without one (or with ``"local"``) a local
    Ray of this process's own starts (see the module docstring), bound to 127.0.0.1 so it is reachable from
    this machine only. ``num_cpus``/``num_gpus`` size a local Ray (logical GPUs let a machine without any test
    GPU pinning). Does nothing when Ray is already initialised.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address in (None, "local")
    if local:
        # With the pinned Ray on Linux, this makes a local Ray use 127.0.0.1 rather than the routable address.
        # Ray reads it once, when it is first imported: so before the import below.
        os.environ.setdefault(_LOCAL_RAY_LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return
    if not local:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    _start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus)


def _start_local_ray(*, num_cpus: int | None, num_gpus: int | None) -> None:
    import ray

    temp_dir = _new_temp_dir()
    gcs_port = _free_port()
    # Workers inherit these: RAY_ADDRESS names this cluster; an empty RAY_API_SERVER_ADDRESS keeps one set in
    # this shell for a remote cluster from sending the workers' state API calls there.
    own_cluster = {"RAY_ADDRESS": f"{LOOPBACK}:{gcs_port}", "RAY_API_SERVER_ADDRESS": ""}
    with _environ(_GCS_PORT_ENV, str(gcs_port)), _dashboard_agent_on_a_free_port():
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 dashboard_port=0, _node_ip_address=LOOPBACK, _temp_dir=str(temp_dir),
                 runtime_env={"env_vars": own_cluster}, logging_level=logging.WARNING)


def _new_temp_dir() -> Path:
    """A new, short temp dir for one local Ray, removed (after Ray has stopped) when this process exits."""
    root = os.environ.get("RAY_TMPDIR") or (_TEMP_ROOT if os.path.isdir(_TEMP_ROOT) else tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=root))
    atexit.register(_remove_after_ray, path, os.getpid())
    return path


def _remove_after_ray(path: Path, owner_pid: int) -> None:
    """At exit: stop Ray (its own exit hook would run after this one), then remove what it left in ``path``.
    Not in a forked child, whose exit must not touch its parent's Ray."""
    if os.getpid() != owner_pid:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _dashboard_agent_on_a_free_port() -> Iterator[None]:
    """While ``ray.init`` starts a local Ray: its dashboard agent takes a free port rather than Ray's fixed
    default, 52365. ``ray.init`` has no argument for it; it builds its node's settings from
    ``ray._private.parameter.RayParams`` (Ray 2.60), whose default this narrows to port 0 (any free port)."""
    from ray._private import parameter

    original = parameter.RayParams

    class RayParams(original):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def cluster_resources() -> ClusterResources:
    """CPUs and GPUs of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return ClusterResources(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)))


@dataclass(frozen=True)
class VideoPoolPlan:
    """How a Ray Data stage over videos runs: ``use_gpu`` (one GPU per actor), ``batches`` of videos (the
    dataset's blocks) and ``actors`` in the pool."""

    use_gpu: bool
    batches: int
    actors: int


def plan_video_pool(gpu: str, videos: int, videos_per_batch: int, actors: int | None,
                    cpus_per_actor: float) -> VideoPoolPlan:
    """The actor pool for ``videos`` on the connected cluster. ``gpu``: ``on``, ``off`` or ``auto`` (GPUs
    when the cluster has them). Without ``actors``: one per GPU, or one per ``cpus_per_actor`` CPUs, never
    more than there are batches."""
    resources = cluster_resources()
    use_gpu = gpu == "on" or (gpu == "auto" and resources.gpus >= 1)
    batches = -(-videos // videos_per_batch)
    slots = int(resources.gpus) if use_gpu else max(1, int(resources.cpus // max(cpus_per_actor, 1)))
    return VideoPoolPlan(use_gpu, batches, actors or max(1, min(batches, slots)))


def torch_device_for_actor() -> str:
    """The torch device of the calling Ray worker: ``cuda`` when Ray assigned it a GPU that torch can see
    (Ray sets CUDA_VISIBLE_DEVICES, so it is always device 0 of what is visible), else ``cpu`` (also when the
    GPUs are only logical, as in tests)."""
    import ray
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    return "cpu"
