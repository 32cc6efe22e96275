"""The field's baselines on planted answers: diff-SAE, ADL, difference-of-means ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stagediff.config import load_config
from stagediff.diff import read_features
from stagediff.diffsae import difference_latents, diffsae_scores, diffsae_splice_fn, load_base_mean, train_diffsae
from stagediff.errors import StagediffError
from stagediff.sae import SAE
from test_crosscoder import _write_store

D = 16
N_SHARED = 12
ROWS = 8192


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted_difference(seed: int = 0):
    """Base rows: sparse codes over 12 shared directions. The fine-tune strengthens every shared feature by 10%,
    adds direction v on 20% of tokens (amplitude 0.5..1), w on 15% (0.4..0.8) and a little dense noise:
    the difference is v, w, the 12 weak shifts and noise."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T
    codes = (torch.rand(ROWS, N_SHARED, generator=g) < 0.15) * (0.5 + 1.5 * torch.rand(ROWS, N_SHARED, generator=g))
    base = codes @ Q[:N_SHARED] * 3.0
    a = (torch.rand(ROWS, generator=g) < 0.2) * (0.5 + 0.5 * torch.rand(ROWS, generator=g))
    b = (torch.rand(ROWS, generator=g) < 0.15) * (0.4 + 0.4 * torch.rand(ROWS, generator=g))
    ft = 1.1 * base + a[:, None] * Q[12] + b[:, None] * Q[13] + 0.02 * torch.randn(ROWS, D, generator=g)
    return base, ft, Q[12], Q[13], a


def _config(**over):
    items = {"device": "cpu", "seed": 0, "sae.batch_size": 256, "sae.warmup_steps": 20, "sae.dead_tokens": 20000,
             "sae.checkpoint_every": 10_000, "baselines.diffsae_d_sae": 24, "baselines.diffsae_k": 2,
             "baselines.diffsae_tokens": 256 * 1000, "baselines.diffsae_lr": 3e-3, **over}
    return load_config(overrides=[f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def diffsae_run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("diffsae")
    base, ft, v, w, a = _planted_difference()
    # both datasets' pairs (the diff-SAE reads an equal share of each): the same planted fine-tune on each half
    for data, sl in (("base", slice(0, ROWS // 2)), ("finetune", slice(ROWS // 2, ROWS))):
        _write_store(run / "activations" / f"base__{data}", base[sl])
        _write_store(run / "activations" / f"finetuned__{data}", ft[sl])
    out = train_diffsae(run, _config())
    torch.set_num_threads(n)
    return run, out, (base, ft, v, w, a)


def _best(W_dec: torch.Tensor, direction: torch.Tensor) -> tuple[int, float]:
    cos = torch.nn.functional.cosine_similarity(W_dec, direction[None], dim=1)
    return int(cos.argmax()), float(cos.max())


def test_diffsae_recovers_the_planted_difference_directions(diffsae_run):
    run, out, (base, ft, v, w, a) = diffsae_run
    sae = SAE.load(out)
    W = sae.W_dec.detach()
    jv, cv = _best(W, v)
    jw, cw = _best(W, w)
    assert cv > 0.95 and cw > 0.9, (cv, cw)
    cols = read_features(out / "features.csv")
    for c in ("feature", "freq", "mean_activation", "max_activation", "dead", "score", "rank"):
        assert c in cols, c
    # v carries the most difference per token (20% x 0.75, w 15% x 0.6, a shift 15% x 0.4): ranked first, w second
    assert cols["rank"][jv] == 1 and cols["rank"][jw] == 2
    assert 0.17 < cols["freq"][jv] < 0.25 and 0.65 < cols["mean_activation"][jv] < 0.85  # planted: 20%, mean 0.75
    np.testing.assert_allclose(diffsae_scores(run), cols["score"], equal_nan=True)
    # the latent reads the planted amplitude on paired rows
    f = difference_latents(sae, base, ft)[:, jv]
    assert np.corrcoef(f.numpy(), a.numpy())[0, 1] > 0.95
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top"][0]["feature"] == jv and summary["latents"] == 24
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["diffsae"]["tokens"] == 256 * 1000
    # μ_base is the base rows' mean
    assert torch.allclose(load_base_mean(run), base.mean(0), atol=0.05)


def test_diffsae_splice_removes_the_clamped_difference(diffsae_run):
    run, out, (base, ft, v, w, a) = diffsae_run
    sae = SAE.load(out)
    jv, _ = _best(sae.W_dec.detach(), v)
    mu = load_base_mean(run)
    # no clamp: the identity, exactly
    assert torch.equal(diffsae_splice_fn(sae, mu)(ft), ft)
    # where the base residual equals its mean, the splice is exact: resid - f_j(δ) d_j
    delta = ft[:64] - base[:64]
    resid = mu + delta
    with torch.no_grad():
        exact = resid - sae.encode(delta)[:, [jv]] @ sae.W_dec[[jv]]
        spliced = diffsae_splice_fn(sae, mu, [jv])(resid)
    assert torch.allclose(spliced, exact, atol=1e-5)
    # on real rows (base varying around μ): the v part is removed where it was planted, little changes elsewhere
    with torch.no_grad():
        out_rows = diffsae_splice_fn(sae, mu, [jv])(ft)
    on = a > 0
    before, after = ft @ v, out_rows @ v
    removed = ((before - after)[on] / a[on]).mean()
    assert 0.8 < float(removed) < 1.2, float(removed)
    assert float((out_rows - ft)[~on].norm(dim=1).mean()) < 0.2 * float(a[on].mean())


def test_diffsae_needs_the_paired_stores(tmp_path):
    with pytest.raises(StagediffError, match="harvest"):
        train_diffsae(tmp_path, _config())
