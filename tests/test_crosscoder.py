"""The crosscoder baseline on synthetic paired activations with directions only the 'ft' model has."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stagediff.activations import write_store
from stagediff.config import SAEConfig, load_config
from stagediff.crosscoder import (
    crosscoder_scores,
    decoder_halves,
    latent_scaling,
    sum_norm_l1,
    sum_of_half_norms,
    train_crosscoder,
)
from stagediff.errors import StagediffError
from stagediff.features import read_features
from stagediff.sae import SAE

D = 16  # width of each model
N_SHARED, N_FT = 12, 4  # features both models have; features only the fine-tuned model has
ROWS = 8192


def _paired_acts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse codes over orthonormal directions of one residual basis (a fine-tune keeps the basis);
    the ft-only features never appear in the base model."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T  # rows: 12 shared + 4 ft-only directions
    fires = torch.rand(ROWS, N_SHARED + N_FT, generator=g) < 0.15
    codes = fires * (0.5 + 1.5 * torch.rand(ROWS, N_SHARED + N_FT, generator=g))
    base = codes[:, :N_SHARED] @ Q[:N_SHARED] * 3.0  # another scale than ft: each model is normalised on its own
    ft = codes @ Q
    return base, ft, Q


def _write_pairs(run, base: torch.Tensor, ft: torch.Tensor) -> None:
    """Paired (base, fine-tuned) stores over both datasets, as a harvest leaves them: half the rows each."""
    half = len(base) // 2
    for data, sl in (("base", slice(0, half)), ("finetune", slice(half, None))):
        write_store(run / "activations" / f"base__{data}", base[sl], shard_rows=2048)
        write_store(run / "activations" / f"finetuned__{data}", ft[sl], shard_rows=2048)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: with 2 threads on a busy 2-core machine, thread hand-offs cost more than the maths."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(**over):
    items = {"device": "cpu", "seed": 0, "sae.batch_size": 256, "sae.warmup_steps": 20, "sae.dead_tokens": 20000,
             "sae.checkpoint_every": 10_000, "crosscoder.d_sae": 24, "crosscoder.k": 3,
             "crosscoder.tokens": 256 * 1500, "crosscoder.lr": 3e-3, **over}
    return load_config(overrides=[f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("cc")
    base, ft, Q = _paired_acts()
    _write_pairs(run, base, ft)
    out = train_crosscoder(run, _config(**{"crosscoder.latent_scaling": "true"}))
    torch.set_num_threads(n)
    return run, out, Q


def _match(W_dec: torch.Tensor, target: torch.Tensor) -> tuple[int, float]:
    """The latent whose decoder row is closest (cosine) to a planted [base, ft] direction."""
    cos = torch.nn.functional.cosine_similarity(W_dec, target[None], dim=1)
    return int(cos.argmax()), float(cos.max())


def test_ft_only_latents_rank_top_with_relative_norm_near_one(trained):
    run, out, Q = trained
    sae = SAE.load(out)
    W = sae.W_dec.detach()
    halves = decoder_halves(W, D)
    cols = read_features(out / "features.csv")
    np.testing.assert_allclose(cols["relative_norm"], halves["relative_norm"], rtol=1e-6)
    ft_latents = []
    for j in range(N_SHARED, N_SHARED + N_FT):  # ft-only: the planted direction lives in the ft half only
        i, c = _match(W, torch.cat([torch.zeros(D), Q[j]]))
        assert c > 0.9, f"ft-only direction {j} not learned (best cosine {c:.3f})"
        assert halves["relative_norm"][i] > 0.8  # (one latent also absorbs a little of a shared feature)
        assert abs(cols["nu"][i]) < 0.1  # Latent Scaling agrees: the base model does not carry it
        ft_latents.append(i)
    assert np.mean(halves["relative_norm"][ft_latents]) > 0.9
    shared = []
    for j in range(N_SHARED):
        i, c = _match(W, torch.cat([Q[j], Q[j]]))
        if c > 0.9:
            shared.append(i)
            assert 0.35 < halves["relative_norm"][i] < 0.65
            # ν ≈ sqrt(16/12): base is normalised over 12 features, ft over 16, so shared ones weigh more in base
            assert 0.8 < cols["nu"][i] < 1.5
    assert len(shared) >= N_SHARED - 2  # (most) shared features learned as shared latents
    # the ft-only latents rank first by the crosscoder score
    scores = crosscoder_scores(run)
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:N_FT]
    assert sorted(top) == sorted(ft_latents)
    assert sorted(cols["rank"][ft_latents]) == list(range(1, N_FT + 1))


def test_outputs_and_relative_norm_ranking(trained, tmp_path):
    run, out, Q = trained
    for name in ("cfg.json", "sae_weights.safetensors", "features.csv", "summary.json", "relative_norm.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latent_scaling"] and summary["ft_exclusive"] >= N_FT - 1 and summary["latents"] == 24
    assert sum(summary["relative_norm_histogram"]["counts"]) == summary["live"]
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]["crosscoder"]
    assert cfg["d_in"] == 2 * D and meta["d_model"] == D
    # each model normalised on its own to mean norm sqrt(d), measured on the base data (the first half)
    base, ft, _ = _paired_acts()
    base, ft = base[: ROWS // 2], ft[: ROWS // 2]
    assert meta["scale_base"] == pytest.approx(D**0.5 / base.norm(dim=1).mean().item(), rel=1e-5)
    assert meta["scale_ft"] == pytest.approx(D**0.5 / ft.norm(dim=1).mean().item(), rel=1e-5)
    png = (out / "relative_norm.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # the same crosscoder without Latent Scaling ranks by relative norm
    from stagediff.crosscoder import write_crosscoder_outputs

    sae = SAE.load(out)
    (tmp_path / "crosscoder").mkdir()
    write_crosscoder_outputs(tmp_path / "crosscoder", sae, D, _config())
    scores = crosscoder_scores(tmp_path)
    np.testing.assert_allclose(scores, decoder_halves(sae.W_dec, D)["relative_norm"], rtol=1e-6)


def test_latent_scaling_closed_form():
    """β equals a direct least-squares fit on one latent."""
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="relu", d_sae=6, l1_coefficient=0.0)
    sae = SAE(2 * 4, cfg)
    x = torch.randn(300, 8)
    ls = latent_scaling(sae, iter([x[:100], x[100:]]), 4)
    with torch.no_grad():
        f = sae.encode(x).double()
        err = (x - sae.decode(f.float())).double()
    W = sae.W_dec.detach().double()
    j = int(f.sum(0).argmax())
    u = W[j, 4:] / W[j, 4:].norm()
    for m, sl in (("base", slice(0, 4)), ("ft", slice(4, 8))):
        y = err[:, sl] + f[:, j:j + 1] * W[j, sl]
        target = (y @ u)  # projection of the target on the direction: the 1-D least-squares problem
        beta = float((f[:, j] * target).sum() / (f[:, j] ** 2).sum())
        assert ls[f"beta_{m}"][j] == pytest.approx(beta, rel=1e-6)
    assert ls["nu"][j] == pytest.approx(ls["beta_base"][j] / ls["beta_ft"][j])


def test_l1_penalty_uses_sum_of_per_model_norms():
    torch.manual_seed(0)
    sae = SAE(8, SAEConfig(architecture="relu", d_sae=5, l1_coefficient=0.0), scale=1.5)
    x = torch.randn(32, 8)
    term = sum_norm_l1(d_base=4, coefficient=2.0)(sae, x)
    f = ((x - sae.b_dec * 1.5) @ sae.W_enc + sae.b_enc * 1.5).relu()  # scaled units, as training computes
    penalty = (f * (sae.W_dec[:, :4].norm(dim=1) + sae.W_dec[:, 4:].norm(dim=1))).sum(-1).mean()
    assert term.item() == pytest.approx(2.0 * penalty.item(), rel=1e-5) and term.item() > 0
    assert float(sae.training_forward(x).sparsity) > 0  # the shared relu penalty is there, but weighted by 0 in the loss
    assert torch.allclose(sum_of_half_norms(sae.W_dec, 4), sae.W_dec[:, :4].norm(dim=1) + sae.W_dec[:, 4:].norm(dim=1))
    term.backward()  # the penalty reaches the decoder
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0


def test_l1_variant_end_to_end(tmp_path):
    base, ft, Q = _paired_acts(seed=1)
    _write_pairs(tmp_path, base, ft)
    cfg = _config(**{"crosscoder.architecture": "l1", "crosscoder.l1_coefficient": 0.5, "crosscoder.tokens": 256 * 500})
    out = train_crosscoder(tmp_path, cfg)
    W = SAE.load(out).W_dec.detach()
    rel = decoder_halves(W, D)["relative_norm"]
    for j in range(N_SHARED, N_SHARED + N_FT):
        i, c = _match(W, torch.cat([torch.zeros(D), Q[j]]))
        assert c > 0.8 and rel[i] > 0.9


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StagediffError, match="harvest"):
        train_crosscoder(tmp_path, _config())


def test_latent_scaling_nu_is_zero_for_ft_only_and_one_for_shared(tmp_path):
    """Both models carry 12 shared features and 4 of their own (orthogonal directions, same code statistics),
    so each is normalised alike: ν ≈ 1 for a shared latent, ≈ 0 for a fine-tune-only one. With
    `latent_scaling` off, features.csv still carries the Latent Scaling ranking beside the decoder-norm one."""
    d, n_own = N_SHARED + 2 * N_FT, N_FT
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T  # 12 shared, 4 fine-tune-only, 4 base-only
    codes = (torch.rand(ROWS, d, generator=g) < 0.15) * (0.5 + 1.5 * torch.rand(ROWS, d, generator=g))
    shared = codes[:, :N_SHARED] @ Q[:N_SHARED]
    ft_dirs, base_dirs = Q[N_SHARED: N_SHARED + n_own], Q[N_SHARED + n_own:]
    base, ft = shared + codes[:, N_SHARED + n_own:] @ base_dirs, shared + codes[:, N_SHARED: N_SHARED + n_own] @ ft_dirs
    _write_pairs(tmp_path, base, ft)
    out = train_crosscoder(tmp_path, _config(**{"crosscoder.d_sae": 32, "crosscoder.k": 4}))
    cols = read_features(out / "features.csv")
    for c in ("score_relative_norm", "rank_relative_norm", "score_latent_scaling", "rank_latent_scaling", "nu"):
        assert c in cols, c
    np.testing.assert_array_equal(cols["rank"], cols["rank_relative_norm"])  # latent_scaling off: ranks by decoder norm
    W = SAE.load(out).W_dec.detach()
    ft_only = []
    for v in ft_dirs:
        i, c = _match(W, torch.cat([torch.zeros(d), v]))
        assert c > 0.9, f"ft-only direction not learned (best cosine {c:.3f})"
        assert abs(cols["nu"][i]) < 0.1, cols["nu"][i]
        ft_only.append(i)
    shared_nu = []
    for v in Q[:N_SHARED]:
        i, c = _match(W, torch.cat([v, v]))
        if c > 0.9:
            shared_nu.append(cols["nu"][i])
    assert len(shared_nu) >= N_SHARED - 4  # (a few shared features end up split at this small budget)
    assert all(0.9 < nu < 1.1 for nu in shared_nu), shared_nu
    # the Latent Scaling ranking puts the fine-tune-only latents first
    assert sorted(cols["rank_latent_scaling"][ft_only]) == list(range(1, n_own + 1))
