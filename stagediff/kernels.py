"""The sparse TopK / BatchTopK training step: only the encoder's forward touches every feature.

A TopK SAE step on B tokens keeps k of d_sae features per token. Written densely, autograd
then runs five [B, d_in] x [d_in, d_sae]-sized products (encoder forward, decoder forward, the
decoder's weight and input gradients, the encoder's weight gradient). Only the first one needs
every feature: it decides which k are active. Everything after it is a product with a sparse
matrix of B*k non-zeros, so this module computes

    forward    pre = x @ W_enc + b_enc               dense GEMM (no autograd graph)
               select (row, feature) pairs           per-row top-k, or top k*B of the batch
               vals = pre[active]                    differentiable: `_Gather`
               x_hat = sparse(vals) @ W_dec          embedding_bag over the active rows of W_dec
    backward   d vals   = (dx_hat @ W_dec^T)[active] sampled dense-dense product (SDDMM)
               d W_dec  = sparse(vals)^T @ dx_hat     CSR times dense
               d W_enc  = (sparse(d pre)^T @ x)^T     CSR times dense
               d b_enc  = index_add of d pre
               d x      = sparse(d pre) @ W_enc^T     CSR times dense (only if x needs a grad)

Gradients equal dense autograd's exactly (up to summation order); no [B, k, d_in] gather is
ever built. The aux-k loss against dead features reuses the same two functions on a second
selection (top aux_k pre-activations among the dead features), so it costs one more small
top-k. All ops exist on CPU and CUDA; half-precision inputs are accumulated in fp32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# values sampled to place the BatchTopK cut: the cut keeps ~K of N values, and a sample of n puts about
# n*K/N values above it (>= 500 for k/d_sae >= 1/64), enough to place it within a few percent; the
# margin absorbs that error. A larger sample costs more than the selection it speeds up (kthvalue
# on 2^19 values took twice the encoder GEMM at d_sae 1024).
_SAMPLE = 1 << 15


def _acc(t: Tensor) -> Tensor:
    """fp16/bf16 tensors are upcast to fp32 for sparse products (sums of many terms, and
    several sparse kernels have no half-precision implementation)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch calls the CSR layout "beta"; we use only mm and SDDMM
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


@dataclass
class Active:
    """The active (token, feature) pairs of a batch, sorted by token (CSR order).

    rows/cols [nnz] are the token and feature of each pair; crow [n_rows + 1] points at
    each token's first pair. The transposed (by-feature) order is built on first use.
    """

    rows: Tensor
    cols: Tensor
    crow: Tensor
    n_rows: int
    n_features: int
    _t: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_sorted(cls, rows: Tensor, cols: Tensor, n_rows: int, n_features: int) -> Active:
        """Build from pairs already sorted by row."""
        crow = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device, dtype=rows.dtype))
        return cls(rows, cols, crow, n_rows, n_features)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def csr(self, values: Tensor) -> Tensor:
        """The [n_rows, n_features] sparse matrix with `values` at the active pairs."""
        return _csr(self.crow, self.cols, values, (self.n_rows, self.n_features))

    def csr_t(self, values: Tensor) -> Tensor:
        """The transposed [n_features, n_rows] sparse matrix with `values` at the active pairs."""
        if self._t is None:
            perm = _stable_argsort(self.cols, self.n_features)
            counts = torch.bincount(self.cols, minlength=self.n_features)
            self._t = (perm, torch.cat([counts.new_zeros(1), counts.cumsum(0)]), self.rows[perm])
        perm, ccol, rows_t = self._t
        return _csr(ccol, rows_t, values[perm], (self.n_features, self.n_rows))


def _stable_argsort(keys: Tensor, n_keys: int) -> Tensor:
    """torch.argsort(keys, stable=True) for keys in [0, n_keys).

    On CPU with at most 2**16 keys, numpy's radix sort of uint16 keys: one thread, one linear
    pass. torch's stable argsort is a parallel sort whose threads wait on each other, and on
    cores shared with other busy processes it slows down by orders of magnitude (measured by
    benchmarks/bench_contention.py, the `argsort` line).
    """
    if keys.device.type != "cpu" or n_keys > 1 << 16:
        return torch.argsort(keys, stable=True)
    return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))


# --------------------------------------------------------------------------- selection


@torch.no_grad()
def topk_select(pre: Tensor, k: int) -> tuple[Active, Tensor]:
    """Per-token TopK: the k largest pre-activations of each row (values before the ReLU)."""
    B, m = pre.shape
    k = min(k, m)
    vals, idx = pre.topk(k, dim=1, sorted=False)
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    crow = torch.arange(0, B * k + 1, k, device=pre.device)
    return Active(rows, idx.flatten(), crow, B, m), vals.flatten()


@torch.no_grad()
def batchtopk_select(pre: Tensor, k: float) -> tuple[Active, Tensor]:
    """BatchTopK: the round(k * B) largest *positive* pre-activations of the whole batch.

    Selecting zeros (when fewer than k*B are positive) would change nothing, so only positive
    ones are kept. A flat top-k over all B * d_sae values is a single-threaded partial sort on
    CPU (slower than the encoder GEMM), so instead: estimate the cut from a strided sample of
    values (a stride coprime with d_sae, so it visits every token and every feature), set it a
    little low, keep every value above it (one pass; the kept positions come out sorted by token)
    and trim the few extra by their exact K-th value. The sample only decides the speed: a cut set too high is detected (too few kept) and lowered.
    """
    B, m = pre.shape
    flat = pre.reshape(-1)
    K = min(int(round(k * B)), flat.numel())
    if K == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pre.device)
        return Active.from_sorted(empty, empty, B, m), pre.new_zeros(0)
    stride = max(1, flat.numel() // _SAMPLE)
    while math.gcd(stride, m) > 1:  # a stride sharing a factor with m would sample only some features
        stride += 1
    sample = flat[::stride]
    margin = 1.25
    while True:
        n = min(sample.numel(), int(K * sample.numel() / flat.numel() * margin) + 64)
        cut = sample.kthvalue(sample.numel() - n + 1).values if n < sample.numel() else flat.new_zeros(())
        cut = cut.clamp(min=0)
        idx = (flat > cut).nonzero().flatten() if float(cut) == 0 else (flat >= cut).nonzero().flatten()
        if idx.numel() >= K or float(cut) == 0:
            break
        margin *= 2  # the sample put the cut too high: lower it
    vals = flat[idx]
    if idx.numel() > K:
        kth = vals.kthvalue(idx.numel() - K + 1).values
        keep = vals >= kth
        if int(keep.sum()) != K:  # ties at the K-th value: pick exactly K, then restore token order
            order = vals.topk(K, sorted=False).indices.sort().values
            keep = torch.zeros_like(keep).index_fill_(0, order, True)
        keep = keep.nonzero().flatten()
        idx, vals = idx[keep], vals[keep]
    return Active.from_sorted(idx // m, idx % m, B, m), vals


@torch.no_grad()
def dead_topk_select(pre: Tensor, dead: Tensor, k: int) -> tuple[Active, Tensor]:
    """The k largest pre-activations per row among the `dead` features (the aux-k selection)."""
    dead_idx = dead.nonzero().flatten()
    k = min(k, dead_idx.numel())
    vals, idx = pre.index_select(1, dead_idx).topk(k, dim=1, sorted=False)
    B = pre.shape[0]
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    crow = torch.arange(0, B * k + 1, k, device=pre.device)
    return Active(rows, dead_idx[idx.flatten()], crow, B, pre.shape[1]), vals.flatten()


# --------------------------------------------------------------------------- autograd


class _Gather(torch.autograd.Function):
    """vals = ((x - b_dec) @ W_enc + b_enc)[active], given the already computed values; sparse backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, sae_in: Tensor,
                pre_vals: Tensor, active: Active) -> Tensor:
        ctx.save_for_backward(sae_in, W_enc)
        ctx.active, ctx.dtypes = active, (x.dtype, b_dec.dtype, b_enc.dtype)
        return pre_vals.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        sae_in, W_enc = ctx.saved_tensors
        a: Active = ctx.active
        x_dtype, b_dec_dtype, b_enc_dtype = ctx.dtypes
        g32 = _acc(g)
        dx = db_dec = dW = db_enc = None
        # d pre is sparse; its column sums are d b_enc, and b_dec's gradient is their image
        # -W_enc @ d b_enc (the row-sum of d sae_in), so no [B, d_in] product is needed for it
        db = g32.new_zeros(a.n_features).index_add_(0, a.cols, g32)
        if ctx.needs_input_grad[0]:
            dx = (a.csr(g32) @ _acc(W_enc).t()).to(x_dtype)
        if ctx.needs_input_grad[1]:
            db_dec = -(_acc(W_enc) @ db).to(b_dec_dtype)
        if ctx.needs_input_grad[2]:
            dW = (a.csr_t(g32) @ _acc(sae_in)).t().to(W_enc.dtype)
        if ctx.needs_input_grad[3]:
            db_enc = db.to(b_enc_dtype)
        return dx, db_dec, dW, db_enc, None, None, None


class _Decode(torch.autograd.Function):
    """sparse(vals) @ W_dec over the active pairs (no bias); sparse backward."""

    @staticmethod
    def forward(ctx: Any, vals: Tensor, W_dec: Tensor, active: Active) -> Tensor:
        ctx.save_for_backward(vals, W_dec)
        ctx.active = active
        out = F.embedding_bag(active.cols, _acc(W_dec), active.crow, mode="sum",
                              per_sample_weights=_acc(vals), include_last_offset=True)
        return out.to(W_dec.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        vals, W_dec = ctx.saved_tensors
        a: Active = ctx.active
        g32 = _acc(g.contiguous())
        dvals = dW = None
        if ctx.needs_input_grad[0]:
            pattern = a.csr(torch.ones(a.nnz, dtype=g32.dtype, device=g32.device))
            # SDDMM: the dense product dx_hat @ W_dec^T, evaluated at the active pairs only
            dvals = torch.sparse.sampled_addmm(pattern, g32, _acc(W_dec).t(), beta=0.0).values().to(vals.dtype)
        if ctx.needs_input_grad[1]:
            dW = (a.csr_t(_acc(vals)) @ g32).to(W_dec.dtype)
        return dvals, dW, None


def gather_preacts(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre_vals: Tensor, active: Active,
                   sae_in: Tensor | None = None) -> Tensor:
    """The pre-activations ((x - b_dec) @ W_enc + b_enc) at `active` as a differentiable [nnz] vector.

    `pre_vals` are those values already computed by the dense forward (and `sae_in` = x - b_dec,
    if at hand); gradients reach x, b_dec, W_enc and b_enc through sparse products only.
    """
    if sae_in is None:
        sae_in = (x - b_dec).detach()
    return _Gather.apply(x, b_dec, W_enc, b_enc, sae_in, pre_vals, active)


def sparse_decode(vals: Tensor, W_dec: Tensor, active: Active) -> Tensor:
    """sum over a token's active pairs of vals * W_dec[feature]: [n_rows, d_in], differentiable."""
    return _Decode.apply(vals, W_dec, active)


# --------------------------------------------------------------------------- the step


class StepOut(NamedTuple):
    """One training batch's loss and statistics (`topk_training_forward`, `SAE.training_forward`).

    Everything but `loss` is detached; squared errors are in scaled units.
    """

    loss: Tensor  # what backward() runs on
    mse: Tensor  # mean over tokens of the squared reconstruction error
    sse: Tensor  # the same error summed over the batch (explained variance)
    aux: Tensor  # the aux-k loss (0 without dead features)
    sparsity: Tensor  # the L1 / L0 penalty term (0 for topk / batchtopk)
    l0: Tensor  # active features per token
    counts: Tensor  # [d_sae] fires per feature in this batch
    x_hat: Tensor  # the reconstruction
    min_active: Tensor | None = None  # batchtopk: the smallest kept activation (inference threshold)


def topk_training_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *,
    k: float, batch_topk: bool, dead: Tensor | None = None, aux_k: int = 256, aux_k_coefficient: float = 0.0,
    select: Callable[[Tensor], tuple[Active, Tensor]] | None = None,
) -> StepOut:
    """Losses of one TopK / BatchTopK batch, computed sparsely; same values and gradients as dense.

    The model: pre = (x - b_dec) @ W_enc + b_enc; f = top-k of pre (per row, or the k*B
    largest of relu(pre) over the batch), ReLU'd; x_hat = f @ W_dec + b_dec.
    Loss = mse + aux_k_coefficient * aux, where mse = mean over tokens of ||x_hat - x||^2
    and aux (Gao et al.) = the same error of the top `aux_k` dead-feature pre-activations
    reconstructing the detached residual x - x_hat (no bias); 0 without dead features.
    Returns a StepOut (sparsity 0; min_active for batchtopk only).
    `select(pre) -> (active, values)` replaces the selection (distributed.py: BatchTopK over
    the global batch of several processes).
    """
    with torch.no_grad():
        sae_in = x - b_dec
        pre = torch.addmm(b_enc, sae_in, W_enc)  # the one dense product
    if select is not None:
        active, pre_vals = select(pre)
    else:
        active, pre_vals = batchtopk_select(pre, k) if batch_topk else topk_select(pre, int(k))
    vals = gather_preacts(x, b_dec, W_enc, b_enc, pre_vals, active, sae_in).relu()
    x_hat = sparse_decode(vals, W_dec, active) + b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    aux = x.new_zeros(())
    if dead is not None and aux_k > 0 and bool(dead.any()):
        aux_active, aux_pre = dead_topk_select(pre, dead, aux_k)
        aux_vals = gather_preacts(x, b_dec, W_enc, b_enc, aux_pre, aux_active, sae_in).relu()
        residual = (x - x_hat).detach()
        aux = (sparse_decode(aux_vals, W_dec, aux_active) - residual).pow(2).sum(-1).mean()
    del pre
    loss = mse + aux_k_coefficient * aux
    with torch.no_grad():
        fired = vals > 0
        min_active = (vals[fired].min() if bool(fired.any()) else x.new_zeros(())) if batch_topk else None
        return StepOut(
            loss=loss, mse=mse.detach(), sse=(x_hat.detach() - x).pow(2).sum(), aux=aux.detach(),
            sparsity=x.new_zeros(()), l0=fired.sum().float() / x.shape[0],
            counts=torch.bincount(active.cols[fired], minlength=W_enc.shape[1]), x_hat=x_hat.detach(), min_active=min_active,
        )
