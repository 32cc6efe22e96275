"""diff.py on synthetic SAEs with planted rotations: cosines, selection, dead features, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from stagediff.config import load_config
from stagediff.diff import bh_qvalues, diff_run, noise_floor, rowwise_cosine
from stagediff.errors import StagediffError
from stagediff.features import read_features
from stagediff.files import save_tensors, write_json

D_IN, N = 16, 200
PLANTED = list(range(20, 30))  # rotated on both axes (model and data)
X_ONLY = list(range(40, 50))  # rotated on the D→F axis only
Y_ONLY = list(range(60, 70))  # rotated on the M→F axis only
DEAD = [5, 6, 7, 8, 9]  # silent in both F stages, and rotated hard on both axes
PCT = ["diff.selection=percentile", "diff.vector=decoder"]  # no control continuations; the cuts below read the decoder columns


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


def _save(run, stage, dec, enc, log_freq=None, scale=1.0, n=N, d_in=D_IN):
    d = run / "saes" / stage
    save_tensors(d / "sae_weights.safetensors", {
        "W_enc": (enc.T * scale).float().contiguous(), "W_dec": (dec * scale).float().contiguous(),
        "b_enc": torch.zeros(n), "b_dec": torch.zeros(d_in)})
    if log_freq is not None:
        save_tensors(d / "sparsity.safetensors", {"sparsity": log_freq})


def _planted_run(run, planted: list[int] = PLANTED):
    """S, D, M as small jitters; F stages with `planted` rotated on both axes; DEAD silent in both F stages."""
    g = torch.Generator().manual_seed(0)
    S = _unit(torch.randn(N, D_IN, generator=g))
    S_enc = _unit(S + 0.3 * torch.randn(N, D_IN, generator=g))  # encoder columns: not equal to the decoder
    stages = {"S": (S, S_enc)}
    stages["D"] = tuple(_jitter(w, g) for w in stages["S"])
    stages["M"] = tuple(_jitter(w, g) for w in stages["S"])
    for f, parent, both_lo in (("F_via_D", "D", X_ONLY), ("F_via_M", "M", Y_ONLY)):
        dec, enc = (_jitter(w, g) for w in stages[parent])
        for idx, lo, hi in ((planted, 0.3, 0.5), (both_lo, 0.6, 0.68), (DEAD, 0.1, 0.2)):
            c = lo + (hi - lo) * torch.rand(len(idx), generator=g)
            dec, enc = _rotate(dec, idx, c, g), _rotate(enc, idx, c, g)
        stages[f] = (dec, enc)
    log_freq = torch.full((N,), -2.0)
    dead_freq = log_freq.clone()
    dead_freq[DEAD] = float("-inf")  # log10(0): never fired
    for i, (s, (dec, enc)) in enumerate(stages.items()):
        _save(run, s, dec, enc, dead_freq if s.startswith("F") else log_freq, scale=1.0 + i)  # scale-invariance
    return stages


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cosines_match_manual_computation(tmp_path):
    stages = _planted_run(tmp_path)
    diff_run(tmp_path, load_config(overrides=PCT))
    cols = read_features(tmp_path / "diff" / "features.csv")
    for a, b, name in (("S", "D", "S_D"), ("D", "F_via_D", "D_FD"), ("M", "F_via_M", "M_FM"), ("S", "F_via_M", "S_FM")):
        for k, kind in ((0, "dec"), (1, "enc")):
            va, vb = stages[a][k].double(), stages[b][k].double()
            manual = ((va * vb).sum(1) / (va.norm(dim=1) * vb.norm(dim=1))).numpy()
            np.testing.assert_allclose(cols[f"{kind}_cos_{name}"], manual, atol=1e-6)
    # planted rotations are the cosines we asked for (up to the F-stage jitter)
    assert cols["dec_cos_D_FD"][PLANTED].max() < 0.55 and cols["dec_cos_M_FM"][PLANTED].max() < 0.55
    assert np.median(cols["dec_cos_S_D"]) > 0.99


@pytest.mark.parametrize("n_planted", [10, 20])
def test_percentile_selects_the_corner_and_ranks_the_planted_set_first(tmp_path, n_planted):
    """Percentile 5 keeps the features below the 5th percentile of *each* axis: with 10 planted (5% of
    live) that is the planted set; with 20 it is the part of the planted set low on both axes, never
    a one-axis mover. Either way the planted set, rotated most on both axes, ranks 1..n."""
    planted = list(range(20, 20 + n_planted))
    _planted_run(tmp_path, planted)
    summary = diff_run(tmp_path, load_config(overrides=PCT))
    cols = read_features(tmp_path / "diff" / "features.csv")
    live = ~cols["dead"]
    x, y = cols["dec_cos_D_FD"], cols["dec_cos_M_FM"]
    cut_x, cut_y = np.percentile(x[live], 5), np.percentile(y[live], 5)
    selected = set(np.flatnonzero(cols["selected"]).tolist())
    assert selected == set(np.flatnonzero(live & (x < cut_x) & (y < cut_y)).tolist())
    assert summary["selection"]["cuts"]["x"] == pytest.approx(cut_x) and summary["selected"] == len(selected)
    assert selected <= set(planted) and len(selected) <= 0.05 * live.sum() + 1
    if n_planted == 10:
        assert sorted(selected) == planted  # the planted set is the 5% corner
    assert not selected & set(X_ONLY + Y_ONLY + DEAD)
    assert [summary[k] for k in ("features", "live", "dead")] == [N, N - len(DEAD), len(DEAD)]
    # ranks 1..n are the planted set, and every selected feature outranks every other
    assert sorted(cols["rank"][planted]) == list(range(1, n_planted + 1))
    assert cols["score"][cols["selected"]].min() > 1 >= cols["score"][live & ~cols["selected"]].max()
    assert summary["rule"].startswith("percentile 5: cos(D, F_via_D) < ")
    assert [t["feature"] for t in summary["top"][:n_planted]] == sorted(planted, key=lambda i: cols["rank"][i])


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
    diff_run(tmp_path, load_config(overrides=PCT))
    header = next(csv.reader(open(tmp_path / "diff" / "features.csv")))
    edges = ["S_D", "S_M", "D_FD", "M_FM", "S_FD", "S_FM"]
    expected = ["feature"] + [f"dec_cos_{e}" for e in edges] + [f"enc_cos_{e}" for e in edges] \
        + [f"freq_{s}" for s in ("S", "D", "M", "F_via_D", "F_via_M")] + ["dead", "rare", "selected", "score", "rank"]
    assert header == expected
    for name in ("scatter.png", "first_step_D.png", "first_step_M.png"):
        png = (tmp_path / "diff" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = json.loads((tmp_path / "diff" / "summary.json").read_text())
    q = summary["edges"]["dec_cos_D_FD"]
    assert q["min"] <= q["p5"] <= q["p50"] <= q["max"] and len(summary["top"]) == 20


DRIFT = list(range(80, 85))  # rotate a lot in the fine-tune, and about as much in their own controls
QUIET = list(range(90, 95))  # rotate little in the fine-tune, yet 20x more than in their controls


def _controlled_run(run) -> np.ndarray:
    """The planted run plus 3 control continuations of D and of M, each feature with its own noise.

    Feature i's control rotation (1 - cos) is sigma_i (log-uniform over 0.0005..0.02) times a
    per-control factor in [0.7, 1.3]; DRIFT have sigma 0.2 and rotate by 0.4 on both axes (cos 0.6:
    below the paper's 0.7 threshold, but only 2x their noise); QUIET have sigma 0.0005 and rotate by
    0.05 on both axes (cos 0.95: far above any threshold, 100x their noise). Returns sigma.
    """
    stages = _planted_run(run)
    g = torch.Generator().manual_seed(7)
    sigma = 10 ** (-3.3 + 1.6 * torch.rand(N, generator=g))
    sigma[DRIFT], sigma[QUIET] = 0.2, 0.0005
    everyone = list(range(N))
    log_freq = torch.full((N,), -2.0)
    for f, start in (("F_via_D", "D"), ("F_via_M", "M")):
        dec, enc = stages[f]
        for idx, c in ((DRIFT, 0.6), (QUIET, 0.95)):  # rotated away from the start stage, not from F's jitter
            dec[idx], enc[idx] = (_rotate(w, idx, torch.full((len(idx),), c), g)[idx] for w in stages[start])
        dead_freq = log_freq.clone()
        dead_freq[DEAD] = float("-inf")
        _save(run, f, dec, enc, dead_freq)
        for j in range(3):
            c = 1 - sigma * (0.7 + 0.6 * torch.rand(N, generator=g))
            _save(run, f"{start}_ctl{j}", *(_rotate(w, everyone, c, g) for w in stages[start]), log_freq)
    return sigma.numpy()


def test_noise_selection_against_control_continuations(tmp_path):
    _planted_run(tmp_path)
    for selection in ("noise", "fdr"):
        with pytest.raises(StagediffError, match="control continuations"):
            diff_run(tmp_path, load_config(overrides=[f"diff.selection={selection}"]))
    sigma = _controlled_run(tmp_path)
    summary = diff_run(tmp_path, load_config(overrides=["diff.selection=noise"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    # each feature's scale is its own mean control rotation, floored at the median of its frequency bin
    ctl = 1 - np.mean([cols[f"ctl_cos_x{j}"] for j in range(3)], axis=0)
    live = ~cols["dead"]
    scale = cols["scale_x"]
    assert (scale[live] >= ctl[live] * (1 - 1e-6)).all() and np.median(scale[live]) < 0.02
    big = live & (ctl > np.percentile(ctl[live], 75))
    np.testing.assert_allclose(scale[big], ctl[big], rtol=1e-6)
    assert scale[DRIFT] == pytest.approx(0.2, rel=0.2) and scale[QUIET].max() < 0.02
    # the noise rule finds what rotated beyond its own noise on both axes, however little:
    # the planted set and the quiet movers; not the drifters, one-axis movers or dead features
    selected = set(np.flatnonzero(cols["selected"]).tolist())
    assert selected == set(PLANTED + QUIET)
    assert summary["controls"]["x"]["stages"] == ["D_ctl0", "D_ctl1", "D_ctl2"]
    # the paper's fixed threshold gets both of them wrong: it takes the drifters, misses the quiet movers
    diff_run(tmp_path, load_config(overrides=["diff.selection=threshold"]))
    threshold = set(np.flatnonzero(read_features(tmp_path / "diff" / "features.csv")["selected"]).tolist())
    assert threshold == set(PLANTED + DRIFT)
    assert sigma[QUIET].max() < 0.001 < 0.1 < sigma[DRIFT].min()


def _noisy_run(run, n: int = 400, r: int = 3, seed: int = 0) -> dict:
    """A stage-wise run where every rotation is noise of a known per-feature scale, except planted ones.

    Feature i has a noise scale s_i (rarer features drift more, and each feature has its own
    predisposition); a control continuation and a real edge both turn it by s_i times lognormal
    noise, except BOTH (20x s_i on both axes), X_ONLY and Y_ONLY (20x on one axis only), and SILENT:
    never fired on the base side (D, M and their controls), a rotation of 1e-9 in every control and
    1e-7 on both real edges (100x its own controls).
    """
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    d_in = 32
    log_freq = rng.uniform(-3.5, -1.0, n)
    scale = 10 ** (-3.0 - 0.6 * (log_freq + 2.25)) * np.exp(rng.normal(0, 0.3, n))
    ids = rng.permutation(np.arange(10, n))
    sets = {"BOTH": ids[:20], "X_ONLY": ids[20:40], "Y_ONLY": ids[40:60], "SILENT": np.arange(3)}
    S = _unit(torch.randn(n, d_in, generator=g))

    def turned(w, rot):
        return _rotate(w, list(range(n)), torch.tensor(1.0 - rot, dtype=torch.float32).double().float(), g)

    def noise():
        return scale * np.exp(rng.normal(0, 0.5, n))

    def save(stage, w, lf):
        _save(run, stage, w, w, torch.tensor(lf, dtype=torch.float32), n=n, d_in=d_in)
        write_json(run / "saes" / stage / "stats.json", {"steps": 500, "tokens": 500 * 256, "window_tokens": 100 * 1024})

    base_freq = log_freq.copy()
    base_freq[sets["SILENT"]] = -10.0  # log10(0 + 1e-10): never fired
    save("S", S.double(), base_freq)
    for start, planted_here in (("D", "X_ONLY"), ("M", "Y_ONLY")):
        w = turned(S.double(), noise())
        save(start, w, base_freq)
        for j in range(r):
            rot = noise()
            rot[sets["SILENT"]] = 1e-9
            save(f"{start}_ctl{j}", turned(w, rot), base_freq)
        rot = noise()
        rot[np.concatenate([sets["BOTH"], sets[planted_here]])] *= 20
        rot[sets["SILENT"]] = 1e-7
        save("F_via_" + start, turned(w, rot), log_freq)
    return sets


def test_fdr_selection_recovers_planted_rotations_at_q(tmp_path):
    sets = _noisy_run(tmp_path)
    summary = diff_run(tmp_path, load_config(overrides=["diff.selection=fdr", "diff.q=0.1", "diff.min_fires=0"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    selected = set(np.flatnonzero(cols["selected"]).tolist())
    both = set(sets["BOTH"].tolist())
    assert len(both & selected) >= 18  # recall: the planted features (20x their noise on both axes)
    false = selected - both
    assert len(false) <= 0.1 * max(1, len(selected)) + 1  # at most about q of the selection is false
    one_axis = set(sets["X_ONLY"].tolist()) | set(sets["Y_ONLY"].tolist())
    assert len(selected & one_axis) <= 1  # 20x on one axis alone is not "rotated on both" (one may pass by chance)
    # one-axis movers are significant on their own axis only
    assert np.mean(cols["q_x"][sets["X_ONLY"]] <= 0.1) > 0.8 and np.mean(cols["q_y"][sets["X_ONLY"]] <= 0.1) < 0.2
    # selection is exactly the BH cut of p_both, and every selected feature outranks every other
    assert selected == set(np.flatnonzero(cols["q_both"] <= 0.1).tolist())
    ranked = cols["rank"] > 0
    assert cols["score"][cols["selected"]].min() > cols["score"][ranked & ~cols["selected"]].max()
    assert summary["selected"] == len(selected) and summary["rule"].startswith("fdr")
    # calibration: on the features that moved by noise alone, p is near uniform
    null = np.setdiff1d(np.arange(10, len(cols["feature"])), np.concatenate(list(sets.values())))
    assert 0.02 < np.mean(cols["p_x"][null] < 0.1) < 0.2
    for c in ("score_sum", "score_product", "score_dec", "p_emp_x", "z_y"):  # score_dec: the other vector (default encoder)
        assert np.isfinite(cols[c][ranked]).all()


def test_silent_feature_with_a_tiny_rotation_is_not_ranked_above_a_real_one(tmp_path):
    sets = _noisy_run(tmp_path)
    silent, both = sets["SILENT"], sets["BOTH"]
    # rarity control (default min_fires): never fired on base data, so not ranked at all
    diff_run(tmp_path, load_config(overrides=["diff.selection=fdr"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert (cols["rank"][silent] == 0).all() and cols["rare"][silent].all() and (cols["fires_D"][silent] == 0).all()
    assert (cols["rank"][both] > 0).all() and cols["fires_F_via_D"][both].min() >= 20
    # without it: its controls barely moved, so its scale falls back to its frequency neighbours' (never ~0)
    diff_run(tmp_path, load_config(overrides=["diff.selection=fdr", "diff.min_fires=0"]))
    cols = read_features(tmp_path / "diff" / "features.csv")
    assert cols["rank"][silent].min() > np.sort(cols["rank"][both])[-3] and not cols["selected"][silent].any()
    assert (cols["scale_x"][silent] > 1e-5).all()


def test_bh_qvalues_match_the_step_up_rule():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan, 0.002])
    mask = np.array([True, True, True, True, True, False])
    q = bh_qvalues(p, mask)
    # sorted p over the 4 scored: .01 .03 .04 .5 -> p * 4 / rank = .04 .06 .0533 .5 -> running minimum from the top
    np.testing.assert_allclose(q[[0, 2, 1, 3]], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert np.isnan(q[4]) and np.isnan(q[5])


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
        diff_run(tmp_path, load_config(overrides=PCT))
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
