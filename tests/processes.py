"""Finding this test session's own Ray worker processes (never another session's on the same machine)."""

from __future__ import annotations

import os


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid and pid > 1 and seen < 64:
        if pid == ancestor:
            return True
        pid, seen = _parent(pid), seen + 1
    return False


def own_pids_titled(marker: bytes) -> list[int]:
    """PIDs of descendants of this process whose command line (Ray sets it to ``ray::<actor class>...``)
    contains ``marker``."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read()
        except OSError:
            continue
        if marker in title and _descends_from(int(entry), me):
            found.append(int(entry))
    return found
