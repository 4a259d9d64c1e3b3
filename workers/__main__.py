"""`python -m workers ROLE --rank R --spec JSON`: one process of a job, run by the coordinator.

ROLE is `ps` (a parameter-server shard), `trainer`, or `inference` (a worker of `narun
serve`). The spec is narun.runtime.spec's WorkerSpec as JSON (workers.inference's
InferenceSpec for `inference`). The process asks the kernel to kill it when its parent dies
(PR_SET_PDEATHSIG), so a coordinator killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

ROLES = ("ps", "trainer", "stage", "inference")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    p.add_argument("role", choices=ROLES)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--spec", required=True,
                   help="the WorkerSpec as JSON, or @PATH of a file holding it (an agent's "
                        "way: the spec may carry the job's CURVE secret, which the command "
                        "line would show to every user of the host)")
    p.add_argument("--parent", type=int, default=None, help="die when this pid goes away")
    args = p.parse_args(argv)
    if args.parent is not None:
        from narun._process import die_with_parent

        die_with_parent(args.parent)
    # The coordinator stops workers with `shutdown` messages; a terminal's Ctrl-C reaches the
    # whole process group, and must not kill a worker before the coordinator drains it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from narun import logs
    from narun._process import tune_process

    # Before any thread exists (ZeroMQ's I/O threads included): received tensor frames then
    # reuse freed memory instead of page-faulting fresh pages on every step.
    tune_process()
    from narun.runtime.actor import run_actor
    from narun.runtime.spec import WorkerSpec

    logs.configure(json_lines=True, level=os.environ.get("NARUN_LOG_LEVEL", "warning"))
    import narun.models  # noqa: F401  (registers model config fields)

    text = args.spec
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    if args.role == "inference":
        from workers.inference import main as run_inference

        return run_inference(args.rank, text)
    spec = WorkerSpec.from_json(text)
    if args.role == "ps":
        from workers.parameter_server import ParameterServer
        actor: object = ParameterServer(args.rank, spec)
    elif args.role == "stage":
        from workers.stage import Stage
        actor = Stage(args.rank, spec)
    else:
        from workers.trainer import Trainer
        actor = Trainer(args.rank, spec)
    return run_actor(actor)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
