"""The `narun` command line.

Exit codes: 0 success; 1 a runtime failure; 2 a usage or config error; 3 a checkpoint
that cannot be used; 130 interrupted by SIGINT (after checkpointing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from narun.errors import CheckpointError, ConfigError, NarunError

EXIT_FAILURE, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_INTERRUPTED = 1, 2, 3, 130


def _load_job_config(path: str, overrides: Sequence[str]) -> Any:
    import narun.models  # noqa: F401  (registers model fields, so model.* keys are checked)
    from narun.config import load_config

    return load_config(path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from narun._process import tune_process
    from narun.events import make_reporter

    overrides = list(args.set)
    if args.workers is not None:
        overrides.append(f"runtime.workers={args.workers}")
    if args.ps_shards is not None:
        overrides.append(f"runtime.ps_shards={args.ps_shards}")
    if args.mode is not None:
        overrides.append(f"runtime.mode={args.mode}")
    elif args.workers:  # `--workers N` alone means the default distributed mode
        overrides.append("runtime.mode=ps-sync")
    cfg = _load_job_config(args.config, overrides)
    reporter = make_reporter(True if args.json else None)
    if cfg.runtime.mode in ("ps-sync", "ps-async"):
        from narun.runtime import train as distributed_train

        done = distributed_train(cfg, reporter, resume=args.resume, overwrite=args.overwrite)
    else:
        from narun.train import train

        if cfg.runtime.mode != "local" or cfg.runtime.workers:
            raise ConfigError(f"runtime.mode: {cfg.runtime.mode!r} with "
                              f"{cfg.runtime.workers} workers is not available; use mode "
                              f"local with workers 0, or ps-sync / ps-async with workers >= 1")
        if cfg.runtime.device not in ("cpu", "auto"):
            raise ConfigError(f"runtime.device: one process (--workers 0) trains on the cpu; "
                              f"for {cfg.runtime.device!r} train with --workers N, which puts "
                              f"each trainer's model there")
        tune_process()  # keep each step's freed temporaries instead of page-faulting them back
        done = train(cfg, reporter, resume=args.resume, overwrite=args.overwrite)
    if done["signal"] == signal.SIGINT:
        return EXIT_INTERRUPTED
    return 0


def _resolve_checkpoint(path: str) -> Path:
    """A step directory as given, or the newest good checkpoint of a run or checkpoints dir."""
    from narun.checkpoint import find_checkpoint

    return find_checkpoint(path)


def _model_from_checkpoint(path: str) -> tuple[Any, Any]:
    from narun.checkpoint import load_checkpoint
    from narun.config import config_from_dict
    from narun.models import build_from_config

    c = load_checkpoint(_resolve_checkpoint(path))
    cfg = config_from_dict(c.extra["config"])
    model = build_from_config(cfg.model)
    model.load_state_dict(c.model)
    model.eval()
    return model, cfg


def cmd_generate(args: argparse.Namespace) -> int:
    import narun.models  # noqa: F401
    from narun.data import ByteTokenizer

    model, cfg = _model_from_checkpoint(args.checkpoint)
    if not hasattr(model, "generate"):
        raise CheckpointError(f"{args.checkpoint}: holds a {cfg.model.name!r} model, which "
                              f"does not generate text; use a language model checkpoint "
                              f"(model.name: gpt)")
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt) if args.prompt else [10]  # empty prompt: start a line
    out = model.generate([prompt], args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed)
    sys.stdout.write(tok.decode(out[0]) + "\n")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    import narun.models  # noqa: F401
    from narun.checkpoint import load_checkpoint
    from narun.config import config_from_dict
    from narun.train import build_job

    c = load_checkpoint(_resolve_checkpoint(args.checkpoint))
    job = build_job(config_from_dict(c.extra["config"]))
    job.model.load_state_dict(c.model)
    val = job.evaluate(max_batches=None)
    result = {"event": "eval", "step": c.step, "val_loss": val}
    if job.text:
        result["perplexity"] = math.exp(val)
        result["bits_per_byte"] = val / math.log(2)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"step {c.step}: val_loss {val:.4f}"
              + (f", perplexity {result['perplexity']:.3f}, {result['bits_per_byte']:.3f} "
                 "bits/byte" if job.text else ""))
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


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from protocol.keys import generate_keypair

    public, secret = generate_keypair(args.dir, name=args.name)
    print(f"public key: {public}  (copy it to the peers that must accept this one)")
    print(f"secret key: {secret}  (mode 0600; keep it on this host)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="narun", description="narun: train models with narun's "
                                "own autograd engine.")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train the job a YAML config describes")
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
    t.add_argument("--mode", choices=("local", "ps-sync", "ps-async"),
                   help="runtime.mode; --workers N alone implies ps-sync")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="sample text from a trained checkpoint")
    g.add_argument("checkpoint", help="a step directory, or a run directory (newest good one)")
    g.add_argument("prompt", nargs="?", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("evaluate", help="validation loss (and perplexity) of a checkpoint")
    e.add_argument("checkpoint", help="a step directory, or a run directory (newest good one)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

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

    d = sub.add_parser("data", help="make datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    db = dsub.add_parser("blobs", help="write a known-answer classification set (.npz)")
    db.add_argument("path")
    db.add_argument("--n", type=int, default=4096)
    db.add_argument("--dim", type=int, default=16)
    db.add_argument("--classes", type=int, default=4)
    db.add_argument("--seed", type=int, default=0)
    db.set_defaults(fn=cmd_data_blobs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from narun import logs

    logs.configure(json_lines=True if args.log_json else None)
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
