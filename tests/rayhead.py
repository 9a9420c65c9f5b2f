"""A real Ray head on 127.0.0.1 with token authentication, shared by the job submission tests.

Started with ``ray start --head --block`` in its own process session and a clean environment; stopped by
signalling that session (``ray stop`` would kill every Ray on the machine, the tests' local one included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

DEAD_ADDRESS = "http://127.0.0.1:9"  # loopback discard port: nothing listens


@dataclass(frozen=True)
class RayHead:
    address: str  # the job server (dashboard)
    token_path: Path
    pid: int
    gcs_address: str  # what `ray.init(address=...)` takes

    def token(self) -> str:
        return self.token_path.read_text().strip()


def _head_environment(token_path: Path) -> dict[str, str]:
    """A clean environment for the head: no Ray or AWS settings of this process leak into the cluster (jobs
    see only what `--env` passes); S3 defaults point at a dead loopback port, so nothing leaves the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_USAGE_STATS_ENABLED="0", AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=DEAD_ADDRESS,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _session_pids(sid: int) -> list[int]:
    """Processes of one session (the head was started as a session leader, so all its processes are in it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it drains and stops what it started), then SIGKILL whatever of its session
    is left. Only this head's processes are touched, never `ray stop`'s every-Ray-on-the-machine sweep."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(10)


def head_nodes(address: str, token: str) -> list[dict]:
    """The cluster's nodes as the dashboard's state API reports them."""
    import requests

    reply = requests.get(f"{address}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def _wait_until_ready(proc: subprocess.Popen, address: str, token: str, log: Path, timeout_s: float = 120) -> None:
    """Until the job API answers and the head node has registered."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            jobs = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if jobs.status_code == 200 and head_nodes(address, token):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not come up in {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """A real Ray head on 127.0.0.1 with token authentication, for this file's tests; stopped even on failure."""
    root = Path(tempfile.mkdtemp(prefix="rolo-ray-"))  # short: Ray's unix sockets live under --temp-dir
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    dashboard_port, gcs_port = free_port(), free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard_port), "--port", str(gcs_port),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(100 * 1024 ** 2),
               "--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    log = root / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=_head_environment(token_path), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_until_ready(proc, address, token_path.read_text(), log)
        yield RayHead(address=address, token_path=token_path, pid=proc.pid, gcs_address=f"127.0.0.1:{gcs_port}")
    finally:
        _stop_head(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster_env(ray_head, monkeypatch) -> RayHead:
    """This process set up as a user of the head: RAY_ADDRESS, RAY_AUTH_MODE=token and the token's file."""
    for name in ("RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_path))
    return ray_head


