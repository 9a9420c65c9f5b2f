"""Cluster jobs: run a rolo-batch stage on a Ray cluster as a Ray Job, then follow, inspect and stop it.

Built on ``ray.job_submission.JobSubmissionClient`` (the cluster's dashboard/job server, ``http://<head>:8265``).

**Address.** ``--address`` if given, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` (the variables Ray's own
``ray job`` CLI reads), else ``http://127.0.0.1:8265``. Unlike Ray's client, an explicit ``--address`` wins over the
environment.

**Token authentication** (Ray 2.60). A cluster started with ``RAY_AUTH_MODE=token`` (or, with the mode unset, by
``ray start`` on a machine where a token already exists) answers 401/403 to requests without its token. As in
Ray, the client sends a token only when ``RAY_AUTH_MODE=token`` is set, and takes it from, in order:
``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``. A missing or rejected token is
a ``ConfigError`` that says what to set; the token's value never appears in output.

**A head without a job agent.** The job server hands each job to the head's job agent. While the head is still
starting, or when its agent could not start (e.g. another Ray on that machine holds the agent's port), it
answers ``500 No available agent to submit job``. Nothing was wrong with the request, so ``submit`` retries it
(with the same submission id, so a retry never makes a second job) for up to ``agent_wait_s``, saying once what
it waits for, then raises ``ClusterUnavailableError`` with the likely causes and where the head's logs are.
Every other refusal (bad address, token, a 4xx, a reused submission id) is a ``ConfigError`` at once.

**What a job runs and ships.** The entrypoint is ``python -m rolo_batch.cli <stage> <args>``, so every stage
(also one without a ``jobs/`` script) runs exactly as it does locally. The code travels in one of three ways:

- ``source`` (default): this checkout, staged as it installs: the ``rolo_batch`` package with its table
  contracts placed at ``rolo_batch/schemas`` (they live in ``schemas/`` in the checkout), plus ``jobs/``,
  ``pyproject.toml``, ``constraints.txt`` and ``README.md``, sent as the job's ``working_dir``. Nothing else of
  the checkout is shipped (no ``.venv``, ``.git``, tests, data or demo outputs). The cluster must already have the
  dependencies (``cluster/aws-cluster.yaml`` installs them), or ``with_deps`` adds them as a ``pip`` runtime env
  pinned to ``constraints.txt``.
- ``package``: no code is shipped; ``pip: ["rolo-batch==X"]`` installs a published version on the cluster.
- ``installed``: nothing is shipped; the cluster image already has rolo-batch installed.

**Environment.** A job inherits the cluster's environment (an instance profile or IRSA for S3 is the intended way
to reach buckets). Variables of this machine reach the job only when named explicitly (``--env NAME`` or
``--env NAME=VALUE``); their values are never printed (``jobs status`` masks them), but anyone who can query the
cluster's job server can read them, so prefer roles over keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import random
import re
import shlex
import shutil
import string
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, TextIO

from rolo_batch import __version__
from rolo_batch.console import format_duration, format_table
from rolo_batch.errors import ConfigError, RoloBatchError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

EXIT_SUCCEEDED = 0
EXIT_JOB_FAILED = 1
EXIT_STILL_RUNNING = 3
EXIT_CLUSTER_UNAVAILABLE = 4

DEFAULT_AGENT_WAIT_S = 60.0
_NO_AGENT = "No available agent to submit job"  # Ray 2.60's job server, when the head has no job agent
_AGENT_RETRY_S = (0.5, 5.0)  # first and longest pause between tries while waiting for the job agent
_HEAD_LOGS = "/tmp/ray/session_latest/logs"  # on the head node, unless it was started with --temp-dir
_SDK_LOGGER = "ray.dashboard.modules.dashboard_sdk"  # Ray's job client: logs the working_dir check of each try
# Ray's own form of a submission id (ray.dashboard.modules.job.job_manager.generate_job_id)
_ID_CHARACTERS = "".join(sorted(set(string.ascii_letters + string.digits) - set("IloO0")))

SHIP_SOURCE, SHIP_PACKAGE, SHIP_INSTALLED = "source", "package", "installed"
SHIP_MODES = (SHIP_SOURCE, SHIP_PACKAGE, SHIP_INSTALLED)

PACKAGE = "rolo_batch"
# Mirrors [tool.setuptools.package-dir] in pyproject.toml: checkout folder -> where it sits once installed.
PACKAGE_DIR_OVERLAYS = {"schemas": "rolo_batch/schemas"}
SHIPPED_EXTRAS = ("jobs", "pyproject.toml", "constraints.txt", "README.md")
_NOT_STAGES = frozenset({"submit", "jobs"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")
_TOKEN_SOURCES = (f"{TOKEN_ENV}=<token>, or {TOKEN_PATH_ENV}=<file holding it>, or the file ~/.ray/auth_token "
                  "(on the cluster's head node, `ray get-auth-token` prints it)")
_MASK = "***"


# --- errors ----------------------------------------------------------------------------------------------

class JobWaitTimeout(RoloBatchError):
    """Stopped waiting for a job that is still going; the job itself keeps running."""

    def __init__(self, job_id: str, status: str, waited_s: float) -> None:
        self.job_id = job_id
        self.status = status
        self.waited_s = waited_s
        super().__init__(f"job {job_id} is still {status} after {format_duration(waited_s)}; it keeps running "
                         f"(follow it: rolo-batch jobs logs --follow {job_id}; "
                         f"stop it: rolo-batch jobs stop {job_id})")

    def __reduce__(self):
        return (type(self), (self.job_id, self.status, self.waited_s))


class ClusterUnavailableError(RoloBatchError):
    """The job server answers but its head has no job agent to run a job, and none came up in time. Not a
    configuration error: the same command works once the head is healthy. Nothing was submitted."""

    def __init__(self, address: str, waited_s: float, submission_id: str) -> None:
        self.address = address
        self.waited_s = waited_s
        self.submission_id = submission_id
        super().__init__(
            f"the Ray head behind {address} still had no job agent after {format_duration(waited_s)} (its job "
            f"server answers '{_NO_AGENT}'); nothing was submitted (submission id {submission_id}). Likely "
            f"causes: the head is still starting (try again in a minute, or give --agent-wait more seconds), or "
            f"its dashboard agent failed to start, e.g. because another Ray on the head machine already holds the "
            f"agent's port (52365 unless `ray start --dashboard-agent-listen-port` says otherwise). The head's "
            f"logs say which: on the head node, {_HEAD_LOGS}/dashboard_agent.log and dashboard.log (under "
            f"<temp dir>/session_latest/logs if the head was started with --temp-dir)")

    def __reduce__(self):
        return (type(self), (self.address, self.waited_s, self.submission_id))


# --- address and token -----------------------------------------------------------------------------------

def resolve_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The job server URL: ``address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else
    ``http://127.0.0.1:8265``. Raises ``ConfigError`` for ``local``, which names an embedded Ray, not a cluster."""
    environ = os.environ if environ is None else environ
    candidates = [(address, "--address")] + [(environ.get(name), name) for name in ADDRESS_ENVS]
    for value, origin in candidates:
        if value and value.strip():
            value = value.strip().rstrip("/")
            if value == "local":
                raise ConfigError(f"{origin}=local names an embedded local Ray; a job needs a cluster's job server, "
                                  f"e.g. --address http://<head-node>:8265")
            return value
    return DEFAULT_ADDRESS


@dataclass(frozen=True)
class AuthToken:
    """A Ray auth token and where it was found. The value is kept out of ``repr`` and every message."""

    value: str = field(repr=False)
    source: str

    def header(self) -> dict[str, str]:
        """The HTTP header the Ray job server checks."""
        return {"Authorization": f"Bearer {self.value}"}


def token_auth_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``RAY_AUTH_MODE=token`` is set (the client side of Ray's token authentication)."""
    environ = os.environ if environ is None else environ
    return environ.get(AUTH_MODE_ENV, "").strip().lower() == "token"


def find_auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> AuthToken | None:
    """The token from Ray's sources in Ray's order: ``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; None when there is none. A ``RAY_AUTH_TOKEN_PATH`` that
    cannot be read or is empty is a ``ConfigError`` (Ray treats it as fatal too, rather than falling back)."""
    environ = os.environ if environ is None else environ
    value = environ.get(TOKEN_ENV, "").strip()
    if value:
        return AuthToken(value, TOKEN_ENV)
    named = environ.get(TOKEN_PATH_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        value = _read_token_file(path)
        if not value:
            raise ConfigError(f"{TOKEN_PATH_ENV}={path} does not name a readable, non-empty token file")
        return AuthToken(value, f"{TOKEN_PATH_ENV}={path}")
    default = (home or Path.home()) / ".ray" / "auth_token"
    value = _read_token_file(default)
    return AuthToken(value, str(default)) if value else None


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def required_token(environ: Mapping[str, str] | None = None) -> AuthToken | None:
    """The token to send: None unless ``RAY_AUTH_MODE=token``; then the token, or a ``ConfigError`` naming
    every place it can come from."""
    if not token_auth_requested(environ):
        return None
    token = find_auth_token(environ)
    if token is None:
        raise ConfigError(f"{AUTH_MODE_ENV}=token is set but no Ray auth token was found; set {_TOKEN_SOURCES}")
    return token


def _auth_message(exc: Exception, address: str, token: AuthToken | None) -> str:
    if token is not None and "failed" in str(exc).lower():
        return (f"the Ray cluster at {address} rejected the auth token from {token.source}: it is not this "
                f"cluster's token; set {_TOKEN_SOURCES}")
    if token is not None:
        return f"the Ray cluster at {address} did not accept the auth token from {token.source}: {exc}"
    hint = ""
    try:
        local = find_auth_token()
    except ConfigError:
        local = None
    if local is not None:
        hint = f" (a token exists in {local.source}, but it is sent only with {AUTH_MODE_ENV}=token)"
    return (f"the Ray cluster at {address} requires token authentication{hint}: set {AUTH_MODE_ENV}=token and "
            f"{_TOKEN_SOURCES}")


@contextlib.contextmanager
def _translated_errors(address: str, token: AuthToken | None) -> Iterator[None]:
    """Turn the job client's failures into ``ConfigError`` messages that say what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise ConfigError(_auth_message(exc, address, token)) from None
    except (ConnectionError, requests.exceptions.RequestException) as exc:
        raise ConfigError(f"cannot reach a Ray job server at {address} ({type(exc).__name__}); is the cluster up "
                          f"and is this its dashboard address (http://<head-node>:8265)? Set --address or "
                          f"RAY_ADDRESS") from None
    except RuntimeError as exc:
        raise ConfigError(f"the Ray job server at {address} refused the request: {_refusal(str(exc))}") from None


@contextlib.contextmanager
def _logger_level_restored(name: str) -> Iterator[logging.Logger]:
    logger = logging.getLogger(name)
    level = logger.level
    try:
        yield logger
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _address_env_hidden() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override its address argument; hide it while the address we resolved
    (which already honours the variables) is used."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENVS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _refusal(text: str) -> str:
    """The gist of the job client's ``Request failed with status code N: <body>.``: its first line, or, when the
    body is the server's traceback, the status and the traceback's last line (the exception)."""
    first = _first_line(text)
    if "Traceback (most recent call last)" not in text:
        return first
    meaningful = [line.strip() for line in text.splitlines() if line.strip(" .")]
    return f"{first.split('Traceback')[0].rstrip()} {meaningful[-1]}"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


# --- the job server --------------------------------------------------------------------------------------

class JobCluster:
    """One Ray cluster's job server: ``JobSubmissionClient`` with this project's address and token rules and
    errors that say what to do."""

    def __init__(self, client: "JobSubmissionClient", address: str, token: AuthToken | None) -> None:
        self._client = client
        self.address = address
        self.token = token

    @classmethod
    def connect(cls, address: str | None = None, environ: Mapping[str, str] | None = None) -> "JobCluster":
        """Connect to the job server named by ``address`` / the environment (see ``resolve_address``), sending
        the auth token when ``RAY_AUTH_MODE=token``. Raises ``ConfigError`` when it is unreachable or refuses
        the token."""
        from ray.job_submission import JobSubmissionClient

        url = resolve_address(address, environ)
        token = required_token(environ)
        headers = token.header() if token else {}
        with _translated_errors(url, token), _address_env_hidden():
            client = JobSubmissionClient(url, headers=headers)
        return cls(client, url, token)

    @contextlib.contextmanager
    def _calls(self) -> Iterator[None]:
        with _translated_errors(self.address, self.token):
            yield

    def submit(self, *, entrypoint: str, runtime_env: dict[str, Any], metadata: dict[str, str],
               submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
               entrypoint_num_gpus: float | None = None, agent_wait_s: float = DEFAULT_AGENT_WAIT_S,
               log: TextIO | None = None) -> str:
        """Submit one job; returns its submission id (``submission_id``, else a new one in Ray's form).

        While the head has no job agent, retries for up to ``agent_wait_s`` seconds (one line on ``log``, stderr
        by default, says so), then raises ``ClusterUnavailableError``. Each try can take the head up to 10 s
        of its own waiting. A longer wait rides out a head that is still starting; 0 fails on the first answer.
        """
        submission_id = submission_id or new_submission_id()
        deadline = _Deadline(agent_wait_s)
        pause_s, longest_pause_s = _AGENT_RETRY_S
        tries = 0
        with self._calls(), _logger_level_restored(_SDK_LOGGER) as sdk_logger:
            while True:
                tries += 1
                try:
                    return self._client.submit_job(
                        entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                        submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                        entrypoint_num_gpus=entrypoint_num_gpus)
                except RuntimeError as exc:
                    if tries > 1 and f"Job with submission_id {submission_id} already exists" in str(exc):
                        return submission_id  # an earlier try reached the agent after all: that job is ours
                    if _NO_AGENT not in str(exc):
                        raise
                if deadline.passed():
                    raise ClusterUnavailableError(self.address, deadline.elapsed(), submission_id)
                if tries == 1:
                    print(f"rolo-batch: waiting for the Ray head's job agent at {self.address} (up to "
                          f"{format_duration(agent_wait_s)}): its job server answers '{_NO_AGENT}'",
                          file=log or sys.stderr, flush=True)
                    sdk_logger.setLevel(logging.WARNING)  # each retry's "Package ... already exists" line
                time.sleep(min(pause_s, deadline.remaining()))
                pause_s = min(2 * pause_s, longest_pause_s)

    def info(self, job_id: str) -> "JobDetails":
        """The job's details (status, entrypoint, times, message, metadata, runtime_env)."""
        with self._calls():
            return self._client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        """Everything the job's entrypoint has printed so far."""
        with self._calls():
            return self._client.get_job_logs(job_id)

    def jobs(self) -> list["JobDetails"]:
        """The submitted jobs (not plain drivers), oldest first."""
        with self._calls():
            found = self._client.list_jobs()
        submitted = [job for job in found if job.submission_id]
        return sorted(submitted, key=lambda job: job.start_time or 0)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already finished."""
        with self._calls():
            return bool(self._client.stop_job(job_id))

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> "JobDetails":
        """Wait until the job has finished; raises ``JobWaitTimeout`` after ``timeout_s``."""
        return self._poll(job_id, None, _Printed(), _Deadline(timeout_s), poll_s, print_logs=False)

    def follow(self, job_id: str, out: TextIO, timeout_s: float | None = None,
               poll_s: float = 1.0) -> "JobDetails":
        """Stream the job's logs to ``out`` until it finishes and return its final details. Raises
        ``JobWaitTimeout`` after ``timeout_s``. Falls back to polling when the log stream breaks."""
        deadline = _Deadline(timeout_s)
        self.info(job_id)  # an unknown id fails here, clearly, before any streaming
        printed = _Printed()
        stream_broke = False
        try:
            with warnings.catch_warnings():  # Ray's log tail passes aiohttp a deprecated ssl=None
                warnings.filterwarnings("ignore", "ssl=None is deprecated", DeprecationWarning)
                asyncio.run(_tail_logs(self._client, job_id, out, printed, deadline))
        except (asyncio.TimeoutError, TimeoutError):
            pass
        except Exception as exc:  # a dropped websocket must not end the wait: poll instead
            print(f"rolo-batch: log stream interrupted ({type(exc).__name__}: {exc}); polling instead",
                  file=sys.stderr)
            stream_broke = True
        return self._poll(job_id, out, printed, deadline, poll_s, print_logs=stream_broke)

    def _poll(self, job_id: str, out: TextIO | None, printed: "_Printed", deadline: "_Deadline",
              poll_s: float, print_logs: bool) -> "JobDetails":
        while True:
            details = self.info(job_id)
            finished = details.status.is_terminal()
            if out is not None and (finished or print_logs):
                printed.write_new(self.logs(job_id), out)
            if finished:
                return details
            if deadline.passed():
                raise JobWaitTimeout(job_id, str(details.status.value), deadline.elapsed())
            time.sleep(poll_s)


@dataclass
class _Printed:
    """How many characters of a job's log have been written out (the stream and a poll share it)."""

    chars: int = 0

    def write(self, chunk: str, out: TextIO) -> None:
        out.write(chunk)
        out.flush()
        self.chars += len(chunk)

    def write_new(self, whole_log: str, out: TextIO) -> None:
        if len(whole_log) > self.chars:
            self.write(whole_log[self.chars:], out)


class _Deadline:
    """When to stop waiting (never, without a timeout)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.started = time.monotonic()
        self.timeout_s = timeout_s

    def remaining(self) -> float | None:
        return None if self.timeout_s is None else max(0.0, self.timeout_s - self.elapsed())

    def passed(self) -> bool:
        return self.remaining() == 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started


async def _tail_logs(client: "JobSubmissionClient", job_id: str, out: TextIO, printed: _Printed,
                     deadline: _Deadline) -> None:
    async def consume() -> None:
        async for chunk in client.tail_job_logs(job_id):
            printed.write(chunk, out)

    await asyncio.wait_for(consume(), deadline.remaining())


def new_submission_id() -> str:
    """A new job id of the form Ray gives one (``raysubmit_`` and 16 letters and digits), chosen before the
    first try so that every retry names the same job."""
    return "raysubmit_" + "".join(random.SystemRandom().choices(_ID_CHARACTERS, k=16))


def job_exit_code(details: "JobDetails") -> int:
    """0 for SUCCEEDED, 1 for FAILED or STOPPED."""
    return EXIT_SUCCEEDED if details.status.value == "SUCCEEDED" else EXIT_JOB_FAILED


def final_line(details: "JobDetails") -> str:
    """One line that ends every wait: ``job <id> SUCCEEDED after 12s`` or ``job <id> FAILED after 3s: <why>``."""
    line = f"job {details.submission_id} {details.status.value}"
    duration = _duration_s(details)
    if duration is not None:
        line += f" after {format_duration(duration)}"
    if details.status.value != "SUCCEEDED" and details.message:
        line += f": {_short_message(details.message)}"
    return line


def _short_message(message: str) -> str:
    """Ray appends the log tail to a failed job's message; keep the first sentence."""
    return _first_line(message).split(", last available logs")[0]


def _duration_s(details: "JobDetails") -> float | None:
    if not details.start_time:
        return None
    end = details.end_time or time.time() * 1000
    return max(0.0, (end - details.start_time) / 1000)


# --- what a job ships ------------------------------------------------------------------------------------

def parse_env_flags(items: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--env NAME`` (value taken from this machine's environment) and ``--env NAME=VALUE``."""
    environ = os.environ if environ is None else environ
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--env {name!r}: not a valid environment variable name")
        if not sep:
            if name not in environ:
                raise ConfigError(f"--env {name}: not set in this environment (give --env {name}=VALUE)")
            value = environ[name]
        result[name] = value
    return result


def entrypoint_command(stage: str, args: Sequence[str]) -> str:
    """The shell command a job runs: the stage through the package's CLI, arguments quoted."""
    return shlex.join(["python", "-m", "rolo_batch.cli", stage, *args])


def is_checkout(path: Path) -> bool:
    """Whether ``path`` is a rolo-batch source checkout (pyproject.toml beside the package)."""
    return (path / "pyproject.toml").is_file() and (path / PACKAGE / "__init__.py").is_file()


def local_checkout() -> Path | None:
    """The checkout this ``rolo_batch`` is imported from, or None when it is an installed package."""
    import rolo_batch

    root = Path(rolo_batch.__file__).resolve().parent.parent
    return root if is_checkout(root) else None


def stage_code(dest: Path, project_dir: Path | None = None) -> Path:
    """Copy the code a job needs into ``dest`` laid out as it installs: ``rolo_batch/`` with its contracts in
    ``rolo_batch/schemas``, and (from a checkout) ``jobs/``, ``pyproject.toml``, ``constraints.txt`` and
    ``README.md``. ``project_dir`` names a checkout; by default the one this package comes from, or the
    installed package alone. Returns ``dest``."""
    import rolo_batch

    if project_dir is not None and not is_checkout(project_dir):
        raise ConfigError(f"{project_dir} is not a rolo-batch checkout (no pyproject.toml and {PACKAGE}/ there)")
    root = project_dir if project_dir is not None else local_checkout()
    package_dir = root / PACKAGE if root is not None else Path(rolo_batch.__file__).resolve().parent
    shutil.copytree(package_dir, dest / PACKAGE, ignore=_IGNORED)
    if root is not None:
        for source, target in PACKAGE_DIR_OVERLAYS.items():
            if (root / source).is_dir():
                shutil.copytree(root / source, dest / target, ignore=_IGNORED, dirs_exist_ok=True)
        for name in SHIPPED_EXTRAS:
            _copy_if_present(root / name, dest / name)
    if not any((dest / PACKAGE / "schemas").glob("*.json")):
        raise ConfigError(f"no table contracts to ship: {package_dir} has no schemas/ and no checkout beside it")
    return dest


def _copy_if_present(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=_IGNORED)
    elif source.is_file():
        shutil.copy2(source, target)


def tree_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pinned_dependencies(constraints: Path | None) -> list[str]:
    """The package's runtime dependencies except Ray (which the cluster already runs), each pinned to its
    version in ``constraints`` (constraints.txt) where it appears there."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = _read_pins(constraints) if constraints is not None and constraints.is_file() else {}
    result = []
    for text in metadata.requires("rolo-batch") or []:
        requirement = Requirement(text)
        name = _normalise(requirement.name)
        if requirement.marker is not None or name == "ray":
            continue
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        result.append(f"{requirement.name}{extras}=={pins[name]}" if name in pins else str(requirement))
    return result


def _read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class SubmitConfig:
    """One stage to run as a Ray Job and how its code gets to the cluster; validated on construction.

    ``ship``: ``source`` sends this checkout (or ``project_dir``) as the working_dir, ``package`` installs
    ``rolo-batch==package_version`` with pip on the cluster, ``installed`` sends nothing. ``with_deps`` (source
    only) also pip-installs the pinned dependencies, for clusters running a stock Ray image. ``env`` holds the
    variables passed to the job; its values are secrets as far as this module is concerned. ``agent_wait_s``:
    how long to wait for a head that has no job agent yet (see ``JobCluster.submit``).
    """

    stage: str
    args: tuple[str, ...] = ()
    ship: str = SHIP_SOURCE
    project_dir: Path | None = None
    package_version: str | None = None
    with_deps: bool = False
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    agent_wait_s: float = DEFAULT_AGENT_WAIT_S

    def __post_init__(self) -> None:
        if not self.stage or self.stage.startswith("-"):
            raise ConfigError("name the stage to run after '--', e.g. rolo-batch submit -- synth s3://bucket/synth")
        if self.stage in _NOT_STAGES:
            raise ConfigError(f"'{self.stage}' is not a stage; a job runs one of the pipeline commands")
        if self.ship not in SHIP_MODES:
            raise ConfigError(f"ship must be one of {', '.join(SHIP_MODES)}, got {self.ship!r}")
        if (self.ship == SHIP_PACKAGE) != bool(self.package_version):
            raise ConfigError("a package version goes with ship='package' and only with it")
        if self.ship != SHIP_SOURCE and (self.project_dir is not None or self.with_deps):
            raise ConfigError("--working-dir and --with-deps apply only when shipping the source")
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ConfigError(f"env: {name!r} is not a valid environment variable name")
        for label, value in (("entrypoint CPUs", self.entrypoint_num_cpus),
                             ("entrypoint GPUs", self.entrypoint_num_gpus)):
            if value is not None and value < 0:
                raise ConfigError(f"{label} must be >= 0, got {value}")
        if not self.agent_wait_s >= 0:
            raise ConfigError(f"the wait for the job agent must be >= 0 seconds, got {self.agent_wait_s}")

    @property
    def entrypoint(self) -> str:
        return entrypoint_command(self.stage, self.args)

    @property
    def metadata(self) -> dict[str, str]:
        return {"rolo_batch_stage": self.stage, "rolo_batch_version": __version__, "rolo_batch_ship": self.ship}


def build_runtime_env(config: SubmitConfig, staging_dir: Path) -> dict[str, Any]:
    """The job's runtime_env (see the module docstring); stages the code under ``staging_dir`` when shipping
    source. Keep ``staging_dir`` until the job is submitted (the client uploads it then)."""
    runtime_env: dict[str, Any] = {}
    if config.ship == SHIP_SOURCE:
        root = config.project_dir or local_checkout()
        runtime_env["working_dir"] = str(stage_code(staging_dir / "rolo-batch", config.project_dir))
        if config.with_deps:
            constraints = root / "constraints.txt" if root is not None else None
            runtime_env["pip"] = {"packages": pinned_dependencies(constraints), "pip_check": False}
    elif config.ship == SHIP_PACKAGE:
        runtime_env["pip"] = {"packages": [f"rolo-batch=={config.package_version}"], "pip_check": False}
    if config.env:
        runtime_env["env_vars"] = dict(config.env)
    return runtime_env


def redact_runtime_env(runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy fit to print: every ``env_vars`` value replaced by ``***``."""
    shown = dict(runtime_env or {})
    if isinstance(shown.get("env_vars"), Mapping):
        shown["env_vars"] = {name: _MASK for name in shown["env_vars"]}
    return shown


def check_stage_command(stage: str, args: Sequence[str]) -> None:
    """Parse ``<stage> <args>`` with this rolo-batch's own CLI before anything is sent, so a typo fails here
    and not on the cluster. ``--help`` prints the stage's help and exits 0, as locally."""
    from rolo_batch import cli

    parser = cli.build_parser()
    stages = sorted(set(_subcommands(parser)) - _NOT_STAGES)
    if stage not in stages:
        raise ConfigError(f"unknown stage {stage!r}; choose one of: {', '.join(stages)}")
    try:
        parser.parse_args([stage, *args])
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        raise ConfigError(f"invalid arguments for '{stage}' (see the message above); nothing was submitted") from None


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def submit_stage(cluster: JobCluster, config: SubmitConfig, log: TextIO | None = None) -> str:
    """Build the runtime_env (staging the code), submit, and return the job id. Call ``check_stage_command``
    first to catch a wrong stage command before connecting."""
    log = log or sys.stderr
    with tempfile.TemporaryDirectory(prefix="rolo-batch-job-") as tmp:
        runtime_env = build_runtime_env(config, Path(tmp))
        shipping = _describe_shipping(config, runtime_env)
        print(f"rolo-batch: submitting '{config.stage}' to {cluster.address}: {shipping}", file=log, flush=True)
        return cluster.submit(entrypoint=config.entrypoint, runtime_env=runtime_env, metadata=config.metadata,
                              submission_id=config.submission_id, entrypoint_num_cpus=config.entrypoint_num_cpus,
                              entrypoint_num_gpus=config.entrypoint_num_gpus, agent_wait_s=config.agent_wait_s,
                              log=log)


def _describe_shipping(config: SubmitConfig, runtime_env: Mapping[str, Any]) -> str:
    if config.ship == SHIP_SOURCE:
        staged = Path(runtime_env["working_dir"])
        text = f"ships the source ({tree_size(staged) / 1024:.0f} KiB)"
        if config.with_deps:
            text += f" and pip-installs {len(runtime_env['pip']['packages'])} pinned dependencies"
    elif config.ship == SHIP_PACKAGE:
        text = f"pip-installs rolo-batch=={config.package_version}"
    else:
        text = "uses the rolo-batch installed on the cluster"
    if config.env:
        text += f"; env: {', '.join(sorted(config.env))} (values not shown)"
    return text


def write_code_archive(out_uri: str, project_dir: Path | None = None) -> str:
    """Write the staged code (as ``submit`` ships it) as a zip with one top-level folder, the form Ray takes
    for a remote ``working_dir`` (e.g. in a KubeRay RayJob). ``out_uri`` is a .zip URI or a folder URI, local or
    s3://. Returns the URI written."""
    from rolo_batch import storage

    name = f"rolo-batch-{__version__}"
    target = out_uri if out_uri.endswith(".zip") else storage.join(out_uri, f"{name}.zip")
    with tempfile.TemporaryDirectory(prefix="rolo-batch-zip-") as tmp:
        staged = stage_code(Path(tmp) / name, project_dir)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(staged.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(staged.parent).as_posix())
        storage.write_bytes(target, buffer.getvalue())
    return target


# --- CLI: rolo-batch submit ------------------------------------------------------------------------------

def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _address_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--address", metavar="URL",
                        help="the cluster's job server, e.g. http://<head-node>:8265 (default: "
                             f"$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    return parent


_AUTH_EPILOG = """\
token authentication (Ray 2.60): a cluster started with RAY_AUTH_MODE=token refuses requests without
its token. Set RAY_AUTH_MODE=token here too and give the token in RAY_AUTH_TOKEN, in a file named by
RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it)."""

_SUBMIT_EPILOG = f"""\
examples:
  rolo-batch submit --address http://127.0.0.1:8265 --wait -- synth s3://bucket/synth --videos 8
  RAY_ADDRESS=http://head:8265 rolo-batch submit -- extract s3://bucket/videos s3://bucket/out
  rolo-batch submit --env AWS_ENDPOINT_URL --wait -- inspect s3://bucket/videos
  rolo-batch submit --package-version 0.1.0 -- score s3://bucket/out

what runs: python -m rolo_batch.cli <stage> <args...> in the job, with the code shipped as working_dir
(default: rolo_batch/ with its contracts, jobs/, pyproject.toml, constraints.txt; no .venv, .git, tests
or data), or installed by pip (--package-version), or already on the cluster (--installed).

exit status with --wait: 0 job SUCCEEDED, 1 job FAILED or STOPPED, 2 configuration error (nothing
submitted, or the cluster unreachable), {EXIT_STILL_RUNNING} still running when --timeout ran out; with or
without --wait, {EXIT_CLUSTER_UNAVAILABLE} when the head had no job agent within --agent-wait (nothing submitted;
the message says what to check on the head).

{_AUTH_EPILOG}"""


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", parents=[_address_parent()], help="run a stage on a Ray cluster as a Ray Job",
        usage="rolo-batch submit [options] -- STAGE [ARGS ...]",
        description="Submit one rolo-batch stage (the same command and arguments as locally) to a Ray cluster\n"
                    "as a Ray Job. The stage's arguments are checked here first.",
        epilog=_SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                   help="stream the job's logs until it ends and exit with its status (default: --no-wait, "
                        "print the job id and return)")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help=f"with --wait: stop waiting after this long (exit {EXIT_STILL_RUNNING}; the job goes on)")
    ship = p.add_mutually_exclusive_group()
    ship.add_argument("--working-dir", type=Path, metavar="DIR",
                      help="the rolo-batch checkout to ship (default: the one this command runs from)")
    ship.add_argument("--package-version", metavar="VERSION",
                      help="ship no code; pip-install rolo-batch==VERSION on the cluster instead")
    ship.add_argument("--installed", action="store_true",
                      help="ship no code; use the rolo-batch installed in the cluster's image")
    p.add_argument("--with-deps", action="store_true",
                   help="also pip-install the dependencies pinned in constraints.txt (for a stock Ray image)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="pass a variable to the job, from this environment or as given (repeatable); values "
                        "are never printed. Nothing is passed unless named, e.g. --env AWS_ENDPOINT_URL")
    p.add_argument("--submission-id", metavar="ID",
                   help="the job's id (default: a new one in Ray's form, raysubmit_...)")
    p.add_argument("--agent-wait", type=_non_negative_float, default=DEFAULT_AGENT_WAIT_S, metavar="SECONDS",
                   help="how long to keep trying while the head has no job agent yet (still starting, or its "
                        f"agent failed), before giving up with exit {EXIT_CLUSTER_UNAVAILABLE} "
                        f"(default: {DEFAULT_AGENT_WAIT_S:.0f})")
    p.add_argument("--entrypoint-num-cpus", type=_non_negative_float, metavar="N",
                   help="CPUs reserved for the stage's driver process (default: 0)")
    p.add_argument("--entrypoint-num-gpus", type=_non_negative_float, metavar="N",
                   help="GPUs reserved for the stage's driver process (default: 0)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="STAGE [ARGS ...]",
                   help="the rolo-batch command to run, after '--'")
    p.set_defaults(handler=_run_submit)


def _submit_config(args: argparse.Namespace) -> SubmitConfig:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("name the stage to run after '--', e.g. rolo-batch submit -- synth s3://bucket/synth")
    ship = SHIP_PACKAGE if args.package_version else SHIP_INSTALLED if args.installed else SHIP_SOURCE
    project_dir = args.working_dir.expanduser().resolve() if args.working_dir else None
    return SubmitConfig(stage=command[0], args=tuple(command[1:]), ship=ship, project_dir=project_dir,
                        package_version=args.package_version, with_deps=args.with_deps,
                        env=parse_env_flags(args.env), submission_id=args.submission_id,
                        entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                        agent_wait_s=args.agent_wait)


def _run_submit(args: argparse.Namespace) -> int:
    config = _submit_config(args)
    if config.ship == SHIP_SOURCE:  # the local CLI is the shipped one: check the command before connecting
        check_stage_command(config.stage, config.args)
    cluster = JobCluster.connect(args.address)
    try:
        job_id = submit_stage(cluster, config)
    except ClusterUnavailableError as exc:
        print(f"rolo-batch: cluster unavailable: {exc}", file=sys.stderr)
        return EXIT_CLUSTER_UNAVAILABLE
    if not args.wait:
        print(job_id)
        print(f"rolo-batch: submitted job {job_id}; follow it: rolo-batch jobs logs --follow {job_id}",
              file=sys.stderr)
        return EXIT_SUCCEEDED
    print(f"rolo-batch: submitted job {job_id}; streaming its logs", file=sys.stderr, flush=True)
    return _follow_to_exit_code(cluster, job_id, args.timeout)


def _follow_to_exit_code(cluster: JobCluster, job_id: str, timeout_s: float | None) -> int:
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed" noise
    try:
        details = cluster.follow(job_id, sys.stdout, timeout_s)
    except JobWaitTimeout as exc:
        print(f"rolo-batch: {exc}", file=sys.stderr)
        return EXIT_STILL_RUNNING
    except KeyboardInterrupt:
        print(f"\nrolo-batch: stopped waiting; job {job_id} keeps running (stop it: rolo-batch jobs stop {job_id})",
              file=sys.stderr)
        return 130
    print(final_line(details), flush=True)
    return job_exit_code(details)


# --- CLI: rolo-batch jobs list|status|logs|stop|package --------------------------------------------------

_JOBS_EPILOG = f"""\
examples:
  rolo-batch jobs list
  rolo-batch jobs status raysubmit_AbC123
  rolo-batch jobs logs --follow raysubmit_AbC123
  rolo-batch jobs stop raysubmit_AbC123
  rolo-batch jobs package s3://bucket/code/        # working_dir zip for a KubeRay RayJob

{_AUTH_EPILOG}"""


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow and stop Ray Jobs",
                       description="The rest of a Ray Job's life cycle, on the cluster named by --address or "
                                   "RAY_ADDRESS.",
                       epilog=_JOBS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(title="actions", metavar="<action>", required=True)
    address = _address_parent()

    listing = actions.add_parser("list", parents=[address], help="the cluster's jobs, oldest first")
    listing.set_defaults(handler=_run_jobs_list)

    status = actions.add_parser("status", parents=[address], help="one job's status and details")
    status.add_argument("job_id", metavar="JOB_ID")
    status.set_defaults(handler=_run_jobs_status)

    logs = actions.add_parser("logs", parents=[address], help="a job's logs (--follow: until it ends)")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("--follow", action="store_true",
                      help="stream until the job ends and exit with its status (0 SUCCEEDED, 1 FAILED/STOPPED)")
    logs.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                      help=f"with --follow: stop after this long (exit {EXIT_STILL_RUNNING})")
    logs.set_defaults(handler=_run_jobs_logs)

    stop = actions.add_parser("stop", parents=[address], help="stop a running job")
    stop.add_argument("job_id", metavar="JOB_ID")
    stop.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                      help="wait until it has stopped (default: --wait)")
    stop.add_argument("--timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                      help="how long to wait (default: 60)")
    stop.set_defaults(handler=_run_jobs_stop)

    package = actions.add_parser(
        "package", help="write the code a job ships as a zip (for a remote working_dir)",
        description="Write rolo_batch/ (with its contracts), jobs/ and the pins as <OUT>/rolo-batch-<version>.zip "
                    "with one top-level folder: the form Ray takes for a remote working_dir (s3:// or https://), "
                    "as in cluster/kuberay-rayjob.yaml.")
    package.add_argument("out", metavar="OUT_URI", help="a folder URI or a .zip URI, local or s3://")
    package.add_argument("--working-dir", type=Path, metavar="DIR",
                         help="the checkout to package (default: the one this command runs from)")
    package.set_defaults(handler=_run_jobs_package)


def _run_jobs_list(args: argparse.Namespace) -> int:
    jobs = JobCluster.connect(args.address).jobs()
    if not jobs:
        print("no jobs")
        return 0
    rows = [{"job": job.submission_id, "status": job.status.value, "stage": _stage(job),
             "started": _clock(job.start_time), "duration": _duration_text(job), "command": _command(job.entrypoint)}
            for job in jobs]
    print(format_table(rows, ["job", "status", "stage", "started", "duration", "command"]))
    return 0


def _run_jobs_status(args: argparse.Namespace) -> int:
    details = JobCluster.connect(args.address).info(args.job_id)
    for label, value in describe_job(details):
        print(f"{label + ':':<13}{value}")
    return 0


def describe_job(details: "JobDetails") -> list[tuple[str, str]]:
    """Labelled lines about one job, secrets masked."""
    lines = [("job", str(details.submission_id)), ("status", details.status.value),
             ("stage", _stage(details)), ("entrypoint", details.entrypoint),
             ("started", _clock(details.start_time)), ("ended", _clock(details.end_time)),
             ("duration", _duration_text(details))]
    if details.driver_exit_code is not None:
        lines.append(("exit code", str(details.driver_exit_code)))
    if details.message:
        lines.append(("message", _short_message(details.message)))
    lines.append(("runtime_env", _runtime_env_text(details.runtime_env)))
    return lines


def _runtime_env_text(runtime_env: Mapping[str, Any] | None) -> str:
    shown = redact_runtime_env(runtime_env)
    if not shown:
        return "-"
    parts = []
    for key, value in shown.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def _stage(details: "JobDetails") -> str:
    return (details.metadata or {}).get("rolo_batch_stage", "-")


def _clock(epoch_ms: int | None) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if epoch_ms else "-"


def _duration_text(details: "JobDetails") -> str:
    duration = _duration_s(details)
    return format_duration(duration) if duration is not None else "-"


def _command(entrypoint: str) -> str:
    prefix = "python -m rolo_batch.cli "
    return entrypoint[len(prefix):] if entrypoint.startswith(prefix) else entrypoint


def _run_jobs_logs(args: argparse.Namespace) -> int:
    cluster = JobCluster.connect(args.address)
    if args.follow:
        return _follow_to_exit_code(cluster, args.job_id, args.timeout)
    cluster.info(args.job_id)  # an unknown id fails with a clear message rather than empty logs
    sys.stdout.write(cluster.logs(args.job_id))
    return 0


def _run_jobs_stop(args: argparse.Namespace) -> int:
    cluster = JobCluster.connect(args.address)
    if not cluster.stop(args.job_id):
        details = cluster.info(args.job_id)
        print(f"job {args.job_id} had already ended: {details.status.value}")
        return 0
    if not args.wait:
        print(f"asked job {args.job_id} to stop")
        return 0
    try:
        details = cluster.wait(args.job_id, args.timeout)
    except JobWaitTimeout as exc:
        print(f"rolo-batch: {exc}", file=sys.stderr)
        return EXIT_STILL_RUNNING
    print(final_line(details))
    return 0


def _run_jobs_package(args: argparse.Namespace) -> int:
    project_dir = args.working_dir.expanduser().resolve() if args.working_dir else None
    target = write_code_archive(args.out, project_dir)
    print(f"wrote {target}\nuse it as a job's runtime_env working_dir: {target}")
    return 0


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``submit`` and ``jobs`` subcommands to the ``rolo-batch`` parser's subparsers. Their handlers
    return exit codes and raise ``ConfigError`` for anything the user must fix."""
    _add_submit(sub)
    _add_jobs(sub)
