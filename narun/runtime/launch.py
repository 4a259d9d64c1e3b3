"""`narun launch`: one job's coordinator in the foreground, its processes on other hosts'
agents (narun.runtime.agents), supervised exactly as `narun train` supervises local ones."""

from __future__ import annotations

import secrets
from typing import Any

import uvloop

from narun.config import JobConfig
from narun.errors import ConfigError
from narun.events import JsonLinesReporter, Reporter
from narun.runtime.agents import AgentProcesses
from narun.runtime.coordinator import Coordinator
from narun.runtime.hosts import is_loopback, parse_hosts
from narun.runtime.pipeline import PipelineCoordinator
from protocol.keys import load_node_keys


def launch(cfg: JobConfig, keys: str | None = None, reporter: Reporter | None = None,
           resume: str | None = None, **options: Any) -> dict[str, Any]:
    """Run a ps-sync, ps-async or pipeline job over the agents in `cfg.runtime.hosts`; the
    `done` fields, as narun.runtime.train. `keys`: this node's key directory (its pair,
    and each agent's public key in authorized/HOST.key); required unless every host is
    loopback. `options` go to Coordinator."""
    hosts = parse_hosts(cfg.runtime.hosts, "runtime.hosts")
    node_keys = load_node_keys(keys) if keys else None
    if node_keys is None and not all(is_loopback(h.host) for h in hosts):
        raise ConfigError(
            "--keys: a job across hosts runs over CURVE and needs this node's keys: run "
            "`narun keys generate DIR --name coordinator`, authorize DIR/coordinator.key on "
            "each host (`narun keys authorize AGENT_KEYS coordinator.key`), authorize each "
            "agent's key here under its host (`narun keys authorize DIR HOST.key --name "
            "HOST`), then pass --keys DIR")
    reporter = reporter or JsonLinesReporter()
    job = f"{cfg.model.name}-{secrets.token_hex(4)}"

    def report(event: str, **fields: Any) -> None:
        # through the coordinator's reporter, which also records the run (narun.runlog);
        # the processes are made first, and report only once the job runs
        coordinator.reporter.emit(event, **fields)

    processes = AgentProcesses(hosts, node_keys, job, report)
    kind = PipelineCoordinator if cfg.runtime.mode == "pipeline" else Coordinator
    coordinator = kind(cfg, reporter, resume, processes=processes, **options)
    return uvloop.run(coordinator.run())
