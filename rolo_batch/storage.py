"""Storage: every input and output is a URI; this module is the only one that knows which store it is on.

Supported URIs: a local path (relative or absolute), ``file:///abs/path``, and ``s3://bucket/prefix``.
S3 honours the standard AWS variables, so any S3-compatible store works: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``), ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the usual credential chain
(environment, ``AWS_PROFILE``, instance profile / IRSA). Credentials are never logged or put in messages.

Guarantees:

- ``atomic_output`` / ``write_bytes``: a reader sees either the whole new file or none of it. The data is
  written to a hidden temporary name beside the target (``.<name>.tmp-<id>``, which table readers ignore),
  made durable (fsync on local disk; a completed upload on S3), then published under its final name.
- ``mark_done`` writes a unit's ``_done.json`` marker; call it only after the unit's data is published.
  ``is_done`` is what re-runs use to skip finished units.
- Transient failures (throttling, 5xx, dropped connections) are retried by the S3 client with backoff, and
  whole operations wrapped in ``retrying``; permanent ones (missing bucket, access denied, unsupported
  scheme) raise ``StorageError`` at once, with the URI and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from rolo_batch.errors import StorageError, TransientStorageError

DONE_MARKER = "_done.json"
# Transient failures: the S3 client retries each request (standard AWS backoff), and whole operations are
# retried on top; together they ride out an outage of about a minute, then fail with a clear error.
S3_CLIENT_ATTEMPTS = 5
OPERATION_ATTEMPTS = 3
_T = TypeVar("_T")


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)


def resolve(uri: str) -> Location:
    """Turn a local path, ``file://`` or ``s3://`` URI into a ``Location``.

    Raises ``StorageError`` for any other scheme.
    """
    uri = str(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(uri, "file:// URIs must be absolute (file:///path/to/dir)")
        path = os.path.abspath(os.path.expanduser(path))
        return Location(_local_fs(), path, path)
    if scheme == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise StorageError(uri, "an s3:// URI needs a bucket: s3://bucket/prefix")
        key = parsed.path.strip("/")
        path = f"{bucket}/{key}" if key else bucket
        return Location(_s3_fs(bucket, **_s3_settings()), path.rstrip("/"), f"s3://{path}".rstrip("/"))
    raise StorageError(uri, f"unsupported URI scheme {scheme!r}; use a local path, file:///path or s3://bucket/prefix")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``join("s3://b/out", "features", "x")`` -> ``"s3://b/out/features/x"``)."""
    base = str(uri).rstrip("/")
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    return "/".join([base, *clean]) if clean else base


def basename(uri: str) -> str:
    """The last path component of a URI."""
    return posixpath.basename(str(uri).rstrip("/"))


def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def _s3_settings() -> dict:
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
    # Part of the cache key so that a changed environment (a test, a new profile) gets a new client.
    return {"endpoint": endpoint, "region": region, "profile": env.get("AWS_PROFILE", ""),
            "key_id": env.get("AWS_ACCESS_KEY_ID", "")}


@functools.lru_cache(maxsize=64)
def _s3_fs(bucket: str, *, endpoint: str, region: str, profile: str, key_id: str) -> pafs.S3FileSystem:
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_CLIENT_ATTEMPTS)}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["region"] = region or "us-east-1"
    elif region:
        kwargs["region"] = region
    else:
        try:
            kwargs["region"] = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError) as exc:
            raise _classify(f"s3://{bucket}", exc) from None
    return pafs.S3FileSystem(**kwargs)


_PERMANENT = {
    "NO_SUCH_BUCKET": "the bucket does not exist; create it or fix the URI",
    "ACCESS_DENIED": "access denied; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                     "AWS_PROFILE or the instance role) and the bucket policy",
    "INVALID_ACCESS_KEY_ID": "the access key is not valid; check AWS_ACCESS_KEY_ID / AWS_PROFILE",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match; check AWS_SECRET_ACCESS_KEY / AWS_PROFILE",
    "INVALID_BUCKET_NAME": "the bucket name is not valid",
}
_TRANSIENT_PATTERNS = re.compile(
    r"SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|NETWORK_CONNECTION|REQUEST_TIMEOUT|THROTTL"
    r"|HTTP response code: 5\d\d|curlCode|Connection (refused|reset)|timed? ?out|UNKNOWN \(HTTP status 5\d\d\)",
    re.IGNORECASE,
)


def _classify(uri: str, exc: BaseException) -> StorageError:
    """Map a filesystem exception to a permanent or transient ``StorageError``."""
    text = str(exc)
    for code, advice in _PERMANENT.items():
        if code in text:
            return StorageError(uri, advice)
    if re.search(r"HTTP response code: 403|status code 403|\b403\b", text):
        return StorageError(uri, _PERMANENT["ACCESS_DENIED"])
    if _TRANSIENT_PATTERNS.search(text):
        return TransientStorageError(uri, f"transient storage failure: {_first_line(text)}")
    if isinstance(exc, FileNotFoundError):
        return StorageError(uri, "not found")
    return StorageError(uri, _first_line(text))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


@contextlib.contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise _classify(uri, exc) from exc


def retrying(operation: Callable[[], _T], *, what: str, attempts: int = OPERATION_ATTEMPTS,
             base_delay_s: float = 0.5, max_delay_s: float = 10.0) -> _T:
    """Run ``operation``, retrying ``TransientStorageError`` with jittered exponential backoff.

    Permanent errors propagate at once. ``what`` names the operation in the final error.
    """
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except TransientStorageError as exc:
            if attempt == attempts:
                raise TransientStorageError(exc.uri, f"{what}: still failing after {attempts} attempts: "
                                                     f"{exc.reason}") from exc
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            time.sleep(delay)
    raise AssertionError("unreachable")


# --- reading ---------------------------------------------------------------------------------------------

def exists(uri: str) -> bool:
    """Whether a file or directory exists at ``uri``."""
    loc = resolve(uri)
    with _storage_errors(uri):
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    loc = resolve(uri)
    with _storage_errors(uri):
        return loc.fs.get_file_info(loc.path).type == pafs.FileType.File


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri``."""
    loc = resolve(uri)

    def read() -> bytes:
        with _storage_errors(uri), loc.fs.open_input_stream(loc.path) as stream:
            return stream.read()

    return retrying(read, what=f"reading {uri}")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@dataclass(frozen=True)
class Entry:
    """One listed file or directory: its URI, base name, whether it is a directory, and its size in bytes."""

    uri: str
    name: str
    is_dir: bool
    size: int | None


def list_dir(uri: str, *, recursive: bool = False, missing_ok: bool = False) -> list[Entry]:
    """Entries under the directory ``uri``, sorted by URI.

    Raises ``StorageError`` when the directory (or bucket) does not exist, unless ``missing_ok``.
    """
    loc = resolve(uri)
    with _storage_errors(uri):
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            _raise_if_bucket_missing(loc)
            if missing_ok:
                return []
            raise StorageError(uri, "no such directory")
        if info.type == pafs.FileType.File:
            raise StorageError(uri, "is a file, expected a directory")
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=missing_ok))
    prefix = loc.path.rstrip("/") + "/"
    entries = []
    for item in infos:
        rel = item.path[len(prefix):] if item.path.startswith(prefix) else posixpath.basename(item.path)
        entries.append(Entry(uri=join(loc.uri, rel), name=posixpath.basename(item.path),
                             is_dir=item.type == pafs.FileType.Directory,
                             size=item.size if item.type == pafs.FileType.File else None))
    return sorted(entries, key=lambda e: e.uri)


def open_input_file(uri: str) -> pa.NativeFile:
    """A random-access input file (for Parquet readers and frame decoders)."""
    loc = resolve(uri)
    with _storage_errors(uri):
        return loc.fs.open_input_file(loc.path)


# --- writing ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[pa.NativeFile]:
    """A writable stream whose content appears at ``uri`` only if the ``with`` block completes.

    On any exception the temporary file is removed and nothing at ``uri`` changes. An existing file at ``uri``
    is replaced as a whole.
    """
    loc = resolve(uri)
    parent, name = posixpath.split(loc.path)
    tmp_path = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    with _storage_errors(uri):
        if loc.is_local:
            loc.fs.create_dir(parent, recursive=True)
        stream = loc.fs.open_output_stream(tmp_path)
    try:
        yield stream
        with _storage_errors(uri):
            stream.close()
            if loc.is_local:
                _fsync_path(tmp_path)
            loc.fs.move(tmp_path, loc.path)
            if loc.is_local:
                _fsync_path(parent, directory=True)
    except BaseException:
        with contextlib.suppress(Exception):
            if not stream.closed:
                stream.close()
        with contextlib.suppress(Exception):
            loc.fs.delete_file(tmp_path)
        raise


def remove_temporaries(dir_uri: str) -> int:
    """Delete the temporary files a crashed writer left in ``dir_uri`` (``.<name>.tmp-<id>``); return how many.

    Call it only where no other writer is at work (a unit of work owned by the caller)."""
    removed = 0
    for entry in list_dir(dir_uri, missing_ok=True):
        if not entry.is_dir and entry.name.startswith(".") and ".tmp-" in entry.name:
            delete(entry.uri)
            removed += 1
    return removed


def _fsync_path(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically, retrying transient failures."""

    def write() -> None:
        with atomic_output(uri) as stream:
            stream.write(data)

    retrying(write, what=f"writing {uri}")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str, *, missing_ok: bool = True) -> None:
    """Delete the file or directory tree at ``uri``."""
    loc = resolve(uri)
    with _storage_errors(uri):
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            if not missing_ok:
                raise StorageError(uri, "not found")
        elif info.type == pafs.FileType.Directory:
            loc.fs.delete_dir(loc.path)
        else:
            loc.fs.delete_file(loc.path)


def ensure_dir(uri: str) -> None:
    """Create the directory ``uri`` on local disk; on S3, check that the bucket exists (prefixes are implicit)."""
    loc = resolve(uri)
    with _storage_errors(uri):
        if loc.is_local:
            loc.fs.create_dir(loc.path, recursive=True)
        else:
            _raise_if_bucket_missing(loc)


def _raise_if_bucket_missing(loc: Location) -> None:
    """On an object store, a missing path may be a missing bucket: say so, since no retry will help."""
    if loc.is_local:
        return
    bucket = loc.path.split("/", 1)[0]
    if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise StorageError(loc.uri, _PERMANENT["NO_SUCH_BUCKET"])


# --- units of work ---------------------------------------------------------------------------------------

def mark_done(unit_uri: str, info: dict) -> None:
    """Publish the done marker of a unit of work (a directory), carrying ``info`` as JSON.

    Call only after every data file of the unit is published: the marker is what makes the unit count.
    """
    write_text(join(unit_uri, DONE_MARKER), json.dumps(info, indent=2, sort_keys=True, default=str))


def read_done(unit_uri: str) -> dict | None:
    """The info stored in a unit's done marker, or ``None`` when the unit is not done."""
    marker = join(unit_uri, DONE_MARKER)
    if not is_file(marker):
        return None
    return json.loads(read_text(marker))


def is_done(unit_uri: str) -> bool:
    """Whether the unit at ``unit_uri`` has a done marker."""
    return is_file(join(unit_uri, DONE_MARKER))
