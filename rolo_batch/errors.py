"""The project's error taxonomy.

Three kinds of failure need different handling, so they are different types:

- ``InputError``: one input (a video, a file, a line of a file) is bad. The unit of work that read it fails,
  is reported by name, and the rest of the job goes on.
- ``StorageError``: a URI cannot be used (missing bucket, denied, unsupported scheme). Permanent: fail fast.
  ``TransientStorageError`` is the retryable kind (throttling, 5xx, dropped connection).
- ``ConfigError``: the command itself is wrong (bad option, contract mismatch). Fail before any cluster work.

Every error carries its context as fields and survives pickling across Ray workers.
"""

from __future__ import annotations


class RoloBatchError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(RoloBatchError, ValueError):
    """A bad input: names the video, the file and the line at fault where they are known."""

    def __init__(self, reason: str, *, video: str | None = None, path: str | None = None,
                 line: int | None = None) -> None:
        self.reason = reason
        self.video = video
        self.path = path
        self.line = line
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.video is not None:
            where.append(f"video {self.video!r}")
        if self.path is not None:
            where.append(f"{self.path}" + (f" line {self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def with_video(self, video: str) -> "InputError":
        """The same error, attributed to ``video`` (when the reader did not know its name)."""
        return InputError(self.reason, video=video, path=self.path, line=self.line)

    def __reduce__(self):
        return (_rebuild_input_error, (self.reason, self.video, self.path, self.line))


def _rebuild_input_error(reason, video, path, line) -> InputError:
    return InputError(reason, video=video, path=path, line=line)


class StorageError(RoloBatchError, OSError):
    """A URI that cannot be read or written, for a reason a retry will not fix."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")

    def __reduce__(self):
        return (type(self), (self.uri, self.reason))


class TransientStorageError(StorageError):
    """A storage failure that may pass (throttling, server error, dropped connection): retry with backoff."""


class ConfigError(RoloBatchError, ValueError):
    """A command, option or configuration that cannot work; raised before any work starts."""
