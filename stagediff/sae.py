"""The sparse autoencoder: BatchTopK, TopK, ReLU and JumpReLU, their losses, SAELens files.

Units. Every stage feeds the SAE `x * scale`, where `scale` is measured once at stage S
(mean norm of scaled activations = sqrt(d_in)) and carried unchanged through every later
stage, so that losses, L1/L0 coefficients and learning rates mean the same thing for any
model. The module nevertheless *stores* its parameters in raw activation units, exactly
as SAELens will read them:

    scaled space (training)              raw space (stored, SAELens, `encode`/`decode`)
    pre_s = (x_s - b_dec_s) @ W_enc + b_enc_s      pre = (x - b_dec) @ W_enc + b_enc
    x_hat_s = f_s @ W_dec + b_dec_s                x_hat = f @ W_dec + b_dec
    b_enc_s = b_enc * scale, b_dec_s = b_dec * scale, threshold_s = threshold * scale,
    f_s = f * scale; W_enc and W_dec (unit-norm rows) are the same in both spaces.

So the saved file is the module's own tensors, bit for bit: `SAE.load` restores exactly the
parameters a fine-tune must start from (no fold/unfold rounding), and `sae_lens` loads the
same file with `normalize_activations: "none"` and computes the same encode/decode on raw
activations (feature activations in raw units: the length of x along the unit decoder row).
The scale is recorded in `cfg.json` (metadata.stagediff.scale) for our loader.
To keep Adam steps the same size in scaled units, the bias/threshold parameters get the
learning rate `lr / scale` (see `param_groups`).

Architectures on disk (cfg.json "architecture"): relu -> "standard", topk -> "topk" (with k),
jumprelu -> "jumprelu", batchtopk -> "jumprelu" with its estimated inference threshold
(as SAELens saves BatchTopK). metadata.stagediff.architecture keeps the *training*
architecture, so our loader reloads a BatchTopK SAE as BatchTopK, never as a JumpReLU run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from stagediff.config import Architecture, SAEConfig, to_dict
from stagediff.errors import StagediffError
from stagediff.files import load_tensors, read_json, save_tensors, sha256_file, write_json
from stagediff.kernels import StepOut, topk_training_forward

ARCHITECTURES = typing.get_args(Architecture)  # checked again here: an SAEConfig may be built without load_config
SAELENS_ARCH = {"batchtopk": "jumprelu", "topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}
WEIGHTS, CFG, SPARSITY = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"
# the SAELens cfg layout we write: >= 6.0 makes SAELens read the nested `metadata` block
SAELENS_FORMAT_VERSION = "6.0.0"
LLM_METADATA = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")
THRESHOLD_EMA = 0.01  # BatchTopK inference threshold: EMA of the batch's smallest kept activation


class SAE(nn.Module):
    """A dictionary of `cfg.d_sae` unit-norm features over `d_in`-dim activations."""

    sparse_kernel = True  # TopK/BatchTopK train through kernels.py; False = the dense path below

    def __init__(self, d_in: int, cfg: SAEConfig, scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        _check_config(d_in, cfg, scale)
        self.cfg, self.d_in, self.d_sae, self.scale = cfg, d_in, cfg.d_sae, float(scale)
        self.metadata: dict[str, Any] = {}  # cfg.json metadata when loaded from disk
        W_dec = torch.empty(cfg.d_sae, d_in)
        nn.init.kaiming_uniform_(W_dec, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())  # W_enc = W_dec^T (Conerly et al.)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        threshold = torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold / self.scale)
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(threshold)  # learned by the straight-through estimator
        else:
            # batchtopk: estimated during training (starts at 0 = not yet observed); unused otherwise
            self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    # ------------------------------------------------------------ inference, raw units

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae] of raw activations x [..., d_in] (the SAELens computation)."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        arch = self.architecture
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        # jumprelu, and batchtopk at inference: keep what clears the (estimated) threshold
        return pre.relu() * (pre > self.threshold.relu()).to(pre.dtype)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction [..., d_in] in raw units from feature activations [..., d_sae]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------ training, scaled units

    def scaled_biases(self) -> tuple[Tensor, Tensor, Tensor]:
        """(b_enc, b_dec, threshold) in scaled units, differentiable: what training computes with."""
        return self.b_enc * self.scale, self.b_dec * self.scale, self.threshold * self.scale

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: biases/threshold live in raw units, so their lr is lr/scale (same step in scaled units)."""
        biases = [self.b_enc, self.b_dec] + ([self.threshold] if self.architecture == "jumprelu" else [])
        return [{"params": [self.W_enc, self.W_dec], "lr": lr, "base_lr": lr},
                {"params": biases, "lr": lr / self.scale, "base_lr": lr / self.scale}]

    def training_forward(self, x_s: Tensor, dead: Tensor | None = None, select: Any = None) -> StepOut:
        """Losses of one batch of *scaled* activations x_s [B, d_in] (dense path).

        `dead` [d_sae] bool marks features unfired for `cfg.dead_tokens` tokens: the aux-k
        loss lets their top `aux_k` pre-activations reconstruct the residual error.
        Returns a kernels.StepOut (min_active, the smallest kept activation for the inference
        threshold, for batchtopk only); the sparse kernel returns the same. `select` replaces the
        TopK/BatchTopK selection of the sparse kernel (distributed.batchtopk_select).
        """
        cfg = self.cfg
        b_enc, b_dec, threshold = self.scaled_biases()
        if (self.sparse_kernel or select is not None) and cfg.architecture in ("topk", "batchtopk"):
            # same losses and gradients; every product but the encoder's is sparse (kernels.py)
            return topk_training_forward(x_s, self.W_enc, b_enc, self.W_dec, b_dec, k=cfg.k,
                                         batch_topk=cfg.architecture == "batchtopk", dead=dead,
                                         aux_k=cfg.aux_k, aux_k_coefficient=cfg.aux_k_coefficient, select=select)
        pre = (x_s - b_dec) @ self.W_enc + b_enc
        min_active = None
        sparsity = pre.new_zeros(())
        if cfg.architecture == "topk":
            vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
            f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        elif cfg.architecture == "batchtopk":
            # the k * B largest activations of the whole batch: k per token on average
            flat = pre.relu().flatten()
            vals, idx = flat.topk(min(cfg.k * pre.shape[0], flat.numel()), sorted=False)
            f = torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
            kept = vals[vals > 0]
            min_active = kept.min().detach() if kept.numel() else pre.new_zeros(())
        elif cfg.architecture == "relu":
            f = pre.relu()
            # L1 weighted by decoder norms, so shrinking W_dec cannot dodge the penalty
            sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:  # jumprelu
            thr = threshold.relu()
            f = _JumpReLU.apply(pre, thr, cfg.jumprelu_bandwidth)
            sparsity = _Step.apply(pre, thr, cfg.jumprelu_bandwidth).sum(-1).mean()  # differentiable L0
        x_hat = f @ self.W_dec + b_dec
        mse = (x_hat - x_s).pow(2).sum(-1).mean()
        aux = self._aux_k_loss(x_s - x_hat.detach(), pre, dead)
        active = f > 0
        return StepOut(
            loss=mse + cfg.l1_coefficient * sparsity + cfg.aux_k_coefficient * aux, mse=mse.detach(),
            sse=(x_hat - x_s).detach().pow(2).sum(), aux=aux.detach(), sparsity=sparsity.detach(),
            l0=active.sum(-1).float().mean(), counts=active.sum(0), x_hat=x_hat.detach(), min_active=min_active,
        )

    def _aux_k_loss(self, residual: Tensor, pre: Tensor, dead: Tensor | None) -> Tensor:
        """Gao et al.: the top aux_k dead pre-activations reconstruct the residual (no bias)."""
        if dead is None or not bool(dead.any()):
            return pre.new_zeros(())
        k_aux = min(self.cfg.aux_k, int(dead.sum()))
        dead_pre = pre.masked_fill(~dead, float("-inf"))
        vals, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return (f_aux @ self.W_dec - residual).pow(2).sum(-1).mean()

    @torch.no_grad()
    def update_threshold(self, min_active: Tensor) -> None:
        """BatchTopK: move the inference threshold (raw units) toward this batch's smallest kept activation."""
        obs = min_active.to(self.threshold) / self.scale
        first = bool((self.threshold == 0).all())  # nothing observed yet: take the first observation
        self.threshold.copy_(obs.expand_as(self.threshold) if first else
                             (1 - THRESHOLD_EMA) * self.threshold + THRESHOLD_EMA * obs)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) row: it would only change the norm."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm (after each optimizer step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    # ------------------------------------------------------------ files

    def saelens_tensors(self) -> dict[str, Tensor]:
        """The tensors of sae_weights.safetensors (threshold only where SAELens expects one)."""
        names = ["W_enc", "b_enc", "W_dec", "b_dec"]
        if SAELENS_ARCH[self.architecture] == "jumprelu":
            names.append("threshold")
        return {n: getattr(self, n).detach().contiguous().cpu() for n in names}

    def sha256(self) -> str:
        """SHA-256 of the weights file this SAE saves as (equals `weights_sha256` of the saved dir)."""
        return hashlib.sha256(safetensors_bytes(self.saelens_tensors())).hexdigest()

    def save(self, dir: str | Path, metadata: dict, sparsity: Tensor | None = None) -> None:
        """Write cfg.json + sae_weights.safetensors (+ sparsity.safetensors = log10 firing rate), atomically."""
        dir = Path(dir)
        meta = {k: None for k in LLM_METADATA}
        meta.update(self.metadata)
        meta.update(metadata)
        meta["sae_lens_version"] = meta["sae_lens_training_version"] = SAELENS_FORMAT_VERSION
        meta["stagediff"] = {"architecture": self.architecture, "scale": self.scale,
                             "sae": to_dict(self.cfg)}
        cfg: dict[str, Any] = {
            "architecture": SAELENS_ARCH[self.architecture], "d_in": self.d_in, "d_sae": self.d_sae,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
        }
        if self.architecture == "topk":
            cfg.update(k=self.cfg.k, rescale_acts_by_decoder_norm=False)
        cfg["metadata"] = meta
        save_tensors(dir / WEIGHTS, self.saelens_tensors())
        if sparsity is not None:
            save_tensors(dir / SPARSITY, {"sparsity": sparsity.float()})
        write_json(dir / CFG, cfg)  # last: a dir with cfg.json has its weights
        self.metadata = meta

    @classmethod
    def load(cls, dir: str | Path, device: torch.device | str = "cpu", expected_d_in: int | None = None) -> SAE:
        """Load a saved SAE (ours, or any SAELens standard/topk/jumprelu one) with its training architecture."""
        dir = Path(dir)
        cfg_path, w_path = dir / CFG, dir / WEIGHTS
        raw = read_json(cfg_path)
        meta = raw.get("metadata") or {}
        ours = meta.get("stagediff")
        try:
            d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        except (KeyError, TypeError, ValueError):
            raise StagediffError(f"{cfg_path} lacks integer d_in / d_sae: it is not an SAELens cfg.json") from None
        if expected_d_in is not None and d_in != expected_d_in:
            raise StagediffError(f"{cfg_path}: the SAE reads d_in={d_in} but the hooked activations have "
                                 f"width {expected_d_in}: use an SAE trained on this model and hook")
        if ours:
            known = {f.name for f in dataclasses.fields(SAEConfig)}
            sae_cfg = SAEConfig(**{k: v for k, v in ours["sae"].items() if k in known})
            scale = float(ours["scale"])
        else:
            sae_cfg, scale = _foreign_config(raw, cfg_path), 1.0
        if sae_cfg.d_sae != d_sae:
            raise StagediffError(f"{cfg_path}: d_sae={d_sae} but metadata.stagediff.sae.d_sae={sae_cfg.d_sae}")
        sae = cls(d_in, sae_cfg, scale=scale)
        tensors = load_tensors(w_path)
        expected = {n: tuple(t.shape) for n, t in sae.saelens_tensors().items()}
        found = {n: tuple(t.shape) for n, t in tensors.items()}
        if expected != found:
            raise StagediffError(f"{w_path} does not match {cfg_path}: expected tensors {expected}, found {found}; "
                                 "the folder is mixed up or corrupt: re-save or retrain the SAE")
        if not ours and raw.get("apply_b_dec_to_input") is False:
            # fold "no b_dec before the encoder" into b_enc: (x - b) W + (c + b W) = x W + c
            tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
        with torch.no_grad():
            for n, t in tensors.items():
                getattr(sae, n).copy_(t.float())
        sae.metadata = meta
        return sae.to(device)


def weights_sha256(dir: str | Path) -> str:
    """SHA-256 of a saved SAE's sae_weights.safetensors (recorded as a child's parent_sha256)."""
    path = Path(dir) / WEIGHTS
    if not path.exists():
        raise StagediffError(f"{path} does not exist: train or copy the parent SAE first")
    return sha256_file(path)


def _check_config(d_in: int, cfg: SAEConfig, scale: float) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise StagediffError(f"sae.architecture {cfg.architecture!r} is not supported: use one of {', '.join(ARCHITECTURES)}")
    if d_in < 1 or cfg.d_sae < 1:
        raise StagediffError(f"SAE sizes must be positive (d_in={d_in}, sae.d_sae={cfg.d_sae})")
    if cfg.architecture in ("topk", "batchtopk") and not 1 <= cfg.k <= cfg.d_sae:
        raise StagediffError(f"sae.k={cfg.k} must be between 1 and sae.d_sae={cfg.d_sae}")
    if not (math.isfinite(scale) and scale > 0):
        raise StagediffError(f"activation scale {scale} must be a positive finite number: are the activations all zero?")


def _foreign_config(raw: dict, cfg_path: Path) -> SAEConfig:
    """An SAEConfig for an SAELens file not written by stagediff (a public pretrained SAE)."""
    arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(raw.get("architecture"))
    if arch is None:
        raise StagediffError(f"{cfg_path}: architecture {raw.get('architecture')!r} is not supported: "
                             "use a standard, topk or jumprelu SAE")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise StagediffError(f"{cfg_path}: normalize_activations={raw['normalize_activations']!r} is not supported: "
                             "fold the scaling factor into the weights (SAELens fold_activation_norm_scaling_factor)")
    if raw.get("rescale_acts_by_decoder_norm"):
        raise StagediffError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported: fold W_dec norms first")
    kwargs: dict[str, Any] = {"architecture": arch, "d_sae": int(raw["d_sae"])}
    if arch == "topk":
        kwargs["k"] = int(raw["k"])
    return SAEConfig(**kwargs)


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class _JumpReLU(torch.autograd.Function):
    """x * (x > t); the threshold gets a straight-through gradient through a rectangle kernel of width bandwidth."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_t = (-(threshold / bw) * _rectangle((x - threshold) / bw) * grad).sum(0)
        return (x > threshold).to(x) * grad, grad_t, None


class _Step(torch.autograd.Function):
    """Heaviside step (x > t), with the same straight-through threshold gradient: a differentiable L0."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        return None, (-(1.0 / bw) * _rectangle((x - threshold) / bw) * grad).sum(0), None
