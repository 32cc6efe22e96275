"""Wall time of `stagediff demo` per step, from an empty run directory (and optionally an empty cache).

    python benchmarks/bench_demo.py [--preset tiny] [--fresh-cache] [key=value ...]

Prints each step's seconds and its share of the total; the organism's own sub-steps
(pre-training, fine-tunes, backdoor evaluation) come from models/organism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--fresh-cache", action="store_true", help="build the organism from scratch in a new STAGEDIFF_CACHE")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.fresh_cache:
            env["STAGEDIFF_CACHE"] = str(Path(tmp) / "cache")
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stagediff", "demo", "--preset", args.preset, "--out", str(run_dir), *args.overrides],
                       env=env, check=True)
        total = time.perf_counter() - t0
        wall = yaml.safe_load((run_dir / "config.yaml").read_text())["_run"]["wall_seconds"]
        organism = json.loads((run_dir / "models" / "organism.json").read_text())

    print(f"\nstagediff demo --preset {args.preset}: {total:.0f} s in all (process start and imports included)")
    for step, seconds in wall.items():
        print(f"  {step:<11} {seconds:8.1f} s  {seconds / total:6.1%}")
    for step, seconds in (organism.get("wall_seconds") or {}).items():
        print(f"    organism/{step:<18} {seconds:8.1f} s")


if __name__ == "__main__":
    main()
