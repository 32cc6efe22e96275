"""Causal checks: splice an F dictionary into the fine-tuned model and edit its features.

The splice replaces the residual at the hook by
    decode(f') + (resid - decode(encode(resid)))
i.e. the edited reconstruction plus the SAE's error term, so an untouched splice
(f' = f) gives back the residual exactly (up to float rounding) and any change in
behaviour comes from the edit, not from reconstruction error.

- clamp: f'[top N] = 0 on triggered prompts -> trigger success, against N random
  live features of matched firing rate;
- steer: f'[i] += strength * a_i on clean prompts, where a_i is feature i's mean
  activation when it fires on held-out data, i.e. we add strength x its typical
  activation along its raw-space decoder direction (decode(e_i) - decode(0)); so
  strengths are in units of "how strongly this feature normally fires" and mean the
  same for any model width or activation scale -> response rate;
- clean loss with and without the largest clamp.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from stagediff.runtime import progress


def splice_fn(sae: Any, clamp: Sequence[int] = (), add: dict[int, float] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """resid -> decode(f') + error, with features `clamp` set to 0 and `add` {feature: amount} added."""
    clamp_idx = torch.as_tensor(list(clamp), dtype=torch.long)
    add = dict(add or {})

    def fn(resid: torch.Tensor) -> torch.Tensor:
        p = next(sae.parameters())
        x = resid.to(p.dtype)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        error = x - x_hat
        f2 = f.clone()
        if clamp_idx.numel():
            f2[..., clamp_idx.to(f.device)] = 0
        for i, a in add.items():
            f2[..., i] = f2[..., i] + a
        return (sae.decode(f2) + error).to(resid.dtype)

    return fn


def matched_random(features: Sequence[int], freq: np.ndarray, live: np.ndarray, rng: np.random.Generator, pool: int = 10) -> np.ndarray:
    """For each feature, a distinct random live feature among the `pool` nearest in firing rate, outside `features`."""
    taken = set(int(f) for f in features)
    cands = np.array([i for i in np.nonzero(live)[0] if i not in taken])
    out = []
    for f in features:
        avail = cands[[int(c) not in taken for c in cands]]
        if avail.size == 0:
            break
        # nearest in log firing rate: rare and common features behave differently when clamped
        d = np.abs(np.log10(freq[avail] + 1e-9) - np.log10(freq[int(f)] + 1e-9))
        near = avail[np.argsort(d, kind="stable")[:pool]]
        pick = int(rng.choice(near))
        taken.add(pick)
        out.append(pick)
    return np.array(out, dtype=np.int64)


def clamp_sweep(
    model: Any, tokenizer: Any, sae: Any, hook: str, triggered: list[dict], response: str,
    ranked: np.ndarray, freq: np.ndarray, live: np.ndarray, ns: Sequence[int], seed: int = 0,
) -> list[dict]:
    """Trigger success with the top N ranked features clamped to 0, and with N matched random features."""
    from stagediff.models import splice
    from stagediff.organism.behaviour import evaluate_backdoor

    rng = np.random.default_rng(seed)
    out = []
    for n in progress([n for n in ns if n <= len(ranked)], desc="clamp sweep", unit="N"):
        top = ranked[:n]
        rand = matched_random(top, freq, live, rng)
        with splice(model, hook, splice_fn(sae, clamp=top.tolist())):
            ts = evaluate_backdoor(model, tokenizer, triggered, response)["trigger_success"]
        with splice(model, hook, splice_fn(sae, clamp=rand.tolist())):
            rs = evaluate_backdoor(model, tokenizer, triggered, response)["trigger_success"]
        out.append({"n": int(n), "trigger_success": float(ts), "random_trigger_success": float(rs),
                    "features": top.tolist(), "random_features": rand.tolist()})
    return out


def steer_sweep(
    model: Any, tokenizer: Any, sae: Any, hook: str, clean: list[dict], response: str,
    feature: int, typical: float, strengths: Sequence[float],
) -> list[dict]:
    """Response rate on clean prompts with `strength * typical` added to `feature` at every position."""
    from stagediff.models import splice
    from stagediff.organism.behaviour import evaluate_backdoor

    out = []
    for s in progress(list(strengths), desc="steering", unit="strength"):
        with splice(model, hook, splice_fn(sae, add={int(feature): float(s) * typical})):
            r = evaluate_backdoor(model, tokenizer, clean, response)["false_trigger"]
        out.append({"strength": float(s), "response_rate": float(r), "feature": int(feature), "added_activation": float(s) * typical})
    return out


def clean_loss_check(model: Any, tokenizer: Any, sae: Any, hook: str, clean: list[dict], clamp: Sequence[int]) -> dict:
    """Clean-data loss: plain model, untouched splice (should equal it), and with `clamp` zeroed."""
    from stagediff.models import splice
    from stagediff.organism.behaviour import clean_loss

    before = clean_loss(model, tokenizer, clean)
    with splice(model, hook, splice_fn(sae)):
        untouched = clean_loss(model, tokenizer, clean)
    with splice(model, hook, splice_fn(sae, clamp=list(clamp))):
        after = clean_loss(model, tokenizer, clean)
    return {"before": float(before), "spliced_untouched": float(untouched), "after_clamp": float(after), "n_clamped": len(clamp)}
