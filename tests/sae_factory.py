"""SAEs with every tensor moved off its initialisation, so round trips and comparisons test real values."""

from __future__ import annotations

import torch

from stagediff.config import SAEConfig
from stagediff.sae import SAE


def perturbed_sae(arch: str, d_in: int = 16, d_sae: int = 64, k: int = 5, scale: float = 0.37, noise: float = 0.1) -> SAE:
    """An SAE of `arch` with perturbed encoder and biases, a non-trivial scale and a random threshold."""
    sae = SAE(d_in, SAEConfig(architecture=arch, d_sae=d_sae, k=k), scale=scale, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in (sae.W_enc, sae.b_enc, sae.b_dec):
            t.add_(noise * torch.randn(t.shape, generator=g))
        sae.threshold.copy_(4 * noise * torch.rand(d_sae, generator=g))
    return sae
