"""Top-activating contexts of dictionary features, streamed over activation rows.

One pass over the rows keeps, per feature, the `n` largest activations and the
rows they came from (a running top-k merged chunk by chunk, so memory is
O(features x (n + chunk)) whatever the row count), plus firing counts and sums
(mean activation) for free. The rows are an `ActivationStore`, a tensor, or any
iterable of [B, d] chunks (e.g. held-out activations computed on the fly).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from stagediff.errors import StagediffError
from stagediff.runtime import progress


class FeatureScan(NamedTuple):
    values: torch.Tensor  # [F, n] largest activations, descending; 0 where fewer than n rows fired
    row_ids: torch.Tensor  # [F, n] global row index of each value; -1 where the feature did not fire
    fires: torch.Tensor  # [F] number of rows where the feature is > 0
    sums: torch.Tensor  # [F] sum of activations over all rows (mean = sums / rows)
    rows: int  # rows scanned


def _chunks(rows: Any, chunk: int, max_rows: int | None) -> tuple[Iterator[torch.Tensor], int | None]:
    """Yield [B, d] float tensors from a store, a tensor or an iterable; also the total if known."""
    if hasattr(rows, "read") and hasattr(rows, "num_rows"):  # an ActivationStore
        total = rows.num_rows if max_rows is None else min(rows.num_rows, max_rows)
        return (torch.as_tensor(rows.read(s, min(s + chunk, total))) for s in range(0, total, chunk)), total
    if isinstance(rows, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(rows)
        total = t.shape[0] if max_rows is None else min(t.shape[0], max_rows)
        return (t[s : min(s + chunk, total)] for s in range(0, total, chunk)), total
    if isinstance(rows, Iterable):
        return (torch.as_tensor(c) for c in rows), max_rows
    raise StagediffError(f"cannot read activation rows from {type(rows).__name__}: pass an ActivationStore, a tensor or an iterable of [B, d] chunks")


@torch.no_grad()
def scan_features(
    sae: Any,
    rows: Any,
    features: Sequence[int] | torch.Tensor | None = None,
    n: int = 20,
    chunk: int = 4096,
    max_rows: int | None = None,
    desc: str = "top activations",
) -> FeatureScan:
    """Encode every row with `sae` and keep each feature's top-`n` activations, fire counts and sums."""
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    idx = None if features is None else torch.as_tensor(features, dtype=torch.long, device=device)
    n_feat = int(sae.cfg.d_sae) if idx is None else int(idx.numel())
    best_v = torch.zeros(n_feat, 0, device=device)
    best_i = torch.zeros(n_feat, 0, dtype=torch.long, device=device)
    fires = torch.zeros(n_feat, dtype=torch.long, device=device)
    sums = torch.zeros(n_feat, dtype=torch.float64, device=device)
    seen = 0
    it, total = _chunks(rows, chunk, max_rows)
    for x in progress(it, total=None if total is None else -(-total // chunk), desc=desc, unit="chunk"):
        if max_rows is not None and seen >= max_rows:
            break
        if max_rows is not None:
            x = x[: max_rows - seen]
        f = sae.encode(x.to(device=device, dtype=dtype)).float()
        if idx is not None:
            f = f[:, idx]
        f = f.T  # [F, B]
        fires += (f > 0).sum(1)
        sums += f.sum(1, dtype=torch.float64)
        ids = torch.arange(seen, seen + f.shape[1], device=device).expand_as(f)
        v = torch.cat([best_v, f], 1)
        i = torch.cat([best_i, ids], 1)
        top_v, top_j = v.topk(min(n, v.shape[1]), dim=1)
        best_v, best_i = top_v, i.gather(1, top_j)
        seen += f.shape[1]
    if best_v.shape[1] < n:  # fewer rows than n: pad so shapes are always [F, n]
        pad = n - best_v.shape[1]
        best_v = torch.cat([best_v, torch.zeros(n_feat, pad, device=device)], 1)
        best_i = torch.cat([best_i, torch.full((n_feat, pad), -1, dtype=torch.long, device=device)], 1)
    best_i = torch.where(best_v > 0, best_i, torch.full_like(best_i, -1))
    return FeatureScan(best_v.cpu(), best_i.cpu(), fires.cpu(), sums.cpu(), seen)


def top_activations(sae: Any, rows: Any, features: Sequence[int] | None = None, n: int = 20, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature, the `n` largest activations [F, n] and their global row ids [F, n] (-1 = did not fire).

    `rows` is an ActivationStore, a [N, d] tensor or an iterable of [B, d] chunks;
    `features` restricts the scan to those feature ids (rows of the outputs follow that order).
    """
    scan = scan_features(sae, rows, features, n, **kw)
    return scan.values, scan.row_ids


class RowIndex:
    """Where each row of a store comes from (window, position), searchable by window.

    Built once per store (it reads every shard's index), then looked up for as many windows as needed.
    """

    def __init__(self, store: Any):
        self.window, self.position = (np.asarray(torch.as_tensor(a).cpu()).astype(np.int64) for a in store.row_index())
        self._order = np.argsort(self.window, kind="stable")
        self._sorted = self.window[self._order]

    def rows_of(self, window: int) -> np.ndarray:
        """The store rows of one window, in store order."""
        lo, hi = np.searchsorted(self._sorted, [window, window + 1])
        return np.sort(self._order[lo:hi])


def window_activations(sae: Any, store: Any, window: int, feature: int, index: RowIndex | None = None,
                       positions: Sequence[int] | None = None) -> np.ndarray:
    """Feature `feature`'s activation at every position of `window` of a store ([T], 0 where no row).

    Pass a `RowIndex` of the store when looking up many windows; `positions` encodes only the rows
    at those positions (the others stay 0), e.g. the span a context shows.
    """
    index = index if index is not None else RowIndex(store)
    rows = index.rows_of(window)
    T = int(np.asarray(store.windows().ids).shape[1]) if positions is None else max(positions) + 1
    if positions is not None:
        rows = rows[np.isin(index.position[rows], positions)]
    out = np.zeros(T, dtype=np.float32)
    if rows.size == 0:
        return out
    lo, hi = int(rows.min()), int(rows.max()) + 1  # a window's rows are contiguous in the store: one read
    with torch.no_grad():
        x = torch.as_tensor(store.read(lo, hi)).float()[torch.as_tensor(rows - lo)]
        out[index.position[rows]] = sae.encode(x)[:, feature].float().cpu().numpy()
    return out


def context_span(mask: Any, position: int, before: int, after: int) -> list[int]:
    """The positions shown around `position` of one window: `before` and `after` it, padding skipped
    (`mask` [T] marks real tokens; `position` itself is always kept)."""
    mask = np.asarray(mask)
    lo, hi = max(0, position - before), min(len(mask), position + after + 1)
    return [p for p in range(lo, hi) if mask[p] or p == position]


def context_tokens(
    windows: Any,
    window: int,
    position: int,
    tokenizer: Any,
    before: int = 12,
    after: int = 4,
    activations: Sequence[float] | np.ndarray | None = None,
) -> list[dict]:
    """The tokens around (`window`, `position`) as [{"position", "token", "act", "current"}], padding skipped.

    `windows` has `.ids [N, T]` and `.mask [N, T]` (a store's `TokenWindows`);
    `activations` (optional, [T]) gives the feature's activation at each position of
    the window, e.g. from `window_activations`, so a report can shade each token.
    """
    ids = np.asarray(windows.ids[window])
    mask = np.asarray(windows.mask[window]) if getattr(windows, "mask", None) is not None else np.ones_like(ids, bool)
    return [{"position": p, "token": tokenizer.decode([int(ids[p])]), "act": None if activations is None else float(activations[p]),
             "current": p == position} for p in context_span(mask, position, before, after)]
