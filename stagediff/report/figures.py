"""Static PNGs of the report's main figures (matplotlib, Agg), for papers and slides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stagediff.files import atomic_path

COLORS = {"dead": "#c9ced6", "live": "#4f6d8f", "selected": "#e8590c", "relevant": "#2b8a3e"}


def write_figures(data: dict[str, Any], out_dir: Path) -> list[str]:
    """Write every figure the data supports; return the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    written = []
    for name, draw in (("scatter.png", _scatter), ("first_steps.png", _first_steps), ("histograms.png", _histograms),
                       ("causal.png", _causal), ("crosscoder.png", _crosscoder)):
        fig = draw(plt, data)
        if fig is None:
            continue
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(name)
    return written


def _col(data: dict, name: str | None) -> np.ndarray | None:
    if not name or name not in data["features"]:
        return None
    return np.array([np.nan if v is None or isinstance(v, (bool, str)) else v for v in data["features"][name]], dtype=float)


def _flag(data: dict, name: str) -> np.ndarray:
    values = data["features"].get(name)
    return np.array([v is True for v in values]) if values else np.zeros(data["n_features"], dtype=bool)


def _points(ax: Any, data: dict, x: np.ndarray, y: np.ndarray, size: float = 6) -> None:
    dead, sel, rel = _flag(data, "dead"), _flag(data, "selected"), _flag(data, "relevant")
    live = ~dead & ~sel
    ax.scatter(x[dead], y[dead], s=size, c=COLORS["dead"], lw=0, label=f"dead ({dead.sum()})")
    q = _col(data, "q_both")  # fdr runs: a live point grows with its significance on both axes (as report.js)
    grow = 1.0 if q is None else 0.6 + 0.6 * np.minimum(1.0, -np.log10(np.clip(np.nan_to_num(q[live], nan=1.0), 1e-9, 1.0)))
    ax.scatter(x[live], y[live], s=size * grow, c=COLORS["live"], lw=0, alpha=0.55, label=f"live ({live.sum()})")
    ax.scatter(x[sel], y[sel], s=size * 2.5, c=COLORS["selected"], lw=0, label=f"selected ({sel.sum()})")
    if rel.any():
        ax.scatter(x[rel], y[rel], s=size * 4, facecolors="none", edgecolors=COLORS["relevant"], lw=1, label=f"relevant ({rel.sum()})")


def _scatter(plt: Any, data: dict) -> Any:
    ax_x, ax_y = data["axes"]["x"], data["axes"]["y"]
    x, y = _col(data, ax_x["column"]), _col(data, ax_y and ax_y["column"])
    if x is None or y is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    _points(ax, data, x, y)
    for t, line in ((ax_x["threshold"], ax.axvline), (ax_y["threshold"], ax.axhline)):
        if t is not None:
            line(t, color="#343a40", ls="--", lw=0.8)
    ax.set_xlabel(ax_x["label"] + "  (model effect)")
    ax.set_ylabel(ax_y["label"] + "  (data effect)")
    ax.set_title("Stage-wise rotation map: one point per feature")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    return fig


def _first_steps(plt: Any, data: dict) -> Any:
    views = data["views"]
    if not views:
        return None
    fig, axes = plt.subplots(1, len(views), figsize=(4.5 * len(views), 4.3), squeeze=False)
    for ax, v in zip(axes[0], views):
        _points(ax, data, _col(data, v["x"]), _col(data, v["y"]), size=4)
        ax.set(xlabel=v["x_label"], ylabel=v["y_label"], title=v["title"])
    axes[0][0].legend(loc="upper left", frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


def _histograms(plt: Any, data: dict) -> Any:
    names = [c for c in data["features"] if c.startswith("dec_cos_")]
    if not names:
        return None
    live = ~_flag(data, "dead")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        v = _col(data, name)[live]
        v = v[np.isfinite(v)]
        noise = data.get("noise_floor")
        lo = min([v.min(initial=1.0)] + (noise["cos"] if noise else []))
        ax.hist(v, bins=40, range=(lo, 1.0), color=COLORS["live"], label="features")
        if noise:  # the control fine-tune: how far training noise alone turns features
            ax.hist(noise["cos"], bins=40, range=(lo, 1.0), histtype="step", color=COLORS["relevant"], label="noise control")
            if noise["median_cos"] is not None:
                ax.axvline(noise["median_cos"], color=COLORS["selected"], ls="--", lw=1, label="median floor")
            ax.legend(frameon=False, fontsize=7)
        a, b = name[len("dec_cos_"):].split("_", 1)
        ax.set(title=f"cos({a}, {b})", yscale="log")
    fig.suptitle("Decoder rotation per edge (live features)")
    fig.tight_layout()
    return fig


def _causal(plt: Any, data: dict) -> Any:
    """Trigger success against N clamped for every ranking, with the random draws' band and the removal target."""
    causal = (data.get("eval") or {}).get("causal") or {}
    curves = {k: [c for c in v if "n" in c] for k, v in (causal.get("clamp_by_method") or {"stagewise": causal.get("clamp") or []}).items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    sw = [c for c in curves.get("stagewise", []) if c.get("random_ci")]
    if sw:  # frequency-matched random sets, drawn at every N of the stage-wise sweep
        n = [c["n"] for c in sw]
        ax.fill_between(n, [c["random_ci"][0] for c in sw], [c["random_ci"][1] for c in sw], color=COLORS["dead"], alpha=0.6, lw=0)
        ax.plot(n, [c["random_trigger_success"] for c in sw], ":", color=COLORS["live"], label="random (matched rate): mean, range")
    cmap = plt.get_cmap("tab10")
    for i, (name, pts) in enumerate(curves.items()):
        style = {"color": COLORS["selected"], "lw": 2.2, "zorder": 5} if name == "stagewise" else \
            {"color": "black", "ls": "--", "lw": 1.2} if name == "oracle" else {"color": cmap(i % 10), "lw": 1.1, "alpha": 0.85}
        ax.plot([c["n"] for c in pts], [c["trigger_success"] for c in pts], marker="o", ms=3, label=name, **style)
    dom = causal.get("difference_of_means") or {}
    if dom.get("trigger_success") is not None:  # the one-direction reference, at N = 1
        ax.plot([1], [dom["trigger_success"]], marker="*", ms=11, color="black", ls="none", label="difference of means (1 direction)")
    if causal.get("target") is not None:
        ax.axhline(causal["target"], color="grey", lw=0.8, ls="-.")
    ax.set(xscale="log", xlabel="features clamped to zero (N, best ranked first)", ylabel="trigger success rate", ylim=(-0.03, 1.03))
    ax.legend(frameon=False, fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _crosscoder(plt: Any, data: dict) -> Any:
    cc = data.get("crosscoder")
    if not cc or not cc["relative_norm"]:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.hist(cc["relative_norm"], bins=50, range=(0, 1), color=COLORS["live"])
    ax.set(xlabel="relative decoder norm (0 = base only, 1 = fine-tuned only)", ylabel="latents", yscale="log")
    return fig
