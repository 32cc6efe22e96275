"""diff.py on synthetic SAEs with planted rotations: cosines, selection, dead features, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from stagediff.config import load_config
from stagediff.diff import diff_run, noise_floor, read_features, rowwise_cosine
from stagediff.errors import StagediffError
from stagediff.files import save_tensors

D_IN, N = 16, 200
PLANTED = list(range(20, 30))  # rotated on both axes (model and data)
X_ONLY = list(range(40, 50))  # rotated on the D→F axis only
Y_ONLY = list(range(60, 70))  # rotated on the M→F axis only
DEAD = [5, 6, 7, 8, 9]  # silent in both F stages, and rotated hard on both axes


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def _rotate(rows: torch.Tensor, idx: list[int], cos: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotate rows[idx] so each new row has exactly cosine `cos` with the old one."""
    out = rows.clone()
    v = _unit(rows[idx])
    u = torch.randn(len(idx), rows.shape[1], generator=g)
    u = _unit(u - (u * v).sum(-1, keepdim=True) * v)
    out[idx] = (cos[:, None] * v + (1 - cos[:, None] ** 2).sqrt() * u) * rows[idx].norm(dim=-1, keepdim=True)
    return out


def _jitter(w: torch.Tensor, g: torch.Generator, eps: float = 0.02) -> torch.Tensor:
    return w + eps * torch.randn(w.shape, generator=g) * w.norm(dim=-1, keepdim=True) / D_IN**0.5


def _save(run, stage, dec, enc, log_freq=None, scale=1.0):
    d = run / "saes" / stage
    save_tensors(d / "sae_weights.safetensors", {
        "W_enc": (enc.T * scale).contiguous(), "W_dec": dec * scale,
        "b_enc": torch.zeros(N), "b_dec": torch.zeros(D_IN)})
    if log_freq is not None:
        save_tensors(d / "sparsity.safetensors", {"sparsity": log_freq})


def _planted_run(run, noise_stage: bool = False):
    """S, D, M as small jitters; F stages with planted rotations; DEAD silent in both F stages."""
    g = torch.Generator().manual_seed(0)
    S = _unit(torch.randn(N, D_IN, generator=g))
    S_enc = _unit(S + 0.3 * torch.randn(N, D_IN, generator=g))  # encoder columns: not equal to the decoder
    stages = {"S": (S, S_enc)}
    stages["D"] = tuple(_jitter(w, g) for w in stages["S"])
    stages["M"] = tuple(_jitter(w, g) for w in stages["S"])
    for f, parent, both_lo, only in (("F_via_D", "D", X_ONLY, Y_ONLY), ("F_via_M", "M", Y_ONLY, X_ONLY)):
        dec, enc = (_jitter(w, g) for w in stages[parent])
        for idx, lo, hi in ((PLANTED, 0.3, 0.5), (both_lo, 0.6, 0.68), (DEAD, 0.1, 0.2)):
            c = lo + (hi - lo) * torch.rand(len(idx), generator=g)
            dec, enc = _rotate(dec, idx, c, g), _rotate(enc, idx, c, g)
        stages[f] = (dec, enc)
    log_freq = torch.full((N,), -2.0)
    dead_freq = log_freq.clone()
    dead_freq[DEAD] = float("-inf")  # log10(0): never fired
    for i, (s, (dec, enc)) in enumerate(stages.items()):
        _save(run, s, dec, enc, dead_freq if s.startswith("F") else log_freq, scale=1.0 + i)  # scale-invariance
    if noise_stage:
        c = torch.full((N,), 0.999)
        c[21] = 0.6  # a feature that drifts by itself
        S_noise = _rotate(S, list(range(N)), c, g)
        _save(run, "S_noise", S_noise, S_enc, log_freq)
    return stages


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cosines_match_manual_computation(tmp_path):
    stages = _planted_run(tmp_path)
    diff_run(tmp_path, load_config())
    cols = read_features(tmp_path / "diff" / "features.csv")
    for a, b, name in (("S", "D", "S_D"), ("D", "F_via_D", "D_FD"), ("M", "F_via_M", "M_FM"), ("S", "F_via_M", "S_FM")):
        for k, kind in ((0, "dec"), (1, "enc")):
            va, vb = stages[a][k].double(), stages[b][k].double()
            manual = ((va * vb).sum(1) / (va.norm(dim=1) * vb.norm(dim=1))).numpy()
            np.testing.assert_allclose(cols[f"{kind}_cos_{name}"], manual, atol=1e-6)
    # planted rotations are the cosines we asked for (up to the F-stage jitter)
    assert cols["dec_cos_D_FD"][PLANTED].max() < 0.55 and cols["dec_cos_M_FM"][PLANTED].max() < 0.55
    assert np.median(cols["dec_cos_S_D"]) > 0.99


def test_percentile_selects_exactly_the_planted_set(tmp_path):
    _planted_run(tmp_path)
    summary = diff_run(tmp_path, load_config())
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert sorted(np.flatnonzero(cols["selected"])) == PLANTED
    assert [summary[k] for k in ("features", "live", "dead", "selected")] == [N, N - len(DEAD), len(DEAD), len(PLANTED)]
    # the planted set ranks 1..10, every selected feature scores above every other
    assert sorted(cols["rank"][PLANTED]) == list(range(1, len(PLANTED) + 1))
    live = ~cols["dead"]
    assert cols["score"][cols["selected"]].min() > 1 >= cols["score"][live & ~cols["selected"]].max()
    cut_x = summary["selection"]["cuts"]["x"]
    assert summary["rule"].startswith("percentile 5: cos(D, F_via_D) < ")
    assert cols["dec_cos_D_FD"][PLANTED].max() < cut_x < cols["dec_cos_D_FD"][X_ONLY].min()
    assert [t["feature"] for t in summary["top"][:10]] == sorted(PLANTED, key=lambda i: cols["rank"][i])


def test_threshold_selects_planted_and_ignores_one_axis_movers(tmp_path):
    _planted_run(tmp_path)
    summary = diff_run(tmp_path, load_config(overrides=["diff.selection=threshold"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert sorted(np.flatnonzero(cols["selected"])) == PLANTED
    # the one-axis movers are below 0.7 on their axis but not selected
    assert (cols["dec_cos_D_FD"][X_ONLY] < 0.7).all() and not cols["selected"][X_ONLY].any()
    assert summary["selection"]["cuts"] == {"x": 0.7, "y": 0.7}
    # encoder vector: same planted set (rotated alike)
    diff_run(tmp_path, load_config(overrides=["diff.selection=threshold", "diff.vector=encoder"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert sorted(np.flatnonzero(cols["selected"])) == PLANTED


def test_dead_features_are_marked_not_ranked(tmp_path):
    _planted_run(tmp_path)
    diff_run(tmp_path, load_config(overrides=["diff.selection=threshold"]))
    rows = _read_csv(tmp_path / "diff" / "features.csv")
    for i in DEAD:  # rotated hardest of all, yet excluded
        assert rows[i]["dead"] == "True" and rows[i]["selected"] == "False"
        assert rows[i]["score"] == "nan" and rows[i]["rank"] == ""
        assert float(rows[i]["dec_cos_D_FD"]) < 0.25
    ranks = sorted(int(r["rank"]) for r in rows if r["rank"])
    assert ranks == list(range(1, N - len(DEAD) + 1))
    assert float(rows[0]["freq_F_via_D"]) == pytest.approx(0.01)


def test_csv_columns_and_pngs(tmp_path):
    _planted_run(tmp_path)
    diff_run(tmp_path, load_config())
    header = next(csv.reader(open(tmp_path / "diff" / "features.csv")))
    edges = ["S_D", "S_M", "D_FD", "M_FM", "S_FD", "S_FM"]
    expected = ["feature"] + [f"dec_cos_{e}" for e in edges] + [f"enc_cos_{e}" for e in edges] \
        + [f"freq_{s}" for s in ("S", "D", "M", "F_via_D", "F_via_M")] + ["dead", "selected", "score", "rank"]
    assert header == expected
    for name in ("scatter.png", "first_step_D.png", "first_step_M.png"):
        png = (tmp_path / "diff" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = json.loads((tmp_path / "diff" / "summary.json").read_text())
    q = summary["edges"]["dec_cos_D_FD"]
    assert q["min"] <= q["p5"] <= q["p50"] <= q["max"] and len(summary["top"]) == 20


def test_noise_floor_and_selection(tmp_path):
    _planted_run(tmp_path)
    with pytest.raises(StagediffError, match="S_noise"):
        diff_run(tmp_path, load_config(overrides=["diff.selection=noise"]))
    _planted_run(tmp_path, noise_stage=True)
    diff_run(tmp_path, load_config(overrides=["diff.selection=noise"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    # floor: the median control rotation (1 - 0.999) for ordinary features, the feature's own where larger
    assert np.median(cols["noise_floor"]) == pytest.approx(0.001, rel=1e-3)
    assert cols["noise_floor"][21] == pytest.approx(0.4, rel=1e-3)
    np.testing.assert_allclose(cols["noise_multiple_x"], (1 - cols["dec_cos_D_FD"]) / cols["noise_floor"], rtol=1e-4)
    # feature 21 drifts in the control run as much as in the fine-tune: not selected; the rest of the planted set is
    selected = set(np.flatnonzero(cols["selected"]))
    assert set(PLANTED) - {21} <= selected and 21 not in selected
    assert not selected & set(DEAD)


def test_noise_floor_is_robust_to_a_lucky_feature():
    r0 = np.array([0.01] * 9 + [1e-7])  # one feature barely moved in the control run
    floor = noise_floor(r0, freq=np.full(10, 0.01))
    assert floor[-1] == pytest.approx(0.01)  # floored by the median of its frequency bin
    # rare features drift more: with 200 features in bins of frequency, each bin gets its own median
    freq = np.repeat([1e-4, 1e-1], 100)
    r0 = np.where(freq < 1e-2, 0.05, 0.005) * np.linspace(0.5, 1.5, 200)
    floor = noise_floor(r0, freq)
    assert (floor >= r0).all() and floor[100:].max() <= r0[100:].max() + 1e-12  # a global median would be ~0.016
    assert np.median(floor[:100]) > 0.03


def test_generic_chain_with_explicit_edges(tmp_path):
    g = torch.Generator().manual_seed(1)
    w0 = _unit(torch.randn(N, D_IN, generator=g))
    w1 = _jitter(w0, g)
    w2 = _rotate(_jitter(w1, g), PLANTED, torch.full((len(PLANTED),), 0.4), g)
    for s, w in (("ckpt0", w0), ("ckpt1", w1), ("ckpt2", w2)):
        _save(tmp_path, s, w, w)
    cfg = load_config(overrides=["diff.axes=[[ckpt1, ckpt2], [ckpt0, ckpt2]]", "diff.edges=[[ckpt0, ckpt1]]",
                                 "diff.selection=threshold"])
    summary = diff_run(tmp_path, cfg)
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert {"dec_cos_ckpt0_ckpt1", "dec_cos_ckpt1_ckpt2", "enc_cos_ckpt0_ckpt2"} <= set(cols)
    assert sorted(np.flatnonzero(cols["selected"])) == PLANTED
    assert summary["frequency_missing"] == ["ckpt0", "ckpt1", "ckpt2"]
    assert (tmp_path / "diff" / "first_step_ckpt1.png").exists()


def test_bad_input(tmp_path):
    with pytest.raises(StagediffError, match="train stage"):
        diff_run(tmp_path, load_config())
    assert np.isnan(rowwise_cosine(torch.zeros(1, 3), torch.ones(1, 3))[0])


def test_reads_saes_saved_by_the_sae_module(tmp_path):
    """Stages written by SAE.save (raw-unit layout, its own scale, sparsity file) diff like the planted tensors."""
    from stagediff.config import SAEConfig
    from stagediff.sae import SAE

    planted = _planted_run(tmp_path / "planted")
    for i, (stage, (dec, enc)) in enumerate(planted.items()):
        sae = SAE(D_IN, SAEConfig(architecture="topk", d_sae=N, k=4), scale=0.5 + i)
        with torch.no_grad():
            sae.W_dec.copy_(dec)
            sae.W_enc.copy_(enc.T)
        log_freq = torch.full((N,), -2.0)
        if stage.startswith("F"):
            log_freq[DEAD] = -10.0  # log10(0 + 1e-10), as train_sae writes a feature that never fired
        sae.save(tmp_path / "saes" / stage, {"stage": stage}, sparsity=log_freq)
    summary = diff_run(tmp_path, load_config(overrides=["diff.selection=threshold"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert sorted(np.flatnonzero(cols["selected"])) == PLANTED and summary["dead"] == len(DEAD)
