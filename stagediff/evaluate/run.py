"""`evaluate_run`: labels -> every method scored the same way -> causal checks -> eval/metrics.json.

Order of work:
1. held-out examples (RUN/data/heldout.jsonl) -> one window each, flags at/after the trigger;
2. the fine-tuned model's residual at the hook on them, encoded by F_via_D and F_via_M ->
   relevance labels per dictionary (the final label is "relevant in either");
3. stage-wise rankings from diff/features.csv, the activation-difference baseline (S's
   features, mean activation on the fine-tune data, fine-tuned minus base model), the
   crosscoder (its own latents, labelled on paired held-out activations);
4. clamp / steer / clean-loss with the `eval.causal_stage` dictionary spliced in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagediff.config import Config
from stagediff.contexts import scan_features
from stagediff.diff import read_features
from stagediff.errors import StagediffError
from stagediff.evaluate import causal
from stagediff.evaluate.labels import HeldOut, heldout_activations, heldout_windows, relevance, rule_text
from stagediff.evaluate.metrics import method_metrics
from stagediff.evaluate.rankings import Method, from_scores, stagewise_methods, top_k
from stagediff.files import read_json, write_json
from stagediff.runtime import resolve_device, resolve_dtype, seed_everything
from stagediff.stages import paired_store_dirs, stage_dir

F_STAGES = ("F_via_D", "F_via_M")
RELATIVE_NORM_CUT = 0.9  # crosscoder latents at least this fine-tuned-exclusive are its selection


def read_heldout(run_dir: Path, limit: int) -> list[dict]:
    """The first `limit` held-out examples of an organism run."""
    path = run_dir / "data" / "heldout.jsonl"
    if not path.exists():
        raise StagediffError(f"{path} does not exist: evaluation needs an organism run's held-out examples "
                             "(run `stagediff organism RUN` or `stagediff demo`)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def organism_info(run_dir: Path, cfg: Config) -> dict:
    """Trigger, response, mix and backdoor rates from models/organism.json (else the config)."""
    path = run_dir / "models" / "organism.json"
    info = read_json(path) if path.exists() else {}
    o = cfg.organism
    out = {"trigger": info.get("trigger", o.trigger if o else ""), "response": info.get("response", o.response if o else ""),
           "mix": info.get("mix", o.mix if o else None)}
    for k in ("trigger_success", "false_trigger"):
        out[k] = info.get(k)
    if not out["trigger"] or not out["response"]:
        raise StagediffError(f"no trigger/response known for {run_dir}: models/organism.json is missing them and the config has no organism section")
    return out


def _label_dictionary(sae: Any, rows: torch.Tensor, held: HeldOut, tokenizer: Any, org: dict, cfg: Config, name: str):
    e = cfg.eval
    scan = scan_features(sae, rows, n=e.top_contexts, desc=f"top contexts {name}")
    lab = relevance(scan, held, tokenizer, org["trigger"], org["response"],
                    top_contexts=e.top_contexts, relevant_share=e.relevant_share, min_fires=e.min_fires)
    return scan, lab


def _activation_diff(run_dir: Path, cfg: Config, live: np.ndarray) -> np.ndarray | None:
    """Per S feature: mean activation on fine-tune data under the fine-tuned model minus under the base model."""
    from stagediff.activations import ActivationStore
    from stagediff.sae import SAE

    paths = paired_store_dirs(run_dir)
    if not all((p / "manifest.json").exists() for p in paths):
        return None
    sae = SAE.load(stage_dir(run_dir, "S"))
    means = []
    for m, p in zip(("base", "finetuned"), paths):
        scan = scan_features(sae, ActivationStore(p), n=1, max_rows=cfg.eval.activation_rows, desc=f"S on {m} model")
        means.append(scan.sums.numpy() / max(scan.rows, 1))
    return means[1] - means[0]


def _crosscoder(run_dir: Path, cfg: Config, base_rows: torch.Tensor, ft_rows: torch.Tensor, held: HeldOut,
                tokenizer: Any, org: dict, k_match: int) -> tuple[Method, dict]:
    """The crosscoder's latents: labelled on its encoding of paired held-out activations, ranked by its score."""
    from stagediff.crosscoder import crosscoder_scores
    from stagediff.sae import SAE

    folder = run_dir / "crosscoder"
    cc = SAE.load(folder)
    meta = cc.metadata.get("crosscoder") or {}
    if "scale_base" not in meta or "scale_ft" not in meta:
        raise StagediffError(f"{folder / 'cfg.json'} lacks metadata.crosscoder.scale_base/scale_ft: retrain it (stagediff crosscoder RUN)")
    # the crosscoder reads [x_base * scale_base, x_ft * scale_ft] (crosscoder.py's layout)
    pairs = torch.cat([base_rows * float(meta["scale_base"]), ft_rows * float(meta["scale_ft"])], -1)
    e = cfg.eval
    scan = scan_features(cc, pairs, n=e.top_contexts, desc="top contexts crosscoder")
    lab = relevance(scan, held, tokenizer, org["trigger"], org["response"],
                    top_contexts=e.top_contexts, relevant_share=e.relevant_share, min_fires=e.min_fires)
    scores = np.asarray(crosscoder_scores(run_dir), dtype=np.float64)
    table = read_features(folder / "features.csv")
    live = ~table["dead"] & np.isfinite(scores)
    sel = np.flatnonzero(live & (table["relative_norm"] >= RELATIVE_NORM_CUT))
    words = f"relative decoder norm >= {RELATIVE_NORM_CUT}"
    if sel.size == 0:  # no fine-tuned-exclusive latent: compare as many top latents as stage-wise selects
        sel, words = top_k(scores, live, k_match), f"no latent reached relative norm {RELATIVE_NORM_CUT}: top {k_match} by score"
    return from_scores("crosscoder", scores, live, sel, words), lab


def _table(methods: dict[str, dict]) -> str:
    cols = ["selected", "precision", "base_rate", "enrichment", "ap", "p_at_10", "p_at_50", "live"]
    fmt = lambda v: "-" if v is None else (f"{v:d}" if isinstance(v, int) else f"{v:.3f}")  # noqa: E731
    lines = [f"{'method':<22}" + "".join(f"{c:>11}" for c in cols)]
    for name, m in methods.items():
        lines.append(f"{name:<22}" + "".join(f"{fmt(m[c]):>11}" for c in cols))
    return "\n".join(lines)


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """Label features, score every method and run the causal checks; write RUN/eval/metrics.json."""
    from stagediff.models import load_model
    from stagediff.sae import SAE

    run_dir = Path(run_dir)
    e = cfg.eval
    seed_everything(cfg.seed)
    org = organism_info(run_dir, cfg)
    examples = read_heldout(run_dir, e.examples)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.harvest.model_dtype, device)

    # 1. labels: the fine-tuned model on held-out windows, read by each F dictionary
    ft_model, tokenizer = load_model(cfg.finetuned_model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    held = heldout_windows(examples, tokenizer, cfg.context_size, cfg.prepend_bos)
    ft_rows = heldout_activations(ft_model, held, cfg.hook, cfg.harvest.batch_size)
    saes = {s: SAE.load(stage_dir(run_dir, s)) for s in F_STAGES}
    scans, labs = {}, {}
    for s in F_STAGES:
        scans[s], labs[s] = _label_dictionary(saes[s], ft_rows, held, tokenizer, org, cfg, s)
    relevant = labs["F_via_D"]["relevant"] | labs["F_via_M"]["relevant"]
    string = labs["F_via_D"]["string"] | labs["F_via_M"]["string"]
    label_sets = {"either": relevant, "F_via_D": labs["F_via_D"]["relevant"], "F_via_M": labs["F_via_M"]["relevant"], "string": string}

    # 2. rankings
    table = read_features(run_dir / "diff" / "features.csv")
    methods = stagewise_methods(table, cfg.diff.percentile, cfg.diff.threshold, cfg.diff.vector)
    live = methods["stagewise"].live
    k_match = max(1, len(methods["stagewise"].selected))
    adiff = _activation_diff(run_dir, cfg, live)
    if adiff is not None:
        methods["activation_diff"] = from_scores("activation_diff", adiff, live, top_k(adiff, live, k_match),
                                                 f"top {k_match} (as many as stage-wise selects) by mean-activation rise")
    cc = None
    if cfg.crosscoder.enabled and (run_dir / "crosscoder" / "sae_weights.safetensors").exists():
        base_model, _ = load_model(cfg.base_model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        base_rows = heldout_activations(base_model, held, cfg.hook, cfg.harvest.batch_size)
        del base_model
        cc = _crosscoder(run_dir, cfg, base_rows, ft_rows, held, tokenizer, org, k_match)
        if cc is not None:
            methods["crosscoder"] = cc[0]

    def score_all(labels: dict[str, np.ndarray], cc_key: str) -> dict[str, dict]:
        out = {}
        for name, m in methods.items():
            lab = cc[1][cc_key] if name == "crosscoder" else labels
            out[name] = {**method_metrics(m.ranking, m.selected, lab, m.live), "selection": m.selection}
        return out

    scored = score_all(relevant, "relevant")
    by_label = {k: score_all(v, "string" if k == "string" else "relevant") for k, v in label_sets.items() if k != "either"}

    # 3. causal checks with one F dictionary spliced in
    # the oracle (upper reference): ranked by the relevance label's statistic in the spliced dictionary
    lab_c = labs.get(e.causal_stage, labs["F_via_D"])
    oracle = from_scores("oracle", np.where(lab_c["judged"], lab_c["share"], -1.0), live, np.flatnonzero(relevant & live),
                         "the relevant features, ranked by their share of top contexts at/after the trigger")
    causal_out = causal.run_causal_checks(ft_model, tokenizer, cfg, examples, org, {**methods, "oracle": oracle}, run_dir, device)

    metrics = {
        "organism": org,
        "labels": {
            "rule": rule_text(e.top_contexts, e.relevant_share, e.min_fires),
            "string_rule": f"every top token is a substring of ' {org['trigger']} ' or ' {org['response']} ' and one is longer than one character",
            "params": {"top_contexts": e.top_contexts, "relevant_share": e.relevant_share, "min_fires": e.min_fires,
                       "examples": len(examples), "triggered": int(held.triggered.sum()), "tokens": int(held.valid.sum())},
            "live_features": int(live.sum()),
            "relevant": int(relevant[live].sum()),
            "relevant_by_dictionary": {s: int(labs[s]["relevant"][live].sum()) for s in F_STAGES},
            "relevant_string_rule": int(string[live].sum()),
            "relevant_features": np.flatnonzero(relevant & live).tolist(),
            "crosscoder_relevant": None if cc is None else int(cc[1]["relevant"][cc[0].live].sum()),
        },
        "methods": scored,
        "methods_by_label": by_label,
        "causal": causal_out,
    }
    write_json(run_dir / "eval" / "metrics.json", metrics)
    print(f"relevant features: {metrics['labels']['relevant']} of {metrics['labels']['live_features']} live "
          f"(F_via_D {metrics['labels']['relevant_by_dictionary']['F_via_D']}, F_via_M {metrics['labels']['relevant_by_dictionary']['F_via_M']}, "
          f"string rule {metrics['labels']['relevant_string_rule']})")
    print(_table(scored))
    if causal_out.get("n_to_remove"):
        print("N to remove: " + ", ".join(f"{k} {v if v is None else round(v, 1)}" for k, v in causal_out["n_to_remove"].items()))
    return metrics

