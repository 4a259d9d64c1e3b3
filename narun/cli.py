"""The `narun` command line.

Exit codes: 0 success; 1 a runtime failure; 2 a usage or config error; 3 a checkpoint
that cannot be used; 130 interrupted by SIGINT (after checkpointing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from narun.errors import CheckpointError, ConfigError, NarunError

EXIT_FAILURE, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_INTERRUPTED = 1, 2, 3, 130


def _load_job_config(path: str, sets: Sequence[str], flags: Sequence[str] = (),
                     here: bool = True) -> Any:
    """The config `narun train` would run (`--set` items, then what flags such as --workers
    set), checked as `train` checks it (narun.train.check_job: model, data files, seq_len
    against the model, device, mode), so `config check` refuses exactly what `train` does."""
    import narun.models  # noqa: F401  (registers model fields, so model.* keys are checked)
    from narun.config import load_config
    from narun.train import check_job

    cfg = load_config(path, [*sets, *flags])
    try:
        check_job(cfg, here)
    except ConfigError as err:
        key = str(err).partition(":")[0]  # every check_job message starts with its key path
        origin = [o for o in sets if o.partition("=")[0].strip() == key]
        where = f" [from --set {origin[-1]}]" if origin else ""
        raise ConfigError(f"{path}: {err}{where}") from None
    return cfg


# Each trainer is a process computing its own steps: more trainers than cores only
# time-share them (measured in issue 12: 64 trainers on a 2-core machine ran 16x slower).
_OVERSUBSCRIBED = ("each trainer is a process computing its own steps; beyond one per core "
                   "they time-share the cores (measured: 64 trainers on 2 cores ran 16x "
                   "slower)")


def cmd_train(args: argparse.Namespace) -> int:
    import structlog

    from narun._process import tune_process
    from narun.events import make_reporter

    if args.overwrite and args.resume is not None:
        raise ConfigError(f"--overwrite starts afresh and --resume {args.resume} continues a "
                          f"run; pass one of them")
    flags: list[str] = []  # what the flags set, after (over) the --set items
    if args.workers is not None:
        flags.append(f"runtime.workers={args.workers}")
    if args.ps_shards is not None:
        flags.append(f"runtime.ps_shards={args.ps_shards}")
    if args.stages is not None:
        flags.append(f"runtime.stages={args.stages}")
    if args.mode is not None:
        flags.append(f"runtime.mode={args.mode}")
    elif args.stages:
        flags.append("runtime.mode=pipeline")
    elif args.workers:  # `--workers N` alone means the default distributed mode
        flags.append("runtime.mode=ps-sync")
    cfg = _load_job_config(args.config, args.set, flags, here=args.command == "train")
    if args.ps_shards is not None and cfg.runtime.mode not in ("ps-sync", "ps-async"):
        raise ConfigError(f"--ps-shards {args.ps_shards}: parameter-server shards run only in "
                          f"mode ps-sync or ps-async, and this job runs mode "
                          f"{cfg.runtime.mode!r}; add --workers N, or drop --ps-shards")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.command == "train" and cores and cfg.runtime.workers > cores:
        structlog.get_logger("narun.cli").warning(
            "workers_exceed_cores", workers=cfg.runtime.workers, cores=cores,
            reason=_OVERSUBSCRIBED)
    if args.command == "train" and cfg.runtime.hosts:
        structlog.get_logger("narun.cli").warning(
            "hosts_ignored", hosts=cfg.runtime.hosts,
            reason="narun train runs every process on this machine; narun launch runs the "
                   "job over runtime.hosts")
    reporter = make_reporter(True if args.json else None)
    if args.command == "launch":
        from narun.runtime.launch import launch

        if args.hosts:
            cfg.runtime.hosts = [h for h in args.hosts.split(",") if h.strip()]
        if cfg.runtime.mode not in ("ps-sync", "ps-async", "pipeline"):
            raise ConfigError(f"runtime.mode: launch runs ps-sync, ps-async or pipeline jobs "
                              f"over hosts, got {cfg.runtime.mode!r}; add --workers N or "
                              f"--stages P")
        if not cfg.runtime.hosts:
            raise ConfigError("--hosts: launch needs the agents to run on (HOST[:PORT],...), "
                              "or runtime.hosts in the config; narun train runs here")
        done = launch(cfg, args.keys, reporter, resume=args.resume, overwrite=args.overwrite)
    elif cfg.runtime.mode in ("ps-sync", "ps-async"):
        from narun.runtime import train as distributed_train

        done = distributed_train(cfg, reporter, resume=args.resume, overwrite=args.overwrite)
    elif cfg.runtime.mode == "pipeline":
        from narun.runtime.pipeline import train as pipeline_train

        done = pipeline_train(cfg, reporter, resume=args.resume, overwrite=args.overwrite)
    else:
        from narun.train import train

        tune_process()  # keep each step's freed temporaries instead of page-faulting them back
        done = train(cfg, reporter, resume=args.resume, overwrite=args.overwrite)
    if done["signal"] == signal.SIGINT:
        return EXIT_INTERRUPTED
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.top_k < 0:
        raise ConfigError(f"--top-k: must be 0 (no limit) or a number of most likely tokens "
                          f"to sample from, such as --top-k 40; got {args.top_k}")
    from narun.cli_serve import check_generate_args, generate_from_server

    check_generate_args(args)
    if args.server is not None:
        return generate_from_server(args)
    try:
        _generate_to_stdout(args)
    except KeyboardInterrupt:  # Ctrl-C: end the line printed so far, no traceback
        sys.stdout.write("\n")
        sys.stdout.flush()
        return EXIT_INTERRUPTED
    return 0


def _generate_to_stdout(args: argparse.Namespace) -> None:
    import codecs

    from narun.data import ByteTokenizer
    from narun.models import load_trained

    model, cfg, _, _ = load_trained(args.checkpoint)
    if not hasattr(model, "generate_stream"):
        raise ConfigError(f"{args.checkpoint}: holds a {cfg.model.name!r} model, which "
                          f"does not generate text; pass a language model's checkpoint "
                          f"(model.name: gpt), or use `narun evaluate` on this one")
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt) if args.prompt else tok.encode("\n")  # empty: a new line
    stream = model.generate_stream(prompt[None], args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k or None,
                                   seed=args.seed)
    # A character may span several byte tokens: decode incrementally, print what is whole.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    with contextlib.closing(stream):
        out.write(text.decode(tok.decode_bytes(prompt)))
        out.flush()
        for column in stream:
            piece = text.decode(tok.decode_bytes(column))
            if piece:
                out.write(piece)
                out.flush()
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()


def cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    from narun.models import load_trained
    from narun.train import build_job

    trained = load_trained(args.checkpoint)
    job = build_job(trained.config)
    job.model.load_state_dict(trained.model.state_dict())
    val = job.evaluate(max_batches=None)
    result = {"event": "eval", "step": trained.step, "val_loss": val}
    if job.text:
        result["perplexity"] = math.exp(val)
        result["bits_per_byte"] = val / math.log(2)
    else:  # a classifier: a loss near 0 says little, the share it gets right says it all
        result["accuracy"] = job.accuracy()
    if args.json:
        print(json.dumps(result))
    elif job.text:
        print(f"step {trained.step}: val_loss {val:.4f}, perplexity "
              f"{result['perplexity']:.3f}, {result['bits_per_byte']:.3f} bits/byte")
    else:
        print(f"step {trained.step}: val_loss {val:.4f}, accuracy {result['accuracy']:.4f} "
              f"({len(job.val_data)} validation rows)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from narun.plot import plot_run

    print(plot_run(args.run, args.out).path)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from narun.config import format_config

    sys.stdout.write(format_config(_load_job_config(args.file, args.set)))
    return 0


def cmd_data_blobs(args: argparse.Namespace) -> int:
    from narun.data import make_classification_npz

    try:
        Path(args.path).parent.mkdir(parents=True, exist_ok=True)  # runs/ on a fresh clone
        path = make_classification_npz(args.path, n=args.n, dim=args.dim,
                                       classes=args.classes, seed=args.seed)
    except ValueError as e:  # an out-of-range --n/--dim/--classes
        raise ConfigError(f"data blobs: {e}") from None
    except OSError as e:
        raise NarunError(f"data blobs: cannot write {args.path}: {e}") from None
    print(path)
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from narun.data import make_shapes_npz

    try:
        Path(args.path).parent.mkdir(parents=True, exist_ok=True)
        path = make_shapes_npz(args.path, n=args.n, size=args.size, seed=args.seed)
    except ValueError as e:  # an out-of-range --n/--size
        raise ConfigError(f"data shapes: {e}") from None
    except OSError as e:
        raise NarunError(f"data shapes: cannot write {args.path}: {e}") from None
    print(path)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from protocol.keys import generate_keypair

    public, secret = generate_keypair(args.dir, name=args.name)
    print(f"public key: {public}  (copy it to the peers that must accept this one)")
    print(f"secret key: {secret}  (mode 0600; keep it on this host)")
    return 0


def cmd_keys_authorize(args: argparse.Namespace) -> int:
    from protocol.keys import authorize

    target = authorize(args.dir, args.public_key, name=args.name)
    print(f"authorized: {target}  (this node now admits that key's holder)")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from narun.runtime.agent import DEFAULT_PORT, Agent, run_agent
    from narun.runtime.hosts import tcp_address
    from protocol.keys import load_node_keys

    keys = load_node_keys(args.keys) if args.keys else None
    agent = Agent(tcp_address(args.listen, DEFAULT_PORT, "--listen"), keys, args.slots,
                  Path(args.state_dir).expanduser(), grace=args.grace)
    return run_agent(agent)


def _version() -> str:
    from narun import __version__

    return __version__


def _job_arguments(t: argparse.ArgumentParser) -> None:
    """What `train` and `launch` take alike."""
    t.add_argument("config", help="YAML job config, e.g. configs/quickstart.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.lr=3e-4 (repeatable)")
    t.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint (a step directory, or a run directory's "
                        "newest good one), or this out_dir's newest good one with 'auto'")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an out_dir that holds another run's checkpoints, "
                        "moving them aside to checkpoints.old-N/")
    t.add_argument("--json", action="store_true",
                   help="JSON lines on stdout (the default when stdout is not a terminal)")
    t.add_argument("--workers", type=int, metavar="N",
                   help="trainer processes (runtime.workers); 0 trains in this process")
    t.add_argument("--ps-shards", type=int, metavar="K",
                   help="parameter-server processes (runtime.ps_shards)")
    t.add_argument("--stages", type=int, metavar="P",
                   help="pipeline stage processes (runtime.stages); implies --mode pipeline")
    t.add_argument("--mode", choices=("local", "ps-sync", "ps-async", "pipeline"),
                   help="runtime.mode; --workers N alone implies ps-sync, --stages P "
                        "pipeline")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="narun", description="narun: train models with narun's "
                                "own autograd engine.")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines on stderr")
    p.add_argument("--version", action="version", version=f"narun {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train the job a YAML config describes, on this machine")
    _job_arguments(t)
    t.set_defaults(fn=cmd_train)

    la = sub.add_parser("launch", help="train a job over several hosts' agents (narun agent), "
                                       "the coordinator in the foreground")
    _job_arguments(la)
    la.add_argument("--hosts", metavar="H1,H2,...",
                    help="the agents, HOST[:PORT] each (port 7600 when omitted); "
                         "runtime.hosts in the config is the same list")
    la.add_argument("--keys", metavar="DIR",
                    help="this node's key pair, and in DIR/authorized/HOST.key each agent's "
                         "public key (CURVE; needed unless every host is loopback)")
    la.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="sample text from a trained checkpoint",
                       description="Continue PROMPT with text sampled from a trained language "
                       "model, printing each piece as soon as it is sampled (Ctrl-C stops).")
    g.add_argument("checkpoint", nargs="?",
                   help="a step directory, or a run directory (newest good one); omitted "
                        "with --server")
    g.add_argument("prompt", nargs="?", default="",
                   help="text to continue (default: empty, which starts a new line)")
    g.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="how many tokens (bytes) to sample (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="higher is more random; 0 always picks the most likely token "
                   "(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only among the K most likely tokens; 0 means no limit "
                   "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed gives the same text (default: %(default)s)")
    g.add_argument("--server", metavar="tcp://HOST:PORT",
                   help="ask a running `narun serve` instead of loading a checkpoint: narun "
                        "generate --server tcp://127.0.0.1:7800 \"PROMPT\" (default: none, "
                        "load the checkpoint)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="with --server: stop once the text ends with TEXT (repeatable; "
                        "default: none)")
    g.add_argument("--keys", metavar="DIR",
                   help="with --server: this client's key pair, and the server's public key "
                        "filed under its host in DIR/authorized/ (default: none, plaintext, "
                        "for a server on loopback)")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("evaluate", help="validation loss, and perplexity (language models) "
                       "or accuracy (classifiers), of a checkpoint")
    e.add_argument("checkpoint", help="a step directory, or a run directory (newest good one)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

    pl = sub.add_parser("plot", help="draw a run's loss and validation loss against step "
                                     "(needs narun[plot])",
                        description="Draw RUN's training loss and validation loss against "
                        "step, from RUN/events.jsonl, into a PNG (log y when the losses span "
                        "more than two decades).")
    pl.add_argument("run", help="a run directory (training.out_dir), e.g. runs/mlp")
    pl.add_argument("--out", metavar="PATH", help="the PNG to write (default RUN/loss.png)")
    pl.set_defaults(fn=cmd_plot)

    c = sub.add_parser("config", help="work with job configs")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cc = csub.add_parser("check", help="validate a config and print it resolved")
    cc.add_argument("file")
    cc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cc.set_defaults(fn=cmd_config_check)

    k = sub.add_parser("keys", help="CURVE keys for authenticated, encrypted connections")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kg = ksub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret to DIR")
    kg.add_argument("dir")
    kg.add_argument("--name", default="narun")
    kg.set_defaults(fn=cmd_keys_generate)

    ka = ksub.add_parser("authorize", help="admit the holder of PUBLIC_KEY (copy it to "
                                           "DIR/authorized/NAME.key)")
    ka.add_argument("dir")
    ka.add_argument("public_key", help="a NAME.key file from the peer to admit")
    ka.add_argument("--name", help="file it under this name (default: the file's NAME); a "
                                   "coordinator finds an agent's key under the agent's host")
    ka.set_defaults(fn=cmd_keys_authorize)

    a = sub.add_parser("agent", help="serve coordinators on this host: start and watch "
                                     "their workers (one per host, e.g. as a systemd service)")
    a.add_argument("--listen", default="tcp://127.0.0.1:7600", metavar="tcp://ADDR:PORT",
                   help="where coordinators connect (default %(default)s; port 7600 when "
                        "omitted); any address but loopback needs --keys")
    a.add_argument("--keys", metavar="DIR",
                   help="this host's key pair (narun keys generate DIR) and, in "
                        "DIR/authorized/, the coordinators it admits (CURVE)")
    a.add_argument("--slots", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="processes it runs at once over all jobs (default: the core count, "
                        "%(default)s)")
    a.add_argument("--state-dir", default="~/.local/state/narun/agent", metavar="DIR",
                   help="job directories (logs, files) live here (default %(default)s)")
    a.add_argument("--grace", type=float, default=10.0, metavar="S",
                   help="on SIGTERM, seconds workers get to leave before SIGKILL "
                        "(default %(default)s)")
    a.set_defaults(fn=cmd_agent)

    from narun.cli_export import add_commands as add_export_commands
    from narun.cli_jobs import add_commands
    from narun.cli_serve import add_commands as add_serve_commands

    add_commands(sub)
    add_serve_commands(sub)
    add_export_commands(sub)

    d = sub.add_parser("data", help="make datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    db = dsub.add_parser("blobs", help="write a known-answer classification set (.npz)")
    db.add_argument("path")
    db.add_argument("--n", type=int, default=4096)
    db.add_argument("--dim", type=int, default=16)
    db.add_argument("--classes", type=int, default=4)
    db.add_argument("--seed", type=int, default=0)
    db.set_defaults(fn=cmd_data_blobs)
    ds = dsub.add_parser("shapes", help="render a labelled image set: circle, square, "
                         "triangle, stripes (.npz with x, y, captions)")
    ds.add_argument("path")
    ds.add_argument("--n", type=int, default=4096)
    ds.add_argument("--size", type=int, default=32)
    ds.add_argument("--seed", type=int, default=0)
    ds.set_defaults(fn=cmd_data_shapes)
    return p


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from narun import logs

    # NARUN_LOG_LEVEL=debug adds the long-lived services' vitals (tasks, rss), as for workers
    level = os.environ.get("NARUN_LOG_LEVEL", "info")
    if level.lower() not in LOG_LEVELS:
        _report_error(args, ConfigError(f"NARUN_LOG_LEVEL={level!r}: expected one of "
                                        f"{', '.join(LOG_LEVELS)} [from the environment]"))
        return EXIT_USAGE
    logs.configure(json_lines=True if args.log_json else None, level=level)
    try:
        return args.fn(args)
    except ConfigError as e:
        _report_error(args, e)
        return EXIT_USAGE
    except CheckpointError as e:
        _report_error(args, e)
        return EXIT_CHECKPOINT
    except NarunError as e:
        _report_error(args, e)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader left (`narun train ... | head`): stop quietly, as Unix tools do, and
        # point stdout at devnull so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _report_error(args: argparse.Namespace, err: Exception) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"event": "error", "message": str(err)}), flush=True)
    print(f"narun: error: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
