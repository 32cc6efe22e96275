"""`features.csv`: the per-feature table the steps after training write and read.

One row per dictionary feature, one column per measurement. The diff writes RUN/diff/features.csv
(cosines per edge `dec_cos_D_FD`, firing rates `freq_<stage>`, `dead`, `rare`, `selected`, `score`,
`rank`, the control standing...), the crosscoder and the diff-SAE write their own under RUN/crosscoder/
and RUN/diffsae/ (`feature`, `dead`, `score`, `rank` and their own columns). Evaluation, the report
and the demo summary read them back with `read_features`.

Conventions every writer keeps: `feature` is the feature id; `score` is higher = stronger candidate
(NaN where the feature is not ranked); `rank` is 1-based by descending score, empty (read back
as 0) for unranked features; booleans are True / False; other numbers are written to 8 digits.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from stagediff.errors import StagediffError
from stagediff.files import atomic_write

# the standard stages' names in column names (dec_cos_D_FD); other stage names are used as they are
SHORT = {"F_via_D": "FD", "F_via_M": "FM"}


def short(stage: str) -> str:
    """The short name of a stage used in column names (F_via_D → FD); other names unchanged."""
    return SHORT.get(stage, stage)


def cos_column(kind: str, a: str, b: str) -> str:
    """Column name of an edge's cosine, kind = 'dec' or 'enc': cos_column('dec','D','F_via_D') = 'dec_cos_D_FD'."""
    return f"{kind}_cos_{short(a)}_{short(b)}"


# ---------------------------------------------------------------- ranking


def order_by_score(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """The ids of the `eligible` features, best (highest score) first; ties keep feature order (reproducible)."""
    idx = np.flatnonzero(eligible)
    return idx[np.argsort(-np.asarray(score, dtype=np.float64)[idx], kind="stable")]


def rank_by_score(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """The `rank` column: 1-based rank of each eligible feature by descending score, 0 = unranked."""
    rank = np.zeros(len(score), dtype=np.int64)
    order = order_by_score(score, eligible)
    rank[order] = np.arange(1, len(order) + 1)
    return rank


def rank_scores(score: np.ndarray, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The `score` and `rank` columns of a baseline: score NaN where dead or unknown, the rest ranked."""
    score = np.where(dead | ~np.isfinite(score), np.nan, score)
    return score, rank_by_score(score, np.isfinite(score))


def top_ranked(rank: np.ndarray, n: int) -> np.ndarray:
    """The ids of the `n` best-ranked features (rank 1 first)."""
    ids = np.flatnonzero(rank)
    return ids[np.argsort(rank[ids], kind="stable")][:n]


# ---------------------------------------------------------------- files


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "nan" if math.isnan(v) else f"{v:.8g}"


def write_features(path: Path, columns: dict[str, np.ndarray], blank_zero: tuple[str, ...] = ("rank",)) -> None:
    """Write equal-length columns as CSV, atomically; integer columns in `blank_zero` write 0 as empty."""
    names = list(columns)
    n = len(next(iter(columns.values())))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for i in range(n):
        w.writerow(["" if (k in blank_zero and columns[k][i] == 0) else _fmt(columns[k][i]) for k in names])
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def read_features(path: str | Path) -> dict[str, np.ndarray]:
    """Read a features.csv back into columns: bools as bool, `feature`/`rank` as int (empty rank = 0), rest float."""
    path = Path(path)
    if not path.exists():
        raise StagediffError(f"{path} does not exist: run the step that writes it first (`stagediff {path.parent.name} RUN`)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "feature" not in rows[0]:
        raise StagediffError(f"{path} has no `feature` column (or is empty): rerun `stagediff {path.parent.name} RUN`")
    names, body = rows[0], rows[1:]
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        col = [r[j] for r in body]
        if col and all(v in ("True", "False") for v in col):
            out[name] = np.array([v == "True" for v in col])
        elif name in ("feature", "rank"):
            out[name] = np.array([int(v) if v else 0 for v in col], dtype=np.int64)
        else:
            out[name] = np.array([float(v) if v else float("nan") for v in col])
    return out
