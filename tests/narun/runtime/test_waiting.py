"""Broadcast.wait_until: the runtime's one wait for a condition or a deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from narun.errors import WaitTimeout
from narun.runtime.waiting import Broadcast

pytestmark = pytest.mark.timeout(10)


async def test_returns_at_once_when_the_condition_already_holds():
    changed = Broadcast()
    await changed.wait_until(lambda: True, timeout=0.0, who="w", what="nothing")


async def test_every_waiter_rechecks_its_own_condition_after_a_notify():
    changed, state = Broadcast(), {"version": 0}
    woke: list[int] = []

    async def waiter(want: int) -> None:
        await changed.wait_until(lambda: state["version"] >= want, timeout=5, who="w",
                                 what=f"version {want}")
        woke.append(want)

    tasks = [asyncio.ensure_future(waiter(v)) for v in (1, 2, 3)]
    await asyncio.sleep(0.01)
    for version in (1, 2, 3):
        state["version"] = version
        changed.notify()
        await asyncio.sleep(0.01)
        assert woke == list(range(1, version + 1))
    await asyncio.gather(*tasks)


async def test_the_timeout_names_who_waited_for_what_still_missing():
    changed, missing = Broadcast(), ["trainer 1"]
    began = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"^coordinator waited 0.2 s for step 4 from "
                                          r"\['trainer 1'\]$"):
        await changed.wait_until(lambda: not missing, timeout=0.2, who="coordinator",
                                 what=lambda: f"step 4 from {missing}")
    assert 0.19 < time.monotonic() - began < 1.0


async def test_notifies_do_not_extend_the_deadline():
    changed = Broadcast()

    async def chatter() -> None:
        while True:
            changed.notify()
            await asyncio.sleep(0.01)

    noise = asyncio.ensure_future(chatter())
    began = time.monotonic()
    try:
        with pytest.raises(WaitTimeout):
            await changed.wait_until(lambda: False, timeout=0.2, who="w", what="x")
    finally:
        noise.cancel()
    assert time.monotonic() - began < 0.5


async def test_an_exception_from_the_condition_ends_the_wait_as_is():
    changed, failed = Broadcast(), []

    def ready() -> bool:
        if failed:
            raise WaitTimeout("a shard's own timeout, which must not be taken for ours")
        return False

    waiting = asyncio.ensure_future(changed.wait_until(ready, timeout=5, who="w", what="x"))
    await asyncio.sleep(0.01)
    failed.append(True)
    changed.notify()
    with pytest.raises(WaitTimeout, match="a shard's own timeout"):
        await waiting


async def test_a_cancelled_waiter_leaves_nothing_behind():
    changed = Broadcast()
    waiting = asyncio.ensure_future(changed.wait_until(lambda: False, timeout=5, who="w",
                                                       what="x"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not changed._waiters


async def test_wait_reports_a_notify_or_a_timeout():
    changed = Broadcast()
    assert await changed.wait(0.01) is False
    asyncio.get_running_loop().call_later(0.01, changed.notify)
    assert await changed.wait(5) is True
