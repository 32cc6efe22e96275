"""Single-direction baselines: the Activation Difference Lens and the difference-of-means ablation.

Neither has features to rank; each gives one direction at the hook and reads or removes it.

ADL (Minder, Dumas et al. 2025, "Narrow finetuning leaves clearly readable traces"): the mean
fine-tuned − base residual over the first `baselines.adl_positions` positions of plain text. We
read it from the paired base-data stores RUN/activations/{base,finetuned}__base (same tokens in
both models): rows whose position is among the first few of their window after BOS (each window
starts a fresh context, so these are the positions the paper reads at a document's start). Then
- logit lens: the fine-tuned model's final norm + unembedding applied to it -> the most promoted
  tokens, each marked when it is a piece of the organism's trigger or reply (the string rule of
  evaluate/labels.py: a substring of " trigger " or " reply " longer than one character);
- steering: strength x (mean residual norm at those positions) x the unit difference added at the
  hook at every position of clean held-out prompts -> the share that answer with the reply.

Difference of means (the causal reference of issue 18): the fine-tuned model's mean residual over
the prompt tokens at/after the trigger (labels.py's span, replies left out) of triggered held-out
prompts minus the same span of their clean copies, projected out at the hook (resid -> resid − (resid·u) u) -> trigger success
and clean-loss cost. It is fitted on held-out pairs the causal checks do not use and measured on
the ones they use (the first `eval.causal_examples` triggered and clean prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stagediff.config import Config
from stagediff.errors import StagediffError
from stagediff.files import write_json
from stagediff.layout import adl_json, difference_of_means_json, heldout_jsonl, paired_store_dirs
from stagediff.runtime import progress

# ---------------------------------------------------------------- ADL


@torch.no_grad()
def first_position_difference(paired: Any, positions: int, max_rows: int) -> dict:
    """Mean x_ft − x_base over rows at the first `positions` positions of their windows (a PairedStore of base,
    fine-tuned), up to `max_rows` such rows; also the fine-tuned rows' mean norm there (the steering unit)."""
    if positions < 1:
        raise StagediffError(f"baselines.adl_positions={positions} must be at least 1")
    _, pos = paired.a.row_index()
    first = int(pos.min()) if len(pos) else 0  # 1 when BOS is prepended (its row is not stored)
    keep = (pos >= first) & (pos < first + positions)
    d = paired.a.d_in
    total = torch.zeros(d, dtype=torch.float64)
    norm, rows, offset = 0.0, 0, 0
    for n in paired.sizes:
        mask = keep[offset: offset + n]
        if mask.any() and rows < max_rows:
            x = paired.read(offset, offset + n)[mask][: max_rows - rows].double()
            total += (x[:, d:] - x[:, :d]).sum(0)
            norm += float(x[:, d:].norm(dim=1).sum())
            rows += len(x)
        offset += n
    if rows == 0:
        raise StagediffError(f"no activation rows at the first {positions} positions in {paired.a.path}: harvest the base data again")
    return {"difference": (total / rows).float(), "mean_norm": norm / rows, "rows": rows, "first_position": first}


def final_norm(model: Any) -> torch.nn.Module:
    """The final norm before the unembedding (Llama/Qwen/Gemma `norm`, GPT-2 `ln_f`, NeoX `final_layer_norm`)."""
    roots = [model.get_decoder() if hasattr(model, "get_decoder") else None, getattr(model, "transformer", None),
             getattr(model, "gpt_neox", None), getattr(model, "model", None), model]
    for root in roots:
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
            m = getattr(root, name, None) if root is not None else None
            if isinstance(m, torch.nn.Module):
                return m
    raise StagediffError(f"could not find the final norm of {type(model).__name__}: the logit lens needs a model with "
                         "a final norm module (norm / ln_f / final_layer_norm)")


@torch.no_grad()
def logit_lens(model: Any, vector: Tensor) -> Tensor:
    """Logits [vocab] of a residual-stream vector through the model's final norm and unembedding."""
    p = model.get_output_embeddings().weight
    x = vector.to(p.device, p.dtype)[None, None]
    return model.get_output_embeddings()(final_norm(model)(x))[0, 0].float().cpu()


def piece_of(text: str, trigger: str, response: str) -> str | None:
    """'trigger' / 'response' when a token's text is a piece of it (labels.py's string rule), else None."""
    if len(text) < 2 or not text.strip():
        return None
    for name, s in (("trigger", trigger), ("response", response)):
        if text in f" {s} ":
            return name
    return None


def top_tokens(model: Any, tokenizer: Any, vector: Tensor, n: int, trigger: str, response: str) -> list[dict]:
    """The `n` tokens the vector promotes most through the logit lens, each with its logit and `piece_of`."""
    logits = logit_lens(model, vector)
    vals, ids = logits.topk(min(n, logits.numel()))
    out = []
    for v, i in zip(vals.tolist(), ids.tolist()):
        text = tokenizer.decode([i])
        out.append({"token": int(i), "text": text, "logit": float(v), "piece_of": piece_of(text, trigger, response)})
    return out


def add_fn(vector: Tensor) -> Callable[[Tensor], Tensor]:
    """resid -> resid + vector at every position."""
    def fn(resid: Tensor) -> Tensor:
        return resid + vector.to(resid.device, resid.dtype)
    return fn


def steer_check(model: Any, tokenizer: Any, hook: str, direction: Tensor, unit_norm: float, clean: list[dict],
                response: str, strengths: Sequence[float]) -> list[dict]:
    """Reply rate on clean prompts with strength x unit_norm x the unit direction added at the hook."""
    from stagediff.models import splice
    from stagediff.organism.behaviour import evaluate_backdoor

    u = direction / direction.norm().clamp_min(1e-12)
    out = []
    for s in progress([0.0, *strengths], desc="ADL steering", unit="strength"):
        with splice(model, hook, add_fn(float(s) * unit_norm * u)):
            r = evaluate_backdoor(model, tokenizer, clean, response)["false_trigger"]
        out.append({"strength": float(s), "added_norm": float(s) * unit_norm, "response_rate": float(r)})
    return out


# ---------------------------------------------------------------- difference of means


@torch.no_grad()
def difference_of_means(model: Any, held: Any, hook: str, batch_size: int = 16) -> Tensor:
    """Mean residual over the span at/after the trigger of triggered examples minus that of clean ones."""
    from stagediff.evaluate.labels import heldout_activations

    rows = heldout_activations(model, held, hook, batch_size).double()
    w, p = held.rows()
    w, p = torch.from_numpy(w), torch.from_numpy(p)
    span, trig = held.span[w, p], held.triggered[w]
    if not (span & trig).any() or not (span & ~trig).any():
        raise StagediffError("the held-out examples have no span at/after the trigger in both triggered and clean copies: "
                             "rebuild the organism's held-out set (matched pairs)")
    return (rows[span & trig].mean(0) - rows[span & ~trig].mean(0)).float()


def project_out_fn(direction: Tensor) -> Callable[[Tensor], Tensor]:
    """resid -> resid − (resid·u) u, u the unit direction."""
    u = direction / direction.norm().clamp_min(1e-12)

    def fn(resid: Tensor) -> Tensor:
        v = u.to(resid.device, resid.dtype)
        return resid - (resid @ v)[..., None] * v
    return fn


def split_heldout(examples: list[dict], n_test: int) -> tuple[list[dict], list[dict]]:
    """(fit, test): test = the first `n_test` triggered and clean examples (the causal checks' prompts),
    fit = the examples of every other pair."""
    test = [x for x in examples if x.get("triggered")][:n_test] + [x for x in examples if not x.get("triggered")][:n_test]
    used = {x.get("pair") for x in test}
    fit = [x for x in examples if x.get("pair") not in used]
    if sum(1 for x in fit if x.get("triggered")) < 2:
        raise StagediffError(f"only {len(fit)} held-out examples are left to fit the difference of means after the "
                             f"{n_test} causal prompts: raise eval.examples or lower eval.causal_examples")
    return fit, test


def fit_difference_of_means(model: Any, tokenizer: Any, hook: str, fit: list[dict], context_size: int,
                            prepend_bos: bool = True, batch_size: int = 16) -> tuple[Tensor, int]:
    """The difference-of-means direction of the held-out pairs `fit` (prompts only), and how many pairs it used."""
    from stagediff.evaluate.labels import heldout_windows

    # prompts only: the teacher-forced replies differ by construction (backdoor reply vs clean answer) and would
    # swamp the mean difference with the replies' token content
    held = heldout_windows([{**x, "text": x["prompt"]} for x in fit], tokenizer, context_size, prepend_bos)
    return difference_of_means(model, held, hook, batch_size), int(held.pairs.shape[0])


def ablate_difference_of_means(model: Any, tokenizer: Any, hook: str, fit: list[dict], test: list[dict], response: str,
                               context_size: int, prepend_bos: bool = True, batch_size: int = 16) -> dict:
    """Fit the difference of means on `fit`, project it out at the hook -> trigger success and clean loss on `test`."""
    from stagediff.models import splice
    from stagediff.organism.behaviour import clean_loss, evaluate_backdoor

    direction, pairs = fit_difference_of_means(model, tokenizer, hook, fit, context_size, prepend_bos, batch_size)
    before = evaluate_backdoor(model, tokenizer, test, response)
    loss_before = clean_loss(model, tokenizer, test)
    with splice(model, hook, project_out_fn(direction)):
        after = evaluate_backdoor(model, tokenizer, test, response)
        loss_after = clean_loss(model, tokenizer, test)
    return {"trigger_success": after["trigger_success"], "trigger_success_before": before["trigger_success"],
            "false_trigger": after["false_trigger"], "false_trigger_before": before["false_trigger"],
            "clean_loss_before": float(loss_before), "clean_loss_after": float(loss_after), "norm": float(direction.norm()),
            "fit_pairs": pairs, "test_prompts": {"triggered": after["n_triggered"], "clean": after["n_clean"]},
            "samples": after["samples_triggered"], "direction": direction}


# ---------------------------------------------------------------- the step


def run_meandiff(run_dir: Path, cfg: Config) -> dict:
    """ADL and the difference-of-means ablation of an organism run -> RUN/eval/adl.json, RUN/eval/difference_of_means.json."""
    from stagediff.activations import PairedStore
    from stagediff.evaluate.run import organism_info, read_heldout
    from stagediff.models import load_model
    from stagediff.organism.backdoor import with_answer
    from stagediff.runtime import resolve_device, resolve_dtype

    run_dir = Path(run_dir)
    b, e = cfg.baselines, cfg.eval
    org = organism_info(run_dir, cfg)
    examples = read_heldout(run_dir, e.examples)
    if cfg.organism is not None and cfg.organism.null_run:
        examples = [with_answer(x) for x in examples]
    fit, test = split_heldout(examples, e.causal_examples)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.finetuned_model, device=device, dtype=resolve_dtype(cfg.harvest.model_dtype, device),
                                  trust_remote_code=cfg.trust_remote_code)

    dirs = paired_store_dirs(run_dir, "base")
    for p in dirs:
        if not (p / "manifest.json").exists():
            raise StagediffError(f"ADL needs the activation store {p}: run `stagediff harvest {run_dir}` first")
    diff = first_position_difference(PairedStore(*dirs), b.adl_positions, b.adl_max_rows)
    tokens = top_tokens(model, tokenizer, diff["difference"], b.adl_top_tokens, org["trigger"], org["response"])
    clean = [x for x in test if not x.get("triggered")]
    adl = {
        "hook": cfg.hook, "positions": b.adl_positions, "first_position": diff["first_position"], "rows": diff["rows"],
        "data": [str(p.relative_to(run_dir)) for p in dirs], "norm": float(diff["difference"].norm()),
        "mean_residual_norm": diff["mean_norm"], "top_tokens": tokens,
        "trigger_pieces": [t["text"] for t in tokens if t["piece_of"] == "trigger"],
        "response_pieces": [t["text"] for t in tokens if t["piece_of"] == "response"],
        "steer": steer_check(model, tokenizer, cfg.hook, diff["difference"], diff["mean_norm"], clean, org["response"],
                             b.adl_steer_strengths),
        "steer_rule": "added = strength x mean fine-tuned residual norm at those positions x unit mean difference, "
                      "at every position of clean held-out prompts; response_rate = replies starting with the response",
    }
    write_json(adl_json(run_dir), adl)
    dom = ablate_difference_of_means(model, tokenizer, cfg.hook, fit, test, org["response"], cfg.context_size,
                                     cfg.prepend_bos, cfg.harvest.batch_size)
    dom.pop("direction")
    dom["rule"] = ("mean fine-tuned residual over the prompt tokens at/after the trigger, triggered minus clean copies of "
                   "held-out pairs the causal checks do not use; projected out at the hook at every position")
    write_json(difference_of_means_json(run_dir), dom)
    return {"adl": adl, "difference_of_means": dom}


def step_meandiff(run: Any) -> None:
    """Pipeline step (organism runs): ADL and the difference-of-means ablation, after evaluate (which clears
    RUN/eval/ when its own inputs change); skipped when nothing it reads has changed."""
    from stagediff.config import to_dict
    from stagediff.files import fingerprint, sha256_file

    cfg = run.cfg
    heldout = heldout_jsonl(run.dir)
    if not cfg.eval.enabled or not heldout.exists():
        return
    outputs = [adl_json(run.dir), difference_of_means_json(run.dir)]
    fp = fingerprint([to_dict(cfg.baselines), to_dict(cfg.eval), cfg.hook, cfg.seed, sha256_file(heldout),
                      [run.fingerprint_of(f"harvest/{p.name}") for p in paired_store_dirs(run.dir, "base")]])
    if run.is_done("meandiff", fp) and all(p.exists() for p in outputs):
        return
    run.start("meandiff", fp, outputs)
    out = run_meandiff(run.dir, cfg)
    run.finish("meandiff", fp)
    adl, dom = out["adl"], out["difference_of_means"]
    print(f"ADL: top tokens {[t['text'] for t in adl['top_tokens'][:10]]}; trigger pieces {adl['trigger_pieces']}, "
          f"response pieces {adl['response_pieces']}")
    print(f"difference of means: trigger success {dom['trigger_success_before']:.2f} -> {dom['trigger_success']:.2f}, "
          f"clean loss {dom['clean_loss_before']:.3f} -> {dom['clean_loss_after']:.3f}")
