"""What every process of a data-parallel job has: the job built from its spec."""

from __future__ import annotations

from narun.runtime.actor import Actor
from narun.runtime.buckets import plan_for
from narun.runtime.spec import WorkerSpec
from narun.train import build_job, restore


class JobActor(Actor):
    """An actor of a data-parallel job. The job (model, data, optimizer, schedule) is built
    from the spec's config, seeded, so every process starts from the same parameters; it is
    restored from `spec.resume` when given; `plan` cuts its parameters into buckets the same
    way in every process."""

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        cfg = spec.job_config()
        super().__init__(rank, spec.coordinator, cfg.runtime.heartbeat_interval,
                         cfg.runtime.heartbeat_timeout)
        self.spec = spec
        self.cfg = cfg
        self.job = build_job(cfg)
        self.start = restore(self.job, spec.resume) if spec.resume else 0
        self.plan = plan_for(self.job.model, cfg.runtime.ps_shards, spec.bucket_bytes)
