"""What every process of a data-parallel job has: its spec and the job's config."""

from __future__ import annotations

import asyncio
import json
import sys

from narun.errors import ActorDiedError
from narun.runtime.actor import Actor
from narun.runtime.jobkeys import JobKeys
from narun.runtime.spec import WorkerSpec


class JobActor(Actor):
    """An actor of a data-parallel job. A trainer builds the whole job from `cfg`; a shard
    only what its slice needs (narun.runtime.shard_start). Both cut the parameters into
    the same buckets, since both plan from the same names and shapes in model order."""

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        cfg = spec.job_config()
        super().__init__(rank, spec.coordinator, cfg.runtime.heartbeat_interval,
                         cfg.runtime.heartbeat_timeout)
        self.spec = spec
        self.cfg = cfg
        self.job_keys = JobKeys.from_spec(spec.curve)


async def read_endpoints(who: str, key: str) -> list[str]:
    """The endpoints `key` names in one JSON line the coordinator writes to our stdin (the
    shards' for a trainer, every stage's for a stage)."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise ActorDiedError(f"{who}: stdin closed before the coordinator sent {key}")
    return [str(e) for e in json.loads(line)[key]]
