"""SAE training throughput: the sparse TopK step vs the dense autograd step vs sae-lens's trainer.

    nice -n 10 python benchmarks/bench_train.py                 # d_in 576, d_sae 4608, k 32, batch 4096
    nice -n 10 python benchmarks/bench_train.py --store RUN/activations/base__base --arch topk

All three train the same architecture on the same activation batches (random Gaussian rows
scaled to mean norm sqrt(d_in), or rows of an activation store) with Adam. Each full step
(forward, backward, optimizer, decoder renormalisation) is timed alone; tokens/s = batch /
median step time, which shrugs off other processes on a shared machine. sae-lens runs in
its side venv ($STAGEDIFF_CACHE/saelens-venv, built by tests/test_saelens_compat.py) as a
subprocess, timed the same way inside its own `SAETrainer.fit`. The dense-equivalent FLOP
rate counts 12 * d_in * d_sae FLOPs per token (the encoder and decoder products, forward and
both backward products each) and is compared with a measured fp32 GEMM of the encoder's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--arch", choices=["batchtopk", "topk"], default="batchtopk")
    p.add_argument("--steps", type=int, default=8, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dead-fraction", type=float, default=0.1,
                   help="share of features marked dead for the extra 'sparse + aux-k' line")
    p.add_argument("--store", help="activation store folder (RUN/activations/<model>__<data>) instead of random rows")
    p.add_argument("--no-saelens", action="store_true", help="skip the sae-lens comparison")
    p.add_argument("--saelens-worker", help=argparse.SUPPRESS)  # internal: run inside the sae-lens venv
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def load_rows(args: argparse.Namespace) -> torch.Tensor:
    """Enough rows for a few distinct batches (cycled), from a store or random."""
    n = args.batch * min(args.steps + args.warmup, 4)
    if args.store:
        sys.path.insert(0, str(ROOT))
        from stagediff.activations import ActivationStore

        store = ActivationStore(args.store)
        if store.num_rows < args.batch:
            sys.exit(f"{args.store} holds {store.num_rows} rows, fewer than one batch of {args.batch}: use --batch")
        rows = store.read(0, min(n, store.num_rows))
        args.d_in = rows.shape[1]
        return rows * (args.d_in ** 0.5 / rows.norm(dim=1).mean())  # the fixed input scale training uses
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, args.d_in, generator=g)


def batches(rows: torch.Tensor, batch: int):
    i = 0
    while True:
        if (i + 1) * batch > len(rows):
            i = 0
        yield rows[i * batch:(i + 1) * batch]
        i += 1


# --------------------------------------------------------------------------- our steps


def init_params(d_in: int, d_sae: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in), generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return [W_dec.T.clone().contiguous().requires_grad_(), torch.zeros(d_sae, requires_grad=True),
            W_dec.requires_grad_(), torch.zeros(d_in, requires_grad=True)]


def dense_forward(x, W_enc, b_enc, W_dec, b_dec, *, k, batch_topk, dead=None, aux_k=256, aux_k_coefficient=0.0):
    """The plain autograd TopK / BatchTopK step (every product dense), as most SAE code writes it."""
    pre = (x - b_dec) @ W_enc + b_enc
    if batch_topk:
        flat = pre.relu().flatten()
        vals, idx = flat.topk(min(int(k * x.shape[0]), flat.numel()), sorted=False)
        f = torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
    else:
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    x_hat = f @ W_dec + b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if dead is not None and bool(dead.any()):
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, int(dead.sum())), dim=-1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        loss = loss + aux_k_coefficient * (f_aux @ W_dec - (x - x_hat).detach()).pow(2).sum(-1).mean()
    return SimpleNamespace(loss=loss)  # the field of kernels.StepOut the timing reads


def time_ours(forward, rows: torch.Tensor, args: argparse.Namespace, dead: torch.Tensor | None = None) -> list[float]:
    """Per-step seconds of a full training step with `forward`."""
    params = init_params(args.d_in, args.d_sae)
    W_dec = params[2]
    opt = torch.optim.Adam(params, lr=3e-4)
    data = batches(rows, args.batch)
    times = []
    for step in range(args.warmup + args.steps):
        x = next(data)
        t0 = time.perf_counter()
        out = forward(x, *params, k=args.k, batch_topk=args.arch == "batchtopk", dead=dead,
                      aux_k=256, aux_k_coefficient=1 / 32)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        with torch.no_grad():  # unit-norm decoder rows: drop the radial gradient, renormalise after
            g = W_dec.grad
            g -= (g * W_dec).sum(1, keepdim=True) * W_dec
            opt.step()
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def gemm_flops(args: argparse.Namespace) -> float:
    """Measured fp32 GEMM rate (FLOP/s) at the encoder's shape [batch, d_in] @ [d_in, d_sae]."""
    a, b = torch.randn(args.batch, args.d_in), torch.randn(args.d_in, args.d_sae)
    out = torch.empty(args.batch, args.d_sae)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * args.batch * args.d_in * args.d_sae / statistics.median(times)


# --------------------------------------------------------------------------- sae-lens


def saelens_python() -> Path:
    cache = Path(os.environ.get("STAGEDIFF_CACHE", Path.home() / ".cache" / "stagediff"))
    return cache / "saelens-venv" / "bin" / "python"


def time_saelens(rows: torch.Tensor, args: argparse.Namespace) -> dict | None:
    """Run this script's worker inside the sae-lens venv on the same rows; None if the venv is missing."""
    py = saelens_python()
    if not py.exists():
        print(f"sae-lens venv not found at {py.parent.parent} (build it: pytest tests/test_saelens_compat.py)")
        return None
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.safetensors"
        save_file({"rows": rows.contiguous()}, str(path))
        cmd = [str(py), __file__, "--saelens-worker", str(path), "--d-sae", str(args.d_sae), "--k", str(args.k),
               "--batch", str(args.batch), "--arch", args.arch, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        env = dict(os.environ, TQDM_DISABLE="1", WANDB_MODE="disabled", PYTHONPATH="")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"sae-lens worker failed:\n{res.stderr[-2000:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def saelens_worker(args: argparse.Namespace) -> None:
    """Inside the sae-lens venv: train with sae-lens's own SAETrainer, time each step between batch requests."""
    import sae_lens
    from safetensors.torch import load_file
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(args.threads)
    rows = load_file(args.saelens_worker)["rows"]
    d_in = rows.shape[1]
    kind = (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig) if args.arch == "batchtopk" else \
        (TopKTrainingSAE, TopKTrainingSAEConfig)
    sae = kind[0](kind[1](d_in=d_in, d_sae=args.d_sae, k=args.k, aux_loss_coefficient=1 / 32))
    total = args.warmup + args.steps + 1  # the last request only closes the last timed step
    cfg = SAETrainerConfig(total_training_samples=total * args.batch, train_batch_size_samples=args.batch,
                           lr=3e-4, lr_end=3e-4, device="cpu",
                           logger=LoggingConfig(log_to_wandb=False))
    stamps: list[float] = []

    def provider():
        for x in batches(rows, args.batch):
            stamps.append(time.perf_counter())
            yield x

    SAETrainer(cfg, sae, provider()).fit()
    times = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    print(json.dumps({"version": sae_lens.__version__, "times": times}))


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.saelens_worker:
        return saelens_worker(args)
    sys.path.insert(0, str(ROOT))
    from stagediff.kernels import topk_training_forward

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = load_rows(args)
    B = args.batch
    print(f"{args.arch} d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={B} threads={args.threads} "
          f"steps={args.steps} (+{args.warmup} warm-up) data={'store ' + args.store if args.store else 'random'}")
    dead = torch.rand(args.d_sae, generator=torch.Generator().manual_seed(1)) < args.dead_fraction
    ours = {"sparse": (topk_training_forward, None), "dense": (dense_forward, None),
            "sparse+aux": (topk_training_forward, dead), "dense+aux": (dense_forward, dead)}
    # two rounds of ours around the sae-lens run, so a burst of load elsewhere hits every method
    times: dict[str, list[float]] = {name: [] for name in ours}
    round_args = argparse.Namespace(**{**vars(args), "steps": max(1, args.steps // 2)})
    for r in range(2):
        for name, (forward, mask) in ours.items():
            times[name] += time_ours(forward, rows, round_args, dead=mask)
        if r == 0 and not args.no_saelens and (sl := time_saelens(rows, args)):
            times[f"sae-lens {sl['version']}"] = sl["times"]
    gemm = gemm_flops(args)

    med = {name: B / statistics.median(t) for name, t in times.items()}
    best = {name: B / min(t) for name, t in times.items()}
    for name in times:
        print(f"  {name:<18} {med[name]:>9,.0f} tok/s (median step)  {best[name]:>9,.0f} tok/s (best step)")
    print(f"  fp32 GEMM [{B}x{args.d_in}]@[{args.d_in}x{args.d_sae}]: {gemm / 1e9:.1f} GFLOP/s")

    def ratio(label: str, a: str, b: str, note: str = "") -> None:
        print(f"ratio {label:<28} {med[a] / med[b]:6.2f}x (best steps: {best[a] / best[b]:.2f}x){note}")

    ratio("sparse / dense:", "sparse", "dense")
    ratio("sparse+aux / dense+aux:", "sparse+aux", "dense+aux", f"  [{args.dead_fraction:.0%} dead, aux_k 256]")
    sl_name = next((n for n in times if n.startswith("sae-lens")), None)
    if sl_name:
        ratio("sparse / sae-lens:", "sparse", sl_name)
    flop_rate = 12 * args.d_in * args.d_sae * med["sparse"]
    print(f"dense-equivalent FLOP rate of the sparse step: {flop_rate / 1e9:.1f} GFLOP/s = "
          f"{flop_rate / gemm:.2f}x the measured GEMM rate (a dense step is bounded by 1x)")

if __name__ == "__main__":
    main()
