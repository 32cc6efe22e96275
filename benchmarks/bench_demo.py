"""Wall and CPU time of `stagediff demo` per step, from an empty run directory (and optionally an empty cache).

    python benchmarks/bench_demo.py [--preset tiny] [--fresh-cache] [--out DIR] [key=value ...]

Runs the demo in this process and prints each step's wall seconds, its CPU seconds
(this process and its finished children, i.e. the organism's fine-tune workers) and
the load average before and after. On a shared machine the wall time measures the
neighbours as much as the code; the CPU seconds do not (much: busy-waiting threads
and a shared core's caches still inflate them). The organism's own sub-steps
(pre-training, fine-tunes, backdoor evaluation) come from models/organism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_steps() -> dict[str, tuple[float, float]]:
    """Wrap every pipeline step so it records (wall s, CPU s) into the returned dict as it runs."""
    from stagediff import pipeline

    times: dict[str, tuple[float, float]] = {}
    for name, step in list(pipeline.STEP_FUNCTIONS.items()):
        def timed(run, step=step, name=name):
            wall, cpu = time.perf_counter(), cpu_seconds()
            step(run)
            w, c = times.get(name, (0.0, 0.0))  # the demo runs the report separately: add up
            times[name] = (w + time.perf_counter() - wall, c + cpu_seconds() - cpu)
        pipeline.STEP_FUNCTIONS[name] = timed
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--fresh-cache", action="store_true", help="build the organism from scratch in a new STAGEDIFF_CACHE")
    ap.add_argument("--out", help="keep the run directory here (default: a temporary one)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh_cache:
            os.environ["STAGEDIFF_CACHE"] = str(Path(tmp) / "cache")
        from stagediff.demo import run_demo

        times = timed_steps()
        run_dir = Path(args.out) if args.out else Path(tmp) / "run"
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), cpu_seconds()
        run_demo(args.preset, run_dir, args.overrides)
        total, total_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        organism = json.loads((run_dir / "models" / "organism.json").read_text())

    cores = len(os.sched_getaffinity(0))
    print(f"\nstagediff demo --preset {args.preset}: {total:.0f} s wall, {total_cpu:.0f} s CPU on {cores} cores "
          f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    print(f"  {'step':<11} {'wall s':>8} {'share':>6} {'CPU s':>8}")
    for step, (wall, cpu) in times.items():
        print(f"  {step:<11} {wall:8.1f} {wall / total:6.1%} {cpu:8.1f}")
    for step, seconds in (organism.get("times") or {}).items():
        print(f"    organism/{step:<22} {seconds:8.1f}")


if __name__ == "__main__":
    main()
