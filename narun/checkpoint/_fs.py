"""Durable file-system steps: fsync files and directories, hash files, atomic single files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open directories (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def temp_tag(kind: str = "tmp") -> str:
    """`<kind>-<host>-<pid>`: names the writer, so a stale temp entry can be told from a live
    one (the host part matters where several hosts share a checkpoint directory)."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
    return f"{kind}-{host}-{os.getpid()}"


_TEMP = re.compile(r"\.(?:tmp|old)-(\w+)-(\d+)")


def is_stale_temp(name: str) -> bool:
    """True for a temp entry written on this host by a process that no longer exists."""
    m = _TEMP.search(name)
    if m is None or m.end() != len(name):
        return False
    return writer_is_gone(m.group(1), int(m.group(2)))


def writer_is_gone(host: str, pid: int) -> bool:
    """True when (host, pid), as `temp_tag` wrote them, name a process of this host that no
    longer exists (another host's processes cannot be checked: False)."""
    if host != temp_tag().split("-")[1]:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temp file beside `path`, fsync it, rename it over `path`, fsync
    the directory: readers see the old file or the complete new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{temp_tag()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
