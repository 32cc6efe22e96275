"""The diff: per-feature rotations between stages, firing rates, selection and ranking.

Feature i is the same feature in every stage (each stage is fine-tuned from its parent),
so an edge a→b is summarised per feature by two cosines: between the decoder rows
W_dec[i] of a and b, and between the encoder columns W_enc[:, i]. Weights may carry
any scalar factor; cosines do not see it.

The headline map has one axis per entry of `diff.axes` (default x = cos(D, F_via_D),
y = cos(M, F_via_M)); `diff.vector` picks the decoder or encoder cosine for it (default encoder:
on the discovery bench its standings ranked the backdoor features better than the decoder's, the
paper's choice, with the null organism still selecting nothing; features.csv holds both).

Noise standing (needs `diff.controls` >= 2 control continuations per axis): for an axis a→b
(b fine-tuned from a), the controls a→a_ctl<j> continue a on its own store with b's budget, lr
and aux-k and their own seeds: the rotation training alone produces on that edge. Per feature
    scale_i = max(mean_j ctl_ij, median of that over features of similar firing rate in a)
(the frequency-matched fallback: a feature whose controls barely moved, e.g. one silent on a's
data, gets its neighbours' scale, never ~0), t_i = log(rot_i / scale_i). The null distribution
of t is the controls' own: each control j against the scale of the other r - 1, pooled over the
ranked features. z_i = (t_i - median) / spread of that null (spread: its 50th-to-84th percentile
width, the upper tail being what matters), p_i its one-sided normal tail; `p_emp_*` is the
empirical p-value against the pooled null (calibration check).

Selection (features low on *every* axis, the bottom-left corner), over ranked features:
- `fdr`:        Benjamini-Hochberg at `q` on p_both = max over axes of p (significant on every
                axis: an intersection-union test), score = min over axes of z;
- `percentile`: cos below the p-th percentile of each axis, percentiles over live features;
- `threshold`:  cos below a fixed value on each axis (the paper's 0.7);
- `noise`:      rotation at least `noise_multiple` times the feature's control scale on each axis.

Score (higher = stronger candidate): for fdr min_a z_a, so that the selection is exactly the
features with score above the BH cut; otherwise each axis's rotation divided by the rotation
at the selection cut, then the minimum over axes:
    score = min_a (1 − cos_a) / (1 − cut_a)                (percentile, threshold)
    score = min_a (1 − cos_a) / (noise_multiple · scale_a)  (noise)
Every selected feature outranks every unselected one, and within either group the feature
that stands out most on its *least* rotated axis comes first (rotated with the model and the
data). Rank 1 is the best; unranked features get score NaN and no rank. Other ways to combine
the axes are recorded for comparison (score_sum = z_x + z_y, score_product = product of
rot/scale, score_enc = min z on encoder cosines).

Dead features: firing rate below `diff.min_frequency` in the end stage of every axis
(F_via_D and F_via_M by default), or a zero vector on an axis. They are marked
(`dead = True`) and excluded from percentiles, selection and ranking.
Rare features: fired fewer than `diff.min_fires` times (a count over the last 20% of training
steps, from sparsity.safetensors and stats.json) in either stage of an axis. Adam moves a
feature a lot on little evidence, so they are marked (`rare = True`) and not ranked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from stagediff.config import Config
from stagediff.errors import StagediffError
from stagediff.features import cos_column, rank_by_score, short, top_ranked, write_features
from stagediff.files import atomic_path, load_tensors, read_json, write_json
from stagediff.layout import diff_dir, features_csv, saes_dir, summary_json
from stagediff.stages import control_names, resolve_stages, stage_edges
from stagediff.train import FREQ_SHARE

QUANTILES = {"min": 0.0, "p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
_EPS = 1e-12


# ---------------------------------------------------------------- tensors → numbers


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosine between matching rows of a and b [n, d]; NaN where either row is zero."""
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    out = num / den
    out[den == 0] = float("nan")
    return out.clamp(-1, 1).numpy()


def feature_cosines(w_a: dict[str, torch.Tensor], w_b: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Decoder-row and encoder-column cosine per feature between two SAEs' weights."""
    return {"dec": rowwise_cosine(w_a["W_dec"], w_b["W_dec"]), "enc": rowwise_cosine(w_a["W_enc"].T, w_b["W_enc"].T)}


def noise_floor(r0: np.ndarray, freq: np.ndarray | None, bins: int = 10, min_bin: int = 20) -> np.ndarray:
    """Robust per-feature noise floor: max(r0_i, median r0 of features in i's firing-frequency bin).

    r0 = a rotation training noise alone produced per feature (NaN: not scored); freq = firing
    rate (None: one bin for all).
    Equal-count bins of log frequency, at most `bins` and each at least `min_bin` features
    (a median of a handful of features would be as noisy as the feature itself).
    """
    floor = np.full_like(r0, np.nan, dtype=np.float64)
    ok = np.isfinite(r0)
    if not ok.any():
        return floor
    idx = np.flatnonzero(ok)
    nbins = max(1, min(bins, len(idx) // min_bin))
    if freq is None or not np.isfinite(freq[idx]).all():
        nbins = 1
    order = idx[np.argsort(np.log10(np.maximum(freq[idx], 1e-12)), kind="stable")] if nbins > 1 else idx
    groups = [g for g in np.array_split(order, nbins) if len(g)]
    for g in groups:
        floor[g] = np.maximum(r0[g], np.median(r0[g]))
    return np.maximum(floor, _EPS)


def control_standing(rot: np.ndarray, controls: np.ndarray, ranked: np.ndarray, freq: np.ndarray | None) -> dict:
    """One axis's rotation per feature against that feature's control rotations.

    rot [n] = 1 − cos on the real edge; controls [n, r] = 1 − cos on the r control continuations
    (r >= 2); ranked marks the features to score; freq = firing rate in the axis's start stage.
    Returns per feature (NaN outside `ranked`): ctl (mean control rotation), scale, ratio
    (rot / scale), z, p (normal tail of z), p_emp (against the pooled null), and the null's
    `center` and `spread`. See the module docstring.
    """
    n, r = controls.shape
    if r < 2:
        raise StagediffError(f"a noise standing needs at least 2 control continuations per axis, got {r}: set diff.controls=3")
    ok = ranked & np.isfinite(rot) & np.isfinite(controls).all(1)
    ctl = np.clip(controls, 0.0, None)
    rot = np.clip(rot, 0.0, None)

    def scale_of(c: np.ndarray) -> np.ndarray:
        return noise_floor(np.where(ok, c.mean(1), np.nan), freq)

    scale = scale_of(ctl)
    out = {k: np.full(n, np.nan) for k in ("ctl", "scale", "ratio", "z", "p", "p_emp")}
    if not ok.any():
        return {**out, "center": float("nan"), "spread": float("nan")}
    # the null: each control against the scale the *other* controls give (leave one out), so it
    # carries the same estimation noise as the real rotation against all r (a little more: r − 1)
    null = np.concatenate([np.log(np.maximum(ctl[ok, j], _EPS) / scale_of(np.delete(ctl, j, axis=1))[ok]) for j in range(r)])
    center = float(np.median(null))
    spread = max(float(np.percentile(null, 84.13)) - center, 1e-6)
    t = np.log(np.maximum(rot[ok], _EPS) / scale[ok])
    null_sorted = np.sort(null)
    out["ctl"][ok], out["scale"][ok], out["ratio"][ok] = ctl[ok].mean(1), scale[ok], rot[ok] / scale[ok]
    out["z"][ok] = (t - center) / spread
    out["p"][ok] = normal_tail(out["z"][ok])
    out["p_emp"][ok] = (1 + len(null) - np.searchsorted(null_sorted, t, side="left")) / (1 + len(null))
    return {**out, "center": center, "spread": spread}


def normal_tail(z: np.ndarray) -> np.ndarray:
    """P(Z >= z) for a standard normal Z, elementwise."""
    return 0.5 * np.vectorize(math.erfc)(np.asarray(z, dtype=np.float64) / math.sqrt(2.0))


def bh_qvalues(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of p over the features in `mask` (NaN elsewhere)."""
    q = np.full(len(p), np.nan)
    idx = np.flatnonzero(mask & np.isfinite(p))
    if not len(idx):
        return q
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    qs = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(qs[::-1])[::-1], 1.0)
    return q


def select(axes_cos: list[np.ndarray], live: np.ndarray, *, selection: str, percentile: float = 5.0,
           threshold: float = 0.7, noise_multiple: float = 3.0, q: float = 0.1,
           standing: list[dict] | None = None) -> dict:
    """Bottom-left selection and score over the axis cosines (one array per axis).

    `standing` (fdr, noise): control_standing() of each axis. Returns {"selected", "score",
    "rank", "cuts"}: selected is False and score NaN for features not `live`; rank is 1-based
    (0 = unranked); cuts are the cosine cut per axis (None where the cut is per feature).
    For fdr also "p_both" and "q_both".
    """
    rot = [1.0 - c for c in axes_cos]
    extra = {}
    if selection in ("fdr", "noise") and standing is None:
        raise StagediffError(f"diff.selection={selection} needs the control continuations (diff.controls >= 2, "
                             "trained by `stagediff train RUN`), or use selection percentile")
    if selection == "percentile":
        if not live.any():
            cuts = [float("nan")] * len(axes_cos)
        else:
            cuts = [float(np.percentile(c[live], percentile)) for c in axes_cos]
        per_axis = [r / max(1.0 - t, _EPS) for r, t in zip(rot, cuts)]
        selected = live & np.all([c < t for c, t in zip(axes_cos, cuts)], axis=0)
    elif selection == "threshold":
        cuts = [float(threshold)] * len(axes_cos)
        per_axis = [r / max(1.0 - threshold, _EPS) for r in rot]
        selected = live & np.all([c < threshold for c in axes_cos], axis=0)
    elif selection == "noise":
        cuts = None
        per_axis = [r / (noise_multiple * st["scale"]) for r, st in zip(rot, standing)]
        selected = live & np.all([np.nan_to_num(v) >= 1.0 for v in per_axis], axis=0)
    elif selection == "fdr":
        cuts = None
        per_axis = [st["z"] for st in standing]
        live = live & np.all([np.isfinite(v) for v in per_axis], axis=0)
        p_both = np.max([st["p"] for st in standing], axis=0)
        q_both = bh_qvalues(p_both, live)
        selected = live & (q_both <= q)
        extra = {"p_both": p_both, "q_both": q_both}
    else:
        raise StagediffError(f"diff.selection={selection!r} is unknown: use fdr, percentile, threshold or noise")
    score = np.min(per_axis, axis=0).astype(np.float64)
    score[~live] = np.nan
    return {"selected": selected, "score": score, "rank": rank_by_score(score, live), "cuts": cuts, **extra}


# ---------------------------------------------------------------- config


def _pairs(raw: list, key: str) -> list[tuple[str, str]]:
    out = []
    for item in raw:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(s, str) for s in item):
            raise StagediffError(f"config key {key} must be a list of [from_stage, to_stage] pairs, got {item!r}")
        out.append((item[0], item[1]))
    return out


# ---------------------------------------------------------------- files


def load_sae_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    """W_enc and W_dec of a SAELens-format SAE folder, checked for shape."""
    path = stage_dir / "sae_weights.safetensors"
    if not path.exists():
        raise StagediffError(f"{path} does not exist: train stage {stage_dir.name} first (stagediff train RUN), "
                             "or list only trained stages in diff.edges / diff.axes")
    w = load_tensors(path)
    for key in ("W_enc", "W_dec"):
        if key not in w:
            raise StagediffError(f"{path} has no tensor {key}: it is not a SAELens-format SAE; retrain the stage")
    if w["W_enc"].shape != w["W_dec"].T.shape:
        raise StagediffError(f"{path}: W_enc {tuple(w['W_enc'].shape)} and W_dec {tuple(w['W_dec'].shape)} "
                             "do not match ([d_in, d_sae] and [d_sae, d_in]); retrain the stage")
    return {"W_enc": w["W_enc"].float(), "W_dec": w["W_dec"].float()}


def load_frequency(stage_dir: Path) -> np.ndarray | None:
    """Firing rate per feature from sparsity.safetensors (log10 frequency, SAELens), or None if absent."""
    path = stage_dir / "sparsity.safetensors"
    if not path.exists():
        return None
    t = load_tensors(path)
    if "sparsity" not in t:
        raise StagediffError(f"{path} has no tensor 'sparsity' (log10 firing frequency); delete it and retrain the stage")
    return np.power(10.0, t["sparsity"].double().numpy())  # log10(0) = -inf → 0


def load_counts(stage_dir: Path, freq: np.ndarray | None) -> np.ndarray | None:
    """Firings per feature over the stage's frequency window (the last 20% of its steps), or None if unknown.

    sparsity.safetensors holds log10(count / window_tokens + 1e-10); stats.json says the window
    (older stages: recomputed from their steps and tokens as train_sae sizes it).
    """
    path = stage_dir / "stats.json"
    if freq is None or not path.exists():
        return None
    stats = read_json(path)
    window = stats.get("window_tokens")
    if window is None and stats.get("steps"):
        steps = int(stats["steps"])
        window = max(1, math.ceil(FREQ_SHARE * steps)) * (int(stats["tokens"]) // steps)
    return None if not window else np.round(np.maximum(freq - 1e-10, 0.0) * window)


# ---------------------------------------------------------------- plots


def _scatter(path: Path, x: np.ndarray, y: np.ndarray, dead: np.ndarray, selected: np.ndarray,
             xlabel: str, ylabel: str, title: str, xcut: float | None = None, ycut: float | None = None,
             significance: np.ndarray | None = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    live = ~dead & np.isfinite(x) & np.isfinite(y)
    other = live & ~selected
    ax.scatter(x[dead], y[dead], s=4, c="#cccccc", label=f"dead ({int(dead.sum())})", linewidths=0)
    if significance is None:
        ax.scatter(x[other], y[other], s=5, c="#4c72b0", alpha=0.6, label=f"live ({int(other.sum())})", linewidths=0)
    else:  # fdr: colour = -log10 q of "rotated on both axes", so the map shows how close each point is to the cut
        shade = -np.log10(np.clip(np.nan_to_num(significance[other], nan=1.0), 1e-6, 1.0))
        pts = ax.scatter(x[other], y[other], s=5, c=shade, cmap="viridis", vmin=0, vmax=max(1.0, float(shade.max(initial=0))),
                         label=f"live ({int(other.sum())})", linewidths=0)
        fig.colorbar(pts, ax=ax, shrink=0.7, label="-log10 q (both axes)")
    ax.scatter(x[selected], y[selected], s=14, c="#d62728", label=f"selected ({int(selected.sum())})", linewidths=0)
    if xcut is not None and math.isfinite(xcut):
        ax.axvline(xcut, color="k", ls="--", lw=0.8)
    if ycut is not None and math.isfinite(ycut):
        ax.axhline(ycut, color="k", ls="--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------- the step


def diff_run(run_dir: Path, cfg: Config) -> dict:
    """Diff the stages of `run_dir`: write diff/features.csv, summary.json and the scatter PNGs; return the summary."""
    run_dir = Path(run_dir)
    d = cfg.diff
    if not 0 < d.q < 1:
        raise StagediffError(f"diff.q={d.q} must lie strictly between 0 and 1 (a false-discovery rate, e.g. 0.1)")
    if d.controls < 0 or d.min_fires < 0:
        raise StagediffError(f"diff.controls ({d.controls}) and diff.min_fires ({d.min_fires}) must not be negative")
    if not 0 < d.percentile < 100:
        raise StagediffError(f"diff.percentile={d.percentile} must lie strictly between 0 and 100 (e.g. 5)")
    axes = _pairs(d.axes, "diff.axes")
    if not axes:
        raise StagediffError("diff.axes is empty: give at least one [from_stage, to_stage] pair, e.g. [[D, F_via_D]]")
    edges = _pairs(d.edges, "diff.edges") if d.edges is not None else stage_edges(resolve_stages(cfg))
    edges += [a for a in axes if a not in edges]  # the axes are always computed

    saes = saes_dir(run_dir)
    stages = list(dict.fromkeys(s for e in edges for s in e))
    controls = {a: [c for c in control_names(a, d.controls) if (saes / c / "sae_weights.safetensors").exists()]
                for a, _ in axes}
    has_controls = all(len(c) >= 2 for c in controls.values())
    if d.selection in ("fdr", "noise") and not has_controls:
        have = {a: len(c) for a, c in controls.items()}
        raise StagediffError(f"diff.selection={d.selection} needs at least 2 control continuations per axis in {saes} "
                             f"(found {have}): set diff.controls=3 and rerun training (stagediff train RUN), "
                             "or use diff.selection=percentile")
    if has_controls:
        stages += [c for cs in controls.values() for c in cs]
    weights = {s: load_sae_weights(saes / s) for s in stages}
    shapes = {s: tuple(w["W_dec"].shape) for s, w in weights.items()}
    if len(set(shapes.values())) != 1:
        raise StagediffError(f"stages have different SAE shapes {shapes}: every stage must be fine-tuned from the same S")
    n = shapes[stages[0]][0]
    freqs = {s: load_frequency(saes / s) for s in stages}
    for s, f in freqs.items():
        if f is not None and len(f) != n:
            raise StagediffError(f"{saes / s / 'sparsity.safetensors'} has {len(f)} entries for {n} features; delete it and retrain")

    vec = "dec" if d.vector == "decoder" else "enc"
    cols: dict[str, np.ndarray] = {"feature": np.arange(n)}
    cos = {e: feature_cosines(weights[e[0]], weights[e[1]]) for e in edges}
    for kind in ("dec", "enc"):
        for (a, b) in edges:
            cols[cos_column(kind, a, b)] = cos[(a, b)][kind]
    main_stages = [s for s in stages if not any(s in cs for cs in controls.values())]
    missing_freq = [s for s in main_stages if freqs[s] is None]
    for s in main_stages:
        cols[f"freq_{s}"] = freqs[s] if freqs[s] is not None else np.full(n, np.nan)

    # dead: silent at the end of every axis (NaN frequency = unknown, not dead), or no vector to compare
    axes_cos = [cos[a][vec] for a in axes]
    ends = list(dict.fromkeys(b for _, b in axes))
    dead = np.all([cols[f"freq_{s}"] < d.min_frequency for s in ends], axis=0)
    dead |= ~np.all([np.isfinite(c) for c in axes_cos], axis=0)
    live = ~dead
    cols["dead"] = dead
    # rare: too few firings in some stage of an axis to trust its rotation (unknown counts pass)
    rare = np.zeros(n, dtype=bool)
    for s in dict.fromkeys(s for ax in axes for s in ax):
        counts = load_counts(saes / s, freqs[s])
        if counts is not None:
            cols[f"fires_{s}"] = counts
            rare |= counts < d.min_fires
    cols["rare"] = rare & live
    ranked = live & ~rare

    names = _axis_names(len(axes))
    standing = None
    if has_controls:
        standing = {}
        for kind in ("dec", "enc"):
            standing[kind] = []
            for name, (a, b) in zip(names, axes):
                ctl_cos = np.stack([feature_cosines(weights[a], weights[c])[kind] for c in controls[a]], axis=1)
                st = control_standing(1.0 - cos[(a, b)][kind], 1.0 - ctl_cos, ranked, freqs[a])
                standing[kind].append(st)
                if kind == vec:
                    for j in range(ctl_cos.shape[1]):
                        cols[f"ctl_cos_{name}{j}"] = ctl_cos[:, j]
                    for key in ("scale", "z", "p", "p_emp"):
                        cols[f"{key}_{name}"] = st[key]
                    cols[f"noise_multiple_{name}"] = st["ratio"]  # rotation / control scale (evaluate's noise variant)
                    cols[f"q_{name}"] = bh_qvalues(st["p"], ranked)
    sel = select(axes_cos, ranked, selection=d.selection, percentile=d.percentile, threshold=d.threshold,
                 noise_multiple=d.noise_multiple, q=d.q, standing=standing[vec] if standing else None)
    cols["selected"], cols["score"], cols["rank"] = sel["selected"], sel["score"], sel["rank"]
    if "q_both" in sel:
        cols["p_both"], cols["q_both"] = sel["p_both"], sel["q_both"]
    if standing:  # the other ways to combine the axes, for comparison (module docstring)
        cols["score_sum"] = np.sum([st["z"] for st in standing[vec]], axis=0)
        cols["score_product"] = np.prod([st["ratio"] for st in standing[vec]], axis=0)
        cols["score_enc" if vec == "dec" else "score_dec"] = np.min([st["z"] for st in standing["enc" if vec == "dec" else "dec"]], axis=0)

    out = diff_dir(run_dir)
    write_features(features_csv(out), cols)
    summary = _summary(cfg, axes, edges, cols, sel, live, dead, vec, missing_freq, standing[vec] if standing else None,
                       names, controls if has_controls else None)
    write_json(summary_json(out), summary)
    _plots(out, axes, edges, cos, vec, dead, sel)
    return summary


def _axis_names(k: int) -> list[str]:
    return (["x", "y"] + [f"axis{i}" for i in range(2, k)])[:k]


def _quantiles(v: np.ndarray) -> dict[str, float] | None:
    v = v[np.isfinite(v)]
    return {k: float(np.quantile(v, q)) for k, q in QUANTILES.items()} if len(v) else None


def _summary(cfg, axes, edges, cols, sel, live, dead, vec, missing_freq, standing, names, controls) -> dict:
    d = cfg.diff
    sel_rule = {"selection": d.selection, "vector": d.vector, "min_frequency": d.min_frequency, "min_fires": d.min_fires,
                "axes": {nm: {"edge": list(a), "column": cos_column(vec, *a)} for nm, a in zip(names, axes)}}
    both = " and ".join(f"{a}->{b}" for a, b in axes)
    if d.selection == "fdr":
        sel_rule["q"] = d.q
        rule = f"fdr: Benjamini-Hochberg q <= {d.q:g} on the larger p-value of {both} against their control continuations"
        sel_rule["score"] = "min over axes of z (rotation against the feature's controls); selected <=> q_both <= q"
    elif d.selection == "noise":
        sel_rule["noise_multiple"] = d.noise_multiple
        rule = f"noise: rotation >= {d.noise_multiple:g} x the feature's control rotation on " + both
        sel_rule["score"] = "min over axes of (1 - cos) / (noise_multiple x control scale); selected <=> score >= 1"
    else:
        sel_rule["cuts"] = dict(zip(names, sel["cuts"]))
        if d.selection == "percentile":
            sel_rule["percentile"] = d.percentile
        head = f"percentile {d.percentile:g}" if d.selection == "percentile" else "threshold"
        rule = f"{head}: " + " and ".join(f"cos({a}, {b}) < {t:.4f}" for (a, b), t in zip(axes, sel["cuts"]))
        sel_rule["score"] = "min over axes of (1 - cos) / (rotation at the cut); selected <=> score passes 1"
    top_idx = top_ranked(sel["rank"], 20)
    show = ["feature", "score", "rank", "selected"] + [cos_column(k, *e) for k in ("dec", "enc") for e in edges] \
        + [c for c in cols if c.startswith(("freq_", "fires_", "z_", "q_", "ctl_cos_"))]
    summary = {
        "rule": rule,
        "selection": sel_rule,
        "features": int(len(live)), "live": int(live.sum()), "dead": int(dead.sum()), "rare": int(cols["rare"].sum()),
        "ranked": int((sel["rank"] > 0).sum()), "selected": int(sel["selected"].sum()),
        "stages": {s: short(s) for e in edges for s in e},
        "edges": {cos_column(k, *e): _quantiles(cols[cos_column(k, *e)][live]) for k in ("dec", "enc") for e in edges},
        "top": [{c: jsonable(cols[c][i]) for c in show} for i in top_idx],
    }
    if missing_freq:
        summary["frequency_missing"] = missing_freq  # no sparsity.safetensors: these stages cannot mark features dead
    if standing is not None:
        summary["controls"] = {nm: {"stages": controls[a], "null_center": st["center"], "null_spread": st["spread"],
                                    "scale": _quantiles(st["scale"]), "significant_at_q": int((cols[f"q_{nm}"] <= d.q).sum())}
                               for nm, (a, _), st in zip(names, axes, standing)}
    return summary


def jsonable(v):
    """A numpy/python scalar as plain JSON (NaN → None)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return None if math.isnan(v) else v


def _plots(out: Path, axes, edges, cos, vec, dead, sel) -> None:
    selected = sel["selected"]
    label = "decoder" if vec == "dec" else "encoder"
    cuts = sel["cuts"]  # None for fdr / noise: the cut is per feature, the selected points show it
    (ax_x, ax_y) = (axes[0], axes[1]) if len(axes) > 1 else (axes[0], None)
    x = cos[ax_x][vec]
    if ax_y is not None:
        y, ylabel = cos[ax_y][vec], f"cos({ax_y[0]}, {ax_y[1]})"
    else:  # one axis: plot it against the same axis's encoder/decoder partner
        other = "enc" if vec == "dec" else "dec"
        y, ylabel = cos[ax_x][other], f"{other} cos({ax_x[0]}, {ax_x[1]})"
    _scatter(out / "scatter.png", x, y, dead, selected, f"cos({ax_x[0]}, {ax_x[1]})", ylabel,
             f"{label} rotation ({int(selected.sum())} selected)",
             cuts[0] if cuts else None, cuts[1] if cuts and ax_y is not None else None, significance=sel.get("q_both"))
    # first-step views: the edge into each axis's start stage against the axis itself
    for i, (a, b) in enumerate(axes):
        into = [e for e in edges if e[1] == a]
        if not into:
            continue
        p = into[0][0]
        _scatter(out / f"first_step_{a}.png", cos[(p, a)][vec], cos[(a, b)][vec], dead, selected,
                 f"cos({p}, {a})", f"cos({a}, {b})", f"first step: {p}→{a} against {a}→{b}",
                 None, cuts[i] if cuts else None)
