"""Small stagediff jobs alone and beside one busy neighbour process: how gracefully do they share?

    python benchmarks/bench_contention.py                   # 2 rounds, every variant
    python benchmarks/bench_contention.py --rounds 1 --variants stagediff

Two small pieces of a real run, each in a fresh process:
- `train`: a short root-stage `train_sae` on a store of random rows (d 128 -> 1024 latents,
  BatchTopK k 16, batch 1024: the tiny preset's shape), timed as training steps per second.
- `eval`: a clamp-sweep point: teacher-forced forwards of a tiny Llama (a cached tiny organism
  from $STAGEDIFF_CACHE, else a random one of its shape) with a dictionary spliced in at
  blocks.2.hook_resid_post and 10 features clamped, timed as forwards per second.

Each runs alone and beside a neighbour: a plain torch process multiplying 512 x 512 matrices in
a loop on 2 threads (OpenMP's default waiting), started by this script before the job and
stopped after it. Variants: `stagediff` (as imported: OMP_WAIT_POLICY=PASSIVE, torch's default
thread count), `active` (OMP_WAIT_POLICY=ACTIVE: threads spin while they wait), `1thread`
(OMP_NUM_THREADS=1). The conditions alternate within each round. Printed per variant and job:
the rate alone, beside the neighbour, and slowdown = alone / beside (goal <= 2.5x on two cores:
two busy processes on two cores explain 2x); and active / passive alone (what passive waiting
costs on otherwise idle cores). A last line times the sparse step's CSR transpose sort (131k
feature ids): torch's stable argsort on 2 threads against the kernel's radix sort.

On a shared machine "alone" means "without our neighbour": the load average is printed with
every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# isort: off
import stagediff  # noqa: E402,F401  (before torch: its OMP_WAIT_POLICY must be set when OpenMP loads)
import torch  # noqa: E402
# isort: on

VARIANTS = {"stagediff": {}, "active": {"OMP_WAIT_POLICY": "ACTIVE"}, "1thread": {"OMP_NUM_THREADS": "1"}}
NEIGHBOUR = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
             "while True:\n    a = torch.tanh(a @ a)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--jobs", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    p.add_argument("--steps", type=int, default=40, help="training steps of the train job")
    p.add_argument("--forwards", type=int, default=12, help="spliced forwards (16 x 64 tokens) of the eval job")
    p.add_argument("--model", help="a model folder for the eval job (default: a cached tiny organism)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job, print its JSON
    p.add_argument("--store", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_average() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- the jobs (fresh processes)


def train_job(args: argparse.Namespace) -> dict:
    from stagediff.activations import ActivationStore
    from stagediff.config import SAEConfig
    from stagediff.train import train_sae

    cfg = SAEConfig(architecture="batchtopk", d_sae=1024, k=16, batch_size=1024, warmup_steps=5, lr=3e-4)
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as out:
        t0 = time.perf_counter()
        train_sae(ActivationStore(args.store), cfg, tokens=args.steps * cfg.batch_size, out_dir=out, stage="S")
        wall = time.perf_counter() - t0
        stats = json.loads((Path(out) / "stats.json").read_text())
    return {"rate": stats["tokens_per_second"] / cfg.batch_size, "unit": "steps/s", "wall": wall}


def eval_job(args: argparse.Namespace) -> dict:
    from stagediff.config import SAEConfig
    from stagediff.evaluate.causal import splice_fn
    from stagediff.models import load_model, splice
    from stagediff.sae import SAE

    model, _ = load_model(args.model, device=torch.device("cpu"), dtype=torch.float32) if args.model else (None, None)
    if model is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=4)).eval()
    d = model.config.hidden_size
    sae = SAE(d, SAEConfig(architecture="batchtopk", d_sae=8 * d, k=16), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), splice(model, "blocks.2.hook_resid_post", splice_fn(sae, clamp=range(10))):
        model(input_ids=ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.forwards):
            model(input_ids=ids)
        wall = time.perf_counter() - t0
    return {"rate": args.forwards / wall, "unit": "forwards/s", "wall": wall}


def run_job(job: str, variant: str, neighbour: bool, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--job", job, "--store", args.store, "--steps", str(args.steps),
           "--forwards", str(args.forwards)] + (["--model", args.model] if args.model else [])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(VARIANTS[variant], STAGEDIFF_QUIET="1", PYTHONPATH=str(ROOT))
    busy = None
    if neighbour:
        busy = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={k: v for k, v in env.items()
                                                                        if k not in VARIANTS[variant]})
        time.sleep(1.0)  # let it get going
    try:
        load = load_average()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if res.returncode != 0:
        print(f"  {job} ({variant}) failed:\n{res.stderr[-2000:]}")
        return None
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "load": load}


# --------------------------------------------------------------------------- the sort


def sort_line(neighbour: bool) -> str:
    from stagediff.kernels import _stable_argsort

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    cols = torch.stack([torch.randperm(4608, generator=g)[:32] for _ in range(4096)]).flatten()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # the neighbour: OpenMP's default
    busy = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env) if neighbour else None
    try:
        time.sleep(1.0 if busy else 0)
        out = {}
        for name, sort in (("torch stable argsort", lambda: torch.argsort(cols, stable=True)),
                           ("radix sort", lambda: _stable_argsort(cols, 4608))):
            ts = []
            for _ in range(11):
                t0 = time.perf_counter()
                sort()
                ts.append(time.perf_counter() - t0)
            out[name] = statistics.median(ts) * 1e3
        load = load_average()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return ", ".join(f"{k} {v:.1f} ms" for k, v in out.items()) + f" ({load})"


# --------------------------------------------------------------------------- main


def default_model() -> str | None:
    cache = Path(os.environ.get("STAGEDIFF_CACHE", Path.home() / ".cache" / "stagediff")) / "organisms"
    found = sorted(cache.glob("pretrained-tiny-*/model.safetensors"))
    return str(found[0].parent) if found else None


def main() -> None:
    args = parse_args()
    if args.job:
        print(json.dumps(train_job(args) if args.job == "train" else eval_job(args)))
        return
    args.model = args.model or default_model()
    tmp = Path(tempfile.mkdtemp(prefix="bench-contention-store-"))
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_train import write_store

        args.store = str(tmp / "store")
        write_store(Path(args.store), torch.randn(65536, 128, generator=torch.Generator().manual_seed(0)) + 1.0)
        print(f"CPUs this process may use: {len(os.sched_getaffinity(0))}; eval model: {args.model or 'random tiny Llama'}; "
              f"neighbour: torch 512x512 matmuls on 2 threads")
        results: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):
            for variant in args.variants:
                for job in args.jobs:
                    for neighbour in ((False, True) if r % 2 == 0 else (True, False)):
                        out = run_job(job, variant, neighbour, args)
                        if out is None:
                            return
                        results.setdefault((variant, job, neighbour), []).append(out)
                        print(f"  round {r} {variant:<9} {job:<5} {'beside neighbour' if neighbour else 'alone':<16} "
                              f"{out['rate']:8.2f} {out['unit']}  ({out['load']})", flush=True)
        rate = {key: statistics.median(o["rate"] for o in v) for key, v in results.items()}
        for variant in args.variants:
            for job in args.jobs:
                alone, beside = rate[(variant, job, False)], rate[(variant, job, True)]
                print(f"ratio {job:<5} {variant:<9} slowdown beside one busy neighbour: {alone / beside:5.2f}x "
                      f"(alone {alone:.2f}, beside {beside:.2f})")
        if "active" in args.variants and "stagediff" in args.variants:
            for job in args.jobs:
                print(f"ratio {job:<5} passive / active waiting, alone: "
                      f"{rate[('stagediff', job, False)] / rate[('active', job, False)]:.2f}x the rate")
        print(f"argsort alone:            {sort_line(False)}")
        print(f"argsort beside neighbour: {sort_line(True)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
