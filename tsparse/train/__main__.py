"""``python -m tsparse.train --config configs/demo.yaml [--model PATH] [--output-dir DIR]
[--resume | --resume-from CKPT] [key=value ...]``: runs the configured stages, then prints the summary
tables (per-stage training means; greedy evaluations before training and after each stage)."""

from __future__ import annotations

import argparse
import json
import sys

from .._cli import ArgumentParser, run

PROG = "python -m tsparse.train"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Dual-stream token-sparse GRPO trainer: stage 0 format warm-up, stage 1 localization, "
                    "stage 2 sparse reasoning (token selection + fusion).",
        epilog="Overrides are dotted keys parsed as YAML, e.g. stages.localization.steps=3 device=cpu "
               "stages=[sparse] loss.kl_coef=0.01 (see configs/README.md).")
    p.add_argument("--config", required=True, help="a trainer config (a path, or a name in configs/)")
    p.add_argument("--model", default=None,
                   help="'tiny' or a local Qwen2.5-VL-family checkpoint folder (sets model.path)")
    p.add_argument("--output-dir", default=None, help="where metrics, checkpoints and the plot go (sets output_dir)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from <output_dir>/checkpoints/latest (model, optimizer, step, RNG)")
    resume.add_argument("--resume-from", default=None, metavar="CKPT",
                        help="continue from the checkpoint folder CKPT (e.g. runs/demo/checkpoints/localization-final)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv=None) -> int:
    """Runs the trainer. A user's mistake (bad flag, config key or value, data file, checkpoint)
    prints one line on stderr naming it and returns 2 (``--debug`` / ``TSPARSE_DEBUG=1``: the
    traceback); warnings (e.g. boxes dropped from the data) print one line each."""
    return run(_main, argv, PROG)


def _main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may sit between flags
    from .config import load_train_config
    from .metrics import format_summary

    overrides = list(args.overrides)
    if args.model is not None:
        overrides.append(f"model.path={json.dumps(args.model)}")  # a JSON string is YAML
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    cfg = load_train_config(args.config, overrides)
    from .trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume_from or args.resume or None)
    summary = trainer.run()
    print()
    print(format_summary(summary))
    if summary.get("plot"):
        print(f"metrics: {trainer.out / 'metrics.jsonl'}; plot: {summary['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
