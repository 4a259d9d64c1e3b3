"""The job service's commands: `narun coordinator` (the service) and its clients' `narun
submit`, `status`, `logs`, `cancel` (narun.client underneath)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def cmd_coordinator(args: argparse.Namespace) -> int:
    from narun.runtime.hosts import parse_hosts, tcp_address
    from narun.runtime.service import DEFAULT_PORT, JobService, run_service
    from protocol.keys import load_node_keys

    hosts = None if args.hosts in (None, "local") else parse_hosts(args.hosts)
    keys = load_node_keys(args.keys) if args.keys else None
    service = JobService(tcp_address(args.listen, DEFAULT_PORT, "--listen"),
                         Path(args.state_dir).expanduser(), args.slots, hosts=hosts,
                         keys=keys, keys_dir=args.keys, metrics_port=args.metrics_port)
    return run_service(service)


def _client(args: argparse.Namespace) -> Any:
    from narun.client import Client

    return Client(args.coordinator, keys=args.keys)


def cmd_submit(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with _client(args) as client:
            job = await client.submit(args.config, name=args.name, overrides=args.set)
            if not args.follow:
                print(job)
                return 0
            return await _follow(client, job, 0, args.json)

    return _run(main)


def cmd_status(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with _client(args) as client:
            if args.job:
                status = await client.status(args.job)
                rows = [status]
            else:
                rows = await client.list()
            if args.json:
                for s in rows:
                    print(json.dumps(s.__dict__))
                return 0
            table = [("JOB", "STATE", "STEP", "MESSAGE")] + [
                (s.job, s.state, f"{s.step}/{s.steps}", s.message) for s in rows]
            widths = [max(len(r[i]) for r in table) for i in range(3)]
            for r in table:
                print("  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3])
            return 0

    return _run(main)


def cmd_logs(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with _client(args) as client:
            if args.follow:
                return await _follow(client, args.job, args.since, True)
            # What there is now: the service sends a job's stored events at once, so a
            # pause of half a second means they have all arrived (a running job goes on).
            events = client.events(args.job, args.since)
            try:
                while True:
                    async with asyncio.timeout(0.5):
                        event = await anext(events)
                    print(json.dumps(event), flush=True)
            except (StopAsyncIteration, TimeoutError):
                return 0
            finally:
                await events.aclose()

    return _run(main)


def cmd_fetch(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with _client(args) as client:
            print(await client.fetch_checkpoint(args.job, args.out))
            return 0

    return _run(main)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with _client(args) as client:
            status = await client.cancel(args.job, args.reason)
            print(f"{status.job}: {status.state} ({status.message})")
            return 0

    return _run(main)


async def _follow(client: Any, job: str, since: int, as_json: bool) -> int:
    """Print the job's events as `narun train` does (progress bar, or JSON lines); the exit
    code `narun train` would have given."""
    from narun.events import make_reporter

    reporter = make_reporter(True if as_json else None)
    started = False
    async for event in client.events(job, since):
        kind = event.pop("event")
        event.pop("seq", None)
        if not started and kind == "step":
            reporter.start(event.get("steps", 0) or (await client.status(job)).steps,
                           event["step"] - 1)
            started = True
        reporter.emit(kind, **event)
    final = await client.status(job)
    if not as_json:
        print(f"{final.job}: {final.state}" + (f" ({final.message})" if final.message else ""),
              file=sys.stderr)
    return {"done": 0, "cancelled": EXIT_INTERRUPTED}.get(final.state, EXIT_FAILURE)


def _run(main: Any) -> int:
    import uvloop

    try:
        return uvloop.run(main())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def add_commands(sub: Any) -> None:
    """The service and client subcommands, added to `narun`'s parser."""
    c = sub.add_parser("coordinator", help="the job service: queue, run and keep jobs for "
                                           "clients (narun submit, narun.client)")
    c.add_argument("--listen", default="tcp://127.0.0.1:7700", metavar="tcp://ADDR:PORT",
                   help="where clients connect (default %(default)s); any address but "
                        "loopback needs --keys")
    c.add_argument("--hosts", metavar="H1,H2|local",
                   help="run jobs over these agents (narun launch); 'local' or omitted: on "
                        "this machine")
    c.add_argument("--keys", metavar="DIR",
                   help="this service's key pair; DIR/authorized/ holds the clients it "
                        "admits and the agents' keys under their hosts")
    c.add_argument("--state-dir", default="~/.local/state/narun/coordinator", metavar="DIR",
                   help="jobs' configs, states, events and (relative) out_dirs "
                        "(default %(default)s)")
    c.add_argument("--slots", type=int, metavar="N",
                   help="processes it runs at once over all jobs (default: this machine's "
                        f"cores, {os.cpu_count()}; with --hosts, the agents' free slots)")
    c.add_argument("--metrics-port", type=int, metavar="P",
                   help="serve Prometheus metrics at http://LISTEN-HOST:P/metrics (0: any "
                        "free port, logged)")
    c.set_defaults(fn=cmd_coordinator)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--coordinator", metavar="ADDR",
                       help="the job service (default $NARUN_COORDINATOR, else "
                            "tcp://127.0.0.1:7700)")
        p.add_argument("--keys", metavar="DIR",
                       help="this client's key pair, and the service's public key filed "
                            "under its host in DIR/authorized/")

    s = sub.add_parser("submit", help="queue a job on the job service; prints its id")
    s.add_argument("config", help="YAML job config")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    s.add_argument("--name", help="the job's name (default: the config file's)")
    s.add_argument("--follow", action="store_true",
                   help="then follow it as narun train shows a job, and exit as it would")
    s.add_argument("--json", action="store_true", help="with --follow: JSON lines")
    client_options(s)
    s.set_defaults(fn=cmd_submit)

    st = sub.add_parser("status", help="a job's state, or a table of every job")
    st.add_argument("job", nargs="?")
    st.add_argument("--json", action="store_true", help="one JSON object per job")
    client_options(st)
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser("logs", help="a job's events, as JSON lines")
    lg.add_argument("job")
    lg.add_argument("--follow", action="store_true", help="keep printing until it ends")
    lg.add_argument("--since", type=int, default=0, metavar="N",
                    help="from event number N (default 0)")
    client_options(lg)
    lg.set_defaults(fn=cmd_logs)

    f = sub.add_parser("fetch", help="copy a job's newest checkpoint here (checked against "
                                     "its manifest); prints its path")
    f.add_argument("job")
    f.add_argument("--out", default=".", metavar="DIR",
                   help="where DIR/step-NNNNNN/ is written (default: here)")
    client_options(f)
    f.set_defaults(fn=cmd_fetch)

    ca = sub.add_parser("cancel", help="stop a job: a running one drains to a checkpoint")
    ca.add_argument("job")
    ca.add_argument("--reason", default="cancelled from the command line")
    client_options(ca)
    ca.set_defaults(fn=cmd_cancel)

