"""Cluster jobs: `rolo-batch submit` and `rolo-batch jobs ...` against a real Ray head on loopback.

The head (`ray start --head`, token authentication on, everything bound to 127.0.0.1) is started once for this
file and always stopped afterwards, by signalling only its own process session, so that any other Ray in the
test session (the embedded `ray.init()` one) keeps running. Unit tests of the pieces need no cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from rolo_batch import __version__, cli
from rolo_batch.errors import ConfigError
from rolo_batch.submit import (
    EXIT_CLUSTER_UNAVAILABLE,
    EXIT_STILL_RUNNING,
    PACKAGE_DIR_OVERLAYS,
    ClusterUnavailableError,
    JobCluster,
    SubmitConfig,
    add_job_commands,
    build_runtime_env,
    entrypoint_command,
    find_auth_token,
    new_submission_id,
    parse_env_flags,
    pinned_dependencies,
    redact_runtime_env,
    resolve_address,
    stage_code,
    write_code_archive,
)
from tests.conftest import REPO_ROOT
from tests.faultproxy import FaultPlan, FaultProxy
from tests.ports import free_port
from tests.rayhead import DEAD_ADDRESS, _session_pids, head_nodes

JOB_TIMEOUT_S = "120"  # a --timeout for every wait: a broken job must fail the test, not hang it
# What Ray 2.60's job server answers (500) while its head has no job agent (ray/dashboard/modules/job/job_head.py)
NO_AGENT_BODY = "No available agent to submit job, please try again later."
SUBMIT_ENDPOINT = "POST /api/jobs/"


def run_cli(*argv: str) -> int:
    """Run `rolo-batch <argv>` in this process."""
    return cli.main(list(argv))


def _job_id(text: str) -> str:
    return re.search(r"raysubmit_[A-Za-z0-9]+", text).group(0)


# --- against the head ------------------------------------------------------------------------------------

def _listening_addresses(pids: list[int]) -> set[str]:
    """Local IPv4 addresses on which these processes listen (from /proc/net/tcp and their socket fds)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ip_hex = fields[1].split(":")[0]
            found.add(".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_head_is_bound_to_loopback_only(ray_head):
    nodes = head_nodes(ray_head.address, ray_head.token())
    assert [node["node_ip"] for node in nodes] == ["127.0.0.1"]
    assert _listening_addresses(_session_pids(ray_head.pid)) == {"127.0.0.1"}


@pytest.mark.timeout(240)
def test_submit_wait_runs_the_stage_and_jobs_commands_show_it(cluster_env, tmp_path, capsys):
    out_dir = tmp_path / "synth"
    code = run_cli("submit", "--wait", "--timeout", JOB_TIMEOUT_S, "--", "synth", str(out_dir),
                   "--videos", "1", "--frames", "3")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "wrote 1 videos of 3 frames" in out
    job_id = _job_id(out)
    assert out.strip().splitlines()[-1].startswith(f"job {job_id} SUCCEEDED after ")
    assert sorted(p.name for p in (out_dir / "synth-000" / "img").iterdir()) == ["0001.jpg", "0002.jpg", "0003.jpg"]

    assert run_cli("jobs", "list") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if job_id in line)
    assert "SUCCEEDED" in row and "synth" in row

    assert run_cli("jobs", "status", job_id) == 0
    status = capsys.readouterr().out
    assert "status:      SUCCEEDED" in status and "working_dir: gcs://" in status

    assert run_cli("jobs", "logs", job_id) == 0
    assert "wrote 1 videos of 3 frames" in capsys.readouterr().out


@pytest.mark.timeout(240)
def test_submit_to_s3_passes_only_named_variables_and_never_prints_them(cluster_env, s3_env, s3_client, bucket,
                                                                        monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", DEAD_ADDRESS)  # --address must win over the environment
    names = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]
    env_flags = [arg for name in names for arg in ("--env", name)]
    code = run_cli("submit", "--address", cluster_env.address, "--wait", "--timeout", JOB_TIMEOUT_S, *env_flags,
                   "--", "synth", f"s3://{bucket}/synth", "--videos", "1", "--frames", "3")
    captured = capsys.readouterr()
    assert code == 0, captured.out
    keys = {obj["Key"] for obj in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"synth/synth-000/img/0003.jpg", "synth/synth-000/groundtruth_rect.txt"} <= keys
    job_id = _job_id(captured.out)
    outputs = [captured.out, captured.err]
    for argv in (["jobs", "status", job_id], ["jobs", "logs", job_id], ["jobs", "list"]):
        assert run_cli(*argv, "--address", cluster_env.address) == 0
        outputs.extend(capsys.readouterr())
    shown = "\n".join(outputs)
    assert "AWS_SECRET_ACCESS_KEY" in shown  # the names are shown ...
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in shown  # ... the values never


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target, expected", [
    ("ftp://nowhere/synth", "unsupported URI scheme 'ftp'"),
    ("s3://rolo-batch-no-such-bucket/synth", "the bucket does not exist"),
], ids=["unsupported-scheme", "missing-bucket"])
def test_a_failing_job_ends_failed_with_the_error_in_its_logs(cluster_env, s3_env, target, expected, capsys):
    env_flags = ["--env", "AWS_ENDPOINT_URL", "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]
    code = run_cli("submit", "--wait", "--timeout", JOB_TIMEOUT_S, *env_flags, "--", "synth", target,
                   "--videos", "1", "--frames", "3")
    out = capsys.readouterr().out
    assert code == 1
    assert expected in out
    final = out.strip().splitlines()[-1]
    assert " FAILED after " in final and "exit code 1" in final
    details = JobCluster.connect().info(_job_id(out))
    assert details.status.value == "FAILED" and details.driver_exit_code == 1
    assert expected in JobCluster.connect().logs(_job_id(out))


@pytest.mark.timeout(240)
def test_jobs_stop_stops_a_long_job(cluster_env, tmp_path, capsys):
    code = run_cli("submit", "--", "synth", str(tmp_path / "long"), "--videos", "50", "--frames", "5000")
    assert code == 0
    job_id = capsys.readouterr().out.strip()
    cluster = JobCluster.connect()
    deadline = time.monotonic() + 120
    while "Running entrypoint" not in cluster.logs(job_id):  # the stage's process has started
        assert time.monotonic() < deadline, cluster.logs(job_id)
        time.sleep(0.5)
    assert run_cli("jobs", "stop", job_id, "--timeout", JOB_TIMEOUT_S) == 0
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert cluster.info(job_id).status.value == "STOPPED"
    assert run_cli("jobs", "stop", job_id) == 0
    assert "already ended: STOPPED" in capsys.readouterr().out
    assert run_cli("jobs", "logs", "--follow", job_id, "--timeout", JOB_TIMEOUT_S) == 1


def test_wait_timeout_leaves_the_job_running(cluster_env, tmp_path, capsys):
    code = run_cli("submit", "--wait", "--timeout", "1", "--", "synth", str(tmp_path / "long"),
                   "--videos", "50", "--frames", "5000")
    captured = capsys.readouterr()
    assert code == EXIT_STILL_RUNNING
    assert "keeps running" in captured.err
    job_id = _job_id(captured.err)
    assert run_cli("jobs", "stop", job_id, "--timeout", JOB_TIMEOUT_S) == 0


def test_missing_token_says_what_to_set(cluster_env, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    assert run_cli("jobs", "list") == 2
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=token is set but no Ray auth token was found" in err
    for source in ("RAY_AUTH_TOKEN=", "RAY_AUTH_TOKEN_PATH=", "~/.ray/auth_token"):
        assert source in err
    assert "Traceback" not in err


def test_wrong_token_is_rejected_clearly(cluster_env, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert run_cli("jobs", "list") == 2
    err = capsys.readouterr().err
    assert "rejected the auth token from RAY_AUTH_TOKEN" in err and "not-the-token" not in err


def test_without_token_mode_the_error_says_to_set_it(ray_head, tmp_path):
    """A fresh process, as a user would run it, that forgot RAY_AUTH_MODE=token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_ADDRESS=ray_head.address, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "rolo_batch.cli", "jobs", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "requires token authentication" in result.stderr and "set RAY_AUTH_MODE=token" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_job_id_is_a_clear_error(cluster_env, capsys):
    assert run_cli("jobs", "status", "raysubmit_doesnotexist") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_the_job_runs_the_shipped_package_and_jobs_scripts_import_it(cluster_env, tmp_path):
    cluster = JobCluster.connect()
    runtime_env = build_runtime_env(SubmitConfig(stage="synth"), tmp_path)
    probe = ("import rolo_batch, rolo_batch.contracts as c; "
             "print('package:', rolo_batch.__file__); print('tables:', *c.available())")
    job_id = cluster.submit(entrypoint=f"python -c \"{probe}\" && (python jobs/pipeline.py --help; true)",
                            runtime_env=runtime_env, metadata={})
    assert cluster.wait(job_id, timeout_s=120).status.value == "SUCCEEDED"
    logs = cluster.logs(job_id)
    package_line = next(line for line in logs.splitlines() if line.startswith("package:"))
    assert "working_dir_files" in package_line and str(REPO_ROOT) not in package_line
    assert "tables: features scores tracks" in logs
    assert "usage: rolo-batch" in logs and "ModuleNotFoundError" not in logs


# --- a head without a job agent: a fault server in front of the real head ---------------------------------

def test_the_no_agent_answer_is_rays_own():
    job_head = Path(importlib.util.find_spec("ray").origin).parent / "dashboard" / "modules" / "job" / "job_head.py"
    assert f'text="{NO_AGENT_BODY}"' in job_head.read_text()


def _submitted_ids(plan: FaultPlan) -> set[str]:
    return {json.loads(body)["submission_id"] for body in plan.seen}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("plan", [
    FaultPlan(status=500, fail=2, only=SUBMIT_ENDPOINT, body=NO_AGENT_BODY),
    FaultPlan(status=500, fail=1, only=SUBMIT_ENDPOINT, body=NO_AGENT_BODY, forward_first=True),
], ids=["head-still-starting", "answer-lost-after-the-agent-took-it"])
def test_submit_waits_for_the_job_agent_and_makes_one_job(cluster_env, plan, capsys):
    with FaultProxy(cluster_env.address, plan) as proxy:
        code = run_cli("submit", "--address", proxy.url, "--", "schema", "tracks")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    job_id = captured.out.strip()
    waiting = [line for line in captured.err.splitlines() if "waiting for" in line]
    assert waiting == [f"rolo-batch: waiting for the Ray head's job agent at {proxy.url} (up to 1m00s): its job "
                       f"server answers 'No available agent to submit job'"]
    assert plan.requests == plan.failed + 1
    assert _submitted_ids(plan) == {job_id}  # every try named the same job ...
    cluster = JobCluster.connect(cluster_env.address)
    assert [job.submission_id for job in cluster.jobs()].count(job_id) == 1  # ... so there is one
    assert cluster.wait(job_id, timeout_s=120).status.value == "SUCCEEDED"


def test_submit_gives_up_on_a_head_without_job_agent_and_says_why(cluster_env, capsys, caplog):
    plan = FaultPlan(status=500, always=True, only=SUBMIT_ENDPOINT, body=NO_AGENT_BODY)
    with FaultProxy(cluster_env.address, plan) as proxy:
        started = time.monotonic()
        code = run_cli("submit", "--address", proxy.url, "--agent-wait", "3", "--", "schema", "tracks")
        elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == EXIT_CLUSTER_UNAVAILABLE != 2  # 2: configuration error
    assert 3 <= elapsed < 20 and plan.failed >= 3  # kept trying, for the bound and not much longer
    assert "configuration error" not in err and "ClusterUnavailableError" not in err  # told, not raised
    assert err.strip().splitlines()[-1].startswith(f"rolo-batch: cluster unavailable: the Ray head behind "
                                                   f"{proxy.url} still had no job agent after 3s")
    retries_logged = [r for r in caplog.records if "already exists, skipping upload" in r.getMessage()]
    assert len(retries_logged) <= 1  # Ray's client checks the working_dir on every try: only the first says so
    for cause in ("the head is still starting", "its dashboard agent failed to start",
                  "another Ray on the head machine already holds the agent's port",
                  "/tmp/ray/session_latest/logs/dashboard_agent.log and dashboard.log", "--temp-dir"):
        assert cause in err
    (submission_id,) = _submitted_ids(plan)
    assert f"nothing was submitted (submission id {submission_id})" in err
    assert submission_id not in {job.submission_id for job in JobCluster.connect(cluster_env.address).jobs()}


@pytest.mark.parametrize("case", ["wrong-token", "reused-submission-id"])
def test_configuration_errors_are_not_waited_on(cluster_env, monkeypatch, case, capsys):
    flags = []
    if case == "wrong-token":
        monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
        expected = "rejected the auth token from RAY_AUTH_TOKEN"
    else:  # the head's own 500, but not for a missing agent: the id is taken
        taken = JobCluster.connect().submit(entrypoint="true", runtime_env={}, metadata={}, agent_wait_s=0)
        flags = ["--submission-id", taken]
        expected = f"Job with submission_id {taken} already exists"
    started = time.monotonic()
    code = run_cli("submit", "--agent-wait", "60", *flags, "--", "schema", "tracks")
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and "rolo-batch: configuration error:" in err and expected in err, err
    assert "waiting for" not in err and elapsed < 15


# --- no cluster needed -----------------------------------------------------------------------------------

@pytest.mark.parametrize("items, environ, expected", [
    ([], {}, {}),
    (["A"], {"A": "1"}, {"A": "1"}),
    (["A=2"], {"A": "1"}, {"A": "2"}),
    (["A=x=y"], {}, {"A": "x=y"}),
    (["A="], {}, {"A": ""}),
    (["MISSING"], {}, ConfigError),
    (["1BAD"], {}, ConfigError),
    (["=v"], {}, ConfigError),
], ids=["none", "from-env", "explicit", "value-with-equals", "empty-value", "unset", "bad-name", "no-name"])
def test_env_flags(items, environ, expected):
    if expected is ConfigError:
        with pytest.raises(ConfigError):
            parse_env_flags(items, environ)
    else:
        assert parse_env_flags(items, environ) == expected


@pytest.mark.parametrize("flag, environ, expected", [
    (None, {}, "http://127.0.0.1:8265"),
    (None, {"RAY_ADDRESS": "http://head:8265/"}, "http://head:8265"),
    (None, {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}, "http://b:8265"),
    ("http://flag:8265", {"RAY_ADDRESS": "http://a:8265"}, "http://flag:8265"),
    (None, {"RAY_ADDRESS": "  "}, "http://127.0.0.1:8265"),
    (None, {"RAY_ADDRESS": "local"}, ConfigError),
], ids=["default", "ray-address", "api-server-address-first", "flag-wins", "blank", "local"])
def test_address_resolution(flag, environ, expected):
    if expected is ConfigError:
        with pytest.raises(ConfigError, match="embedded local Ray"):
            resolve_address(flag, environ)
    else:
        assert resolve_address(flag, environ) == expected


_TOKEN_CASES = [
    ({}, False, None),
    ({}, True, "default-token"),
    ({"RAY_AUTH_TOKEN_PATH": "{tmp}/named"}, True, "named-token"),
    ({"RAY_AUTH_TOKEN_PATH": "{tmp}/named", "RAY_AUTH_TOKEN": "env-token"}, True, "env-token"),
]


def _token_case_env(case_env: dict[str, str], tmp_path: Path, with_default: bool) -> dict[str, str]:
    home = tmp_path / ("home" if with_default else "empty-home")
    env = {k: v.format(tmp=tmp_path) for k, v in case_env.items()}
    env["HOME"] = str(home)
    return env


def test_token_sources_follow_rays_order_and_agree_with_rays_loader(tmp_path):
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("default-token\n")
    (tmp_path / "named").write_text("named-token\n")
    envs = [_token_case_env(env, tmp_path, with_default) for env, with_default, _ in _TOKEN_CASES]
    ours = [find_auth_token(env, Path(env["HOME"])) for env in envs]
    assert [t.value if t else None for t in ours] == [expected for _, _, expected in _TOKEN_CASES]
    assert "named-token" not in repr(ours[2]) and "RAY_AUTH_TOKEN_PATH" in ours[2].source
    # Ray's own loader, in a separate process (its token cache is process-wide), must agree.
    script = ("import json, os, sys\nfrom ray._raylet import AuthenticationTokenLoader as L\nout = []\n"
              "for env in json.loads(sys.argv[1]):\n"
              "    for k in ('RAY_AUTH_TOKEN', 'RAY_AUTH_TOKEN_PATH'): os.environ.pop(k, None)\n"
              "    os.environ.update(env); L.instance().reset_cache()\n"
              "    out.append(L.instance().get_raw_token(ignore_auth_mode=True) or None)\n"
              "print(json.dumps(out))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(envs)], env=clean, capture_output=True,
                            text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [expected for _, _, expected in _TOKEN_CASES]


def test_an_unreadable_token_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)


def test_staged_code_is_the_package_as_installed_and_nothing_else(tmp_path):
    staged = stage_code(tmp_path / "stage")
    top = sorted(p.name for p in staged.iterdir())
    assert top == sorted(["rolo_batch", "jobs", "pyproject.toml", "constraints.txt", "README.md"])
    for table in ("features", "tracks", "scores"):
        assert (staged / "rolo_batch" / "schemas" / f"{table}.json").is_file()
    for stage in ("extract", "train", "track", "score", "pipeline", "benchmark"):
        assert (staged / "jobs" / f"{stage}.py").is_file()
    assert not list(staged.rglob("__pycache__")) and not list(staged.rglob(".*"))


def test_package_dir_overlays_mirror_pyproject():
    package_dir = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    expected = {source: target.replace(".", "/") for target, source in package_dir.items() if target}
    assert PACKAGE_DIR_OVERLAYS == expected


def test_code_archive_has_one_top_level_folder(tmp_path):
    target = write_code_archive(str(tmp_path / "code"))
    assert target == str(tmp_path / "code" / f"rolo-batch-{__version__}.zip")
    names = zipfile.ZipFile(target).namelist()
    assert {name.split("/")[0] for name in names} == {f"rolo-batch-{__version__}"}
    assert f"rolo-batch-{__version__}/rolo_batch/schemas/features.json" in names
    assert f"rolo-batch-{__version__}/jobs/pipeline.py" in names


def test_entrypoint_quotes_arguments():
    command = entrypoint_command("synth", ["s3://b/x y", "--prefix", "it's"])
    import shlex

    assert shlex.split(command) == ["python", "-m", "rolo_batch.cli", "synth", "s3://b/x y", "--prefix", "it's"]


def test_runtime_env_for_each_way_of_shipping(tmp_path):
    source = build_runtime_env(SubmitConfig(stage="synth", env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"}), tmp_path)
    assert Path(source["working_dir"]).is_dir() and "pip" not in source
    assert redact_runtime_env(source)["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "***"}
    assert source["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}  # redaction copies, the job gets the value

    with_deps = build_runtime_env(SubmitConfig(stage="synth", with_deps=True), tmp_path / "deps")
    assert with_deps["pip"]["packages"] == pinned_dependencies(REPO_ROOT / "constraints.txt")

    package = build_runtime_env(SubmitConfig(stage="synth", ship="package", package_version="0.1.0"), tmp_path)
    assert package == {"pip": {"packages": ["rolo-batch==0.1.0"], "pip_check": False}}
    assert build_runtime_env(SubmitConfig(stage="synth", ship="installed"), tmp_path) == {}


def test_pinned_dependencies_match_constraints_and_leave_ray_to_the_cluster():
    from tests.test_packaging import pinned

    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    packages = pinned_dependencies(REPO_ROOT / "constraints.txt")
    assert packages and not any(p.lower().startswith("ray") for p in packages)
    for package in packages:
        name, version = package.split("==")
        assert pinned(constraints, name.split("[")[0]) == version


@pytest.mark.parametrize("kwargs", [
    {"stage": ""}, {"stage": "--videos"}, {"stage": "jobs"}, {"stage": "submit"},
    {"stage": "synth", "ship": "package"}, {"stage": "synth", "package_version": "1.0"},
    {"stage": "synth", "ship": "installed", "with_deps": True}, {"stage": "synth", "ship": "wheel"},
    {"stage": "synth", "env": {"BAD-NAME": "x"}}, {"stage": "synth", "entrypoint_num_gpus": -1},
    {"stage": "synth", "agent_wait_s": -1}, {"stage": "synth", "agent_wait_s": float("nan")},
], ids=["empty", "option-not-stage", "jobs", "submit", "package-no-version", "version-without-package",
        "deps-without-source", "unknown-ship", "bad-env-name", "negative-gpus", "negative-agent-wait",
        "nan-agent-wait"])
def test_submit_config_rejects(kwargs):
    with pytest.raises(ConfigError):
        SubmitConfig(**kwargs)


def test_submission_ids_have_rays_form_and_the_unavailable_error_survives_pickling():
    ids = {new_submission_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"raysubmit_[A-HJ-NP-Za-km-np-z1-9]{16}", i) for i in ids)
    error = pickle.loads(pickle.dumps(ClusterUnavailableError("http://head:8265", 60.0, "raysubmit_x")))
    assert (error.address, error.waited_s, error.submission_id) == ("http://head:8265", 60.0, "raysubmit_x")
    assert "after 1m00s" in str(error) and "raysubmit_x" in str(error)


def test_secret_values_stay_out_of_the_config_repr():
    assert "s3cr3t" not in repr(SubmitConfig(stage="synth", env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"}))


@pytest.mark.parametrize("argv, message", [
    (["--", "nosuchstage"], "unknown stage 'nosuchstage'"),
    (["--", "synth"], "invalid arguments for 'synth'"),
    (["--", "synth", "out", "--videos", "0"], "invalid arguments for 'synth'"),
    ([], "name the stage to run"),
], ids=["unknown-stage", "missing-argument", "bad-value", "no-stage"])
def test_a_wrong_stage_command_fails_before_connecting(argv, message, capsys):
    assert run_cli("submit", "--address", DEAD_ADDRESS, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot reach" not in err


def test_an_unreachable_cluster_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert run_cli("jobs", "list", "--address", DEAD_ADDRESS) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a Ray job server at {DEAD_ADDRESS}" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["submit", "--help"], ["examples:", "RAY_AUTH_MODE=token", "--env", "exit status", "--agent-wait"]),
    (["jobs", "--help"], ["examples:", "list", "status", "logs", "stop", "package"]),
])
def test_help_has_examples(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for fragment in expected:
        assert fragment in text
