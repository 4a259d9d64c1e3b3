"""`narun export` and `narun import`: a trained model as ONNX, a GPT-2 to Hugging Face's
layout and back."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXPORTS = ("onnx", "hf-gpt2")
IMPORTS = ("hf-gpt2",)


def cmd_export(args: argparse.Namespace) -> int:
    from narun.models import load_trained

    trained = load_trained(args.run)
    if args.format == "onnx":
        from narun.models.onnx_export import export_onnx

        out = export_onnx(trained.model, args.out)
    else:
        from narun.models.hf_gpt2 import export_hf_gpt2

        out = export_hf_gpt2(trained.model, args.out)
    _say(args, {"event": "exported", "format": args.format, "step": trained.step,
                "checkpoint": str(trained.checkpoint), "out": str(out)})
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A Hugging Face GPT-2 directory as a narun run: its step-0 checkpoint holds the
    weights and a job config of the model's sizes, which `narun generate`, `evaluate` and
    `train --resume` (fine-tuning, a fresh optimizer) take as any run's."""
    from narun.config import config_from_dict
    from narun.models.hf_gpt2 import import_hf_gpt2
    from narun.train import build_job, claim_out_dir, save

    model = import_hf_gpt2(args.dir)
    c = model.config
    overrides = {"vocab_size": c.vocab_size, "block_size": c.block_size, "n_embd": c.n_embd,
                 "n_layer": c.n_layer, "n_head": c.n_head, "mlp_hidden": c.hidden,
                 "tie_weights": c.tie_weights, "dropout": 0.0}
    cfg = config_from_dict({
        "model": {"name": "gpt", "preset": "gpt2-tiny", **overrides},
        "data": {"kind": "text", "seq_len": min(128, c.block_size)},
        "training": {"out_dir": args.out}})
    claim_out_dir(cfg, None, args.overwrite)
    job = build_job(cfg)
    job.model.load_state_dict(model.state_dict())
    path = save(job, 0)
    _say(args, {"event": "imported", "format": "hf-gpt2", "from": args.dir,
                "checkpoint": str(path)})
    return 0


def _say(args: argparse.Namespace, event: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(event))
    else:
        print(" ".join(f"{k}={v}" for k, v in event.items() if k != "event"))


def add_commands(sub: Any) -> None:
    ex = sub.add_parser("export", help="write a trained model in another framework's format")
    ex.add_argument("run", help="run or step directory (its newest good checkpoint)")
    ex.add_argument("--format", choices=EXPORTS, required=True,
                    help="onnx: one .onnx file (an MLP, or a GPT's logits for token ids; "
                         "needs the onnx package); hf-gpt2: Hugging Face GPT-2 "
                         "(model.safetensors + config.json in a directory)")
    ex.add_argument("--out", required=True, metavar="PATH",
                    help="the .onnx file, or the hf-gpt2 directory")
    ex.add_argument("--json", action="store_true", help="one JSON line")
    ex.set_defaults(fn=cmd_export)

    im = sub.add_parser("import", help="make a narun run from another framework's weights")
    im.add_argument("format", choices=IMPORTS)
    im.add_argument("dir", help="the directory (hf-gpt2: model.safetensors + config.json)")
    im.add_argument("--out", required=True, metavar="RUN", help="the run directory to write")
    im.add_argument("--overwrite", action="store_true",
                    help="move another run's checkpoints in RUN aside")
    im.add_argument("--json", action="store_true", help="one JSON line")
    im.set_defaults(fn=cmd_import)
