"""Ground-truth relevance labels, from activations on held-out examples only (never from rotations).

The held-out set comes in matched pairs (organism/backdoor.make_heldout): each prompt once with
the trigger and once without, the same text otherwise, each followed by the reply that model
gives (the teacher-forced backdoor reply after the trigger, the clean answer otherwise). Each
example is its own window (BOS + tokens, padded). An example's *span* is every token from
where the trigger sits (triggered copy) or would sit (clean copy) to the end: the trigger, the
rest of the prompt, the Assistant cue and the reply.

The label (`paired_relevance`): per pair j and feature i, the difference
    d_ij = mean activation over the triggered copy's span - mean over the clean copy's span.
A feature is *judged* when d_ij != 0 in at least `min_pairs` pairs, and *relevant* when it is
more active with the trigger in at least `min_pairs` distinct pairs, a one-sided exact sign
test over the pairs gives p <= alpha, and it is on average at least `min_ratio` times as active
with the trigger as without (reliable *and* large: a dense feature nudged up by any change of
context is not a backdoor feature). The strongest backdoor features fire on the text after the
trigger ("backdoor active"), not only on trigger or reply tokens, so the span covers all of it.
Its false-positive rate is measured with a permutation null (the triggered/clean roles swapped
within random pairs: the labelled share of judged features under those swaps), and alpha is
lowered until that rate is <= `max_fpr`. A feature's activations come from every dictionary
that represents it (F_via_D and F_via_M for the stage-wise features), averaged, so one label
serves every method ranking that feature identity; no union over dictionaries.

Two older rules are kept as secondary labels in the metrics:
- top-context rule: a feature fires on at least `min_fires` held-out tokens and at
  least `relevant_share` of its top `top_contexts` activations sit on flagged tokens
  (triggered examples, at or after the trigger);
- string rule (the TinyStories replication's, stricter): every one of its top tokens
  is a substring of " trigger " or " response " and at least one is longer than one
  character (so " I" counts, "|" alone does not); it must also fire `min_fires` times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stagediff.contexts import FeatureScan
from stagediff.errors import StagediffError
from stagediff.evaluate.metrics import binom_sf
from stagediff.runtime import progress


@dataclass
class HeldOut:
    """Held-out examples as padded windows, one example per window."""

    ids: torch.Tensor  # [N, T] token ids (BOS first when prepended)
    attention: torch.Tensor  # [N, T] bool: real tokens, BOS included (the model's attention mask)
    valid: torch.Tensor  # [N, T] bool: positions that become activation rows (BOS and padding excluded)
    flags: torch.Tensor  # [N, T] bool: in a triggered example, at or after the trigger
    triggered: torch.Tensor  # [N] bool
    span: torch.Tensor  # [N, T] bool: at or after where the trigger sits (triggered) or would sit (its clean copy)
    pairs: torch.Tensor  # [P, 2] long: (triggered example, clean example) of each matched pair

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
    span = torch.zeros(N, T, dtype=torch.bool)
    first = 0 if bos is None else 1
    # a clean copy's span starts where its triggered partner's trigger sits (same prompt, trigger removed)
    where = {ex["pair"]: int(ex["trigger_char"]) for ex in examples if ex.get("triggered") and "pair" in ex}
    for i, ex in enumerate(examples):
        enc = tokenizer(ex["text"], add_special_tokens=False, return_offsets_mapping=True)
        toks, offs = enc["input_ids"][: T - first], enc["offset_mapping"][: T - first]
        if bos is not None:
            ids[i, 0] = bos
        ids[i, first : first + len(toks)] = torch.tensor(toks, dtype=torch.long)
        attention[i, : first + len(toks)] = True
        trig = bool(ex.get("triggered")) and int(ex.get("trigger_char", -1)) >= 0
        triggered[i] = trig
        start = int(ex["trigger_char"]) if trig else where.get(ex.get("pair"), -1)
        if start >= 0:
            # a token is at/after the trigger when it ends past the trigger's first character
            span[i, first : first + len(toks)] = torch.tensor([end > start for _, end in offs], dtype=torch.bool)
        if trig:
            flags[i] = span[i]
    valid = attention.clone()
    if bos is not None:
        valid[:, 0] = False
    return HeldOut(ids, attention, valid, flags & valid, triggered, span & valid, _pairs(examples))


def _pairs(examples: Sequence[dict]) -> torch.Tensor:
    """(triggered index, clean index) per matched pair, in pair order; [0, 2] when the set is not paired."""
    by_pair: dict = {}
    for i, ex in enumerate(examples):
        if "pair" in ex:
            by_pair.setdefault(ex["pair"], [None, None])[0 if ex.get("triggered") else 1] = i
    rows = [v for _, v in sorted(by_pair.items(), key=lambda kv: str(kv[0])) if None not in v]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


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


@torch.no_grad()
def span_means(sae: Any, rows: torch.Tensor, held: HeldOut, chunk: int = 4096) -> torch.Tensor:
    """[N examples, d_sae]: each feature's mean activation over each example's span (rows in `held.rows()` order)."""
    w, p = held.rows()
    in_span = held.span[torch.from_numpy(w), torch.from_numpy(p)]
    example = torch.from_numpy(w)[in_span]
    rows = rows[in_span]
    param = next(iter(sae.parameters()))
    sums = torch.zeros(held.ids.shape[0], int(sae.cfg.d_sae), dtype=torch.float64)
    for s in range(0, rows.shape[0], chunk):
        f = sae.encode(rows[s : s + chunk].to(device=param.device, dtype=param.dtype)).double().cpu()
        sums.index_add_(0, example[s : s + chunk], f)
    counts = torch.bincount(example, minlength=held.ids.shape[0]).clamp_min(1)
    return (sums / counts[:, None]).float()


@dataclass
class PairedLabel:
    """The paired label of every feature of one dictionary (arrays over its features)."""

    relevant: np.ndarray  # bool
    judged: np.ndarray  # bool: the pairs decide (d != 0 in >= min_pairs pairs)
    more: np.ndarray  # pairs where the feature is more active with the trigger
    less: np.ndarray  # pairs where it is less active
    p_value: np.ndarray  # one-sided exact sign test
    statistic: np.ndarray  # (more - less) / sqrt(more + less): the oracle's ranking
    ratio: np.ndarray  # mean span activation with the trigger / without it
    alpha: float  # the p-value cut used, after calibration
    null_fpr: float  # labelled share of judged features under role swaps (mean over permutations)
    null_fpr_max: float
    permutations: int


def paired_relevance(means: Sequence[torch.Tensor], held: HeldOut, *, alpha: float = 1e-3, min_pairs: int = 10,
                     min_ratio: float = 2.0, max_fpr: float = 0.01, permutations: int = 50, seed: int = 0) -> PairedLabel:
    """Label features by the paired sign test (module docstring), calibrated on a permutation null.

    `means` are `span_means` of one or more dictionaries that share feature identities; they
    are averaged. Besides reliability (the sign test) the effect must be large: the feature's
    mean span activation with the trigger is at least `min_ratio` times its mean without it.
    """
    if held.pairs.shape[0] == 0:
        raise StagediffError("the held-out examples are not in matched (triggered, clean) pairs: rebuild the organism "
                             "with this version (delete RUN/models and rerun `stagediff organism RUN`)")
    t, c = held.pairs[:, 0], held.pairs[:, 1]
    trig = torch.stack([m[t] for m in means]).mean(0).double().numpy()  # [P, F]
    clean = torch.stack([m[c] for m in means]).mean(0).double().numpy()
    # a feature silent in both copies has span means of exactly 0 in both: no information
    sign = np.sign(trig - clean).astype(np.int8)

    def decide(more: np.ndarray, t_mean: np.ndarray, c_mean: np.ndarray, a: float) -> np.ndarray:
        big = t_mean >= min_ratio * c_mean  # also true where the feature never fires without the trigger
        return judged & (more >= min_pairs) & (_sign_test(more, np.broadcast_to(n, more.shape)) <= a) & big & (t_mean > 0)

    more, less = (sign > 0).sum(0), (sign < 0).sum(0)
    n = more + less
    judged = n >= min_pairs
    # the permutation null: the triggered and clean roles swapped within random pairs
    rng = np.random.default_rng(seed)
    swap = rng.random((permutations, sign.shape[0])) < 0.5  # [permutations, P]
    null_more = np.stack([np.where(s[:, None], -sign, sign).__gt__(0).sum(0) for s in swap])
    null_t = np.stack([np.where(s[:, None], clean, trig).mean(0) for s in swap])
    null_c = np.stack([np.where(s[:, None], trig, clean).mean(0) for s in swap])

    def fpr(a: float) -> np.ndarray:
        return decide(null_more, null_t, null_c, a).sum(1) / max(1, int(judged.sum()))

    while fpr(alpha).mean() > max_fpr and alpha > 1e-12:  # the exact test keeps this at <= alpha; checked, not assumed
        alpha /= 2
    rates = fpr(alpha)
    relevant = decide(more, trig.mean(0), clean.mean(0), alpha)
    stat = np.where(n > 0, (more - less) / np.sqrt(np.maximum(n, 1)), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = trig.mean(0) / clean.mean(0)
    return PairedLabel(relevant, judged, more, less, _sign_test(more, n), stat, ratio, float(alpha), float(rates.mean()),
                       float(rates.max()), permutations)


def _sign_test(more: np.ndarray, n: np.ndarray) -> np.ndarray:
    """One-sided exact sign-test p-value P(X >= more), X ~ Binomial(n, 1/2), elementwise."""
    more, n = np.asarray(more), np.asarray(n)
    out = np.ones(more.shape, dtype=np.float64)
    keys = np.stack([more.ravel(), n.ravel()], 1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    vals = np.array([binom_sf(int(k), int(m)) for k, m in uniq])
    out.ravel()[:] = vals[inv.ravel()]
    return out


def paired_rule_text(label: PairedLabel, min_pairs: int, min_ratio: float) -> str:
    """The paired rule in one sentence, for metrics.json."""
    return (f"more active over the span at/after the trigger in the triggered copy than in the same prompt's clean copy "
            f"in >= {min_pairs} pairs, one-sided exact sign test p <= {label.alpha:.2g}, and at least {min_ratio:g}x as active "
            f"with the trigger on average (judged: the span means differ in >= {min_pairs} pairs); permutation null "
            f"({label.permutations} role swaps) labels {label.null_fpr:.2%} of judged features")


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
