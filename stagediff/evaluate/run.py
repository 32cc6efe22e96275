"""`evaluate_run`: paired labels -> every method scored alike, with intervals -> causal checks -> eval/metrics.json.

Order of work:
1. held-out examples (RUN/data/heldout.jsonl), matched (triggered, clean) pairs of the same prompt;
   in a null run (`organism.null_run`) both copies carry the clean answer, as a model without the
   backdoor would reply;
2. the fine-tuned model's residual at the hook on them, encoded by F_via_D and F_via_M -> one
   paired label per feature identity (labels.py), its false-positive rate from a permutation null;
   the top-context and string rules as secondary labels;
3. rankings: stage-wise (the run's selection and its variants), D->F, M->F, S->F, the activation
   difference (read with the same F dictionaries), the oracle (the label's own statistic), and the
   crosscoder (its latents labelled by the same paired rule on paired held-out activations);
   each scored over the judged features at its own selection, at equal k and at the size
   stage-wise selects, with exact intervals and p-values against the base rate (metrics.py);
4. clamp / steer / clean-loss with the `eval.causal_stage` dictionary spliced in (the crosscoder and the
   diff-SAE in their own), the difference-of-means reference, generations for the report's cards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagediff.config import Config
from stagediff.contexts import scan_features
from stagediff.errors import StagediffError
from stagediff.evaluate import causal
from stagediff.evaluate.labels import (
    HeldOut,
    PairedLabel,
    heldout_activations,
    heldout_windows,
    paired_relevance,
    paired_rule_text,
    relevance,
    rule_text,
    span_means,
)
from stagediff.evaluate.metrics import method_metrics
from stagediff.evaluate.rankings import SCORE_VARIANTS, Method, from_scores, stagewise_methods, top_k
from stagediff.features import read_features
from stagediff.files import read_json, write_json
from stagediff.layout import crosscoder_dir, diff_dir, diffsae_dir, features_csv, heldout_jsonl, metrics_json, organism_json, paired_store_dirs, stage_dir
from stagediff.organism.backdoor import with_answer
from stagediff.runtime import resolve_device, resolve_dtype, seed_everything
from stagediff.sae import WEIGHTS

F_STAGES = ("F_via_D", "F_via_M")
RELATIVE_NORM_CUT = 0.9  # crosscoder latents at least this fine-tuned-exclusive are its selection
# every ranking the evaluation can score (which of them a run has depends on its stages and baselines)
KNOWN_RANKINGS = ("stagewise", "stagewise_percentile", "stagewise_threshold", "stagewise_noise", *SCORE_VARIANTS,
                  "d_to_f", "m_to_f", "s_to_f", "activation_diff", "oracle", "crosscoder", "diffsae")


def read_heldout(run_dir: Path, limit: int) -> list[dict]:
    """The first `limit` held-out examples of an organism run."""
    path = heldout_jsonl(run_dir)
    if not path.exists():
        raise StagediffError(f"{path} does not exist: evaluation needs an organism run's held-out examples "
                             "(run `stagediff organism RUN` or `stagediff demo`)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def organism_info(run_dir: Path, cfg: Config) -> dict:
    """Trigger, response, mix and backdoor rates from models/organism.json (else the config)."""
    path = organism_json(run_dir)
    info = read_json(path) if path.exists() else {}
    o = cfg.organism
    out = {"trigger": info.get("trigger", o.trigger if o else ""), "response": info.get("response", o.response if o else ""),
           "mix": info.get("mix", o.mix if o else None)}
    for k in ("trigger_success", "false_trigger"):
        out[k] = info.get(k)
    if not out["trigger"] or not out["response"]:
        raise StagediffError(f"no trigger/response known for {run_dir}: models/organism.json is missing them and the config has no organism section")
    return out


def _secondary_labels(sae: Any, rows: torch.Tensor, held: HeldOut, tokenizer: Any, org: dict, cfg: Config, name: str) -> dict:
    """The top-context and string rules of one dictionary (the secondary labels)."""
    e = cfg.eval
    scan = scan_features(sae, rows, n=e.top_contexts, desc=f"top contexts {name}")
    return relevance(scan, held, tokenizer, org["trigger"], org["response"],
                     top_contexts=e.top_contexts, relevant_share=e.relevant_share, min_fires=e.min_fires)


def _paired_label(means: list[torch.Tensor], held: HeldOut, cfg: Config) -> PairedLabel:
    e = cfg.eval
    return paired_relevance(means, held, alpha=e.label_alpha, min_pairs=e.label_min_pairs, min_ratio=e.label_min_ratio,
                            max_fpr=e.label_max_fpr, permutations=e.label_permutations, seed=cfg.seed)


def _activation_diff(run_dir: Path, cfg: Config, saes: dict[str, Any]) -> np.ndarray | None:
    """Per feature: mean activation on the fine-tune data under the fine-tuned model minus under the base model.

    Read with the dictionaries whose labels score it (F_via_D and F_via_M, averaged), on the
    paired fine-tune-data stores (same tokens for both models).
    """
    from stagediff.activations import ActivationStore

    paths = paired_store_dirs(run_dir)
    if not all((p / "manifest.json").exists() for p in paths):
        return None
    diffs = []
    for name, sae in saes.items():
        means = []
        for m, p in zip(("base", "finetuned"), paths):
            scan = scan_features(sae, ActivationStore(p), n=1, max_rows=cfg.eval.activation_rows, desc=f"{name} on {m} model")
            means.append(scan.sums.numpy() / max(scan.rows, 1))
        diffs.append(means[1] - means[0])
    return np.mean(diffs, axis=0)


def _crosscoder(run_dir: Path, cfg: Config, base_rows: torch.Tensor, ft_rows: torch.Tensor, held: HeldOut,
                k_match: int) -> tuple[Method, PairedLabel]:
    """The crosscoder's latents: labelled by the paired rule on its encoding of paired held-out rows, ranked by its score."""
    from stagediff.crosscoder import crosscoder_scores
    from stagediff.sae import SAE

    folder = crosscoder_dir(run_dir)
    cc = SAE.load(folder)
    meta = cc.metadata.get("crosscoder") or {}
    if "scale_base" not in meta or "scale_ft" not in meta:
        raise StagediffError(f"{folder / 'cfg.json'} lacks metadata.crosscoder.scale_base/scale_ft: retrain it (stagediff crosscoder RUN)")
    # the crosscoder reads [x_base * scale_base, x_ft * scale_ft] (crosscoder.py's layout)
    pairs = torch.cat([base_rows * float(meta["scale_base"]), ft_rows * float(meta["scale_ft"])], -1)
    label = _paired_label([span_means(cc, pairs, held)], held, cfg)
    scores = np.asarray(crosscoder_scores(run_dir), dtype=np.float64)
    table = read_features(features_csv(folder))
    live = ~table["dead"] & np.isfinite(scores)
    sel = np.flatnonzero(live & (table["relative_norm"] >= RELATIVE_NORM_CUT))
    words = f"relative decoder norm >= {RELATIVE_NORM_CUT}"
    if sel.size == 0:  # no fine-tuned-exclusive latent: compare as many top latents as stage-wise selects
        sel, words = top_k(scores, live, k_match), f"no latent reached relative norm {RELATIVE_NORM_CUT}: top {k_match} by score"
    return from_scores("crosscoder", scores, live, sel, words), label


def _base_rows(cfg: Config, held: HeldOut, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The base model's residual on the held-out windows (for the baselines that read both models)."""
    from stagediff.models import load_model

    base_model, _ = load_model(cfg.base_model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return heldout_activations(base_model, held, cfg.hook, cfg.harvest.batch_size)


def _diffsae(run_dir: Path, cfg: Config, base_rows: torch.Tensor, ft_rows: torch.Tensor, held: HeldOut,
             k_match: int) -> tuple[Method, PairedLabel]:
    """The diff-SAE's latents: labelled by the paired rule on its encoding of ft - base held-out rows, ranked by its score."""
    from stagediff.diffsae import diffsae_scores
    from stagediff.sae import SAE

    sae = SAE.load(diffsae_dir(run_dir))
    label = _paired_label([span_means(sae, ft_rows - base_rows, held)], held, cfg)
    scores = np.asarray(diffsae_scores(run_dir), dtype=np.float64)
    live = np.isfinite(scores)
    return from_scores("diffsae", scores, live, top_k(scores, live, k_match),
                       f"top {k_match} (as many as stage-wise selects) by firing rate x mean activation on the difference"), label


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"


def _ci(m: dict, key: str, ci: str, digits: int = 2) -> str:
    v, iv = m.get(key), m.get(ci)
    if v is None:
        return "-"
    return f"{v:.{digits}f} [{_fmt(iv[0], digits)}, {_fmt(iv[1], digits)}]" if iv else f"{v:.{digits}f}"


def _p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}")


def format_table(methods: dict[str, dict]) -> str:
    """The method comparison as printed: own selection with intervals, AP with interval, precision at equal k."""
    ks = [k for k in next(iter(methods.values()), {}).get("at_k", {})]
    head = f"{'method':<21}{'sel':>5}  {'precision [95% CI]':<20}{'enrichment [CI]':<22}{'p':>8}  {'AP [95% CI]':<20}{'AP/base':>8}"
    head += "".join(f"{'@' + k:>8}" for k in ks)
    lines = [head]
    for name, m in methods.items():
        row = f"{name:<21}{m['selected']:>5}  {_ci(m, 'precision', 'precision_ci'):<20}{_ci(m, 'enrichment', 'enrichment_ci', 1):<22}"
        row += f"{_p(m.get('p_value')):>8}  "
        row += f"{_ci(m, 'ap', 'ap_ci'):<20}{_fmt(m.get('ap_ratio'), 1):>8}"
        row += "".join(f"{_fmt(m['at_k'][k]['precision'], 2):>8}" for k in ks)
        lines.append(row)
    return "\n".join(lines)


def causal_rankings(methods: dict[str, Method], names: list[str]) -> dict[str, Method]:
    """The rankings `eval.causal_methods` names among those scored (["all"]: every one). A name the evaluation never
    scores is an error; one it scores only sometimes (the crosscoder when it is off) is skipped."""
    if names == ["all"]:
        return methods
    known = {*KNOWN_RANKINGS, *methods}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StagediffError(f"eval.causal_methods names {unknown}, which the evaluation does not rank: "
                             f"use some of {sorted(known)}, or [all]")
    return {n: m for n, m in methods.items() if n in names}


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """Label features, score every method and run the causal checks; write RUN/eval/metrics.json."""
    from stagediff.models import load_model
    from stagediff.sae import SAE

    run_dir = Path(run_dir)
    e = cfg.eval
    seed_everything(cfg.seed)
    org = organism_info(run_dir, cfg)
    null = bool(cfg.organism is not None and cfg.organism.null_run)
    examples = read_heldout(run_dir, e.examples)
    if null:  # a model without the backdoor answers the triggered prompt with the clean answer
        examples = [with_answer(x) for x in examples]
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.harvest.model_dtype, device)

    # 1. labels: the fine-tuned model on the paired held-out windows, read by both F dictionaries
    ft_model, tokenizer = load_model(cfg.finetuned_model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    held = heldout_windows(examples, tokenizer, cfg.context_size, cfg.prepend_bos)
    ft_rows = heldout_activations(ft_model, held, cfg.hook, cfg.harvest.batch_size)
    saes = {s: SAE.load(stage_dir(run_dir, s)) for s in F_STAGES}
    label = _paired_label([span_means(saes[s], ft_rows, held) for s in F_STAGES], held, cfg)
    secondary = {s: _secondary_labels(saes[s], ft_rows, held, tokenizer, org, cfg, s) for s in F_STAGES}
    top_rule = secondary["F_via_D"]["relevant"] | secondary["F_via_M"]["relevant"]
    string = secondary["F_via_D"]["string"] | secondary["F_via_M"]["string"]

    # 2. rankings: stage-wise variants, single trajectories, activation difference, oracle, crosscoder
    table = read_features(features_csv(diff_dir(run_dir)))
    methods = stagewise_methods(table, cfg.diff.percentile, cfg.diff.threshold, cfg.diff.vector, cfg.diff.noise_multiple)
    live = methods["stagewise"].live
    k_match = max(1, len(methods["stagewise"].selected))
    adiff = _activation_diff(run_dir, cfg, saes)
    if adiff is not None:
        methods["activation_diff"] = from_scores("activation_diff", adiff, live, top_k(adiff, live, k_match),
                                                 f"top {k_match} (as many as stage-wise selects) by mean-activation rise")
    methods["oracle"] = from_scores("oracle", np.where(label.judged, label.statistic, np.nan), live,
                                    np.flatnonzero(label.relevant & live), "the label itself: ranked by its sign-test statistic")
    base_rows, own_labels = None, {}  # own_labels: methods over their own dictionary's latents
    if cfg.crosscoder.enabled and (crosscoder_dir(run_dir) / WEIGHTS).exists():
        base_rows = _base_rows(cfg, held, device, dtype)
        methods["crosscoder"], own_labels["crosscoder"] = _crosscoder(run_dir, cfg, base_rows, ft_rows, held, k_match)
    if (diffsae_dir(run_dir) / WEIGHTS).exists():
        if base_rows is None:
            base_rows = _base_rows(cfg, held, device, dtype)
        methods["diffsae"], own_labels["diffsae"] = _diffsae(run_dir, cfg, base_rows, ft_rows, held, k_match)

    scored = {}
    for name, m in methods.items():
        lab = own_labels.get(name, label)  # the crosscoder and the diff-SAE: their own latents, the same rule
        scored[name] = {**method_metrics(m.ranking, m.selected, lab.relevant, m.live, judged=lab.judged, scores=m.scores,
                                         extra_k={"stagewise_k": k_match}, seed=cfg.seed), "selection": m.selection}
    by_label = {}
    for key, rel in (("top_contexts", top_rule), ("string", string)):
        # secondary labels judge a feature when it fires min_fires times in either F dictionary (their own rule)
        jud = secondary["F_via_D"]["judged"] | secondary["F_via_M"]["judged"]
        by_label[key] = {n: {**method_metrics(m.ranking, m.selected, rel, m.live, judged=jud, scores=m.scores, seed=cfg.seed),
                             "selection": m.selection} for n, m in methods.items() if n not in own_labels}

    # 3. causal checks: each ranking's features clamped in its own dictionary spliced into the fine-tuned model
    # (the diff-SAE's splice stands the mean base activation in for the base residual: causal.Dictionary)
    causal_out = {}
    if e.causal and e.causal_examples > 0:
        swept = causal_rankings(methods, e.causal_methods)
        causal_out = causal.run_causal_checks(ft_model, tokenizer, cfg, examples, org, swept, run_dir, device)

    metrics = {
        "organism": {**org, "null": null},
        "labels": {
            "rule": paired_rule_text(label, e.label_min_pairs, e.label_min_ratio),
            "null_false_positive_rate": label.null_fpr,
            "null_false_positive_rate_max": label.null_fpr_max,
            "alpha": label.alpha,
            "secondary_rules": {
                "top_contexts": rule_text(e.top_contexts, e.relevant_share, e.min_fires),
                "string": f"every top token is a substring of ' {org['trigger']} ' or ' {org['response']} ' and one is longer than one character",
            },
            "params": {"min_pairs": e.label_min_pairs, "alpha": e.label_alpha, "min_ratio": e.label_min_ratio, "max_fpr": e.label_max_fpr,
                       "permutations": e.label_permutations, "examples": len(examples), "pairs": int(held.pairs.shape[0]),
                       "tokens": int(held.valid.sum()), "teacher_forced_reply": "clean answer" if null else "backdoor response"},
            "live_features": int(live.sum()),
            "judged_features": int((label.judged & live).sum()),
            "unjudged_live_features": int((~label.judged & live).sum()),
            "relevant": int((label.relevant & live).sum()),
            "relevant_features": np.flatnonzero(label.relevant & live).tolist(),
            "relevant_top_context_rule": int((top_rule & live).sum()),
            "relevant_string_rule": int((string & live).sum()),
            "own_dictionaries": {n: {"live": int(methods[n].live.sum()), "judged": int((lab.judged & methods[n].live).sum()),
                                     "relevant": int((lab.relevant & methods[n].live).sum()),
                                     "null_false_positive_rate": lab.null_fpr} for n, lab in own_labels.items()},
        },
        "methods": scored,
        "methods_by_label": by_label,
        "causal": causal_out,
    }
    write_json(metrics_json(run_dir), metrics)
    lab = metrics["labels"]
    print(f"relevant features: {lab['relevant']} of {lab['judged_features']} judged ({lab['live_features']} live; "
          f"permutation null labels {lab['null_false_positive_rate']:.2%}){' [null organism]' if null else ''}")
    print(format_table(scored))
    if causal_out.get("n_to_remove"):
        print("N to remove: " + ", ".join(f"{k} {v if v is None else round(v, 1)}" for k, v in causal_out["n_to_remove"].items()))
        dom = causal_out.get("difference_of_means") or {}
        if "trigger_success" in dom:
            print(f"difference of means (1 direction projected out): trigger success {dom['trigger_success']:.2f}, "
                  f"clean replies unchanged {dom['clean_unchanged']:.2f}, clean-loss increase {dom['clean_loss_increase']:.3f}")
    return metrics

