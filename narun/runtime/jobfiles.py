"""A job's files on an agent's host, moved in chunks by `file_put` / `file_get` (SPEC.md 5).

Only paths inside the job's directory are reachable: each is checked to be relative and
made of plain names before it is joined, so a coordinator can move a shard's starting state
there and its checkpoint slices back, and nothing else on the host.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from narun.runtime.mailbox import ReplyError

CHUNK = 8 << 20  # bytes per file_put / file_get message
DATA_DIR = "data"  # what a coordinator ships to a job's directory goes under this
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def job_path(directory: Path, path: str) -> Path:
    """`directory`/`path`, refusing anything that could leave `directory`."""
    parts = path.split("/")
    if not path or any(not _NAME.fullmatch(p) or p in (".", "..") for p in parts):
        raise ReplyError("protocol", f"path {path!r}: expected names of letters, digits, "
                                     f"'.', '_' or '-' joined by '/', inside the job's "
                                     f"directory")
    return directory.joinpath(*parts)


def put_chunk(directory: Path, path: str, offset: int, data: np.ndarray | None,
              last: bool) -> int:
    """Write `data` at `offset` of PATH.part; `last`: fsync and rename it to PATH. Returns
    the bytes written so far."""
    target = job_path(directory, path)
    partial = target.with_name(target.name + ".part")
    if data is not None and (data.dtype != np.uint8 or data.ndim != 1 or data.size > CHUNK):
        raise ReplyError("protocol", f"file_put.data: expected 1-d uint8 of at most {CHUNK} "
                                     f"bytes, got {data.dtype} {data.shape}")
    if offset < 0 or (offset > 0 and (not partial.exists() or
                                      partial.stat().st_size != offset)):
        raise ReplyError("protocol", f"file_put {path}: offset {offset} does not continue "
                                     f"the file (start at 0, then send each chunk in order)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "r+b" if offset else "wb") as f:
        f.seek(offset)
        if data is not None:
            f.write(memoryview(data))
        size = f.tell()
        if last:
            f.flush()
            os.fsync(f.fileno())
    if last:
        os.replace(partial, target)
    return size


async def fetch_file(ask: Callable[[int], Awaitable[Any]], target: Path) -> Path:
    """Write a file fetched with `file_get` into `target`: `ask(offset)` sends the request
    for the piece at `offset` and returns its answer."""
    with open(target, "wb") as f:
        offset, eof = 0, False
        while not eof:
            answer = await ask(offset)
            data = answer["data"]
            await asyncio.to_thread(f.write, memoryview(data))
            offset += data.size
            eof = answer["eof"]
    return target


def get_chunk(directory: Path, path: str, offset: int, size: int,
              remove: bool = False) -> tuple[np.ndarray, bool]:
    """Up to `size` (at most CHUNK) bytes of PATH from `offset`, and whether they end it
    (then, with `remove`, the file is deleted)."""
    target = job_path(directory, path)
    try:
        with open(target, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            f.seek(offset)
            data = f.read(max(0, min(size, CHUNK)))
    except FileNotFoundError:
        raise ReplyError("not_found", f"no file {path!r} in the job's directory") from None
    eof = offset + len(data) >= total
    if eof and remove:
        target.unlink(missing_ok=True)
    return np.frombuffer(data, np.uint8), eof
