"""Gather what a run directory holds into one JSON-able dict: the data behind the report page.

Every part is optional except `diff/features.csv`: a run that stopped after the
diff, or one without an organism, still gets a report of what it has. Files
written by other steps are read tolerantly (missing keys and columns are skipped,
never guessed), so the report keeps working while those formats grow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stagediff.config import Config, to_dict
from stagediff.diff import load_frequency
from stagediff.errors import StagediffError
from stagediff.features import cos_column, read_features
from stagediff.files import read_json_if_exists
from stagediff.layers import sibling_layers
from stagediff.layout import (
    adl_json,
    config_yaml,
    crosscoder_dir,
    diff_dir,
    difference_of_means_json,
    features_csv,
    generations_jsonl,
    metrics_json,
    null_dir,
    organism_json,
    saes_dir,
    stage_dir,
    summary_json,
)
from stagediff.stages import STANDARD_GRAPH, resolve_stages


def null_metrics(run_dir: Path) -> dict | None:
    """The eval metrics of RUN/null (the demo's null run) if it diffed this run's organism with this run's settings,
    else None: a null left from an earlier demo in the same folder must not stand beside today's figures."""
    null = null_dir(run_dir)
    metrics = read_json_if_exists(metrics_json(null))
    if metrics is None or not (config_yaml(null).exists() and config_yaml(run_dir).exists()):
        return None

    def settings(folder: Path) -> dict:
        text = config_yaml(folder).read_text().replace(str(Path(folder).resolve()), "RUN").replace(str(folder), "RUN")
        cfg = yaml.safe_load(text) or {}
        cfg.pop("_run", None)
        cfg.pop("finetuned_model", None)  # the null's is the control: the one difference by design
        (cfg.get("organism") or {}).pop("null_run", None)
        return cfg

    same_organism = (read_json_if_exists(organism_json(null)) or {}).get("fingerprint") == \
        (read_json_if_exists(organism_json(run_dir)) or {}).get("fingerprint")
    return metrics if same_organism and settings(null) == settings(run_dir) else None

def read_columns(path: Path) -> dict[str, list]:
    """A features.csv as {column: values} for the page: NaN as None, and an unranked feature's rank None."""
    cols = {k: v.tolist() for k, v in read_features(path).items()}
    if "rank" in cols:
        cols["rank"] = [r or None for r in cols["rank"]]
    return cols


def _rounded(values: list, digits: int = 6) -> list:
    """Round floats for the page: 6 decimals resolve small rotations (cos 0.9994 vs 0.9996) and keep the file small."""
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            out.append(v)
        elif isinstance(v, float):
            out.append(None if not math.isfinite(v) else (int(v) if v.is_integer() and abs(v) < 2**53 else round(v, digits)))
        else:
            out.append(v)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def gather(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Everything the page shows except the per-feature cards (see `cards.py`)."""
    run_dir = Path(run_dir)
    cols = read_columns(features_csv(diff_dir(run_dir)))
    summary = read_json_if_exists(summary_json(diff_dir(run_dir))) or {}

    metrics = read_json_if_exists(metrics_json(run_dir))
    relevant = _relevant(metrics)
    if relevant is not None:
        cols["relevant"] = [int(f) in relevant for f in cols["feature"]]
    cols = {k: _rounded(v) for k, v in cols.items()}

    return {
        "run": _run_summary(run_dir, cfg),
        "features": cols,
        "n_features": len(cols["feature"]),
        "summary": summary,
        "axes": _axes(cfg, cols, summary),
        "views": _first_step_views(cols),
        "noise_floor": _noise_floor(cols),
        "organism": read_json_if_exists(organism_json(run_dir)) or (metrics or {}).get("organism"),
        "eval": metrics,
        "null_eval": null_metrics(run_dir),  # the demo's null run, if it ran with this run's settings
        "crosscoder": _crosscoder(run_dir),
        "adl": read_json_if_exists(adl_json(run_dir)),  # meandiff step: Activation Difference Lens
        "difference_of_means": read_json_if_exists(difference_of_means_json(run_dir)),  # meandiff step, generated
        "generations": _generations(generations_jsonl(run_dir)),
        "layers": sibling_layers(run_dir),  # a hook of a several-hook run: the layer selector's links; else None
    }


GENERATION_ROWS = 5000  # rows of eval/generations.jsonl embedded in the page (prompts x variants)


def _generations(path: Path) -> list[dict] | None:
    """eval/generations.jsonl (plain / clamped / steered greedy replies), shown on the cards; None when absent."""
    if not path.exists():
        return None
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip() and len(rows) < GENERATION_ROWS:
                rows.append(json.loads(line))
    return rows


def _axes(cfg: Config, cols: dict[str, list], summary: dict) -> dict[str, Any]:
    """The headline axes and their selection lines: as diff/summary.json recorded them, else from the config."""
    rule = summary.get("selection") if isinstance(summary.get("selection"), dict) else {}
    recorded = rule.get("axes") or {}
    cuts = rule.get("cuts") or {}
    kind = "enc" if cfg.diff.vector == "encoder" else "dec"
    out = []
    for name, (a, b) in zip("xy", cfg.diff.axes[:2]):
        entry = recorded.get(name) or {}
        if isinstance(entry.get("edge"), list) and len(entry["edge"]) == 2:
            a, b = entry["edge"]
        column = entry.get("column") or cos_column(kind, a, b)
        cut = cuts.get(name)
        if not isinstance(cut, (int, float)) or isinstance(cut, bool):
            cut = _threshold_from_config(cfg, cols, column)
        out.append({"column": column if column in cols else None, "label": f"cos({a}, {b})", "threshold": cut})
    selection = rule.get("selection") or summary.get("selection") or cfg.diff.selection
    if selection == "percentile":
        selection = f"percentile {rule.get('percentile', cfg.diff.percentile):g} of each axis"
    elif selection == "fdr":
        selection = f"FDR q <= {rule.get('q', cfg.diff.q):g}, significant on both axes against the control continuations"
    return {"x": out[0], "y": out[1] if len(out) > 1 else None, "selection": str(selection), "rule": summary.get("rule")}


def _threshold_from_config(cfg: Config, cols: dict[str, list], column: str) -> float | None:
    """The selection line recomputed from the config's rule (runs whose summary.json lacks the cuts)."""
    if cfg.diff.selection == "threshold":
        return cfg.diff.threshold
    if cfg.diff.selection == "percentile" and column in cols:
        dead = cols.get("dead") or [False] * len(cols[column])
        live = [v for v, d in zip(cols[column], dead) if _number(v) and d is not True]
        return float(np.percentile(live, cfg.diff.percentile)) if live else None
    return None  # fdr / noise selection: the cut differs per feature


def _first_step_views(cols: dict[str, list]) -> list[dict[str, str]]:
    """The appendix views: first step against second step of each trajectory, where the columns exist."""
    views = []
    for first, second, title in (("S_D", "D_FD", "S→D→F trajectory"), ("S_M", "M_FM", "S→M→F trajectory")):
        x, y = f"dec_cos_{first}", f"dec_cos_{second}"
        if x in cols and y in cols:
            a, b = first.split("_")
            views.append({"x": x, "y": y, "title": title, "x_label": f"cos({a}, {b})", "y_label": f"cos({b}, {second.split('_')[1]})"})
    return views


def _noise_floor(cols: dict[str, list]) -> dict[str, Any] | None:
    """The control continuations' cosines (every axis, pooled) per live feature, and the median control scale as a cosine."""
    ctl = [c for c in cols if c.startswith("ctl_cos_")]
    if not ctl:
        return None
    dead = cols.get("dead") or [False] * len(cols[ctl[0]])
    cos = [round(v, 5) for c in ctl for v, d in zip(cols[c], dead) if _number(v) and d is not True]
    scales = [v for c in cols if c.startswith("scale_") for v, d in zip(cols[c], dead) if _number(v) and d is not True]
    median = 1.0 - float(np.median(scales)) if scales else None
    return {"cos": cos, "median_cos": median} if cos else None


def _relevant(metrics: dict | None) -> set[int] | None:
    """Ground-truth relevant features: the paired label's list in eval/metrics.json (organism runs only)."""
    listed = ((metrics or {}).get("labels") or {}).get("relevant_features")
    return {int(f) for f in listed} if isinstance(listed, list) else None


def _crosscoder(run_dir: Path) -> dict[str, Any] | None:
    path = features_csv(crosscoder_dir(run_dir))
    if not path.exists():
        return None
    cols = read_columns(path)
    if "relative_norm" not in cols:
        return None
    values = [v for v in cols["relative_norm"] if isinstance(v, float) and math.isfinite(v)]
    return {"relative_norm": _rounded(values, 3), "column": "relative_norm"}


# ---------------------------------------------------------------- run summary


def _run_summary(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Models, data, hook, budgets, per-stage SAE quality, provenance and wall times."""
    provenance: dict = {}
    cfg_path = config_yaml(run_dir)
    if cfg_path.exists():
        try:
            provenance = (yaml.safe_load(cfg_path.read_text()) or {}).get("_run") or {}
        except yaml.YAMLError:
            provenance = {}
    try:
        stages = [(s.name, s.model, s.data, s.parent, s.tokens) for s in resolve_stages(cfg)]
    except StagediffError:  # a custom graph this config cannot resolve: list what is on disk
        stages = []
    known = {s[0] for s in stages}
    for d in sorted(saes_dir(run_dir).glob("*/")):
        if d.name not in known:
            model, data, parent = STANDARD_GRAPH.get(d.name, (None, None, None))
            stages.append((d.name, model, data, parent, None))
    rows = []
    for name, model, data, parent, tokens in stages:
        sdir = stage_dir(run_dir, name)
        sae_cfg = read_json_if_exists(sdir / "cfg.json") or {}
        stats = read_json_if_exists(sdir / "stats.json") or {}
        meta = sae_cfg.get("metadata") or {}
        rows.append({
            "stage": name, "model": model, "data": data, "parent": parent,
            "tokens": meta.get("tokens_seen") or stats.get("tokens") or tokens,
            "trained": sdir.exists(),
            "d_sae": sae_cfg.get("d_sae"), "architecture": sae_cfg.get("architecture"),
            "explained_variance": _pick(stats, "explained_variance"),
            "l0": _pick(stats, "l0"),
            "dead_fraction": _pick(stats, "dead_fraction"),
            "tokens_per_s": _pick(stats, "tokens_per_second"),
            "wall_s": _pick(stats, "wall_seconds"),
            "sparsity": _sparsity(sdir),
        })
    return {
        "models": cfg.model_paths(),
        "data": {k: {"path": v.path, "format": v.format} for k, v in cfg.data_configs().items()},
        "hook": cfg.hook,
        "context_size": cfg.context_size,
        "seed": cfg.seed,
        "sae": {"architecture": cfg.sae.architecture, "d_sae": cfg.sae.d_sae, "k": cfg.sae.k},
        "diff": to_dict(cfg.diff),
        "stages": rows,
        "wall_seconds": provenance.get("wall_seconds") if isinstance(provenance.get("wall_seconds"), dict) else None,
        "provenance": _flatten({k: v for k, v in provenance.items() if k != "wall_seconds"}),
        "run_dir": str(run_dir),
    }


def _pick(stats: dict, key: str) -> Any:
    """A number train_sae wrote to stats.json (None where the stage has none)."""
    v = stats.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sparsity(sdir: Path) -> dict[str, float] | None:
    """The median firing rate over a stage's features (sparsity.safetensors, as the diff reads it)."""
    try:
        freq = load_frequency(sdir)
    except StagediffError:  # a damaged file: the report shows the rest
        return None
    if freq is None or not len(freq):
        return None
    return {"median_density": round(float(np.median(freq)), 6), "features": len(freq)}


def _flatten(d: Any, prefix: str = "", out: dict | None = None) -> dict[str, Any]:
    """Nested provenance as dotted scalar keys (lists of scalars joined), for a simple table."""
    out = {} if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(d, (list, tuple)):
        out[prefix] = ", ".join(str(x) for x in d)[:200]
    elif d is not None:
        out[prefix] = d if isinstance(d, (int, float, bool)) else str(d)[:200]
    return out
