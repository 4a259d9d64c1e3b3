"""Child processes: nothing they write can block them."""

from __future__ import annotations

import asyncio
import sys

import pytest

from narun.runtime.launcher import Child

pytestmark = pytest.mark.timeout(30)

CHATTY = """
import json, sys
print(json.dumps({"endpoint": "tcp://127.0.0.1:1"}), flush=True)
for i in range(20000):  # ~1 MB: far past a pipe's 64 KiB
    print(f"line {i} of a chatty child's stdout, which nobody asked for", flush=True)
"""


async def test_a_chatty_child_never_blocks_on_its_stdout(tmp_path):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHATTY,
                                                stdout=asyncio.subprocess.PIPE)
    child = Child("ps", 0, proc, tmp_path / "ps-0.log")
    assert await child.read_endpoint(10) == "tcp://127.0.0.1:1"
    forward = asyncio.ensure_future(child.forward_stdout())
    assert await asyncio.wait_for(child.wait(), 20) == 0  # blocks forever if nobody reads
    await asyncio.wait_for(forward, 5)
    lines = (tmp_path / "ps-0.log").read_text().splitlines()
    assert len(lines) == 20000 and lines[-1].startswith("line 19999 ")
