"""Scoring a ranking and a selected set against relevance labels, the same way for every method.

The population is the *judged* live features: live (ranked by the method) and firing often
enough on held-out data for the label to decide (labels.py). Live features the label cannot
judge are counted separately and never scored, so every method's precision, AP and base
rate refer to the same kind of feature.

Every figure comes with its uncertainty:
- precision of k picks with r relevant: an exact (Clopper-Pearson) 95% interval, and a
  p-value against the base rate from the hypergeometric tail P(X >= r) of drawing k of the
  N judged features with R relevant (what a random pick of k would give);
- enrichment = precision / base rate, its interval the precision's divided by the base rate;
- AP: a 95% bootstrap interval over features (the judged features resampled with
  replacement, the ranking kept), and a permutation p-value (random rankings of the same
  features; a random ranking's expected AP is about the base rate).
Undefined values (the precision of an empty selection, AP with no relevant feature) are None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

AT_K = (10, 25, 50, 100)
BOOTSTRAP = 1000
PERMUTATIONS = 2000


def average_precision(hits: Sequence[bool] | np.ndarray) -> float | None:
    """Mean of precision@k over the ranks k of the relevant items (`hits` in ranked order)."""
    hits = np.asarray(hits, dtype=bool)
    if not hits.any():
        return None
    ranks = np.nonzero(hits)[0] + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def _ap_rows(hits: np.ndarray) -> np.ndarray:
    """AP of every row of a [n, k] boolean matrix of ranked hits (NaN for a row without hits)."""
    hits = hits.astype(np.float64)
    cum = np.cumsum(hits, axis=1)
    ranks = np.arange(1, hits.shape[1] + 1)
    total = hits.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (hits * cum / ranks).sum(1) / total


def precision_at(hits: Sequence[bool] | np.ndarray, k: int) -> float | None:
    """Relevant share of the top k (of the top len(hits) when fewer are ranked)."""
    hits = np.asarray(hits, dtype=bool)[:k]
    return float(hits.mean()) if hits.size else None


# ---------------------------------------------------------------- exact tails and intervals


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeom_sf(r: int, k: int, relevant: int, population: int) -> float:
    """P(X >= r) for X the relevant count among k drawn without replacement from `population` holding `relevant`."""
    lo, hi = max(r, 0, k - (population - relevant)), min(k, relevant)
    if lo > hi:
        return 0.0 if r > hi else 1.0
    denom = _log_comb(population, k)
    terms = [_log_comb(relevant, x) + _log_comb(population - relevant, k - x) - denom for x in range(lo, hi + 1)]
    m = max(terms)
    return float(min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms)))


def binom_sf(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [_log_comb(n, x) + x * lp + (n - x) * lq for x in range(k, n + 1)]
    m = max(terms)
    return float(min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms)))


@lru_cache(maxsize=4096)
def clopper_pearson(r: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for r successes in n trials (by bisection on the binomial tails)."""
    if n == 0:
        return (0.0, 1.0)
    a = (1 - level) / 2

    def solve(f, target: float) -> float:  # f increasing in p; find p with f(p) = target
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if r == 0 else solve(lambda p: binom_sf(r, n, p), a)  # P(X >= r | p) = a
    upper = 1.0 if r == n else solve(lambda p: binom_sf(r + 1, n, p), 1 - a)  # P(X <= r | p) = a
    return (lower, upper)


def precision_stats(picked: np.ndarray, relevant: np.ndarray, base_rate: float | None) -> dict:
    """Precision, its exact interval, enrichment with interval, and the hypergeometric p-value of a pick.

    `picked` are indices into `relevant`, a boolean array over the judged population.
    """
    k, n, R = int(len(picked)), int(len(relevant)), int(relevant.sum())
    if k == 0:
        return {"k": 0, "relevant": 0, "precision": None, "ci": None, "enrichment": None, "enrichment_ci": None, "p_value": None}
    r = int(relevant[picked].sum())
    lo, hi = clopper_pearson(r, k)
    enr = (lambda v: v / base_rate) if base_rate else (lambda v: None)
    return {"k": k, "relevant": r, "precision": r / k, "ci": [lo, hi], "enrichment": enr(r / k),
            "enrichment_ci": [enr(lo), enr(hi)] if base_rate else None, "p_value": hypergeom_sf(r, k, R, n)}


def ap_stats(scores: np.ndarray, relevant: np.ndarray, seed: int = 0) -> dict:
    """AP of ranking the judged population by `scores` (higher first), its bootstrap interval and permutation p."""
    n = len(scores)
    if n == 0 or not relevant.any():
        return {"ap": None, "ap_ci": None, "ap_p_value": None}
    order = np.lexsort((np.arange(n), -scores))  # best first, ties by position: reproducible
    hits = relevant[order]
    ap = average_precision(hits)
    rng = np.random.default_rng(seed)
    # bootstrap: resample features; a resample keeps the method's order among the drawn features
    draws = np.sort(rng.integers(0, n, size=(BOOTSTRAP, n)), axis=1)  # positions in `order`, so sorted = ranked
    boot = _ap_rows(hits[draws])
    boot = boot[np.isfinite(boot)]
    ci = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))] if boot.size else None
    perm_hits = np.stack([rng.permutation(hits) for _ in range(PERMUTATIONS)]) if n * PERMUTATIONS <= 5e7 else None
    if perm_hits is None:  # very large dictionaries: fewer permutations, same estimate
        perm_hits = np.stack([rng.permutation(hits) for _ in range(max(100, int(5e7 // n)))])
    perm = _ap_rows(perm_hits)
    p = float((1 + np.sum(perm >= ap - 1e-12)) / (1 + len(perm)))
    return {"ap": ap, "ap_ci": ci, "ap_p_value": p}


# ---------------------------------------------------------------- one method


def method_metrics(ranking: Sequence[int], selected: Sequence[int], relevant: np.ndarray, live: np.ndarray,
                   judged: np.ndarray | None = None, scores: np.ndarray | None = None,
                   ks: Sequence[int] = AT_K, extra_k: dict[str, int] | None = None, seed: int = 0) -> dict:
    """Metrics of one method over the judged live features of its dictionary.

    `ranking` = live feature ids best first, `selected` = ids the method picks; `relevant`,
    `live`, `judged` are boolean arrays over all features of the method's dictionary
    (`judged` None = every live feature is judged). Precision at each k in `ks` (and at each
    named size of `extra_k`, e.g. the size stage-wise selects) is over the method's top k
    judged features, so every method is compared at the same sizes.
    """
    relevant = np.asarray(relevant, dtype=bool)
    live = np.asarray(live, dtype=bool)
    judged = live if judged is None else (np.asarray(judged, dtype=bool) & live)
    ranking = np.asarray(ranking, dtype=np.int64)
    ranking = ranking[judged[ranking]]  # only judged features are ranked and scored
    selected = np.asarray(selected, dtype=np.int64)
    selected = selected[judged[selected]]
    pop = np.flatnonzero(judged)
    pos = np.full(len(relevant), -1)
    pos[pop] = np.arange(len(pop))
    rel_pop = relevant[pop]
    base_rate = float(rel_pop.mean()) if len(pop) else None

    sel = precision_stats(pos[selected], rel_pop, base_rate)
    # the AP ranks every judged feature: judged features the method did not rank go last, in id order
    if scores is None:
        rank_score = np.full(len(relevant), -np.inf)
        rank_score[ranking] = -np.arange(len(ranking), dtype=np.float64)
    else:
        rank_score = np.where(np.isfinite(scores), scores, -np.inf).astype(np.float64)
    ap = ap_stats(rank_score[pop], rel_pop, seed=seed)
    hits = relevant[ranking]
    at_k = {str(k): precision_stats(pos[ranking[:k]], rel_pop, base_rate) for k in ks}
    for name, k in (extra_k or {}).items():
        at_k[name] = precision_stats(pos[ranking[:k]], rel_pop, base_rate)
    return {
        "selected": sel["k"],
        "precision": sel["precision"],
        "precision_ci": sel["ci"],
        "base_rate": base_rate,
        "enrichment": sel["enrichment"],
        "enrichment_ci": sel["enrichment_ci"],
        "p_value": sel["p_value"],
        **ap,
        "ap_ratio": ap["ap"] / base_rate if ap["ap"] is not None and base_rate else None,
        "p_at_10": precision_at(hits, 10),
        "p_at_50": precision_at(hits, 50),
        "at_k": at_k,
        "live": int(live.sum()),
        "judged": int(len(pop)),
        "unjudged_live": int(live.sum() - len(pop)),
        "relevant_selected": sel["relevant"],
        "relevant_judged": int(rel_pop.sum()),
    }
