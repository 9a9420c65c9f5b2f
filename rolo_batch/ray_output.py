"""Where Ray's own output goes: a log file, so that the console shows rolo-batch's progress and results only.

Three streams reach a driver's terminal from Ray: the Python loggers of the ``ray`` packages in the driver
(Ray Data's execution plans, Ray Train's controller, ``tqdm is not installed``), the stdout/stderr of every
worker and actor, which Ray forwards to the driver (``(PlacementGroupCleaner pid=...) ...``, a Train worker's
prints), and Ray Data's progress bars; besides, native code writes to the process's stderr (Ray's C++ core
worker). ``send_ray_output_to_file`` sends the loggers, the forwarded output and the native stderr to one
file and turns the bars off (each stage prints its own progress line); the CLI's ``--verbose`` skips it.

The forwarded worker lines are taken over at Ray's own dispatcher of worker output
(``ray._private.ray_logging.global_worker_stdstream_dispatcher``, the handler ``ray.init`` installs under the
name ``ray_print_logs``) with Ray 2.60 pinned; ``tests/test_console.py`` fails if a Ray upgrade moves it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, TextIO

_RAY_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives its handler of forwarded worker output


@dataclass
class RayLogFile:
    """The open log file Ray's output goes to (``path`` is local; ``publish_uri``: where it is copied at the end,
    for an output root in a bucket), and how to give Ray its console back."""

    path: str
    publish_uri: str | None = None
    stream: TextIO | None = None
    _restore: list = field(default_factory=list)

    def take_worker_output(self) -> None:
        """Write the output Ray forwards from workers and actors here instead of the console (after
        ``ray.init``, which installs Ray's own printer of it)."""
        from ray._private import ray_logging

        lock = threading.Lock()

        def write_worker_lines(data: Mapping[str, Any]) -> None:
            who = data.get("actor_name") or data.get("task_name") or ""
            prefix = f"({who} pid={data.get('pid')}) " if who else f"(pid={data.get('pid')}) "
            with lock:
                if self.stream is not None:
                    for line in data.get("lines", []):
                        self.stream.write(prefix + line + "\n")

        dispatcher = ray_logging.global_worker_stdstream_dispatcher
        previous_handlers = list(dispatcher.handlers)
        dispatcher.remove_handler(_RAY_PRINT_HANDLER)
        dispatcher.add_handler(_RAY_PRINT_HANDLER, write_worker_lines)
        self._restore.append(lambda: setattr(dispatcher, "handlers", previous_handlers))

    def close(self) -> None:
        """Give Ray its console back, close the file, and copy it to ``publish_uri`` if set."""
        if self.stream is None:
            return
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        self.stream.flush()
        self.stream.close()
        self.stream = None
        if self.publish_uri:
            from rolo_batch import storage

            with open(self.path, "rb") as handle:
                storage.write_bytes(self.publish_uri, handle.read())


def log_file_location(out_uri: str | None, command: str) -> tuple[str, str | None]:
    """``(local path, URI to publish to or None)`` of the log of one ``command`` run writing under
    ``out_uri``: ``<out>/logs/<command>-<UTC time>.log``; a bucket's log is written locally first."""
    from rolo_batch import storage

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{command}-{stamp}-{os.getpid()}.log"
    if out_uri and storage.resolve(out_uri).is_local:
        folder = os.path.join(storage.resolve(out_uri).path, "logs")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name), None
    import tempfile

    local = os.path.join(tempfile.gettempdir(), f"rolo-batch-{name}")
    return local, storage.join(out_uri, "logs", name) if out_uri else None


def send_ray_output_to_file(path: str, publish_uri: str | None = None) -> RayLogFile:
    """Route Ray's driver-side log records to the file at ``path`` (appended to) and turn Ray Data's progress
    bars off; call before ``ray.init`` (which logs too), then ``RayLogFile.take_worker_output`` after it.
    Returns the open file."""
    import ray
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which are then redirected here)

    stream = open(path, "a", encoding="utf-8", buffering=1)
    sink = RayLogFile(path, publish_uri, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in _ray_loggers():
        before = list(logger.handlers)
        for existing in before:
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                logger.removeHandler(existing)
        if logger.name in ("ray", "ray.data") or not logger.propagate:
            logger.addHandler(handler)
        sink._restore.append(lambda logger=logger, before=before: setattr(logger, "handlers", before))

    _take_native_stderr(sink)
    context = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, "print_on_execution_start": False}
    previous_settings = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    sink._restore.append(lambda: [setattr(context, k, v) for k, v in previous_settings.items()])
    return sink


def _take_native_stderr(sink: RayLogFile) -> None:
    """Point file descriptor 2 at the log, and ``sys.stderr`` at the terminal it was: what native code writes
    to stderr (Ray's C++ core worker in this process, e.g. its warning about actor constructor arguments for
    every Ray Data actor pool; the processes ``ray.init`` starts) goes to the log, rolo-batch's own lines do
    not. Only when ``sys.stderr`` is the process's own stderr (not under a test's capture)."""
    import sys

    if sys.stderr is not sys.__stderr__ or sink.stream is None:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    terminal = os.fdopen(terminal_fd, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    sink.stream.flush()
    os.dup2(sink.stream.fileno(), 2)
    sys.stderr = terminal

    def give_back() -> None:
        terminal.flush()
        os.dup2(terminal_fd, 2)
        sys.stderr = sys.__stderr__
        terminal.close()

    sink._restore.append(give_back)


def _ray_loggers() -> list[logging.Logger]:
    names = [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    return [logging.getLogger(n) for n in sorted(names)]
