"""SAE training speed: stagediff's whole `train_sae` call against sae-lens's whole `SAETrainer.fit`.

    python benchmarks/bench_train.py                      # 131,072 random rows, d_in 576 -> 4608, k 32, batch 4096
    python benchmarks/bench_train.py --store RUN/activations/base__base --tokens 262144
    python benchmarks/bench_train.py --rounds 1 --rows 32768 --no-kernel   # a quick look

Two figures, each saying what it compares:

1. whole job / whole job. Both trainers get the same activation store on disk and train the
   same BatchTopK SAE (576 -> 4608, k 32, batch 4096, Adam at 3e-4 with the same warm-up and
   linear decay to 0, 2 threads) on the same number of rows. Each runs in a fresh process,
   and the two alternate over `--rounds` rounds (stagediff first in even rounds, sae-lens
   first in odd ones), so a burst of load elsewhere hits both. Timed: the whole call, from an
   opened store to a trained SAE, imports excluded. stagediff: `train_sae(ActivationStore(..))`
   (its mean-norm pass, b_dec sample, shuffled shard groups, training, the files it writes).
   sae-lens 6.x in its side venv ($STAGEDIFF_CACHE/saelens-venv, built by
   tests/test_saelens_compat.py): reading the store's shards and shuffling them (sae-lens's own
   store needs a model, so a plain in-memory shuffle stands in for it), then `SAETrainer.fit`
   with `normalize_activations="expected_average_only_in"` estimated on as many rows as
   stagediff's mean-norm pass reads. Each process runs with its own defaults otherwise (stagediff
   sets OMP_WAIT_POLICY=PASSIVE on import, sae-lens leaves OpenMP's default). Printed: wall
   seconds, this process's CPU seconds (all threads), and the ratios sae-lens / stagediff.
2. kernel step / dense step, in this process: one full training step (forward, backward, Adam,
   decoder renormalisation) with stagediff's sparse TopK kernel against the plain autograd step
   most SAE code writes (every product dense), on the same batches; median step times.

A shared machine is never quiet: the load average is printed with every figure, and the
per-round ratios (the two jobs of one round run back to back) are what to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if "--job" not in sys.argv or "stagediff" in sys.argv:  # not inside the sae-lens venv
    sys.path.insert(0, str(ROOT))
    import stagediff  # noqa: E402,F401  (before torch: stagediff's OMP_WAIT_POLICY must be set when OpenMP loads)
import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576, help="width of the random rows (ignored with --store)")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rows", type=int, default=131072, help="random rows written to the store (ignored with --store)")
    p.add_argument("--tokens", type=int, default=0, help="rows trained on (default: the store's rows, one pass)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds of the two whole jobs")
    p.add_argument("--store", help="an activation store folder (RUN/activations/<model>__<data>) instead of random rows")
    p.add_argument("--no-saelens", action="store_true", help="skip the sae-lens job")
    p.add_argument("--no-kernel", action="store_true", help="skip the kernel-vs-dense step line")
    p.add_argument("--steps", type=int, default=6, help="timed steps per method in the kernel-vs-dense line")
    p.add_argument("--job", choices=["stagediff", "saelens"], help=argparse.SUPPRESS)  # internal: one whole job
    # internal: the rows stagediff measures its activation scale on (train.MEAN_NORM_ROWS), for sae-lens's estimate
    p.add_argument("--norm-rows", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_average() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- the two whole jobs (fresh processes)


def stagediff_job(args: argparse.Namespace) -> dict:
    """One stagediff root-stage training on the store, timed from the opened store to the saved SAE."""
    sys.path.insert(0, str(ROOT))
    from stagediff.activations import ActivationStore
    from stagediff.config import SAEConfig
    from stagediff.train import train_sae

    torch.set_num_threads(args.threads)
    cfg = SAEConfig(architecture="batchtopk", d_sae=args.d_sae, k=args.k, batch_size=args.batch, lr=args.lr,
                    warmup_steps=args.warmup_steps, decay_fraction=args.decay_fraction)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        wall, cpu = time.perf_counter(), time.process_time()
        train_sae(ActivationStore(args.store), cfg, tokens=args.tokens, out_dir=out, stage="S")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        loop = json.loads((Path(out) / "stats.json").read_text())["tokens_per_second"]
    return {"wall": wall, "cpu": cpu, "loop_seconds": args.tokens / loop}


def saelens_job(args: argparse.Namespace) -> dict:
    """One sae-lens training (its own SAETrainer.fit) on the same store, timed from reading the shards on."""
    import sae_lens
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    store = Path(args.store)
    manifest = json.loads((store / "manifest.json").read_text())
    steps = math.ceil(args.tokens / args.batch)
    wall, cpu = time.perf_counter(), time.process_time()
    rows = torch.cat([load_file(str(store / s["file"]))["acts"] for s in manifest["shards"]]).float()

    def provider():
        g = torch.Generator().manual_seed(0)
        while True:
            shuffled = rows[torch.randperm(len(rows), generator=g)]
            for i in range(0, len(rows) - args.batch + 1, args.batch):
                yield shuffled[i:i + args.batch]

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=rows.shape[1], d_sae=args.d_sae, k=args.k, aux_loss_coefficient=1 / 32,
        normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                           lr=args.lr, lr_end=0.0, lr_warm_up_steps=args.warmup_steps,
                           lr_decay_steps=round(args.decay_fraction * steps), device="cpu",
                           n_batches_for_norm_estimate=max(1, args.norm_rows // args.batch),
                           logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg, sae, provider()).fit()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "version": sae_lens.__version__}


def saelens_python() -> Path:
    cache = Path(os.environ.get("STAGEDIFF_CACHE", Path.home() / ".cache" / "stagediff"))
    return cache / "saelens-venv" / "bin" / "python"


def run_job(which: str, args: argparse.Namespace) -> dict | None:
    """Run one whole job in a fresh process (sae-lens's in its venv); None (with the reason) if it failed."""
    from stagediff.train import MEAN_NORM_ROWS  # sae-lens estimates its norm on as many rows as stagediff

    py = str(saelens_python()) if which == "saelens" else sys.executable
    cmd = [py, __file__, "--job", which, "--store", args.store, "--tokens", str(args.tokens), "--d-sae", str(args.d_sae),
           "--k", str(args.k), "--batch", str(args.batch), "--lr", str(args.lr), "--threads", str(args.threads),
           "--warmup-steps", str(args.warmup_steps), "--decay-fraction", str(args.decay_fraction),
           "--norm-rows", str(MEAN_NORM_ROWS)]
    env = dict(os.environ, TQDM_DISABLE="1", WANDB_MODE="disabled", STAGEDIFF_QUIET="1",
               OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT) if which == "stagediff" else "")
    env.pop("OMP_WAIT_POLICY", None)  # each library's own default
    load = load_average()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"  {which} job failed:\n{res.stderr[-2000:]}")
        return None
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "load": load}


def write_random_store(path: Path, rows: int, d_in: int) -> None:
    """A store of Gaussian rows with a common offset (so b_dec and the scale have something to find)."""
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(d_in, generator=g)
    write_store(path, torch.randn(rows, d_in, generator=g) + offset)


def write_store(path: Path, rows: torch.Tensor) -> None:
    """The rows as a stagediff activation store (harvest's own layout), which both trainers read."""
    sys.path.insert(0, str(ROOT))
    from stagediff.activations import write_store as write

    write(path, rows, shard_rows=32768)


def whole_jobs(args: argparse.Namespace) -> None:
    if not args.no_saelens and not saelens_python().exists():
        print(f"sae-lens venv not found at {saelens_python().parent.parent} (build it: pytest tests/test_saelens_compat.py)")
        args.no_saelens = True
    jobs = ["stagediff"] + ([] if args.no_saelens else ["saelens"])
    results: dict[str, list[dict]] = {j: [] for j in jobs}
    for r in range(args.rounds):
        for which in jobs if r % 2 == 0 else jobs[::-1]:
            out = run_job(which, args)
            if out is None:
                return
            results[which].append(out)
            extra = f", training loop {out['loop_seconds']:.1f} s" if "loop_seconds" in out else ""
            print(f"  round {r} {which:<9} {out['wall']:7.1f} s wall {out['cpu']:7.1f} s CPU{extra}  ({out['load']})")
    if args.no_saelens:
        return
    ours, theirs = results["stagediff"], results["saelens"]
    per_round = [t["wall"] / o["wall"] for o, t in zip(ours, theirs)]
    wall = statistics.median(t["wall"] for t in theirs) / statistics.median(o["wall"] for o in ours)
    cpu = statistics.median(t["cpu"] for t in theirs) / statistics.median(o["cpu"] for o in ours)
    print(f"ratio whole job, sae-lens {theirs[0]['version']} SAETrainer.fit / stagediff train_sae: "
          f"{wall:.2f}x wall (per round: {', '.join(f'{x:.2f}x' for x in per_round)}), {cpu:.2f}x CPU time")


# --------------------------------------------------------------------------- kernel step vs dense autograd step


def init_params(d_in: int, d_sae: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in), generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return [W_dec.T.clone().contiguous().requires_grad_(), torch.zeros(d_sae, requires_grad=True),
            W_dec.requires_grad_(), torch.zeros(d_in, requires_grad=True)]


def dense_forward(x, W_enc, b_enc, W_dec, b_dec, *, k, batch_topk=True, dead=None, aux_k=256, aux_k_coefficient=0.0):
    """The plain autograd BatchTopK step (every product dense), as most SAE code writes it."""
    pre = (x - b_dec) @ W_enc + b_enc
    flat = pre.relu().flatten()
    vals, idx = flat.topk(min(int(k * x.shape[0]), flat.numel()), sorted=False)
    f = torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
    x_hat = f @ W_dec + b_dec
    return SimpleNamespace(loss=(x_hat - x).pow(2).sum(-1).mean())  # the field of kernels.StepOut the timing reads


def step_times(forward, rows: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Seconds of each full training step with `forward` (2 untimed warm-up steps first)."""
    params = init_params(rows.shape[1], args.d_sae)
    W_dec = params[2]
    opt = torch.optim.Adam(params, lr=args.lr)
    times = []
    for step in range(2 + args.steps):
        x = rows[(step % 4) * args.batch:(step % 4 + 1) * args.batch]
        t0 = time.perf_counter()
        out = forward(x, *params, k=args.k, batch_topk=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        with torch.no_grad():  # unit-norm decoder rows: drop the radial gradient, renormalise after
            g = W_dec.grad
            g -= (g * W_dec).sum(1, keepdim=True) * W_dec
            opt.step()
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return times


def kernel_vs_dense(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from stagediff.activations import ActivationStore
    from stagediff.kernels import topk_training_forward

    torch.set_num_threads(args.threads)
    rows = ActivationStore(args.store).read(0, 4 * args.batch)
    rows = rows * (rows.shape[1] ** 0.5 / rows.norm(dim=1).mean())  # the input scale training uses
    times = {"kernel": [], "dense": []}
    for _ in range(2):  # alternated halves
        for name, forward in (("kernel", topk_training_forward), ("dense", dense_forward)):
            times[name] += step_times(forward, rows, argparse.Namespace(**{**vars(args), "steps": max(1, args.steps // 2)}))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  kernel step {med['kernel'] * 1e3:.0f} ms, dense autograd step {med['dense'] * 1e3:.0f} ms "
          f"(median of {len(times['kernel'])}; {load_average()})")
    print(f"ratio training step, stagediff sparse kernel / dense autograd (same process): {med['dense'] / med['kernel']:.2f}x")


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.job:
        print(json.dumps(stagediff_job(args) if args.job == "stagediff" else saelens_job(args)))
        return
    tmp = None
    if not args.store:
        tmp = Path(tempfile.mkdtemp(prefix="bench-train-store-"))
        args.store = str(tmp / "store")
        write_random_store(Path(args.store), args.rows, args.d_in)
    try:
        manifest = json.loads((Path(args.store) / "manifest.json").read_text())
        args.tokens = args.tokens or manifest["num_rows"]
        print(f"batchtopk d_in={manifest['d_in']} d_sae={args.d_sae} k={args.k} batch={args.batch} threads={args.threads} "
              f"tokens={args.tokens} ({math.ceil(args.tokens / args.batch)} steps) "
              f"store={'random rows' if tmp else args.store} ({manifest['num_rows']} rows); CPUs {os.cpu_count()}")
        whole_jobs(args)
        if not args.no_kernel:
            kernel_vs_dense(args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
