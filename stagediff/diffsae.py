"""The diff-SAE baseline: a BatchTopK SAE trained on the activation difference fine-tuned − base.

Aranguri et al. 2025 and diffing-toolkit's `sae_difference`: the same tokens go through both
models (the paired rows of RUN/activations/{base,finetuned}__{base,finetune}, an equal share of
each dataset per batch, as the crosscoder reads them) and the SAE reads δ = x_ft − x_base. It
reuses `SAE` and `train_sae` unchanged (the scale is measured on δ, as any root stage does) at the
crosscoder's budget: by default every token the stage-wise pipeline trains on.

Per latent (RUN/diffsae/features.csv, over up to STATS_ROWS difference rows): `freq` (firing rate),
`mean_activation` (mean when firing), `max_activation`, and `score` = freq × mean_activation = the
latent's mean activation per token, i.e. how much of the difference it carries (diffing-toolkit
ranks its difference latents by their activation statistics; this is the one-number version).
Latents firing below `diff.min_frequency` are dead (score NaN, rank 0).

Labels: `difference_latents(sae, base_rows, ft_rows)` encodes paired held-out rows, so the paired
sign-test label reads the diff-SAE like every other dictionary (evaluate/run.py `_diffsae`).

Causal splice (`diffsae_splice_fn`). Clamping latent j of the difference SAE means removing its
part f_j(δ) d_j of the difference from the fine-tuned residual. During generation only the
fine-tuned model runs, so δ = r_ft − r_base is not known; we approximate r_base by the mean base
activation μ_base over the paired stores (RUN/diffsae/base_mean.safetensors):
    resid -> resid − Σ_{j clamped} f_j(resid − μ_base) d_j.
Exact when the base residual equals its mean; otherwise a latent's activation also sees the base
model's own variation around its mean (r_base − μ_base), which the difference SAE never saw in
training, so f_j can be over- or under-estimated on single tokens. An unclamped splice is the
identity exactly. The causal sweep (evaluate/causal.py) clamps the diff-SAE's top latents this way,
beside every other ranking, and reports its N to remove.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stagediff.config import Config, SAEConfig
from stagediff.crosscoder import PairMixture, paired_mixture, stagewise_tokens
from stagediff.diff import jsonable
from stagediff.errors import StagediffError
from stagediff.features import rank_scores, read_features, top_ranked, write_features
from stagediff.files import load_tensors, save_tensors, write_json
from stagediff.layout import diffsae_dir, features_csv, summary_json
from stagediff.runtime import resolve_device
from stagediff.sae import SAE

STATS_ROWS = 65536  # difference rows read for the per-latent statistics and the mean base activation
BASE_MEAN = "base_mean.safetensors"


class DifferenceRows:
    """Batches of x_ft − x_base from paired rows [x_base, x_ft] (a PairMixture of unscaled pairs)."""

    def __init__(self, pairs: PairMixture):
        self.pairs, self.d_in = pairs, pairs.d_base
        if pairs.d_in != 2 * pairs.d_base:
            raise StagediffError(f"paired stores of widths {pairs.d_base} and {pairs.d_in - pairs.d_base}: "
                                 "the difference needs two models of one width (a fine-tune and its base)")

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, device: Any = "cpu") -> Iterator[Tensor]:
        d = self.d_in
        for x in self.pairs.batches(batch_size, seed=seed, start_step=start_step, device=device):
            yield x[:, d:] - x[:, :d]

    def mean_norm(self, max_rows: int = STATS_ROWS) -> float:
        x = next(self.batches(max_rows, seed=0))
        return float(x.double().norm(dim=1).mean())


def diffsae_sae_config(cfg: Config) -> SAEConfig:
    """sae.* with the diff-SAE's overrides; always BatchTopK (the architecture the field uses for it)."""
    b = cfg.baselines
    return dataclasses.replace(cfg.sae, architecture="batchtopk", d_sae=b.diffsae_d_sae or cfg.sae.d_sae, k=b.diffsae_k or cfg.sae.k)


def diffsae_tokens(cfg: Config) -> int:
    """`baselines.diffsae_tokens`, or the whole stage-wise pipeline's budget."""
    return cfg.baselines.diffsae_tokens or stagewise_tokens(cfg)


def train_diffsae(run_dir: Path, cfg: Config) -> Path:
    """Train the diff-SAE on x_ft − x_base of both datasets' paired stores; write RUN/diffsae/. Returns that folder."""
    from stagediff.train import train_sae

    run_dir = Path(run_dir)
    out = diffsae_dir(run_dir)
    pairs = paired_mixture(run_dir, "the diff-SAE", unscaled=True)
    rows = DifferenceRows(pairs)
    tokens, lr = diffsae_tokens(cfg), cfg.baselines.diffsae_lr or cfg.sae.lr
    device = resolve_device(cfg.device)
    meta = {
        "model_name": f"{cfg.finetuned_model} - {cfg.base_model}", "hook_name": cfg.hook,
        "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
        "dataset_path": f"{cfg.base_data.path} + {cfg.finetune_data.path}",
        "diffsae": {"input": "x_finetuned - x_base (raw units)", "data": ["base", "finetune"], "tokens": tokens},
    }
    sae = train_sae(rows, dataclasses.replace(diffsae_sae_config(cfg), lr=lr), tokens=tokens, out_dir=out, stage="diffsae",
                    seed=cfg.seed, device=device, metadata=meta)
    # statistics on a fresh draw of rows (another seed than training's first batches)
    sample = next(pairs.batches(STATS_ROWS, seed=cfg.seed + 1))
    d = rows.d_in
    save_tensors(out / BASE_MEAN, {"base_mean": sample[:, :d].double().mean(0).float()})
    stats = latent_stats(sae, sample[:, d:] - sample[:, :d])
    write_diffsae_outputs(out, stats, cfg, extra={"tokens": tokens, "lr": lr, "stats_rows": len(sample)})
    return out


@torch.no_grad()
def latent_stats(sae: SAE, diffs: Tensor, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Per latent over difference rows: freq, mean_activation (when firing), max_activation, mean per token."""
    p = next(sae.parameters())
    n = torch.zeros(sae.d_sae, dtype=torch.float64)
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    top = torch.zeros(sae.d_sae, dtype=torch.float64)
    for s in range(0, len(diffs), chunk):
        f = sae.encode(diffs[s: s + chunk].to(p.device, p.dtype)).double().cpu()
        n += (f > 0).sum(0)
        total += f.sum(0)
        top = torch.maximum(top, f.max(0).values)
    rows = max(len(diffs), 1)
    mean_firing = torch.where(n > 0, total / n.clamp_min(1), torch.full_like(n, float("nan")))
    return {"freq": (n / rows).numpy(), "mean_activation": mean_firing.numpy(), "max_activation": top.numpy(),
            "mean_per_token": (total / rows).numpy()}


def write_diffsae_outputs(out: Path, stats: dict[str, np.ndarray], cfg: Config, extra: dict | None = None) -> dict:
    """features.csv (feature, freq, mean_activation, max_activation, dead, score, rank) and summary.json."""
    n = len(stats["freq"])
    dead = stats["freq"] < cfg.diff.min_frequency
    cols: dict[str, np.ndarray] = {"feature": np.arange(n), "freq": stats["freq"], "mean_activation": stats["mean_activation"],
                                   "max_activation": stats["max_activation"], "dead": dead}
    cols["score"], cols["rank"] = rank_scores(stats["mean_per_token"], dead)
    write_features(features_csv(out), cols)
    top = top_ranked(cols["rank"], 20)
    summary = {"score": "freq x mean_activation = mean activation per difference row", "latents": n,
               "live": int((~dead).sum()), "dead": int(dead.sum()), **(extra or {}),
               "top": [{c: jsonable(cols[c][i]) for c in cols} for i in top]}
    write_json(summary_json(out), summary)
    return summary


def diffsae_scores(run_dir: Path) -> np.ndarray:
    """Per latent, higher = carries more of the difference (NaN = dead); from RUN/diffsae/features.csv."""
    return read_features(features_csv(diffsae_dir(run_dir)))["score"]


@torch.no_grad()
def difference_latents(sae: SAE, base_rows: Tensor, ft_rows: Tensor) -> Tensor:
    """Latent activations [rows, d_sae] of paired rows (same tokens through both models): encode(ft − base)."""
    if base_rows.shape != ft_rows.shape:
        raise StagediffError(f"paired rows differ in shape ({tuple(base_rows.shape)} vs {tuple(ft_rows.shape)}): "
                             "read both models on the same held-out windows")
    p = next(sae.parameters())
    return sae.encode((ft_rows - base_rows).to(p.device, p.dtype))


def load_base_mean(run_dir: Path) -> Tensor:
    """μ_base of RUN/diffsae (the splice's stand-in for the base residual)."""
    path = diffsae_dir(run_dir) / BASE_MEAN
    if not path.exists():
        raise StagediffError(f"{path} does not exist: train the diff-SAE first (it writes the mean base activation)")
    return load_tensors(path)["base_mean"]


def diffsae_splice_fn(sae: SAE, base_mean: Tensor, clamp: Sequence[int] = ()) -> Callable[[Tensor], Tensor]:
    """resid -> resid − Σ_{j in clamp} f_j(resid − μ_base) d_j (module docstring: the approximation).

    The causal checks' splice with the diff-SAE read as a `Dictionary` shifted by μ_base (one splice for every method).
    """
    from stagediff.evaluate.causal import Dictionary, splice_fn

    return splice_fn(Dictionary(sae, shift=base_mean), clamp)
