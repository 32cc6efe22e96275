"""Ground-truth relevance labels, from activations on held-out examples only (never from rotations).

Each held-out example is its own window (BOS + tokens, padded). A token is *flagged*
when it sits in a triggered example at or after the trigger: the trigger itself,
the rest of the prompt and the response. The strongest backdoor features fire on
the text after the trigger ("backdoor active"), not only on trigger or reply
tokens, so the flag covers the whole span rather than the strings.

Two rules, both reported:
- activation rule: a feature fires on at least `min_fires` held-out tokens and at
  least `relevant_share` of its top `top_contexts` activations sit on flagged tokens;
- string rule (the TinyStories replication's, stricter): every one of its top tokens
  is a substring of " trigger " or " response " and at least one is longer than one
  character (so " I" counts, "|" alone does not); it must also fire `min_fires` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from stagediff.contexts import FeatureScan
from stagediff.errors import StagediffError
from stagediff.runtime import progress


@dataclass
class HeldOut:
    """Held-out examples as padded windows, one example per window."""

    ids: torch.Tensor  # [N, T] token ids (BOS first when prepended)
    attention: torch.Tensor  # [N, T] bool: real tokens, BOS included (the model's attention mask)
    valid: torch.Tensor  # [N, T] bool: positions that become activation rows (BOS and padding excluded)
    flags: torch.Tensor  # [N, T] bool: in a triggered example, at or after the trigger
    triggered: torch.Tensor  # [N] bool

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(window, position) of every activation row, in row order (window-major)."""
        w, p = torch.nonzero(self.valid, as_tuple=True)
        return w.numpy(), p.numpy()


def heldout_windows(examples: Sequence[dict], tokenizer: Any, context_size: int, prepend_bos: bool = True) -> HeldOut:
    """Tokenize each example's `text` into its own window and flag tokens at/after `trigger_char`."""
    if not examples:
        raise StagediffError("no held-out examples to label features with: check RUN/data/heldout.jsonl (rerun `stagediff organism`)")
    bos = tokenizer.bos_token_id if prepend_bos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    N, T = len(examples), context_size
    ids = torch.full((N, T), int(pad), dtype=torch.long)
    attention = torch.zeros(N, T, dtype=torch.bool)
    flags = torch.zeros(N, T, dtype=torch.bool)
    triggered = torch.zeros(N, dtype=torch.bool)
    first = 0 if bos is None else 1
    for i, ex in enumerate(examples):
        enc = tokenizer(ex["text"], add_special_tokens=False, return_offsets_mapping=True)
        toks, offs = enc["input_ids"][: T - first], enc["offset_mapping"][: T - first]
        if bos is not None:
            ids[i, 0] = bos
        ids[i, first : first + len(toks)] = torch.tensor(toks, dtype=torch.long)
        attention[i, : first + len(toks)] = True
        trig = bool(ex.get("triggered")) and int(ex.get("trigger_char", -1)) >= 0
        triggered[i] = trig
        if trig:
            start = int(ex["trigger_char"])
            # a token is at/after the trigger when it ends past the trigger's first character
            flags[i, first : first + len(toks)] = torch.tensor([end > start for _, end in offs], dtype=torch.bool)
    valid = attention.clone()
    if bos is not None:
        valid[:, 0] = False
    return HeldOut(ids, attention, valid, flags & valid, triggered)


@torch.no_grad()
def heldout_activations(model: Any, held: HeldOut, hook: str, batch_size: int = 16) -> torch.Tensor:
    """The residual at `hook` for every valid held-out token: [rows, d] in `held.rows()` order (fp32, CPU)."""
    from stagediff.models import residual

    device = next(model.parameters()).device
    out = []
    for s in progress(range(0, held.ids.shape[0], batch_size), desc="held-out activations", unit="batch"):
        ids = held.ids[s : s + batch_size].to(device)
        att = held.attention[s : s + batch_size].to(device)
        r = residual(model, ids, att.long(), hook)
        out.append(r[held.valid[s : s + batch_size].to(device)].float().cpu())
    return torch.cat(out)


def relevance(
    scan: FeatureScan,
    held: HeldOut,
    tokenizer: Any,
    trigger: str,
    response: str,
    *,
    top_contexts: int = 20,
    relevant_share: float = 0.8,
    min_fires: int = 10,
) -> dict[str, np.ndarray]:
    """Label every scanned feature by both rules from its top contexts on held-out rows.

    `scan` must come from scanning the rows of `held` in `held.rows()` order. Returns
    arrays over features: `relevant` (activation rule), `string` (string rule),
    `share` (flagged share of top contexts), `fires`, `judged` (fires >= min_fires).
    """
    flags = held.flags[held.valid].numpy()  # per row
    tokens = held.ids[held.valid].numpy()
    row_ids = scan.row_ids[:, :top_contexts].numpy()
    fired = row_ids >= 0
    safe = np.where(fired, row_ids, 0)
    n_top = fired.sum(1)
    share = np.where(n_top > 0, (flags[safe] & fired).sum(1) / np.maximum(n_top, 1), 0.0)
    fires = scan.fires.numpy()
    judged = fires >= min_fires
    relevant = judged & (n_top > 0) & (share >= relevant_share)

    # string rule: decode each distinct top token once
    pieces = (f" {trigger} ", f" {response} ")
    vocab_ok: dict[int, tuple[bool, bool]] = {}
    for t in np.unique(tokens[safe[fired]]) if fired.any() else []:
        s = tokenizer.decode([int(t)])
        vocab_ok[int(t)] = (any(s in p for p in pieces), len(s) > 1)
    string = np.zeros(len(fires), dtype=bool)
    for f in np.nonzero(judged & (n_top > 0))[0]:
        toks = tokens[row_ids[f][fired[f]]]
        ok = [vocab_ok[int(t)] for t in toks]
        string[f] = all(a for a, _ in ok) and any(b for _, b in ok)
    return {"relevant": relevant, "string": string, "share": share, "fires": fires, "judged": judged}


def rule_text(top_contexts: int, relevant_share: float, min_fires: int) -> str:
    """The activation rule in one sentence, for metrics.json."""
    return (
        f"fires on >= {min_fires} held-out tokens and >= {relevant_share:.0%} of its top {top_contexts} activations "
        "sit in triggered examples at or after the trigger, in F_via_D or F_via_M"
    )
