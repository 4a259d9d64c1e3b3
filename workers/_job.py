"""What every process of a data-parallel job has: its spec and the job's config."""

from __future__ import annotations

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
