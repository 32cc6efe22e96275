"""Causal checks: splice a dictionary into the fine-tuned model, edit its features, read the behaviour.

The splice adds to the residual at the hook the change an edit makes to the dictionary's output:
    resid + decode(f') - decode(f) = resid + (f' - f) @ W_dec,    f = encode(resid)
which is decode(f') + error (the SAE's reconstruction error term kept), written so that an
untouched splice (f' = f) adds an exact zero and gives back the plain model bit for bit.

Every check reads one teacher-forced forward per batch instead of a generation loop: greedy
decoding yields a target continuation t exactly when argmax(logits) = t_j at each of its
positions given t_<j, so "the reply starts with the response" and "the greedy clean reply is
unchanged" are both one forward over prompt + target (targets: the response tokens, or the plain
model's greedy reply cached once). That is what keeps the sweeps fast; measurements are also
memoized per (dictionary, clamped set), so rankings sharing a prefix cost one forward.

- clamp sweep per ranking (every stage-wise variant, D->F, M->F, S->F, activation difference,
  oracle, the crosscoder and the diff-SAE in their own dictionaries): f'[top N] = 0, N = 1, 2, 5,
  10, 20, 50, ... until trigger success <= the target (or every live feature is clamped); "N to
  remove" interpolated on log N between the bracketing points; specificity (clean replies
  unchanged, clean-loss increase) at each N of the stage-wise sweep and at each other ranking's
  bracketing Ns;
- controls: plain model, untouched splice of every dictionary (must equal it exactly), zero-all
  (every feature clamped), frequency-matched random sets (several draws: every N of the stage-wise
  sweep and each method's removal N; disjoint from the top N, so their size is recorded), the
  stage-wise clamp applied only at/after the trigger; the difference of means projected out (one
  direction, the reference of issue 18);
- steer (sufficiency): add strength x typical activation to each of the top k features on clean
  prompts -> how often the response appears without the trigger;
- generations: greedy replies plain / untouched / clamped / steered -> eval/generations.jsonl (organism
  runs: a few held-out prompts, for the report's cards; own models, `eval.prompts_file`: the user's
  prompts, and each stage's spliced "loss recovered").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagediff.organism.behaviour import greedy_tokens
from stagediff.runtime import progress

SWEEP_STEPS = (1, 2, 5)  # N = 1, 2, 5, 10, 20, 50, 100, 200, 500, ... (x 10 each decade)
GENERATION_PROMPTS = 4  # triggered and clean prompts each, generated for the report's cards (organism runs)
OWN_DICTIONARIES = ("crosscoder", "diffsae")  # methods ranking the latents of their own dictionary (RUN/<name>/)


# ---------------------------------------------------------------- the dictionary and the splice


class Dictionary:
    """What a splice edits: features read from and written to the residual at the hook.

    An SAE reads and writes the residual directly. A crosscoder reads [x_base * scale_base,
    x_ft * scale_ft] and writes both halves; spliced into the fine-tuned model alone, it has no base
    activation, so we feed the fine-tuned activation to both halves and write only the fine-tuned half
    (divided by scale_ft, back to raw units). A diff-SAE reads x_ft - x_base; the base residual is not
    known either, so it reads x - `shift` (shift = the mean base activation, diffsae.py's approximation)
    and clamping latent j removes its part f_j d_j of the difference. Edits are applied as a difference
    of decodes, so the mismatch this makes in the encoding is carried by the error term and an untouched
    splice stays exact.
    """

    def __init__(self, sae: Any, crosscoder: dict | None = None, shift: torch.Tensor | None = None):
        self.sae = sae
        p = next(sae.parameters())
        self.dtype = p.dtype
        self.shift = None if shift is None else shift.to(p.device, p.dtype)
        if crosscoder is None:
            self.scale_in, self.write = None, sae.W_dec
        else:
            d = int(crosscoder.get("d_model") or sae.W_dec.shape[1] // 2)
            self.scale_in = (float(crosscoder["scale_base"]), float(crosscoder["scale_ft"]))
            self.write = sae.W_dec[:, d:] / self.scale_in[1]

    @property
    def d_sae(self) -> int:
        return int(self.write.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_in is not None:
            x = torch.cat([x * self.scale_in[0], x * self.scale_in[1]], -1)
        if self.shift is not None:
            x = x - self.shift
        return self.sae.encode(x)


def as_dictionary(d: Any) -> Dictionary:
    return d if isinstance(d, Dictionary) else Dictionary(d)


def splice_fn(dictionary: Any, clamp: Sequence[int] = (), add: dict[int, float] | None = None,
              where: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """resid -> resid + (f' - f) @ W_dec: features `clamp` set to 0, `add` {feature: amount} added.

    `where` ([batch, positions] bool) limits the edit to those positions (teacher-forced checks only).
    """
    dic = as_dictionary(dictionary)
    add = dict(add or {})
    cols = sorted(set(int(i) for i in clamp) | set(add))
    n_clamp = set(int(i) for i in clamp)
    idx = torch.as_tensor(cols, dtype=torch.long)
    is_clamped = torch.tensor([c in n_clamp for c in cols], dtype=torch.bool)
    added = torch.tensor([add.get(c, 0.0) for c in cols], dtype=torch.float32)

    def fn(resid: torch.Tensor) -> torch.Tensor:
        x = resid.to(dic.dtype)
        if not cols:  # untouched: the encoder still runs, and x + 0 is x exactly
            dic.encode(x)
            return (x + torch.zeros_like(x)).to(resid.dtype)
        f = dic.encode(x)[..., idx.to(x.device)]
        change = torch.where(is_clamped.to(x.device), -f, torch.zeros_like(f)) + added.to(x)
        delta = change @ dic.write[idx.to(x.device)]
        if where is not None:
            delta = delta * where.to(x.device)[..., None].to(x.dtype)
        return (x + delta).to(resid.dtype)

    return fn


def matched_random(features: Sequence[int], freq: np.ndarray, live: np.ndarray, rng: np.random.Generator, pool: int = 10) -> np.ndarray:
    """For each feature, a distinct random live feature among the `pool` nearest in firing rate, outside `features`."""
    free = np.asarray(live, dtype=bool).copy()
    free[np.asarray(list(features), dtype=np.int64)] = False
    logf = np.log10(np.asarray(freq, dtype=np.float64) + 1e-9)
    out = []
    for f in features:
        avail = np.flatnonzero(free)
        if avail.size == 0:
            break
        # nearest in log firing rate: rare and common features behave differently when clamped
        d = np.abs(logf[avail] - logf[int(f)])
        near = avail[np.argsort(d, kind="stable")[:pool]]
        pick = int(rng.choice(near))
        free[pick] = False
        out.append(pick)
    return np.array(out, dtype=np.int64)


# ---------------------------------------------------------------- teacher-forced probes


@dataclass
class Probe:
    """Prompts followed by target continuations, right-padded once; `follows` asks greedy decoding whether it would write them."""

    ids: torch.Tensor  # [n, T]
    attention: torch.Tensor  # [n, T] bool
    target: torch.Tensor  # [n, T] long: the token expected at each position (-1 where nothing is checked)
    after: torch.Tensor  # [n, T] bool: positions at/after the trigger (the positional clamp variant)
    # the residual at the hook per batch, captured at the first spliced forward (models.from_prefix)
    prefixes: dict = field(default_factory=dict, repr=False, compare=False)


def make_probe(tokenizer: Any, prompts: list[str], targets: list[list[int]], trigger_chars: list[int] | None = None) -> Probe:
    """Rows `encode(prompt) + target`; position p checks target[j] at p = len(prompt ids) - 1 + j."""
    from stagediff.organism.lm import encode

    bos = 1 if tokenizer.bos_token_id is not None else 0
    rows, checks, afters = [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        enc = tokenizer(p, add_special_tokens=False, return_offsets_mapping=True)
        ids = encode(tokenizer, p)
        rows.append(ids + list(t))
        checks.append((len(ids) - 1, list(t)))
        start = -1 if trigger_chars is None else int(trigger_chars[i])
        # same rule as the labels: a token is at/after the trigger when it ends past its first character
        flag = [False] * bos + [start >= 0 and end > start for _, end in enc["offset_mapping"]]
        afters.append(flag + [start >= 0] * len(t))
    width = max(map(len, rows))
    n = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((n, width), int(pad), dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.bool)
    target = torch.full((n, width), -1, dtype=torch.long)
    after = torch.zeros(n, width, dtype=torch.bool)
    for i, (r, (p0, t), a) in enumerate(zip(rows, checks, afters)):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = True
        if t:
            target[i, p0 : p0 + len(t)] = torch.tensor(t)
        after[i, : len(a)] = torch.tensor(a, dtype=torch.bool)
    return Probe(ids, attention, target, after)


@torch.no_grad()
def follows(model: Any, probe: Probe, hook: str | None = None, edit: Callable[[torch.Tensor | None], Callable] | None = None,
            positional: bool = False, batch_size: int = 64) -> np.ndarray:
    """Per row: would greedy decoding write the whole target? `edit(where)` builds the splice for a batch.

    Spliced forwards start from the residual at the hook, captured once per batch of the probe (the layers
    before it give the same output under every edit), and the output layer runs at the checked positions
    only (a few of each row; on the tiny organism it is a third of what runs past the hook): the same
    answers for a fraction of the cost.
    """
    from stagediff.models import capture_prefix, from_prefix, splice

    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    out = []
    for s in range(0, probe.ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        ids, att, tgt = probe.ids[sl].to(device), probe.attention[sl].to(device), probe.target[sl].to(device)
        checked = tgt >= 0

        def forward():  # greedy tokens at the checked positions (-1 elsewhere)
            hidden = model.base_model(input_ids=ids, attention_mask=att.long(), use_cache=False).last_hidden_state  # noqa: B023
            pred = torch.full_like(tgt, -1)  # noqa: B023
            pred[checked] = head(hidden[checked]).argmax(-1)  # noqa: B023 (called in this iteration)
            return pred

        if edit is None:
            pred = forward()
        else:
            key = (id(model), hook, s, batch_size)
            if key not in probe.prefixes:
                probe.prefixes[key] = capture_prefix(model, ids, att.long(), hook)
            with from_prefix(model, hook, probe.prefixes[key]), splice(model, hook, edit(probe.after[sl] if positional else None)):
                pred = forward()
        ok = ((pred == tgt) | ~checked).all(-1) & checked.any(-1)
        out.append(ok.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, bool)


@torch.no_grad()
def typical_activation(model: Any, tokenizer: Any, dictionary: Dictionary, hook: str, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Per feature, its mean activation where it fires on `texts` (0 where it never fires)."""
    from stagediff.models import splice
    from stagediff.organism.lm import encode

    sums = torch.zeros(dictionary.d_sae, dtype=torch.float64)
    fires = torch.zeros(dictionary.d_sae, dtype=torch.float64)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for s in range(0, len(texts), batch_size):
        enc = [encode(tokenizer, t) for t in texts[s : s + batch_size]]
        width = max(map(len, enc))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)

        def record(resid: torch.Tensor) -> torch.Tensor:
            f = dictionary.encode(resid.to(dictionary.dtype))[mask.bool()].double().cpu()  # noqa: B023 (called in this iteration)
            sums.add_(f.sum(0))
            fires.add_((f > 0).sum(0).double())
            return resid

        with splice(model, hook, record):
            model(input_ids=ids, attention_mask=mask)
    return (sums / fires.clamp(min=1)).numpy()


# ---------------------------------------------------------------- the sweep


def sweep_sizes(n_live: int, pinned: Sequence[int] = ()) -> list[int]:
    """The Ns to try: the pinned list (those <= n_live), else 1, 2, 5, 10, ... then n_live itself."""
    if pinned:
        return sorted({int(n) for n in pinned if 0 < int(n) <= n_live})
    out, decade = [], 1
    while True:
        for s in SWEEP_STEPS:
            if s * decade >= n_live:
                return out + [n_live] if n_live > 0 else out
            out.append(s * decade)
        decade *= 10


def n_to_remove(points: list[dict], target: float) -> dict:
    """The first N whose trigger success is <= target, interpolated on log N with the point before it.

    Returns {"n": float or None, "bracket": [N before, N at] or None}.
    """
    prev = None
    for p in points:
        if p["trigger_success"] <= target:
            if prev is None:
                return {"n": float(p["n"]), "bracket": [p["n"], p["n"]]}
            t = (prev["trigger_success"] - target) / max(prev["trigger_success"] - p["trigger_success"], 1e-12)
            n = math.exp(math.log(prev["n"]) + t * (math.log(p["n"]) - math.log(prev["n"])))
            return {"n": round(n, 2), "bracket": [prev["n"], p["n"]]}
        prev = p
    return {"n": None, "bracket": None}


class Checks:
    """The fine-tuned model with held-out probes laid out once; each method calls `point` per edit.

    The plain model's greedy clean replies are generated once, here, and every later check reads them
    teacher-forced. Measurements are memoized per (dictionary, clamped set): rankings that share a
    prefix (a stage-wise variant and its score, every ranking at N = all live features) cost one forward.
    """

    def __init__(self, model: Any, tokenizer: Any, hook: str, triggered: list[dict], clean: list[dict], response: str,
                 reply_tokens: int, batch_size: int):
        from stagediff.organism.behaviour import batches_loss, clean_batches

        self.model, self.tokenizer, self.hook, self.clean, self.bs = model, tokenizer, hook, clean, batch_size
        resp = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"]
        self.trig = make_probe(tokenizer, [x["prompt"] for x in triggered], [resp] * len(triggered),
                               [int(x.get("trigger_char", -1)) for x in triggered])
        replies = greedy_tokens(model, tokenizer, [x["prompt"] for x in clean], reply_tokens, batch_size)  # cached once
        self.clean_replies = make_probe(tokenizer, [x["prompt"] for x in clean], replies)
        self.clean_response = make_probe(tokenizer, [x["prompt"] for x in clean], [resp] * len(clean))
        self._clean_batches = clean_batches(model, tokenizer, clean, batch_size)  # encoded once, read by every specificity check
        self.loss_plain = batches_loss(self._clean_batches, lambda b, ids, mask: model(input_ids=ids, attention_mask=mask).logits) \
            if clean else float("nan")
        self._memo: dict[tuple, Any] = {}
        self._clean_prefixes: dict[int, Any] = {}  # the clean texts' residual at the hook, per batch (models.from_prefix)
        self.forwards_saved = 0

    def _key(self, kind: str, dic: Dictionary | None, clamp: Sequence[int], positional: bool = False) -> tuple:
        # the dictionary object itself (hashed by identity) keeps it alive, so a key never matches a later dictionary
        return kind, dic, positional, frozenset(int(i) for i in clamp)

    def _memoized(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key in self._memo:
            self.forwards_saved += 1
        else:
            self._memo[key] = compute()
        return self._memo[key]

    def rate(self, probe: Probe, edit: Callable | None, positional: bool = False) -> float:
        ok = follows(self.model, probe, self.hook, edit, positional, self.bs)
        return float(ok.mean()) if ok.size else float("nan")

    def trigger_success(self, dic: Dictionary | None, clamp: Sequence[int] = (), positional: bool = False) -> float:
        edit = None if dic is None else (lambda where: splice_fn(dic, clamp, where=where))
        return self._memoized(self._key("trigger", dic, clamp, positional), lambda: self.rate(self.trig, edit, positional))

    def edit_specificity(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Share of clean greedy replies unchanged, and the clean-loss increase, under the splice `fn`."""
        from stagediff.models import capture_prefix, from_prefix, splice
        from stagediff.organism.behaviour import batches_loss

        unchanged = self.rate(self.clean_replies, lambda where: fn)

        def spliced(b: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # from batch b's residual at the hook
            if b not in self._clean_prefixes:
                self._clean_prefixes[b] = capture_prefix(self.model, ids, mask, self.hook)
            with from_prefix(self.model, self.hook, self._clean_prefixes[b]), splice(self.model, self.hook, fn):
                return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        loss = batches_loss(self._clean_batches, spliced) if self.clean else float("nan")
        return {"clean_unchanged": unchanged, "clean_loss": float(loss), "clean_loss_increase": float(loss - self.loss_plain)}

    def specificity(self, dic: Dictionary, clamp: Sequence[int]) -> dict:
        """`edit_specificity` with the features `clamp` of `dic` zeroed."""
        return self._memoized(self._key("clean", dic, clamp), lambda: self.edit_specificity(splice_fn(dic, clamp)))

    def steer_rate(self, dic: Dictionary, add: dict[int, float]) -> float:
        """Share of clean prompts answered with the response when `add` {feature: amount} is added (memoized)."""
        key = ("steer", dic, frozenset(add.items()))
        return self._memoized(key, lambda: self.rate(self.clean_response, lambda where: splice_fn(dic, add=add)))

    def random_draws(self, dic: Dictionary, top: np.ndarray, freq: np.ndarray, live: np.ndarray, rng: np.random.Generator, draws: int) -> dict:
        picks = [matched_random(top, freq, live, rng) for _ in range(draws)]
        rates = [self.trigger_success(dic, pick.tolist()) for pick in picks]
        # the sets are disjoint from the top N, so past half the live features they hold fewer than N (recorded)
        return {"random_trigger_success": float(np.mean(rates)), "random_ci": [float(min(rates)), float(max(rates))],
                "random_draws": rates, "random_size": int(min(len(pick) for pick in picks))}


def _sweep(checks: Checks, dic: Dictionary, ranking: np.ndarray, sizes: list[int], target: float, adaptive: bool,
           extra: Callable[[np.ndarray], dict] | None = None, desc: str = "", specificity: bool = True) -> list[dict]:
    """Clamp the top N for each N of `sizes` (stopping once removed when `adaptive`); `specificity` at every N or not."""
    out = []
    for n in progress(sizes, desc=f"clamp {desc}", unit="N"):
        top = ranking[:n]
        point = {"n": int(n), "trigger_success": checks.trigger_success(dic, top.tolist())}
        if specificity:
            point.update(checks.specificity(dic, top.tolist()))
        if extra is not None:
            point.update(extra(top))
        out.append(point)
        if adaptive and point["trigger_success"] <= target:
            break
    return out


@torch.no_grad()
def causal_prompts(examples: list[dict], n: int) -> tuple[list[dict], list[dict], list[dict], set]:
    """The held-out examples the causal checks read: the first `n` whole matched pairs (each prompt with and without
    the trigger), in file order -> (chosen, their triggered copies, their clean copies, the pair ids)."""
    pairs = set(list(dict.fromkeys(x.get("pair", i) for i, x in enumerate(examples)))[:n])
    chosen = [x for i, x in enumerate(examples) if x.get("pair", i) in pairs]
    return chosen, [x for x in chosen if x.get("triggered")][:n], [x for x in chosen if not x.get("triggered")][:n], pairs


def run_causal_checks(model: Any, tokenizer: Any, cfg: Any, examples: list[dict], org: dict, methods: dict,
                      run_dir: Path, device: Any) -> dict:
    """The `causal` section of eval/metrics.json: controls, clamp sweeps of every method, N to remove, steering.

    `methods` maps name -> rankings.Method; all but `crosscoder` and `diffsae` rank features of the
    stage-wise dictionaries, spliced as the `eval.causal_stage` dictionary; `crosscoder` ranks
    RUN/crosscoder's latents, `diffsae` RUN/diffsae's (OWN_DICTIONARIES). Also the difference-of-means
    ablation measured by the same checks (the one-direction reference) and a few greedy generations
    (plain / clamped / steered) -> eval/generations.jsonl for the report's cards.
    """
    from stagediff.errors import StagediffError
    from stagediff.features import read_features
    from stagediff.layout import crosscoder_dir, diff_dir, diffsae_dir, features_csv, generations_jsonl, stage_dir
    from stagediff.models import splice
    from stagediff.sae import SAE

    t0 = time.perf_counter()
    e = cfg.eval
    run_dir = Path(run_dir)
    stage_folder = stage_dir(run_dir, e.causal_stage)
    if not (stage_folder / "cfg.json").exists():
        raise StagediffError(f"eval.causal_stage={e.causal_stage!r}: {stage_folder} holds no dictionary; "
                             "name a trained stage (e.g. F_via_D)")
    was_training = model.training
    model.eval()
    dics = {"sae": Dictionary(SAE.load(stage_folder).to(device))}
    if "crosscoder" in methods:
        cc = SAE.load(crosscoder_dir(run_dir)).to(device)
        dics["crosscoder"] = Dictionary(cc, cc.metadata.get("crosscoder") or {})
    if "diffsae" in methods:
        from stagediff.diffsae import load_base_mean

        dics["diffsae"] = Dictionary(SAE.load(diffsae_dir(run_dir)).to(device), shift=load_base_mean(run_dir))
    chosen, triggered, clean, pairs = causal_prompts(examples, e.causal_examples)
    checks = Checks(model, tokenizer, cfg.hook, triggered, clean, org["response"], e.reply_tokens, cfg.harvest.batch_size)
    table = read_features(features_csv(diff_dir(run_dir)))
    freq_col = f"freq_{e.causal_stage}"
    sae_freq = table[freq_col] if freq_col in table else np.ones(dics["sae"].d_sae)
    rng = np.random.default_rng(cfg.seed)
    target = e.clamp_target

    out: dict[str, Any] = {
        "stage": e.causal_stage, "prompts": {"triggered": len(triggered), "clean": len(clean)},
        "splice": "resid + (f' - f) @ W_dec, f = encode(resid): decode(f') + error, exact when untouched",
        "check": "teacher-forced greedy: a reply counts when argmax reproduces every target token",
        "target": target, "random_rule": f"{e.random_draws} draws of live features nearest in firing rate ({freq_col}); "
                                          "random_ci = [min, max] over the draws",
    }
    # controls
    plain_logits = model(input_ids=checks.trig.ids[:8].to(device), attention_mask=checks.trig.attention[:8].long().to(device)).logits
    with splice(model, cfg.hook, splice_fn(dics["sae"])):
        spliced_logits = model(input_ids=checks.trig.ids[:8].to(device), attention_mask=checks.trig.attention[:8].long().to(device)).logits
    out["controls"] = {
        "plain": checks.trigger_success(None),
        "untouched_splice": checks.trigger_success(dics["sae"], []),
        "untouched_splice_identical_logits": bool(torch.equal(plain_logits, spliced_logits)),
        # every dictionary a ranking is clamped in, spliced untouched: each must equal `plain`
        "untouched_splice_by_dictionary": {k: checks.trigger_success(d, []) for k, d in dics.items()},
        "zero_all": checks.trigger_success(dics["sae"], list(range(dics["sae"].d_sae))),
        "plain_clean_response": checks.rate(checks.clean_response, None),
        # the cached greedy replies read back teacher-forced on the plain model: 1.0 unless float ties
        "plain_clean_unchanged": checks.rate(checks.clean_replies, None),
    }

    def dic_of(name: str) -> Dictionary:
        return dics[name if name in OWN_DICTIONARIES else "sae"]

    def freq_of(name: str, m: Any) -> np.ndarray:
        if name not in OWN_DICTIONARIES:
            return sae_freq
        own = read_features(features_csv(run_dir / name))
        col = next((c for c in own if c.startswith("freq")), None)
        known = col is not None and np.isfinite(own[col]).any()
        return own[col] if known else np.ones(len(m.live))  # unknown rates: plain random live latents

    # the sweeps: random draws at every N of the stage-wise sweep, at each other method's removal N
    by_method, removal = {}, {}
    for name, m in methods.items():
        ranking = np.asarray(m.ranking, dtype=np.int64)
        sizes = sweep_sizes(len(ranking), e.clamp_n)
        dic = dic_of(name)
        extra = None
        if name == "stagewise":
            def extra(top: np.ndarray, dic: Dictionary = dic, live: np.ndarray = m.live) -> dict:
                return {"after_trigger_success": checks.trigger_success(dic, top.tolist(), positional=True),
                        **checks.random_draws(dic, top, sae_freq, live, rng, e.random_draws)}
        # specificity at every N of the stage-wise sweep (and of pinned Ns); elsewhere at the Ns bracketing the
        # removal (what the N-to-remove table reads): two of the three forwards per point saved
        every_n = name == "stagewise" or bool(e.clamp_n)
        points = _sweep(checks, dic, ranking, sizes, target, not e.clamp_n, extra, name, specificity=every_n)
        by_method[name] = points
        r = n_to_remove(points, target)
        for p in points:
            if not every_n and r["bracket"] and p["n"] in r["bracket"]:
                p.update(checks.specificity(dic, ranking[: p["n"]].tolist()))
        if r["n"] is not None:
            at = next(p for p in points if p["n"] == r["bracket"][1])
            r.update({k: at[k] for k in ("trigger_success", "clean_unchanged", "clean_loss_increase")})
            rand = at if "random_trigger_success" in at else \
                checks.random_draws(dic, ranking[: at["n"]], freq_of(name, m), m.live, rng, e.random_draws)
            r.update({k: rand[k] for k in ("random_trigger_success", "random_ci", "random_size")})
        removal[name] = r
    out["clamp_by_method"] = by_method
    out["clamp"] = by_method.get("stagewise", [])
    out["n_to_remove"] = {k: v["n"] for k, v in removal.items()}
    out["n_to_remove_detail"] = removal
    sw = by_method.get("stagewise") or []
    if sw:
        out["after_trigger_n_to_remove"] = n_to_remove([{"n": p["n"], "trigger_success": p["after_trigger_success"]} for p in sw], target)["n"]

    # sufficiency: steer the top k features of each ranking into clean prompts
    texts = [x["text"] for x in chosen]
    typical = {k: typical_activation(model, tokenizer, d, cfg.hook, texts, cfg.harvest.batch_size) for k, d in dics.items()}
    steer_by = {}
    for name, m in methods.items():
        typ = typical[name if name in OWN_DICTIONARIES else "sae"]
        firing = [int(f) for f in m.ranking if typ[int(f)] > 0]
        rows = []
        for k in e.steer_k:
            feats = firing[:k]
            if not feats:
                continue
            for s in e.steer_strengths:
                add = {f: float(s) * float(typ[f]) for f in feats}
                rate = checks.steer_rate(dic_of(name), add)
                rows.append({"k": int(k), "strength": float(s), "response_rate": rate, "features": feats})
        steer_by[name] = rows
    out["steer_by_method"] = steer_by
    out["steer"] = [r for r in steer_by.get("stagewise", []) if r["k"] == min(e.steer_k, default=1)]
    out["steer_rule"] = ("added activation = strength x the feature's mean activation where it fires on held-out texts, "
                         "along its decoder direction, at every position, for each of the top k firing features")
    # clean loss: plain, untouched splice, and at the stage-wise removal N (else the largest N tried)
    n_clamp = (removal.get("stagewise") or {}).get("bracket")
    n_clamp = n_clamp[1] if n_clamp else (sw[-1]["n"] if sw else 0)
    untouched = checks.specificity(dics["sae"], [])["clean_loss"]
    after = checks.specificity(dics["sae"], methods["stagewise"].ranking[:n_clamp].tolist())["clean_loss"] if "stagewise" in methods else float("nan")
    out["clean_loss"] = {"before": checks.loss_plain, "spliced_untouched": untouched, "after_clamp": after, "n_clamped": int(n_clamp)}
    out["difference_of_means"] = _difference_of_means(checks, model, tokenizer, cfg, examples, pairs)
    # a few generations for the report's cards: the first triggered and clean prompts, plain / clamped at the
    # stage-wise removal N / each top feature steered
    if "stagewise" in methods and e.generation_tokens > 0:
        m, typ = methods["stagewise"], typical["sae"]
        shown = [{"prompt": x["prompt"], "triggered": True} for x in triggered[:GENERATION_PROMPTS]] + \
                [{"prompt": x["prompt"], "triggered": False} for x in clean[:GENERATION_PROMPTS]]
        steered = [int(f) for f in m.ranking if typ[int(f)] > 0][: e.prompts_steer_features]
        write_generations(generations_jsonl(run_dir), model, tokenizer, cfg.hook, dics["sae"], shown,
                          m.ranking[:n_clamp].tolist(), {f: float(typ[f]) for f in steered}, e.steer_strengths,
                          e.generation_tokens, cfg.harvest.batch_size)
        out["generations"] = {"file": "eval/generations.jsonl", "prompts": len(shown), "clamped_n": int(n_clamp), "steered": steered}
    out["references"] = {"adl": "eval/adl.json", "difference_of_means_generated": "eval/difference_of_means.json"}
    out["forwards_saved_by_memo"] = checks.forwards_saved
    model.train(was_training)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _difference_of_means(checks: Checks, model: Any, tokenizer: Any, cfg: Any, examples: list[dict], used: set) -> dict:
    """The one-direction reference (issue 18): the difference of means fitted on the held-out pairs the checks do
    not use, projected out at the hook, measured by the same checks as every clamp."""
    from stagediff.meandiff import fit_difference_of_means, project_out_fn

    fit = [x for i, x in enumerate(examples) if x.get("pair", i) not in used]
    if sum(1 for x in fit if x.get("triggered")) < 2:
        return {"skipped": f"only {len(fit)} held-out examples outside the causal prompts: raise eval.examples above "
                           f"2 x eval.causal_examples to fit the difference of means"}
    direction, n_pairs = fit_difference_of_means(model, tokenizer, cfg.hook, fit, cfg.context_size, cfg.prepend_bos,
                                                 cfg.harvest.batch_size)
    fn = project_out_fn(direction)
    return {"directions": 1, "trigger_success": checks.rate(checks.trig, lambda where: fn), **checks.edit_specificity(fn),
            "fit_pairs": n_pairs, "norm": float(direction.norm()),
            "rule": "mean residual over the prompt tokens at/after the trigger, triggered minus clean copies of held-out "
                    "pairs the causal checks do not use; projected out at every position"}


def write_generations(path: Path, model: Any, tokenizer: Any, hook: str, dic: Dictionary, prompts: list[dict],
                      clamp: list[int], steer: dict[int, float], strengths: Sequence[float], tokens: int, batch_size: int) -> int:
    """Greedy generations of `prompts` ({"prompt": ..., any other keys copied}) plain, through an untouched splice,
    with `clamp` zeroed and with each feature of `steer` ({feature: typical activation}) added at each strength
    -> a jsonl file, one row per (prompt, variant). Returns the number of variants."""
    from stagediff.files import atomic_write
    from stagediff.models import splice

    texts = [p["prompt"] for p in prompts]

    def generate(edit: Callable | None) -> list[str]:
        if edit is None:
            ids = greedy_tokens(model, tokenizer, texts, tokens, batch_size)
        else:
            with splice(model, hook, edit):
                ids = greedy_tokens(model, tokenizer, texts, tokens, batch_size)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    variants = [({"edit": "plain"}, None), ({"edit": "untouched_splice"}, splice_fn(dic)),
                ({"edit": "clamp", "features": [int(f) for f in clamp]}, splice_fn(dic, clamp=clamp))]
    for f, a in steer.items():
        for s in strengths:
            variants.append(({"edit": "steer", "features": [int(f)], "strength": float(s), "added_activation": float(s) * a},
                             splice_fn(dic, add={int(f): float(s) * a})))
    rows = []
    for info, fn in progress(variants, desc="generations", unit="variant"):
        for p, reply in zip(prompts, generate(fn)):
            rows.append({**p, **info, "reply": reply})
    with atomic_write(Path(path), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return len(variants)


# ---------------------------------------------------------------- own models: prompts in, generations out


def read_prompts(path: str | Path) -> list[str]:
    """`eval.prompts_file`: one prompt a line, as a JSON string or an object with a "prompt" key."""
    from stagediff.errors import StagediffError

    path = Path(path)
    if not path.exists():
        raise StagediffError(f"eval.prompts_file={str(path)!r} does not exist: give a jsonl file of prompts")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise StagediffError(f"{path} line {i} is not JSON ({err}): write one JSON string or {{\"prompt\": ...}} a line") from None
            text = row.get("prompt") if isinstance(row, dict) else row
            if not isinstance(text, str) or not text:
                raise StagediffError(f"{path} line {i} has no prompt: write one JSON string or {{\"prompt\": ...}} a line")
            out.append(text)
    if not out:
        raise StagediffError(f"{path} holds no prompts: write one JSON string or {{\"prompt\": ...}} a line")
    return out


@torch.no_grad()
def _text_losses(model: Any, tokenizer: Any, hook: str, texts: list[str], sae: Any) -> dict:
    """Mean next-token loss on `texts`: plain, with the dictionary's reconstruction spliced in (no error term), and zero-ablated."""
    from stagediff.models import splice
    from stagediff.organism.behaviour import clean_loss

    rows = [{"text": t, "triggered": False} for t in texts]
    plain = clean_loss(model, tokenizer, rows)
    p = next(sae.parameters())
    with splice(model, hook, lambda r: sae.decode(sae.encode(r.to(p.dtype))).to(r.dtype)):
        spliced = clean_loss(model, tokenizer, rows)
    with splice(model, hook, torch.zeros_like):
        zero = clean_loss(model, tokenizer, rows)
    recovered = (zero - spliced) / (zero - plain) if zero != plain else float("nan")
    return {"plain": plain, "spliced": spliced, "zero_ablated": zero, "loss_recovered": recovered}


def evaluate_prompts(run_dir: Path, cfg: Any) -> dict:
    """A run without an organism: greedy generations of `eval.prompts_file` plain, with the top N stage-wise
    features clamped and with each of the top features steered -> eval/generations.jsonl; each stage's
    spliced loss recovered on the prompts -> eval/metrics.json (causal.loss_recovered)."""
    from stagediff.evaluate.rankings import from_scores
    from stagediff.features import read_features
    from stagediff.files import write_json
    from stagediff.layout import diff_dir, features_csv, generations_jsonl, metrics_json, stage_dir
    from stagediff.models import load_model
    from stagediff.runtime import resolve_device, resolve_dtype, seed_everything
    from stagediff.sae import SAE
    from stagediff.stages import resolve_stages

    run_dir, e = Path(run_dir), cfg.eval
    seed_everything(cfg.seed)
    prompts = read_prompts(e.prompts_file)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.harvest.model_dtype, device)
    model, tokenizer = load_model(cfg.finetuned_model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    dic = Dictionary(SAE.load(stage_dir(run_dir, e.causal_stage)).to(device))
    table = read_features(features_csv(diff_dir(run_dir)))
    live = ~table["dead"] if "dead" in table else np.isfinite(table["score"])
    ranking = from_scores("stagewise", table["score"], live, np.zeros(0, np.int64), "").ranking
    top = ranking[: e.prompts_clamp_n].tolist()
    typ = typical_activation(model, tokenizer, dic, cfg.hook, prompts, cfg.harvest.batch_size)
    fallback = float(np.median(typ[typ > 0])) if (typ > 0).any() else 1.0  # features silent on these prompts
    steer_feats = ranking[: e.prompts_steer_features].tolist()
    steer = {int(f): float(typ[f]) if typ[f] > 0 else fallback for f in steer_feats}
    n_variants = write_generations(generations_jsonl(run_dir), model, tokenizer, cfg.hook, dic,
                                   [{"prompt": p} for p in prompts], top, steer, e.steer_strengths, e.generation_tokens,
                                   cfg.harvest.batch_size)

    models = {"finetuned": (model, tokenizer)}
    paths = cfg.model_paths()
    losses = {}
    for st in resolve_stages(cfg):
        if not (stage_dir(run_dir, st.name) / "cfg.json").exists():
            continue
        if st.model not in models:
            models[st.model] = load_model(paths[st.model], device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        m, tok = models[st.model]
        losses[st.name] = {"model": st.model, **_text_losses(m, tok, cfg.hook, prompts, SAE.load(stage_dir(run_dir, st.name)).to(device))}
    metrics = {"causal": {"prompts_file": str(e.prompts_file), "prompts": len(prompts), "stage": e.causal_stage,
                          "generations": "eval/generations.jsonl", "clamped": top, "steered": steer_feats,
                          "loss_recovered": losses}}
    write_json(metrics_json(run_dir), metrics)
    print(f"generations: {n_variants} variants x {len(prompts)} prompts -> {generations_jsonl(run_dir)}")
    for name, v in losses.items():
        print(f"{name}: loss recovered {v['loss_recovered']:.3f} (plain {v['plain']:.3f}, spliced {v['spliced']:.3f}, zero {v['zero_ablated']:.3f})")
    return metrics
