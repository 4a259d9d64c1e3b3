"""What the coordinator tells each process it starts: plain data, as JSON on the command line.

Nothing crosses a process boundary pickled: the job config travels as `to_dict(config)`;
each trainer rebuilds the model, data and optimizer from it (seeded, so identically), and
each shard only the optimizer and schedule, over the parameters' shapes, reading its slice
of the values from the coordinator's initial-state file or the checkpoint it resumes from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from narun.config import JobConfig, config_from_dict
from narun.errors import ConfigError


@dataclass
class WorkerSpec:
    """The job as one parameter-server shard or trainer sees it."""

    config: dict[str, Any]
    coordinator: str  # the coordinator's control endpoint
    bucket_bytes: int
    wait_timeout: float  # seconds any one wait may take before WaitTimeout
    shard_endpoints: list[str] = field(default_factory=list)  # trainers only
    resume: str | None = None  # checkpoint directory to start from
    # shards: the coordinator's initial-state file (narun.runtime.shard_start): the
    # parameters' names and shapes, and their initial values when the job started fresh
    init_state: str | None = None
    start_step: int | None = None  # ps-async: where a restarted trainer picks up
    stop_at: int | None = None  # the last step of this run, when before training.steps
    blas_threads: int | None = 1
    delays: dict[str, float] = field(default_factory=dict)  # rank -> seconds before each step
    # where other processes reach this one (a shard binds there): its host's address
    host: str = "127.0.0.1"
    # the job's CURVE pair (narun.runtime.jobkeys) across hosts; None on one host
    curve: dict[str, str] | None = None
    # pipeline stages: the directory they write checkpoint slices under (on their host)
    staging: str | None = None
    # a data-parallel pipeline's shards: each stage's parameter names (shard s holds stage s's)
    stage_names: list[list[str]] | None = None

    def job_config(self) -> JobConfig:
        return config_from_dict(self.config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"worker spec: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"worker spec: expected a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"worker spec: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

