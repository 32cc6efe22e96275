"""The rankings compared: each method = a ranking of live features (best first) plus a selected set.

Stage-wise methods come from `diff/features.csv` (feature i is the same feature in every
stage, so they share one set of labels); the crosscoder and activation-difference
baselines are built in `run.py` from their own scores with `from_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stagediff.diff import select
from stagediff.errors import StagediffError
from stagediff.features import cos_column, order_by_score


@dataclass
class Method:
    name: str
    ranking: np.ndarray  # live feature ids, best first
    selected: np.ndarray  # feature ids the method picks
    live: np.ndarray  # bool over the dictionary's features
    selection: str  # how `selected` was chosen, in words
    scores: np.ndarray  # per feature, higher = more candidate (NaN for dead)


def from_scores(name: str, scores: np.ndarray, live: np.ndarray, selected: np.ndarray, selection: str) -> Method:
    """A method from per-feature scores (higher first; ties by feature id), ranking live features only."""
    scores = np.asarray(scores, dtype=np.float64)
    live = np.asarray(live, dtype=bool) & np.isfinite(scores)
    ranking = order_by_score(scores, live)
    selected = np.asarray(selected, dtype=np.int64)
    return Method(name, ranking, selected[live[selected]], live, selection, scores)


def top_k(scores: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """The k best live features by score: a size-matched selection for methods without a rule of their own."""
    return from_scores("", scores, live, np.zeros(0, np.int64), "").ranking[:k]


# other ways to combine the axes, recorded by diff.py in features.csv: method name -> (column, words)
SCORE_VARIANTS = {
    "stagewise_sum": ("score_sum", "z_x + z_y"),
    "stagewise_product": ("score_product", "the product of rotation / control scale over the axes"),
    "stagewise_enc": ("score_enc", "min over axes of z on encoder cosines"),
    "stagewise_dec": ("score_dec", "min over axes of z on decoder cosines"),
}


def stagewise_methods(table: dict[str, np.ndarray], percentile: float, threshold: float, vector: str = "decoder",
                      noise_multiple: float = 3.0) -> dict[str, Method]:
    """From diff/features.csv: stagewise (the run's selection and score), its percentile and
    threshold variants (diff.select, same score family), the noise-floor variant when the run
    has a noise control, the other ways to combine the two axes' standings that diff records
    (SCORE_VARIANTS: each ranked by its column, selecting as many as stagewise does, so they
    compare at the same size), and each rotation alone (d_to_f, m_to_f, s_to_f = mean of
    S->F_via_D and S->F_via_M), selected below the percentile of that axis."""
    kind = "dec" if vector == "decoder" else "enc"
    cols = {k: cos_column(kind, *e) for k, e in
            {"x": ("D", "F_via_D"), "y": ("M", "F_via_M"), "sd": ("S", "F_via_D"), "sm": ("S", "F_via_M")}.items()}
    missing = [c for c in ["selected", "score", *cols.values()] if c not in table]
    if missing:
        raise StagediffError(f"diff/features.csv lacks columns {missing}: rerun `stagediff diff RUN` "
                             "with the standard stage graph (S, D, M, F_via_D, F_via_M)")
    n = len(table["score"])
    live = ~table["dead"] if "dead" in table else np.isfinite(table["score"])
    x, y = table[cols["x"]], table[cols["y"]]
    ids = np.arange(n)
    out = {"stagewise": from_scores("stagewise", table["score"], live, ids[table["selected"]], "the run's diff selection")}
    for name, rule in (("stagewise_percentile", "percentile"), ("stagewise_threshold", "threshold")):
        sel = select([x, y], live, selection=rule, percentile=percentile, threshold=threshold)
        words = f"both axes below their {percentile:g}th percentile" if rule == "percentile" else f"both axes below {threshold:g}"
        out[name] = from_scores(name, sel["score"], live, ids[sel["selected"]], words)
    multiples = [table.get(f"noise_multiple_{a}") for a in ("x", "y")]
    if all(m is not None for m in multiples):  # rotation over the noise floor on both axes
        score = np.minimum(*multiples) / noise_multiple
        out["stagewise_noise"] = from_scores("stagewise_noise", score, live, ids[live & (score >= 1)],
                                             f"rotation >= {noise_multiple:g} x noise floor on both axes")
    k = len(out["stagewise"].selected)
    for name, (column, words) in SCORE_VARIANTS.items():
        if column in table:
            score = np.where(np.isfinite(table["score"]), table[column], np.nan)  # the same ranked population
            out[name] = from_scores(name, score, live, top_k(score, live, k), f"top {k} (as many as stagewise) by {words}")
    s_to_f = (table[cols["sd"]] + table[cols["sm"]]) / 2
    for name, cos in (("d_to_f", x), ("m_to_f", y), ("s_to_f", s_to_f)):
        sel = select([cos], live, selection="percentile", percentile=percentile)
        out[name] = from_scores(name, 1.0 - cos, live, ids[sel["selected"]], f"this axis below its {percentile:g}th percentile")
    return out
