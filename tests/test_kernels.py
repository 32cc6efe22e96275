"""The sparse TopK/BatchTopK step gives the dense autograd step's losses and gradients exactly."""

from __future__ import annotations

import pytest
import torch

from stagediff.kernels import batchtopk_select, topk_training_forward


def dense_forward(x, W_enc, b_enc, W_dec, b_dec, *, k, batch_topk, dead=None, aux_k=256, aux_k_coefficient=0.0):
    """The reference: every product dense, plain autograd (the SAELens / stagediff.sae formulation)."""
    pre = (x - b_dec) @ W_enc + b_enc
    if batch_topk:
        flat = pre.relu().flatten()
        vals, idx = flat.topk(min(int(round(k * x.shape[0])), flat.numel()), sorted=False)
        f = torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
    else:
        vals, idx = pre.topk(min(int(k), pre.shape[1]), dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    x_hat = f @ W_dec + b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    aux = x.new_zeros(())
    if dead is not None and bool(dead.any()):
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, int(dead.sum())), dim=-1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        aux = (f_aux @ W_dec - (x - x_hat).detach()).pow(2).sum(-1).mean()
    fired = f > 0
    out = {"loss": mse + aux_k_coefficient * aux, "mse": mse, "aux": aux, "l0": fired.sum(-1).float().mean(),
           "counts": fired.sum(0), "x_hat": x_hat}
    if batch_topk:
        out["min_active"] = f[fired].min() if bool(fired.any()) else x.new_zeros(())
    return out


def make(B, d_in, d_sae, dtype=torch.float64, seed=0, b_enc_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g, dtype=dtype)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=dtype) / d_in**0.5
    b_enc = 0.3 * torch.randn(d_sae, generator=g, dtype=dtype) + b_enc_shift
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype) / d_in**0.5
    b_dec = 0.3 * torch.randn(d_in, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]


NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def compare(tensors, *, rtol=1e-9, atol=1e-11, **kw):
    """Run both paths on the same tensors; assert equal outputs and gradients of every input."""
    ref = dense_forward(*tensors, **kw)
    ref_grads = torch.autograd.grad(ref["loss"], tensors)
    out = topk_training_forward(*tensors, **kw)
    grads = torch.autograd.grad(out.loss, tensors)
    for key in ref:
        a, b = ref[key].detach(), getattr(out, key)
        assert a.dtype == b.dtype or key in ("l0",), key
        assert torch.allclose(a.to(b.dtype), b, rtol=rtol, atol=atol), (key, a, b)
    for name, a, b in zip(NAMES, ref_grads, grads):
        assert b.shape == a.shape and b.dtype == a.dtype, name
        assert torch.allclose(a, b, rtol=rtol, atol=atol), (name, (a - b).abs().max())
    return out


@pytest.mark.parametrize("batch_topk", [False, True])
@pytest.mark.parametrize("k", [1, 5, 13.5])
def test_same_loss_and_gradients_as_dense(batch_topk, k):
    if not batch_topk:
        k = int(k)
    out = compare(make(48, 12, 80), k=k, batch_topk=batch_topk)
    assert 0 < float(out.l0) <= k


@pytest.mark.parametrize("batch_topk", [False, True])
def test_aux_k_loss_on_dead_features(batch_topk):
    dead = torch.rand(80, generator=torch.Generator().manual_seed(3)) < 0.3
    out = compare(make(40, 12, 80, seed=1), k=4, batch_topk=batch_topk, dead=dead, aux_k=6, aux_k_coefficient=0.5)
    assert float(out.aux) > 0
    # aux_k above the number of dead features: all dead features take part
    compare(make(40, 12, 80, seed=2), k=4, batch_topk=batch_topk, dead=torch.arange(80) < 3, aux_k=256,
            aux_k_coefficient=1.0)


@pytest.mark.parametrize("batch_topk", [False, True])
def test_k_above_the_active_features(batch_topk):
    # b_enc far below zero: most pre-activations are negative, so k exceeds the positive ones
    tensors = make(32, 10, 40, seed=4, b_enc_shift=-1.5)
    out = compare(tensors, k=30, batch_topk=batch_topk)
    assert float(out.l0) < 30
    compare(make(16, 10, 40, seed=5), k=40, batch_topk=batch_topk)  # k = d_sae


def test_batchtopk_rows_without_any_active_feature():
    x, W_enc, b_enc, W_dec, b_dec = make(24, 10, 40, seed=6)
    with torch.no_grad():
        x[:8] = b_dec  # these rows see only b_enc ...
        b_enc -= b_enc.max() + 0.1  # ... which is negative everywhere: nothing fires there
        x[8:] *= 4  # the other rows fire strongly
    out = compare([x, W_enc, b_enc, W_dec, b_dec], k=3, batch_topk=True)
    assert torch.equal(out.x_hat[:8], b_dec.detach().expand(8, -1))  # empty rows decode to b_dec
    assert float(out.l0) > 0


def test_batchtopk_ties_at_the_cut():
    # every row appears twice, so every value is tied in pairs; K = 35 is odd, so the cut splits a
    # pair and the two paths may keep different copies. Swapping copies of identical rows leaves
    # the loss and the parameter gradients unchanged.
    x, W_enc, b_enc, W_dec, b_dec = make(5, 10, 40, seed=7)
    x = torch.cat([x, x]).detach().requires_grad_()
    tensors = [x, W_enc, b_enc, W_dec, b_dec]
    ref = dense_forward(*tensors, k=3.5, batch_topk=True)
    out = topk_training_forward(*tensors, k=3.5, batch_topk=True)
    assert int(out.counts.sum()) == int(ref["counts"].sum()) == 35
    assert torch.allclose(ref["loss"], out.loss, rtol=1e-12)
    for name, a, b in list(zip(NAMES, torch.autograd.grad(ref["loss"], tensors), torch.autograd.grad(out.loss, tensors)))[1:]:
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), name


def test_batchtopk_cut_estimated_too_high_is_lowered():
    # the cut is estimated from every `stride`-th value (kernels._SAMPLE of them); those values are
    # shifted up, so the sample overestimates the cut and the selection must lower it to stay exact
    import math

    from stagediff import kernels

    B, m, k = 256, 4096, 16
    pre = torch.randn(B, m, generator=torch.Generator().manual_seed(8))
    stride = pre.numel() // kernels._SAMPLE
    while math.gcd(stride, m) > 1:
        stride += 1
    pre.view(-1)[::stride] += 3.0
    true_cut = pre.relu().flatten().topk(k * B).values[-1]
    assert pre.view(-1)[::stride].quantile(1 - 1.25 * k / m) > true_cut  # the planted overestimate
    active, vals = batchtopk_select(pre, k)
    ref_vals, ref_idx = pre.relu().flatten().topk(k * B)
    assert active.nnz == k * B
    assert torch.equal(torch.sort(active.rows * m + active.cols).values, torch.sort(ref_idx).values)
    assert torch.equal(vals, pre[active.rows, active.cols])
    assert torch.all(active.rows[1:] >= active.rows[:-1])  # token order (CSR)


@pytest.mark.parametrize("B, m", [(1024, 1024), (512, 4608), (7, 33)])
def test_batchtopk_is_exact_at_any_width(B, m):
    """The sampled cut is exact for any width, including ones sharing factors with the sampling stride:
    features of very different scales (a stride hitting only some columns would misplace the cut)."""
    g = torch.Generator().manual_seed(B + m)
    pre = torch.randn(B, m, generator=g) * torch.logspace(-2, 1, m)[torch.randperm(m, generator=g)]
    active, vals = batchtopk_select(pre, 8)
    ref = pre.relu().flatten().topk(8 * B).indices
    assert torch.equal(torch.sort(active.rows * m + active.cols).values, torch.sort(ref).values)


@pytest.mark.parametrize("batch_topk", [False, True])
def test_fp32_at_a_realistic_shape(batch_topk):
    torch.manual_seed(0)
    dead = torch.rand(512) < 0.1
    compare(make(512, 64, 512, dtype=torch.float32, seed=9), k=16, batch_topk=batch_topk, dead=dead,
            aux_k=32, aux_k_coefficient=1 / 32, rtol=1e-4, atol=1e-5)


def test_bfloat16_runs_and_tracks_fp32():
    tensors32 = make(64, 16, 96, dtype=torch.float32, seed=10)
    tensors16 = [t.detach().bfloat16().requires_grad_() for t in tensors32]
    out32 = topk_training_forward(*tensors32, k=4, batch_topk=False)
    out16 = topk_training_forward(*tensors16, k=4, batch_topk=False)
    g32 = torch.autograd.grad(out32.loss, tensors32)
    g16 = torch.autograd.grad(out16.loss, tensors16)
    assert torch.allclose(out16.loss.float(), out32.loss, rtol=3e-2)
    for name, a, b in zip(NAMES, g32, g16):
        assert b.dtype == torch.bfloat16, name
        assert (b.float() - a).norm() <= 0.05 * a.norm(), name


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sae_training_forward_routes_through_the_kernel(arch):
    """SAE.training_forward (sparse by default) matches its own dense path: outputs and every gradient."""
    from stagediff.config import SAEConfig
    from stagediff.sae import SAE

    sae = SAE(16, SAEConfig(architecture=arch, d_sae=64, k=4, aux_k=8), scale=1.9,
              generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (sae.W_enc, sae.b_enc, sae.b_dec):
            t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    dead = torch.arange(64) % 5 == 0
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    results = []
    for sparse in (True, False):
        sae.sparse_kernel = sparse
        out = sae.training_forward(x, dead)
        results.append((out, torch.autograd.grad(out.loss, params)))
    (out_s, g_s), (out_d, g_d) = results
    assert (out_s.min_active is None) == (out_d.min_active is None) == (arch == "topk")
    assert float(out_s.aux) > 0
    for key, a, b in zip(out_d._fields, out_s, out_d):
        if b is not None:
            assert torch.allclose(a.to(b.dtype), b, rtol=1e-9, atol=1e-11), key
    for a, b in zip(g_s, g_d):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_batchtopk_with_nothing_to_keep():
    """k * B rounding to 0 selects nothing: x_hat = b_dec and zero encoder gradients, as dense."""
    out = compare(make(4, 6, 10, seed=11), k=0.1, batch_topk=True)
    assert float(out.l0) == 0


def test_stable_argsort_orders_like_torch_with_ties():
    """The CSR transpose's sort: by key, ties in their original order, on both paths (radix and torch)."""
    from stagediff.kernels import _stable_argsort

    g = torch.Generator().manual_seed(0)
    for n_keys in (7, 4608, 1 << 16, (1 << 16) + 1):
        keys = torch.randint(n_keys, (50_000,), generator=g)
        keys[:3] = n_keys - 1  # the largest key, tied
        perm = _stable_argsort(keys, n_keys)
        assert torch.equal(perm, torch.argsort(keys, stable=True)), n_keys
        assert torch.equal(keys[perm], keys.sort().values)
