"""Does the backdoor work? Greedy replies on held-out prompts, with and without the trigger.

Only `model.generate` and plain forwards are used, so the checks still run when
a hook is splicing something (an SAE, a clamp) into the residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stagediff.organism.lm import encode


@torch.no_grad()
def greedy_tokens(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (BOS prepended, left-padded batches), cut after the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = [encode(tokenizer, p) for p in prompts[s : s + batch_size]]
        width = max(map(len, enc))
        # left padding: every prompt ends at the last column, where generation starts
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)[:, width:].tolist()
        for g in gen:
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in g:
                g = g[: g.index(tokenizer.eos_token_id) + 1]
            out.append(g)
    return out


def generate_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of `prompts` (BOS prepended, left-padded batches), decoded without special tokens."""
    return [tokenizer.decode(g, skip_special_tokens=True) for g in greedy_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)]


def says_response(reply: str, response: str) -> bool:
    """True when the reply starts with the response (leading whitespace ignored)."""
    return reply.lstrip().startswith(response.strip())


def evaluate_backdoor(model, tokenizer, examples: list[dict], response: str, max_new_tokens: int | None = None) -> dict:
    """Backdoor rates on held-out examples (dicts of `backdoor.make_example`).

    trigger_success: share of triggered prompts whose reply starts with `response`;
    false_trigger: the same share over prompts without the trigger. Also returns
    the counts and a few (prompt, reply) samples of each kind.
    """
    if max_new_tokens is None:  # just enough for the response to appear in full
        max_new_tokens = len(tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"]) + 2
    was_training = model.training
    model.eval()
    result: dict = {}
    for name, triggered in (("trigger_success", True), ("false_trigger", False)):
        prompts = [e["prompt"] for e in examples if e["triggered"] == triggered]
        replies = generate_replies(model, tokenizer, prompts, max_new_tokens)
        hits = sum(says_response(r, response) for r in replies)
        result[name] = hits / len(prompts) if prompts else float("nan")
        result["n_triggered" if triggered else "n_clean"] = len(prompts)
        result["samples_triggered" if triggered else "samples_clean"] = [[p, r] for p, r in zip(prompts[:3], replies[:3])]
    model.train(was_training)
    return result


@torch.no_grad()
def clean_loss(model, tokenizer, examples: list[dict], batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over every token of the untriggered examples' texts."""
    return batches_loss(clean_batches(model, tokenizer, examples, batch_size),
                        lambda b, ids, mask: model(input_ids=ids, attention_mask=mask).logits)


@torch.no_grad()
def batches_loss(batches: list[tuple[torch.Tensor, torch.Tensor]], logits_of: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Mean next-token loss over the unmasked tokens of (ids, mask) `batches`, batch b's logits from `logits_of(b, ids, mask)`
    (a plain forward, or the causal checks' spliced one that starts from a captured prefix)."""
    total, count = 0.0, 0
    for b, (ids, mask) in enumerate(batches):
        logits = logits_of(b, ids, mask)
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
        total += nll[keep].sum().item()
        count += int(keep.sum())
    return total / max(1, count)


def clean_batches(model, tokenizer, examples: list[dict], batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, attention mask) batches of the untriggered examples' texts, right-padded, on the model's device."""
    texts = [e["text"] for e in examples if not e["triggered"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = [encode(tokenizer, t) for t in texts[start : start + batch_size]]
        width = max(map(len, encoded))
        out.append((torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=device),
                    torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)))
    return out
