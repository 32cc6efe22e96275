"""Scoring a ranking and a selected set against relevance labels, the same way for every method.

Only live features count: the ranking is over live features, and the random
baseline (`base_rate`) is the relevant share among them. Undefined values (the
precision of an empty selection, AP with no relevant feature) are None (JSON null).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def average_precision(hits: Sequence[bool] | np.ndarray) -> float | None:
    """Mean of precision@k over the ranks k of the relevant items (`hits` in ranked order)."""
    hits = np.asarray(hits, dtype=bool)
    if not hits.any():
        return None
    ranks = np.nonzero(hits)[0] + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def precision_at(hits: Sequence[bool] | np.ndarray, k: int) -> float | None:
    """Relevant share of the top k (of the top len(hits) when fewer are ranked)."""
    hits = np.asarray(hits, dtype=bool)[:k]
    return float(hits.mean()) if hits.size else None


def method_metrics(ranking: Sequence[int], selected: Sequence[int], relevant: np.ndarray, live: np.ndarray) -> dict:
    """Metrics of one method: `ranking` = live feature ids best first, `selected` = ids it picks.

    `relevant` and `live` are boolean arrays over all features of the method's dictionary.
    """
    relevant = np.asarray(relevant, dtype=bool)
    live = np.asarray(live, dtype=bool)
    ranking = np.asarray(ranking, dtype=np.int64)
    ranking = ranking[live[ranking]]  # dead features are never ranked
    selected = np.asarray(selected, dtype=np.int64)
    selected = selected[live[selected]]
    n_live = int(live.sum())
    base_rate = float(relevant[live].mean()) if n_live else None
    precision = float(relevant[selected].mean()) if selected.size else None
    enrichment = precision / base_rate if precision is not None and base_rate else None
    hits = relevant[ranking]
    return {
        "selected": int(selected.size),
        "precision": precision,
        "base_rate": base_rate,
        "enrichment": enrichment,
        "ap": average_precision(hits),
        "p_at_10": precision_at(hits, 10),
        "p_at_50": precision_at(hits, 50),
        "live": n_live,
        "relevant_selected": int(relevant[selected].sum()),
        "relevant_live": int(relevant[live].sum()),
    }
