"""Background tasks: a failure is logged with its traceback and reaches the owner."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from narun.runtime.tasks import Background

pytestmark = pytest.mark.timeout(10)


class Expected(Exception):
    pass


async def test_an_unexpected_exception_is_logged_and_reaches_the_owner():
    failures: list[BaseException] = []
    tasks = Background("ps 2", on_error=failures.append)

    async def watchdog() -> None:
        raise KeyError("bucket b9")

    with capture_logs() as logs:
        tasks.spawn(watchdog(), "watchdog")
        await asyncio.sleep(0.01)
    assert [repr(e) for e in failures] == ["KeyError('bucket b9')"]
    failed = [e for e in logs if e["event"] == "runtime.task_failed"]
    assert len(failed) == 1 and failed[0]["task"] == "ps 2: watchdog"
    assert failed[0]["log_level"] == "error" and failed[0]["exc_info"] is failures[0]
    assert len(tasks) == 0


async def test_expected_exceptions_and_cancellation_are_not_failures():
    failures: list[BaseException] = []
    tasks = Background("coordinator", on_error=failures.append, expected=(Expected,))

    async def rolls_back() -> None:
        raise Expected()

    async def forever() -> None:
        await asyncio.Event().wait()

    with capture_logs() as logs:
        tasks.spawn(rolls_back(), "replace trainer 1")
        tasks.spawn(forever(), "watchdog")
        await asyncio.sleep(0.01)
        assert len(tasks) == 1
        tasks.cancel()
        await asyncio.sleep(0.01)
    assert failures == [] and logs == [] and len(tasks) == 0


async def test_tasks_are_held_until_they_end():
    tasks = Background("x", on_error=lambda e: None)
    finished = []

    async def work() -> None:
        await asyncio.sleep(0.01)
        finished.append(True)

    tasks.spawn(work(), "work")
    assert len(tasks) == 1
    import gc

    gc.collect()  # asyncio holds tasks weakly: an unheld task could vanish here
    await asyncio.sleep(0.05)
    assert finished == [True] and len(tasks) == 0
