"""`ensure_ray`: a local Ray that rolo-batch starts is the command's own, next to other Rays on the machine.

Real processes only: the shared `ray start --head` (tests/rayhead.py) plays a user's cluster on this machine, and
rolo-batch-like commands run as subprocesses with a clean environment (nothing of this test session's Ray, and
not the loopback switch conftest sets: `ensure_ray` must manage on its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.rayhead import head_nodes

RAY_DEFAULT_PORTS = {8265, 52365}  # dashboard, dashboard agent: a `ray start --head` on this machine needs them
MULTIPLE = "Found multiple active Ray instances"

# A rolo-batch-like command. "train" and "work" start a local Ray and meet (files) so that both Rays are up at
# once; "train" runs a Ray Train TorchTrainer, whose PlacementGroupCleaner looks up "the" cluster from a worker
# through the state API; both also make that lookup themselves in a task. "join" connects to RAY_ADDRESS.
COMMAND = r'''
import json, sys, tempfile, time
from pathlib import Path

from rolo_batch.runtime import ensure_ray

ensure_ray(num_cpus=1)
import ray
import psutil  # Ray ships it

mode, mark, *peers = sys.argv[1:]


def meet(step):
    Path(f"{mark}.{step}").touch()
    deadline = time.monotonic() + 150
    while not all(Path(f"{peer}.{step}").exists() for peer in peers):
        if time.monotonic() > deadline:
            sys.exit(f"the other command never got to {step!r}")
        time.sleep(0.2)


@ray.remote
def api_server_from_a_worker():
    from ray.dashboard.utils import get_address_for_submission_client  # what the state API does, no address

    try:
        return get_address_for_submission_client(None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def train():
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        for step in range(3):
            time.sleep(1)  # the PlacementGroupCleaner checks every second
            ray.train.report({"step": step})

    result = TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                          run_config=ray.train.RunConfig(name="probe", storage_path=tempfile.mkdtemp())).fit()
    return repr(result.error)


def listening():
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            found.update(f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN)
        except psutil.Error:
            pass
    return sorted(found)


context = ray.get_runtime_context()
report = {"gcs": context.gcs_address, "node": context.get_node_id()}
if mode != "join":
    meet("up")
    report.update(temp_dir=ray._private.worker._global_node.get_temp_dir_path(), listening=listening(),
                  api_server=ray.get(api_server_from_a_worker.remote()))
    if mode == "train":
        report["train_error"] = train()
    meet("done")
print("REPORT " + json.dumps(report), flush=True)
'''


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _report(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("REPORT "):])


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.timeout(300)
def test_local_rays_are_their_own_and_run_side_by_side_with_a_head(ray_head, tmp_path):
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    runs = {
        "train": (["train", str(tmp_path / "train"), str(tmp_path / "work")], _environment()),
        "work": (["work", str(tmp_path / "work"), str(tmp_path / "train")], _environment()),
        "join": (["join", str(tmp_path / "join")],
                 _environment(RAY_ADDRESS=ray_head.gcs_address, RAY_AUTH_MODE="token",
                              RAY_AUTH_TOKEN_PATH=str(ray_head.token_path),
                              RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")),  # Ray's switch to reach a loopback head
    }
    procs = {name: subprocess.Popen([sys.executable, str(script), *argv], env=env, cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, (argv, env) in runs.items()}
    outputs, reports = {}, {}
    try:
        for name, proc in procs.items():
            outputs[name], _ = proc.communicate(timeout=200)
            assert proc.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
            reports[name] = _report(outputs[name])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    head_node_ids = {node["node_id"] for node in head_nodes(ray_head.address, ray_head.token())}
    # RAY_ADDRESS naming a cluster still joins it
    assert reports["join"]["gcs"] == ray_head.gcs_address and reports["join"]["node"] in head_node_ids

    train, work = reports["train"], reports["work"]
    assert train["train_error"] == "None", outputs["train"][-4000:]
    assert train["gcs"] != work["gcs"] and train["node"] != work["node"]  # two Rays, at the same time
    for name in ("train", "work"):
        report, output, pid = reports[name], outputs[name], procs[name].pid
        assert report["gcs"] != ray_head.gcs_address and report["node"] not in head_node_ids  # joined nothing
        assert MULTIPLE not in output and MULTIPLE not in report["api_server"], output[-4000:]
        # a worker looking up "the" cluster finds its own (whose dashboard serves nothing: include_dashboard=False)
        assert report["api_server"].startswith("http://127.0.0.1:") and report["api_server"] != ray_head.address
        assert report["gcs"].startswith("127.0.0.1:")
        listening = report["listening"]
        assert listening and all(a.startswith(("127.0.0.1:", "::ffff:127.0.0.1:")) for a in listening), listening
        assert not {_port(a) for a in listening} & RAY_DEFAULT_PORTS, listening
        # its own short temp dir, gone once the command has exited
        assert Path(report["temp_dir"]).name.startswith(f"rolo-ray-{pid}-"), report["temp_dir"]
        assert len(report["temp_dir"]) < 40 and not Path(report["temp_dir"]).exists()
