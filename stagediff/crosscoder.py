"""The crosscoder baseline: one dictionary reading and writing both models at once.

An acausal crosscoder over paired activations of the same tokens (base and fine-tune data, an
equal share of each batch; by default as many rows as the whole stage-wise pipeline reads) is
an SAE over the concatenation [x_base · s_base, x_ft · s_ft], each model normalised on its
own to mean norm sqrt(d_model) so neither dominates the loss. So it reuses `SAE` and
`train_sae` unchanged (with a fixed scale of 1: the per-model scales are applied here);
the decoder row of latent j splits into a base half d_base and a fine-tuned half d_ft.

Per latent we report ‖d_base‖, ‖d_ft‖, the relative norm ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖)
(≈ 1: exists only in the fine-tuned model, ≈ 0.5: shared, ≈ 0: base only) and the cosine
between the halves.

Variants (`crosscoder.architecture`):
- `batchtopk` (default): the shared BatchTopK SAE; largely free of the L1 artefacts.
- `l1`: ReLU with the crosscoder sparsity penalty λ Σ_j f_j (‖d_base,j‖ + ‖d_ft,j‖): the
  SUM of the per-model decoder norms (the shared ReLU SAE weights by the norm of the whole
  row, which does not favour one-model latents the way the crosscoder loss does). This is
  the one extension here, `sum_norm_l1`, added to train_sae's loss.

Latent Scaling (Minder et al. 2025; `crosscoder.latent_scaling`): for each latent, the
closed-form least-squares β_m fitting β · f_j(x) · u_j (u_j = the unit fine-tuned decoder
half) to model m's reconstruction error with latent j's own contribution put back,
y_m = x_m − x̂_m + f_j d_m,j. ν = β_base / β_ft: ≈ 0 for a truly fine-tune-exclusive latent,
≈ 1 for a shared one, even where the decoder norms say otherwise (shrinkage, decoupling).
It fits the fine-tuned direction to the base model's activations, so it assumes the two
models share a residual basis, as a fine-tune and its base do.

Score (`crosscoder_scores`, higher = more fine-tune-exclusive): the relative norm, or with
`crosscoder.latent_scaling` Latent Scaling among the latents the norms put on the fine-tuned side
(`latent_scaling_score`: 0.5 + 0.5 (1 − clip(ν, 0, 1)) where relative norm >= 0.5, else the relative
norm). ν is measured either way and features.csv holds
both rankings (score_/rank_relative_norm, score_/rank_latent_scaling). Latents that never fired (firing rate below
`diff.min_frequency`) are marked dead: score NaN, no rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stagediff.config import Config, SAEConfig
from stagediff.diff import jsonable, load_frequency
from stagediff.errors import StagediffError
from stagediff.features import rank_scores, read_features, top_ranked, write_features
from stagediff.files import atomic_path, read_json, write_json
from stagediff.layout import crosscoder_dir, features_csv, paired_store_dirs, summary_json
from stagediff.runtime import resolve_device
from stagediff.sae import SAE
from stagediff.train import MEAN_NORM_ROWS, activation_scale, train_sae

LS_ROWS = 65536  # activation rows read for Latent Scaling


# ---------------------------------------------------------------- data


class ScaledPair:
    """A PairedStore whose base and fine-tuned halves are each scaled to mean norm sqrt(d_model)."""

    def __init__(self, paired, d_base: int, scale_base: float | None = None, scale_ft: float | None = None):
        self.paired, self.d_base, self.d_in = paired, d_base, paired.d_in
        self.d_ft = paired.d_in - d_base
        if scale_base is None or scale_ft is None:
            scale_base, scale_ft = activation_scale(paired.a), activation_scale(paired.b)
        self.scales = torch.tensor([scale_base] * d_base + [scale_ft] * self.d_ft)
        self.scale_base, self.scale_ft = float(scale_base), float(scale_ft)

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, device="cpu") -> Iterator[Tensor]:
        scales = self.scales.to(device)
        for x in self.paired.batches(batch_size, seed=seed, start_step=start_step, device=device):
            yield x * scales

    def mean_norm(self, max_rows: int = MEAN_NORM_ROWS) -> float:
        x = next(self.batches(min(max_rows, self.paired.num_rows), seed=0))
        return float(x.double().norm(dim=1).mean())


class PairMixture:
    """Scaled pairs of several datasets read as one: each batch takes an equal share of rows from each.

    The crosscoder trains on both models' activations over the base *and* the fine-tune data,
    as in the crosscoder papers (one dataset alone would see only half of what the stages see).
    """

    def __init__(self, pairs: list[ScaledPair]):
        if len({p.d_in for p in pairs}) != 1:
            raise StagediffError(f"paired stores of different widths {[p.d_in for p in pairs]}: harvest them at one hook")
        self.pairs, self.d_in, self.d_base = pairs, pairs[0].d_in, pairs[0].d_base

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, device="cpu") -> Iterator[Tensor]:
        n = len(self.pairs)
        sizes = [batch_size // n + (i < batch_size % n) for i in range(n)]
        streams = [p.batches(b, seed=seed + 7919 * i, start_step=start_step, device=device)
                   for i, (p, b) in enumerate(zip(self.pairs, sizes))]
        while True:
            yield torch.cat([next(s) for s in streams])


def paired_mixture(run_dir: Path, needed_by: str, unscaled: bool = False) -> PairMixture:
    """Both models over both datasets (RUN/activations/{base,finetuned}__{base,finetune}), an equal share of
    each per batch. Each model is scaled to mean norm sqrt(d_model), measured once on the base data (as
    S's scale is) and used for both datasets, unless `unscaled`."""
    from stagediff.activations import PairedStore

    pairs = {data: paired_store_dirs(run_dir, data) for data in ("base", "finetune")}
    for p in (p for ps in pairs.values() for p in ps):
        if not (p / "manifest.json").exists():
            raise StagediffError(f"{needed_by} needs the activation store {p}: run `stagediff harvest {run_dir}` first")
    base = PairedStore(*pairs["base"])
    base_pair = ScaledPair(base, base.a.d_in, *((1.0, 1.0) if unscaled else (None, None)))
    ft_pair = ScaledPair(PairedStore(*pairs["finetune"]), base.a.d_in, base_pair.scale_base, base_pair.scale_ft)
    return PairMixture([base_pair, ft_pair])


# ---------------------------------------------------------------- the L1 variant


def sum_norm_l1(d_base: int, coefficient: float) -> Callable[[SAE, Tensor], Tensor]:
    """The crosscoder's sparsity penalty λ Σ_j f_j (‖d_base,j‖ + ‖d_ft,j‖) as train_sae's `extra_loss`.

    Trained on a ReLU SAE with `l1_coefficient = 0` (crosscoder_sae_config), so the shared loss is
    MSE + aux-k only and this term is the whole sparsity penalty.
    """

    def penalty(sae: SAE, x_s: Tensor) -> Tensor:
        b_enc, b_dec, _ = sae.scaled_biases()
        f = ((x_s - b_dec) @ sae.W_enc + b_enc).relu()
        return coefficient * (f * sum_of_half_norms(sae.W_dec, d_base)).sum(-1).mean()

    return penalty


def sum_of_half_norms(W_dec: Tensor, d_base: int) -> Tensor:
    """‖d_base‖ + ‖d_ft‖ per latent, differentiable."""
    return W_dec[:, :d_base].norm(dim=1) + W_dec[:, d_base:].norm(dim=1)


# ---------------------------------------------------------------- per-latent numbers


def decoder_halves(W_dec: Tensor, d_base: int) -> dict[str, np.ndarray]:
    """Norms of the base and fine-tuned decoder halves, relative norm, cosine between the halves."""
    W = W_dec.detach().double().cpu()
    base, ft = W[:, :d_base], W[:, d_base:]
    nb, nf = base.norm(dim=1), ft.norm(dim=1)
    rel = nf / (nb + nf)
    cos = (base * ft).sum(1) / (nb * nf) if base.shape[1] == ft.shape[1] else torch.full_like(nb, float("nan"))
    return {"norm_base": nb.numpy(), "norm_ft": nf.numpy(), "relative_norm": rel.numpy(), "cos_base_ft": cos.numpy()}


@torch.no_grad()
def latent_scaling(sae: SAE, rows: Iterator[Tensor], d_base: int, max_rows: int = LS_ROWS) -> dict[str, np.ndarray]:
    """β_base, β_ft and ν = β_base / β_ft per latent over up to `max_rows` paired (scaled) rows.

    β_m = Σ_t f_t (u · y_m,t) / Σ_t f_t², u = unit fine-tuned decoder half,
    y_m,t = e_m,t + f_t d_m (model m's reconstruction error plus the latent's own part).
    Accumulated as f^T e (latents × d) so memory does not grow with the rows.
    """
    W = sae.W_dec.double()
    halves = {"base": W[:, :d_base], "ft": W[:, d_base:]}
    u = halves["ft"] / halves["ft"].norm(dim=1, keepdim=True).clamp_min(1e-12)
    fe = {m: torch.zeros_like(h) for m, h in halves.items()}
    f2 = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    seen = 0
    for x in rows:
        x = x[: max_rows - seen].to(W.device)
        f = sae.encode(x)
        err = x - sae.decode(f)
        fe["base"] += (f.T @ err[:, :d_base]).double()  # fp32 products per batch, summed over batches in fp64
        fe["ft"] += (f.T @ err[:, d_base:]).double()
        f2 += f.double().pow(2).sum(0)
        seen += len(x)
        if seen >= max_rows:
            break
    beta = {}
    for m, h in halves.items():
        num = (fe[m] * u).sum(1) + f2 * (h * u).sum(1)
        beta[m] = torch.where(f2 > 0, num / f2.clamp_min(1e-300), torch.full_like(f2, float("nan")))
    nu = beta["base"] / beta["ft"]
    return {"beta_base": beta["base"].cpu().numpy(), "beta_ft": beta["ft"].cpu().numpy(), "nu": nu.cpu().numpy()}


def latent_scaling_score(nu: np.ndarray, relative_norm: np.ndarray) -> np.ndarray:
    """Higher = more fine-tune-exclusive by Latent Scaling, among the latents the decoder norms put on the
    fine-tuned side (relative norm >= 0.5): 0.5 + 0.5 (1 − clip(ν, 0, 1)) in [0.5, 1]; the others keep their
    relative norm (< 0.5). ν alone cannot rank a base-leaning latent: its fine-tuned half is a weak direction,
    β_ft ≈ 0 and ν is large or negative noise, so 1 − clip(ν) would call it fine-tune-only (Minder et al.
    apply Latent Scaling to the latents the norms call fine-tune-only). NaN where ν is unknown."""
    ls = 0.5 + 0.5 * (1.0 - np.clip(nu, 0.0, 1.0))
    return np.where(np.isfinite(nu), np.where(relative_norm >= 0.5, ls, relative_norm), np.nan)


# ---------------------------------------------------------------- the step


def stagewise_tokens(cfg: Config) -> int:
    """The whole stage-wise pipeline's budget: every trained stage's tokens but the noise controls."""
    from stagediff.stages import resolve_stages

    return sum(s.tokens for s in resolve_stages(cfg) if not s.from_pretrained and s.control_of is None)


def crosscoder_tokens(cfg: Config) -> int:
    """`crosscoder.tokens`, or by default the whole stage-wise pipeline's budget:
    the baseline sees as many activation rows as the method it is compared with."""
    return cfg.crosscoder.tokens or stagewise_tokens(cfg)


def crosscoder_sae_config(cfg: Config) -> SAEConfig:
    """The SAEConfig the crosscoder trains with: sae.* with the crosscoder's own overrides (width, k, lr)
    resolved against their sae.* defaults; the tokens are `crosscoder_tokens`."""
    cc = cfg.crosscoder
    arch = "batchtopk" if cc.architecture == "batchtopk" else "relu"
    return dataclasses.replace(cfg.sae, architecture=arch, d_sae=cc.d_sae or cfg.sae.d_sae, k=cc.k or cfg.sae.k,
                               lr=cc.lr or cfg.sae.lr, l1_coefficient=0.0 if arch == "relu" else cfg.sae.l1_coefficient)


def train_crosscoder(run_dir: Path, cfg: Config) -> Path:
    """Train the crosscoder on both models' activations over both datasets (RUN/activations/{base,finetuned}__{base,finetune});
    write RUN/crosscoder/. Returns that folder."""
    run_dir = Path(run_dir)
    out = crosscoder_dir(run_dir)
    cc = cfg.crosscoder
    store = paired_mixture(run_dir, "the crosscoder")
    base_pair = store.pairs[0]
    sae_cfg = crosscoder_sae_config(cfg)
    tokens = crosscoder_tokens(cfg)
    lr = sae_cfg.lr
    device = resolve_device(cfg.device)
    meta = {
        "model_name": f"{cfg.base_model} + {cfg.finetuned_model}", "hook_name": cfg.hook,
        "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
        "dataset_path": f"{cfg.base_data.path} + {cfg.finetune_data.path}",
        "crosscoder": {"models": ["base", "finetuned"], "d_model": store.d_base, "scale_base": base_pair.scale_base,
                       "scale_ft": base_pair.scale_ft, "data": ["base", "finetune"], "variant": cc.architecture, "l1_coefficient": cc.l1_coefficient,
                       "layout": "input [x_base*scale_base, x_ft*scale_ft]; W_dec[:, :d_model] base, [:, d_model:] fine-tuned"},
    }
    extra_loss = sum_norm_l1(store.d_base, cc.l1_coefficient) if cc.architecture == "l1" else None
    sae = train_sae(store, sae_cfg, tokens=tokens, out_dir=out, stage="crosscoder", scale=1.0,
                    seed=cfg.seed, device=device, metadata=meta, extra_loss=extra_loss)
    # always measured (one pass over LS_ROWS rows), so features.csv carries both rankings
    ls = latent_scaling(sae, store.batches(4096, seed=cfg.seed + 1, device=device), store.d_base)
    write_crosscoder_outputs(out, sae, store.d_base, cfg, ls, extra={"tokens": tokens, "lr": lr,
                             "scale_base": base_pair.scale_base, "scale_ft": base_pair.scale_ft})
    return out


def write_crosscoder_outputs(out: Path, sae: SAE, d_base: int, cfg: Config, ls: dict | None = None,
                             extra: dict | None = None) -> dict:
    """features.csv, summary.json and relative_norm.png of a trained crosscoder in `out`; returns the summary.

    Both rankings are columns (score_/rank_relative_norm and, given `ls`, score_/rank_latent_scaling);
    `score`/`rank` repeat the one `crosscoder.latent_scaling` picks, and `dead` is what that one cannot rank.
    """
    n = sae.W_dec.shape[0]
    cols: dict[str, np.ndarray] = {"feature": np.arange(n)}
    cols.update(decoder_halves(sae.W_dec, d_base))
    freq = load_frequency(out)
    cols["freq"] = freq if freq is not None else np.full(n, np.nan)
    unfired = cols["freq"] < cfg.diff.min_frequency  # NaN (unknown) is not dead
    rankings = {"relative_norm": cols["relative_norm"]}
    if ls is not None:
        cols.update(ls)
        # a latent that never fired in the Latent Scaling sample has ν = NaN: that ranking cannot judge it
        rankings["latent_scaling"] = latent_scaling_score(ls["nu"], cols["relative_norm"])
    for name, raw in rankings.items():
        cols[f"score_{name}"], cols[f"rank_{name}"] = rank_scores(raw, unfired)
    main = "latent_scaling" if cfg.crosscoder.latent_scaling else "relative_norm"
    if main not in rankings:
        raise StagediffError("crosscoder.latent_scaling is on but no Latent Scaling was measured: retrain the crosscoder")
    cols["dead"] = unfired | ~np.isfinite(cols[f"score_{main}"])
    cols["score"], cols["rank"] = cols[f"score_{main}"], cols[f"rank_{main}"]
    write_features(features_csv(out), cols)  # rank_<ranking> 0 = unranked
    dead = cols["dead"]

    live = ~dead
    rel = cols["relative_norm"][live]
    counts, edges = np.histogram(rel, bins=20, range=(0.0, 1.0))
    stats_path = out / "stats.json"
    top = top_ranked(cols["rank"], 20)
    summary = {
        "variant": cfg.crosscoder.architecture, "latent_scaling": main == "latent_scaling",
        "score": "relative_norm >= 0.5: 0.5 + 0.5 (1 - clip(nu, 0, 1)), else relative_norm" if main == "latent_scaling"
                 else "relative_norm = |d_ft| / (|d_base| + |d_ft|)",
        "rankings": {r: f"features.csv score_{r} / rank_{r}" for r in rankings},
        "latents": n, "live": int(live.sum()), "dead": int(dead.sum()),
        "ft_exclusive": int((rel >= 0.9).sum()), "base_exclusive": int((rel <= 0.1).sum()),
        "shared": int(((rel > 0.3) & (rel < 0.7)).sum()),
        "relative_norm_quantiles": {q: float(np.quantile(rel, v)) for q, v in
                                    (("min", 0), ("p5", .05), ("p50", .5), ("p95", .95), ("max", 1))} if len(rel) else None,
        "relative_norm_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "training": read_json(stats_path) if stats_path.exists() else None,
        **(extra or {}),
        "top": [{c: jsonable(cols[c][i]) for c in cols} for i in top],
    }
    write_json(summary_json(out), summary)
    _histogram(out / "relative_norm.png", rel, cfg.crosscoder.architecture)
    return summary


def crosscoder_scores(run_dir: Path) -> np.ndarray:
    """Per latent, higher = more fine-tune-exclusive (NaN = dead); from RUN/crosscoder/features.csv."""
    return read_features(features_csv(crosscoder_dir(run_dir)))["score"]


def _histogram(path: Path, rel: np.ndarray, variant: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(rel, bins=50, range=(0, 1), color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel("relative decoder norm  |d_ft| / (|d_base| + |d_ft|)")
    ax.set_ylabel("live latents")
    ax.set_title(f"crosscoder ({variant})\n0 = base only, 0.5 = shared, 1 = fine-tuned only", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
