"""The SAE module: shapes, sparsity rules, losses, units, and the SAELens-layout files."""

from __future__ import annotations

import json

import pytest
import torch
from sae_factory import perturbed_sae

from stagediff.config import SAEConfig
from stagediff.errors import StagediffError
from stagediff.files import save_tensors
from stagediff.sae import SAE, weights_sha256

ARCHS = ["batchtopk", "topk", "relu", "jumprelu"]


def _sae(arch: str, d_in: int = 16, d_sae: int = 64, k: int = 5, scale: float = 0.37) -> SAE:
    return perturbed_sae(arch, d_in, d_sae, k, scale, noise=0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_init(arch):
    sae = SAE(16, SAEConfig(architecture=arch, d_sae=64, k=5), generator=torch.Generator().manual_seed(0))
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,) and sae.threshold.shape == (64,)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    x = torch.randn(3, 7, 16)
    f = sae.encode(x)
    assert f.shape == (3, 7, 64) and (f >= 0).all()
    assert sae.decode(f).shape == (3, 7, 16) and sae(x).shape == (3, 7, 16)
    out = sae.training_forward(torch.randn(32, 16))
    assert out.loss.requires_grad and not out.mse.requires_grad and out.l0.item() > 0
    assert out.counts.shape == (64,) and out.x_hat.shape == (32, 16)


def test_topk_keeps_exactly_k_per_row():
    sae = _sae("topk", k=5)
    x = torch.randn(200, 16) * 3
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    kth = pre.topk(5, dim=-1).values[:, -1]
    l0 = (sae.encode(x) > 0).sum(-1)
    assert (l0 <= 5).all()
    assert (l0[kth > 0] == 5).all() and (kth > 0).sum() > 150  # k active wherever k pre-activations are positive
    out = sae.training_forward(x * sae.scale)
    assert out.l0.item() == pytest.approx(l0.float().mean().item())


def test_batchtopk_keeps_k_per_row_on_average():
    sae = _sae("batchtopk", k=5)
    x = torch.randn(256, 16) * 3
    out = sae.training_forward(x * sae.scale)
    assert out.l0.item() == pytest.approx(5.0)  # exactly k * B active over the batch ...
    assert int(out.counts.sum()) == 5 * 256
    assert out.min_active > 0


def test_training_forward_matches_inference_in_raw_units():
    """Scaled training space and raw inference space are the same map (to float rounding)."""
    for arch in ["topk", "relu", "jumprelu"]:  # (batchtopk selects over the batch in training, by threshold after)
        sae = _sae(arch)
        x = torch.randn(64, 16) * 3
        out = sae.training_forward(x * sae.scale)
        assert torch.allclose(out.x_hat / sae.scale, sae(x), atol=1e-5, rtol=1e-5), arch


def test_batchtopk_threshold_estimate_gives_inference_l0_near_k():
    torch.manual_seed(0)
    sae = _sae("batchtopk", k=5)
    sae.threshold.zero_()  # as at the start of training: nothing observed yet
    x = torch.randn(4096, 16) * 3
    for i in range(300):
        sae.update_threshold(sae.training_forward(x[(i * 256) % 4096:][:256] * sae.scale).min_active)
    assert torch.all(sae.threshold == sae.threshold[0]) and sae.threshold[0] > 0
    l0 = (sae.encode(x) > 0).sum(-1).float().mean().item()
    assert 3.5 < l0 < 6.5


def test_relu_l1_is_weighted_by_decoder_norm():
    sae = _sae("relu")
    x = torch.randn(32, 16) * 3
    base = sae.training_forward(x * sae.scale).sparsity
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    assert sae.training_forward(x * sae.scale).sparsity == pytest.approx(2 * base.item(), rel=1e-5)


def test_jumprelu_threshold_learns_through_straight_through_estimator():
    cfg = SAEConfig(architecture="jumprelu", d_sae=64, jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.5)
    sae = SAE(16, cfg, scale=1.0, generator=torch.Generator().manual_seed(0))
    out = sae.training_forward(torch.randn(256, 16) * 3)
    out.loss.backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    assert out.sparsity == pytest.approx(out.l0.item())  # the L0 penalty counts the active features


def test_aux_k_loss_only_trains_dead_features():
    sae = _sae("topk", k=2)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    x = torch.randn(128, 16) * 3 * sae.scale
    assert sae.training_forward(x).aux == 0
    grads = []
    for mask in (None, dead):
        sae.zero_grad()
        out = sae.training_forward(x, mask)
        out.loss.backward()
        grads.append(sae.W_dec.grad.clone())
    assert out.aux > 0
    extra = grads[1] - grads[0]  # what the aux-k term adds: only on the dead features' decoder rows
    assert extra[20:].abs().sum() == 0 and extra[:20].abs().sum() > 0


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = _sae("topk")
    sae.training_forward(torch.randn(64, 16)).loss.backward()
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    sae = _sae(arch)
    sparsity = torch.log10(torch.rand(64) + 1e-10)
    sae.save(tmp_path, {"model_name": "m", "hook_name": "blocks.1.hook_resid_post", "stage": "S"}, sparsity=sparsity)
    back = SAE.load(tmp_path, expected_d_in=16)
    assert back.architecture == arch and back.cfg == sae.cfg and back.scale == sae.scale
    own = sae.state_dict()
    for name, t in back.state_dict().items():
        if arch in ("relu", "topk") and name == "threshold":
            continue  # unused by these architectures; not in the SAELens file
        assert torch.equal(t, own[name]), name
    x = torch.randn(40, 16) * 3
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"batchtopk": "jumprelu", "topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}[arch]
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["stage"] == "S"
    assert cfg["metadata"]["stagediff"]["architecture"] == arch
    assert back.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert weights_sha256(tmp_path) == sae.sha256() == back.sha256()


def test_batchtopk_reloads_for_training_not_as_jumprelu(tmp_path):
    sae = _sae("batchtopk")
    sae.save(tmp_path, {})
    back = SAE.load(tmp_path)
    assert back.architecture == "batchtopk"
    assert "threshold" in dict(back.named_buffers()) and "threshold" not in dict(back.named_parameters())
    assert back.training_forward(torch.randn(64, 16)).l0.item() == pytest.approx(5.0)


def test_wrong_shapes_and_width_are_clear_errors(tmp_path):
    sae = _sae("topk")
    sae.save(tmp_path, {})
    with pytest.raises(StagediffError, match="d_in=16.*width 32"):
        SAE.load(tmp_path, expected_d_in=32)
    bad = sae.saelens_tensors()
    bad["W_dec"] = torch.zeros(64, 17)
    save_tensors(tmp_path / "sae_weights.safetensors", bad)
    with pytest.raises(StagediffError, match=r"sae_weights\.safetensors.*expected.*\(64, 16\).*found.*\(64, 17\)"):
        SAE.load(tmp_path)
    with pytest.raises(StagediffError, match="cfg.json does not exist"):
        SAE.load(tmp_path / "nowhere")


def test_bad_config_is_a_clear_error():
    with pytest.raises(StagediffError, match="architecture 'gated'"):
        SAE(16, SAEConfig(architecture="gated"))
    with pytest.raises(StagediffError, match="sae.k=100"):
        SAE(16, SAEConfig(architecture="topk", d_sae=64, k=100))


def test_loads_a_foreign_saelens_file_without_our_metadata(tmp_path):
    """A public SAELens SAE (no stagediff block, apply_b_dec_to_input false) loads with scale 1, same outputs."""
    g = torch.Generator().manual_seed(3)
    W_enc, W_dec = torch.randn(16, 64, generator=g), torch.randn(64, 16, generator=g)
    b_enc, b_dec, thr = torch.randn(64, generator=g), torch.randn(16, generator=g), torch.rand(64, generator=g)
    save_tensors(tmp_path / "sae_weights.safetensors", {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                                                        "threshold": thr})
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 16, "d_sae": 64,
                                                   "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    sae = SAE.load(tmp_path)
    assert sae.architecture == "jumprelu" and sae.scale == 1.0
    x = torch.randn(20, 16)
    pre = x @ W_enc + b_enc
    expected = pre.relu() * (pre > thr)
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)
