"""Supervision: what failed in a job, and the one restart budget they all draw on.

The budget is job-wide (runtime.max_restarts), not per process: a job whose processes keep
dying is broken whichever process it is, and should fail with the whole story rather than
restart one process forever. Planned leaves (a worker's own SIGTERM) are replaced without
drawing on it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import structlog

from narun.errors import ActorDiedError

log = structlog.get_logger("narun.runtime")

HOST = socket.gethostname()


class RestartBudgetExhausted(ActorDiedError):
    """More processes failed than runtime.max_restarts allows; lists every failure."""


class StartupFailure(ActorDiedError):
    """A process exited with an error before it joined the job: misconfiguration, which a
    restart would only repeat."""


@dataclass(frozen=True)
class Failure:
    """One dead process: who, where, when, why."""

    role: str
    rank: int
    pid: int
    step: int  # the last step it reported (heartbeat or step_done), -1 before any
    reason: str  # "was killed by signal 9", "sent no heartbeat for 5.2 s", ...
    log_path: Path
    host: str = HOST

    def line(self) -> str:
        at = "before its first step" if self.step < 0 else f"at step {self.step}"
        return (f"{self.role} {self.rank} (pid {self.pid} on {self.host}) {self.reason} {at}; "
                f"log {self.log_path}")


class Supervisor:
    """Records failures; says whether the budget allows one more restart."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.failures: list[Failure] = []

    def record(self, failure: Failure) -> bool:
        """Log the failure; True when the budget still allows restarting it."""
        self.failures.append(failure)
        allowed = len(self.failures) <= self.max_restarts
        log.warning("actor.dead", role=failure.role, rank=failure.rank, pid=failure.pid,
                    host=failure.host, last_step=failure.step, reason=failure.reason,
                    restart=allowed, failures=len(self.failures),
                    max_restarts=self.max_restarts)
        return allowed

    def exhausted(self, tail: str = "") -> RestartBudgetExhausted:
        lines = "\n".join(f"  {i}. {f.line()}" for i, f in enumerate(self.failures, 1))
        return RestartBudgetExhausted(
            f"{len(self.failures)} process failure(s) exceed runtime.max_restarts "
            f"{self.max_restarts}; the job stops. Failures:\n{lines}"
            + (f"\nlast log:\n{tail}" if tail else ""))
