"""Feature-card data: max-activating contexts and the tokens a feature's decoder direction writes.

This is the only part of the report that runs models and dictionaries, so every
piece is optional: a missing store, SAE or model leaves a note on the page and
the card shows the numbers it has. Nothing here is needed for the plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagediff.config import Config
from stagediff.layout import saes_dir, stage_dir, store_dir

# Where a card's contexts come from: what the feature meant at the start (S on base
# data, base model) and at the end (F on fine-tune data, fine-tuned model).
SOURCES = (
    ("base", "base data · stage S · base model", ("S",), ("base", "base")),
    ("finetune", "fine-tune data · stage F · fine-tuned model", ("F_via_D", "F_via_M"), ("finetuned", "finetune")),
)
DECODER_STAGES = ("F_via_D", "F_via_M", "D", "M", "S")  # whose W_dec is read through the unembedding
BEFORE, AFTER = 16, 6  # tokens shown around the max-activating one
# Rows scanned per store for contexts: encoding a whole multi-million-token store with a
# 4K+ dictionary costs minutes on a CPU, and a card needs good examples, not the very best.
CONTEXT_ROWS = 100_000


def card_features(features: dict[str, list], n: int) -> list[int]:
    """The features that get cards: selected ones first, then by rank; dead features never."""
    ids = [int(f) for f in features["feature"]]
    n_rows = len(ids)
    dead = features.get("dead") or [False] * n_rows
    selected = features.get("selected") or [False] * n_rows
    rank = features.get("rank") or list(range(n_rows))
    live = [i for i in range(n_rows) if dead[i] is not True]
    live.sort(key=lambda i: (selected[i] is not True, rank[i] if isinstance(rank[i], (int, float)) else math.inf))
    return [ids[i] for i in live[: max(0, n)]]


def build_cards(run_dir: Path, cfg: Config, card_ids: list[int], n_features: int, n_contexts: int = 10) -> dict[str, Any]:
    """{cards: {id: {contexts, promoted, suppressed}}, hover_tokens: [...], vocab: {id: text}, notes: [...]}."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"cards": {str(f): {} for f in card_ids}, "out_tokens": None, "vocab": {}, "notes": []}
    device = torch.device("cpu")  # a report is small work; never compete with a training run for the GPU
    model = tokenizer = None
    try:
        from stagediff.models import load_model

        model, tokenizer = load_model(cfg.model_paths()["finetuned"], device=device, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the page explains what is missing instead of failing
        out["notes"].append(f"fine-tuned model not loaded, so no output tokens or context text: {_short(e)}")
    used: set[int] = set()
    if model is not None:
        try:
            _output_tokens(run_dir, model, card_ids, n_features, out, used)
        except Exception as e:  # noqa: BLE001
            out["notes"].append(f"output tokens skipped: {_short(e)}")
    if tokenizer is not None and card_ids:
        for key, label, stages, source in SOURCES:
            try:
                _contexts(run_dir, key, label, stages, source, card_ids, n_contexts, out, used)
            except Exception as e:  # noqa: BLE001
                out["notes"].append(f"contexts from {label} skipped: {_short(e)}")
        out["vocab"] = {str(i): _token_text(tokenizer, i) for i in sorted(used)}
    return out


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


def _load_sae(run_dir: Path, stages: tuple[str, ...]) -> tuple[str, Any]:
    from stagediff.sae import CFG, SAE

    for stage in stages:
        if (stage_dir(run_dir, stage) / CFG).exists():
            return stage, SAE.load(stage_dir(run_dir, stage))
    raise FileNotFoundError(f"no SAE among {', '.join(stages)} under {saes_dir(run_dir)}")


# ---------------------------------------------------------------- output tokens


@torch.no_grad()
def _output_tokens(run_dir: Path, model: Any, card_ids: list[int], n_features: int, out: dict, used: set[int]) -> None:
    """Decoder rows through the final norm's gain and the unembedding: top promoted / suppressed tokens."""
    stage, sae = _load_sae(run_dir, DECODER_STAGES)
    w_dec = sae.W_dec.detach().float().cpu()  # [d_sae, d_in]
    w_u = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_in]
    gain = _final_norm_gain(model)
    if gain is not None:
        w_dec = w_dec * gain  # the logit lens: a direction reaches the unembedding through the final norm
    top3 = []
    cards = {f: i for i, f in enumerate(card_ids)}
    for start in range(0, w_dec.shape[0], 512):  # chunks keep [chunk, vocab] logits small for big vocabularies
        logits = w_dec[start : start + 512] @ w_u.T
        up = logits.topk(10, dim=1)
        down = (-logits).topk(10, dim=1)
        for j in range(logits.shape[0]):
            f = start + j
            top3.append(up.indices[j, :3].tolist())
            if f in cards:
                out["cards"][str(f)]["promoted"] = [[int(t), round(float(v), 3)] for t, v in zip(up.indices[j], up.values[j])]
                out["cards"][str(f)]["suppressed"] = [[int(t), round(-float(v), 3)] for t, v in zip(down.indices[j], down.values[j])]
                used.update(int(t) for t in up.indices[j])
                used.update(int(t) for t in down.indices[j])
    out["out_tokens"] = top3[:n_features]
    out["out_tokens_stage"] = stage
    used.update(t for row in top3 for t in row)


def _final_norm_gain(model: Any) -> torch.Tensor | None:
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        weight = getattr(getattr(base, name, None), "weight", None)
        if weight is not None:
            return weight.detach().float().cpu()
    return None


# ---------------------------------------------------------------- contexts


@torch.no_grad()
def _contexts(run_dir: Path, key: str, label: str, stages: tuple[str, ...], source: tuple[str, str],
              card_ids: list[int], n: int, out: dict, used: set[int]) -> None:
    """Top-n contexts per card feature from one store, each token shaded by the feature's activation."""
    from stagediff.activations import ActivationStore
    from stagediff.contexts import RowIndex, context_span, top_activations, window_activations

    stage, sae = _load_sae(run_dir, stages)
    store = ActivationStore(store_dir(run_dir, *source))
    # Ask for extra rows: neighbouring positions of one window often all rank high, and a card
    # should show n different passages, not one passage n times.
    values, rows = top_activations(sae, store, card_ids, 3 * n, max_rows=CONTEXT_ROWS, desc=f"report contexts {stage}")
    values, rows = np.asarray(torch.as_tensor(values).cpu()), np.asarray(torch.as_tensor(rows).cpu())
    index = RowIndex(store)
    tw = store.windows()
    ids = np.asarray(torch.as_tensor(tw.ids).cpu())
    mask = np.asarray(torch.as_tensor(tw.mask).cpu()).astype(bool)

    for fi, f in enumerate(card_ids):
        contexts, seen = [], set()
        for val, row in zip(values[fi], rows[fi]):
            if len(contexts) == n or not (val > 0):
                break
            w, p = int(index.window[row]), int(index.position[row])
            if w in seen:
                continue
            seen.add(w)
            span = context_span(mask[w], p, BEFORE, AFTER)
            acts = window_activations(sae, store, w, f, index, positions=span)
            toks = [int(ids[w, q]) for q in span]
            used.update(toks)
            contexts.append({"tokens": toks, "acts": [round(float(acts[q]), 3) for q in span], "max": round(float(val), 3),
                             "at": span.index(p)})
        scanned = f", first {CONTEXT_ROWS:,} tokens" if store.num_rows > CONTEXT_ROWS else ""
        out["cards"][str(f)].setdefault("contexts", {})[key] = {"label": f"{label} ({stage}{scanned})", "items": contexts}
