"""Top-activating contexts: the streamed top-k equals a brute-force top-k; token rendering."""

from __future__ import annotations

import numpy as np
import torch

from stagediff.config import SAEConfig
from stagediff.contexts import RowIndex, context_span, context_tokens, scan_features, top_activations, window_activations
from stagediff.sae import SAE


def _relu_sae(d_in: int, d_sae: int, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, SAEConfig(architecture="relu", d_sae=d_sae), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(-0.8 * torch.ones(d_sae))  # sparse: most features silent on most rows
    return sae


def test_streamed_top_k_matches_brute_force():
    torch.manual_seed(0)
    sae = _relu_sae(16, 24)
    x = torch.randn(1000, 16)
    f = sae.encode(x).detach()
    # chunks of 97 rows: the running top-k must merge across chunk borders
    scan = scan_features(sae, x, n=5, chunk=97)
    v, i = f.T.topk(5, dim=1)
    assert torch.allclose(scan.values, v, atol=1e-6)
    fired = scan.values > 0
    # same rows (ties are measure-zero with random data), -1 where the feature fired fewer than 5 times
    assert torch.equal(scan.row_ids[fired], i[fired])
    assert (scan.row_ids[~fired] == -1).all()
    assert torch.equal(scan.fires, (f > 0).sum(0))
    assert torch.allclose(scan.sums.float(), f.sum(0), rtol=1e-4, atol=1e-4)
    assert scan.rows == 1000
    # a feature subset, from an iterable of chunks, keeps the subset's order
    feats = [7, 2, 19]
    vals, rows = top_activations(sae, (x[s : s + 300] for s in range(0, 1000, 300)), features=feats, n=5)
    assert torch.allclose(vals, v[feats], atol=1e-6)
    assert torch.equal(rows[vals > 0], i[feats][vals > 0])


def test_fewer_rows_than_n_pads_with_minus_one():
    sae = _relu_sae(8, 4)
    scan = scan_features(sae, torch.randn(3, 8), n=10)
    assert scan.values.shape == (4, 10) and scan.row_ids.shape == (4, 10)
    assert (scan.row_ids[:, 3:] == -1).all()


class _Windows:
    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask


class _Store:
    """Rows of two windows laid out as an ActivationStore lays them out (window-major, masked positions skipped)."""

    def __init__(self, x, win, pos, windows):
        self.x, self.win, self.pos, self._windows = x, win, pos, windows
        self.num_rows = len(x)

    def read(self, a, b):
        return self.x[a:b]

    def row_index(self):
        return self.win, self.pos

    def windows(self):
        return self._windows


def test_context_tokens_and_window_activations(tokenizer):
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    T = len(ids) + 1
    win_ids = torch.tensor([[tokenizer.bos_token_id] + ids, [tokenizer.bos_token_id] + ids[::-1]])
    mask = torch.ones_like(win_ids, dtype=torch.bool)
    mask[:, 0] = False  # BOS is not a row
    windows = _Windows(win_ids, mask)
    sae = _relu_sae(8, 6)
    w, p = torch.nonzero(mask, as_tuple=True)
    x = torch.randn(len(w), 8)
    store = _Store(x, w.numpy(), p.numpy(), windows)
    acts = window_activations(sae, store, 1, 3)
    expect = np.zeros(T, np.float32)
    expect[1:] = sae.encode(x[w == 1])[:, 3].detach().numpy()
    assert np.allclose(acts, expect, atol=1e-6)
    out = context_tokens(windows, 0, 4, tokenizer, before=2, after=1, activations=np.arange(T, dtype=float))
    assert [t["position"] for t in out] == [2, 3, 4, 5]
    assert "".join(t["token"] for t in out) == tokenizer.decode(ids[1:5])
    assert [t["current"] for t in out] == [False, False, True, False]
    assert [t["act"] for t in out] == [2.0, 3.0, 4.0, 5.0]
    # the masked BOS is skipped
    assert [t["position"] for t in context_tokens(windows, 0, 1, tokenizer, before=3, after=0)] == [1]


def test_window_lookup_over_windows_stored_out_of_order():
    """A store whose windows are not in order (a data-parallel harvest): each window's rows found by the index,
    activations of a span only where asked, padding skipped by the span."""
    T, d = 6, 8
    order = [2, 0, 1]  # the windows' order in the store
    w = torch.tensor([win for win in order for _ in range(1, T)])
    p = torch.tensor([q for _ in order for q in range(1, T)])  # position 0 (BOS) is never a row
    x = 3 * torch.randn(len(w), d, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[:, 0] = False
    mask[0, 4] = False  # a padded position in window 0 (its row exists but is not shown)
    store = _Store(x, w.numpy(), p.numpy(), _Windows(torch.zeros(3, T, dtype=torch.long), mask))
    sae = _relu_sae(d, 5)
    index = RowIndex(store)
    assert index.rows_of(0).tolist() == list(range(5, 10)) and index.rows_of(7).size == 0
    full = window_activations(sae, store, 0, 2, index)
    expect = np.zeros(T, np.float32)
    expect[1:] = sae.encode(x[5:10])[:, 2].detach().numpy()
    assert np.allclose(full, expect, atol=1e-6) and np.abs(expect).sum() > 0
    span = context_span(mask[0], 3, before=2, after=2)
    assert span == [1, 2, 3, 5]  # 4 is padding
    part = window_activations(sae, store, 0, 2, index, positions=span)
    assert np.allclose(part[span], expect[span], atol=1e-6) and part[4] == 0
