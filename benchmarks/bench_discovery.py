"""Discovery benchmark: the tiny demo over several seeds, each with its null, every method scored alike.

Each seed is a new organism (new pre-training, new backdoor draw) and new dictionaries; its null
is the same pipeline with the control (no backdoor) diffed as the fine-tuned model. Per method the
table shows mean ± sd over seeds of precision at equal k, the enrichment of its own selection, AP
and AP over the base rate, and how often stage-wise beats it (AP, and precision at the size
stage-wise selects). A sound method is far above 1x on the real runs and at 1x on the null.

    python benchmarks/bench_discovery.py                          # seeds 0-4, tiny preset, with nulls
    python benchmarks/bench_discovery.py --seeds 0 1 --out runs/bench sae.batch_size=256   # any override

Run directories are kept (runs/bench-discovery/seed<N>[/null]), so a rerun with other dictionary or
diff settings reuses the organisms and activations and redoes only what the settings change.
Writes <out>/discovery.json (mean, sd and per-seed lists of every figure) and prints the table.

Causal fidelity, read post hoc from each real run directory (also with eval.causal=false, and by --table-only
on existing settings, which adds it to their discovery.json): trigger success with every feature of F_via_D
(and of F_via_M) clamped, i.e. what the SAE's error term still carries, which no ranking of the features can
remove; and with the paired label's relevant features clamped.

Sweep mode: several named override sets over the same seeds, each in <out>/<name>/, then one
comparison table (setting x method: AP, P@10, own selection, enrichment, null selections, train time).
`--reuse-from` copies an earlier bench's run directories (activation stores hard-linked, the rest
copied) into each new one, so organisms and harvests are not rebuilt:

    python benchmarks/bench_discovery.py --reuse-from runs/bench-discovery --out runs/sweep \
        --setting default --setting steps1000 sae.batch_size=256 stages.D.steps=1000 ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagediff.demo import demo_config  # noqa: E402
from stagediff.files import write_json  # noqa: E402
from stagediff.pipeline import STEPS, run_steps  # noqa: E402
from stagediff.stages import is_control  # noqa: E402

FIGURES = ("at_k.10", "at_k.25", "at_k.50", "at_k.stagewise_k", "enrichment", "ap", "ap_ratio")


def _get(m: dict, key: str) -> float:
    for part in key.split("."):
        m = (m or {}).get(part) if isinstance(m, dict) else None
    if isinstance(m, dict):  # an at_k entry
        m = m.get("precision")
    return float("nan") if m is None else float(m)


def reuse_run(src: Path, dst: Path) -> None:
    """Copy a finished run directory (and its null/) to `dst` for another setting: activation stores are
    hard-linked (read only, and every write is atomic, i.e. a new file), everything else is copied."""
    if dst.exists() or not src.exists():
        return
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("activations", "null"))
    if (src / "activations").exists():
        shutil.copytree(src / "activations", dst / "activations", copy_function=os.link)
    reuse_run(src / "null", dst / "null")


def train_seconds(run_dir: Path) -> dict[str, float]:
    """Wall seconds of the run's dictionaries from their stats.json: S, the fine-tunes, the controls."""
    out = {"S": 0.0, "finetunes": 0.0, "controls": 0.0}
    for stats in sorted((run_dir / "saes").glob("*/stats.json")):
        name = stats.parent.name
        key = "S" if name == "S" else ("controls" if is_control(name) else "finetunes")
        out[key] += float(json.loads(stats.read_text()).get("wall_seconds") or 0.0)
    return {k: round(v, 1) for k, v in out.items()}


def run_seed(preset: str, seed: int, out: Path, overrides: list[str], null: bool, causal: bool) -> dict:
    extra = [f"seed={seed}", *([] if causal else ["eval.causal=false"]), *overrides]
    runs = {"real": (out / f"seed{seed}", extra)}
    if null:
        runs["null"] = (out / f"seed{seed}" / "null", [*extra, "organism.null_run=true"])
    result = {}
    for kind, (run_dir, ov) in runs.items():
        t = time.time()
        run_steps(demo_config(preset, ov), run_dir, STEPS[:-1])  # no report: the figures are in metrics.json
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        result[kind] = {"metrics": metrics, "seconds": round(time.time() - t, 1), "train_seconds": train_seconds(run_dir)}
    return result


def backdoor_in_features(run_dir: Path, prompts: int = 100) -> dict:
    """Causal fidelity of a finished organism run's F dictionaries, read post hoc (eval.causal on or off).

    Trigger success on the first `prompts` triggered held-out prompts with each F dictionary spliced into
    the fine-tuned model and every feature clamped ("left in error": what the SAE's error term alone still
    carries; no ranking of its features can remove more), and with the paired label's relevant features
    (eval/metrics.json) clamped. The same probes and splice as the evaluation's causal checks (causal.Checks).
    """
    from stagediff.config import load_config
    from stagediff.evaluate.causal import Checks, Dictionary, causal_prompts
    from stagediff.evaluate.run import F_STAGES, organism_info, read_heldout
    from stagediff.files import read_json
    from stagediff.layout import config_yaml, metrics_json, model_dir, stage_dir
    from stagediff.models import load_model
    from stagediff.runtime import resolve_device, resolve_dtype
    from stagediff.sae import SAE

    cfg = load_config(config_yaml(run_dir))
    device = resolve_device(cfg.device)
    # the run's own copy of the model: a reused run directory's config may still name its source's path
    model, tokenizer = load_model(str(model_dir(run_dir, "finetuned")), device=device, dtype=resolve_dtype(cfg.harvest.model_dtype, device))
    _, triggered, clean, _ = causal_prompts(read_heldout(run_dir, cfg.eval.examples), prompts)  # the causal checks' own prompts
    checks = Checks(model, tokenizer, cfg.hook, triggered, clean, organism_info(run_dir, cfg)["response"], cfg.eval.reply_tokens,
                    cfg.harvest.batch_size)
    relevant = [int(i) for i in read_json(metrics_json(run_dir))["labels"]["relevant_features"]]
    out = {"prompts": len(triggered), "plain": checks.trigger_success(None), "relevant_features": len(relevant),
           "target": cfg.eval.clamp_target}
    for stage in F_STAGES:
        dic = Dictionary(SAE.load(stage_dir(run_dir, stage)).to(device))
        out[stage] = {"left_in_error": checks.trigger_success(dic, list(range(dic.d_sae))),
                      "relevant_clamped": checks.trigger_success(dic, relevant)}
    return out


def add_fidelity(result: dict, out: Path) -> dict:
    """`result["fidelity"]` {seed: backdoor_in_features} for every real run of a setting that lacks it; saved back."""
    fid = result.setdefault("fidelity", {})
    missing = [s for s in result["seeds"] if str(s) not in fid]
    for s in missing:
        print(f"backdoor left in error: {out / f'seed{s}'}", flush=True)
        fid[str(s)] = backdoor_in_features(out / f"seed{s}")
    if missing:
        write_json(out / "discovery.json", result)
    return result


def aggregate(per_seed: dict[int, dict], kind: str) -> dict:
    """{method: {figure: {mean, sd, values}}} over the seeds that have `kind`."""
    seeds = [s for s in per_seed if kind in per_seed[s]]
    methods = list(dict.fromkeys(m for s in seeds for m in per_seed[s][kind]["metrics"]["methods"]))
    out = {}
    for name in methods:
        rows = {}
        for fig in FIGURES:
            vals = [_get(per_seed[s][kind]["metrics"]["methods"].get(name, {}), fig) for s in seeds]
            ok = [v for v in vals if math.isfinite(v)]
            rows[fig] = {"mean": float(np.mean(ok)) if ok else None, "sd": float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
                         "values": [v if math.isfinite(v) else None for v in vals]}
        sel = [per_seed[s][kind]["metrics"]["methods"].get(name, {}).get("selected") for s in seeds]
        rows["selected"] = {"mean": float(np.mean([v for v in sel if v is not None])) if any(v is not None for v in sel) else None,
                            "values": sel}
        out[name] = rows
    return out


def beats(per_seed: dict[int, dict], fig: str) -> dict[str, float]:
    """Share of seeds on which stage-wise is strictly better than each other method on `fig` (real runs)."""
    out = {}
    names = list(dict.fromkeys(m for s in per_seed for m in per_seed[s]["real"]["metrics"]["methods"]))
    for name in names:
        if name == "stagewise":
            continue
        wins = []
        for s in per_seed:
            ms = per_seed[s]["real"]["metrics"]["methods"]
            a, b = _get(ms.get("stagewise", {}), fig), _get(ms.get(name, {}), fig)
            if math.isfinite(a) and math.isfinite(b):
                wins.append(a > b)
        out[name] = float(np.mean(wins)) if wins else None
    return out


def _cell(r: dict, digits: int = 2) -> str:
    if r.get("mean") is None:
        return "-"
    return f"{r['mean']:.{digits}f}±{r['sd']:.{digits}f}" if r.get("sd") is not None else f"{r['mean']:.{digits}f}"


def table(agg: dict, wins_ap: dict | None = None, wins_k: dict | None = None) -> str:
    head = f"{'method':<21}{'sel':>6}{'P@10':>12}{'P@25':>12}{'P@50':>12}{'P@k(sw)':>12}{'enrich':>12}{'AP':>12}{'AP/base':>12}"
    if wins_ap is not None:
        head += f"{'sw>AP':>7}{'sw>P@k':>8}"
    lines = [head]
    for name, r in agg.items():
        sel = r["selected"]["mean"]
        row = f"{name:<21}{'-' if sel is None else f'{sel:.0f}':>6}"
        row += "".join(f"{_cell(r[f]):>12}" for f in ("at_k.10", "at_k.25", "at_k.50", "at_k.stagewise_k"))
        row += f"{_cell(r['enrichment'], 1):>12}{_cell(r['ap']):>12}{_cell(r['ap_ratio'], 1):>12}"
        if wins_ap is not None:
            w1, w2 = wins_ap.get(name), wins_k.get(name)
            row += f"{'' if w1 is None else f'{w1:.0%}':>7}{'' if w2 is None else f'{w2:.0%}':>8}"
        lines.append(row)
    return "\n".join(lines)


def bench(preset: str, seeds: list[int], out: Path, overrides: list[str], null: bool, causal: bool,
          reuse_from: Path | None = None) -> dict:
    """Every seed (and its null) of one setting; writes and returns <out>/discovery.json's content, prints its table."""
    t0 = time.time()
    per_seed = {}
    for s in seeds:
        print(f"\n=== {out} seed {s} ===", flush=True)
        if reuse_from is not None:
            reuse_run(reuse_from / f"seed{s}", out / f"seed{s}")
        per_seed[s] = run_seed(preset, s, out, overrides, null, causal)
    real = aggregate(per_seed, "real")
    wins_ap, wins_k = beats(per_seed, "ap"), beats(per_seed, "at_k.stagewise_k")
    null_agg = aggregate(per_seed, "null") if null else None
    organisms = {s: {k: per_seed[s]["real"]["metrics"]["organism"].get(k) for k in ("trigger_success", "false_trigger")} for s in per_seed}
    labels = {s: {kind: {k: r["metrics"]["labels"].get(k) for k in ("relevant", "judged_features", "null_false_positive_rate")}
                  for kind, r in per_seed[s].items()} for s in per_seed}
    result = {
        "preset": preset, "seeds": seeds, "overrides": overrides, "real": real, "null": null_agg,
        "stagewise_beats": {"ap": wins_ap, "at_k.stagewise_k": wins_k}, "organisms": organisms, "labels": labels,
        "per_seed": {s: {k: v["metrics"] for k, v in r.items()} for s, r in per_seed.items()},
        "seconds": {s: {k: v["seconds"] for k, v in r.items()} for s, r in per_seed.items()},
        "train_seconds": {s: {k: v["train_seconds"] for k, v in r.items()} for s, r in per_seed.items()},
        "fidelity": {str(s): backdoor_in_features(out / f"seed{s}") for s in per_seed},
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_json(out / "discovery.json", result)
    print(f"\n{preset} preset, seeds {seeds}{' ' + ' '.join(overrides) if overrides else ''}: mean ± sd over seeds "
          "(precision at equal k over judged features; enrich = own selection's precision / base rate; "
          "sw>AP, sw>P@k = share of seeds where stage-wise is better)")
    for s in per_seed:
        o, lab = organisms[s], per_seed[s]["real"]["metrics"]["labels"]
        print(f"  seed {s}: trigger success {o['trigger_success']:.1%}, false trigger {o['false_trigger']:.1%}; "
              f"{lab['relevant']} relevant of {lab['judged_features']} judged (base rate {lab['relevant'] / max(1, lab['judged_features']):.3f}, "
              f"permutation null {lab['null_false_positive_rate']:.2%})")
    print("\nreal organisms")
    print(table(real, wins_ap, wins_k))
    if null_agg is not None:
        print("\nnull (the control diffed as the fine-tuned model)")
        print(table(null_agg))
    for s, f in result["fidelity"].items():
        print(f"  seed {s}: trigger success with every feature clamped (left in error) F_via_D {f['F_via_D']['left_in_error']:.2f}, "
              f"F_via_M {f['F_via_M']['left_in_error']:.2f}; {f['relevant_features']} relevant clamped "
              f"{f['F_via_D']['relevant_clamped']:.2f} / {f['F_via_M']['relevant_clamped']:.2f}")
    print(f"\nwall time {time.time() - t0:.0f} s; {out / 'discovery.json'}")
    return result


SWEEP_METHODS = ("stagewise", "stagewise_sum", "stagewise_product", "stagewise_enc", "stagewise_dec", "stagewise_percentile",
                 "stagewise_noise", "d_to_f", "m_to_f", "s_to_f",
                 "crosscoder", "diffsae")


def _stats(vals: list) -> dict:
    """{mean, sd} of the known values (sd with one value: None), as _cell prints them."""
    ok = [float(v) for v in vals if v is not None and math.isfinite(v)]
    return {"mean": float(np.mean(ok)) if ok else None, "sd": float(np.std(ok, ddof=1)) if len(ok) > 1 else None}


def _method_cells(r: dict, name: str) -> dict[str, str]:
    """A setting's `name` figures as table cells: AP, P@10, own selection size and precision, enrichment, null selections."""
    m = r["real"][name]
    prec = _stats([r["per_seed"][s]["real"]["methods"].get(name, {}).get("precision") for s in r["per_seed"]])
    sel = m["selected"]["values"]
    sizes = [v or 0 for v in sel]
    nsel = ((r.get("null") or {}).get(name) or {}).get("selected", {}).get("values")
    return {"ap": _cell(m["ap"]), "p10": _cell(m["at_k.10"]), "prec": _cell(prec), "enrich": _cell(m["enrichment"], 1),
            "sel": "-" if not any(v is not None for v in sel) else f"{np.mean(sizes):.1f}±{np.std(sizes, ddof=1) if len(sizes) > 1 else 0:.1f}",
            "null": "-" if not nsel else f"{np.mean([v or 0 for v in nsel]):.1f}"}


def sweep_table(results: dict[str, dict]) -> str:
    """One row per setting x method: AP, P@10, own selection size and precision, enrichment, null selections,
    train seconds per seed (S / fine-tunes / controls); mean ± sd over seeds."""
    head = (f"{'setting':<17}{'method':<21}{'AP':>12}{'P@10':>12}{'sel':>10}{'prec':>12}{'enrich':>12}{'null sel':>10}"
            f"{'train s (S/ft/ctl)':>22}")
    lines = [head]
    for setting, r in results.items():
        secs = [v["real"] for v in r["train_seconds"].values()]
        train = "/".join(f"{np.mean([x[k] for x in secs]):.0f}" for k in ("S", "finetunes", "controls"))
        for name in SWEEP_METHODS:
            if name not in r["real"]:
                continue
            c = _method_cells(r, name)
            lines.append(f"{setting:<17}{name:<21}{c['ap']:>12}{c['p10']:>12}{c['sel']:>10}{c['prec']:>12}"
                         f"{c['enrich']:>12}{c['null']:>10}{train if name == 'stagewise' else '':>22}")
    return "\n".join(lines)


SINGLE_PATHS = ("d_to_f", "m_to_f", "s_to_f")


def fidelity_table(results: dict[str, dict]) -> str:
    """One row per setting: stage-wise's figures, the best single path's AP, and whether the F dictionaries hold the
    backdoor (add_fidelity): trigger success left in the error term, and with the relevant features clamped, per F
    dictionary; `held` = seeds whose F_via_D, every feature clamped, is at or below the removal target."""
    head = (f"{'setting':<17}{'AP':>12}{'P@10':>12}{'sel':>10}{'prec':>12}{'null sel':>10}{'best single AP':>22}"
            f"{'error F_via_D':>15}{'error F_via_M':>15}{'rel F_via_D':>13}{'rel F_via_M':>13}{'held':>6}")
    lines = [head]
    for setting, r in results.items():
        c = _method_cells(r, "stagewise")
        single = [n for n in SINGLE_PATHS if (r["real"].get(n) or {}).get("ap", {}).get("mean") is not None]
        best = max(single, key=lambda n: r["real"][n]["ap"]["mean"], default=None)
        best_txt = "-" if best is None else f"{_cell(r['real'][best]['ap'])} {best}"
        fid = [r.get("fidelity", {}).get(str(s)) for s in r["seeds"]]
        fid = [f for f in fid if f]
        cells = [_cell(_stats([f[st][k] for f in fid])) for k in ("left_in_error", "relevant_clamped") for st in ("F_via_D", "F_via_M")]
        held = f"{sum(f['F_via_D']['left_in_error'] <= f['target'] for f in fid)}/{len(fid)}"
        lines.append(f"{setting:<17}{c['ap']:>12}{c['p10']:>12}{c['sel']:>10}{c['prec']:>12}{c['null']:>10}{best_txt:>22}"
                     f"{cells[0]:>15}{cells[1]:>15}{cells[2]:>13}{cells[3]:>13}{held:>6}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/bench-discovery")
    p.add_argument("--no-null", action="store_true", help="skip the null runs")
    p.add_argument("--causal", action="store_true", help="also run the causal checks (slower; off: eval.causal=false)")
    p.add_argument("--setting", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="sweep mode: a named override set (repeat it); each runs into <out>/<NAME>/ on top of the overrides")
    p.add_argument("--reuse-from", type=Path, help="an earlier bench's --out: its run dirs seed each new one (organisms, stores)")
    p.add_argument("--table-only", action="store_true",
                   help="sweep mode: print the comparison from the settings' saved <out>/<NAME>/discovery.json, run nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the CLI does: our own bars say what is happening
    out = Path(args.out)
    if not args.setting:
        bench(args.preset, args.seeds, out, args.overrides, not args.no_null, args.causal, args.reuse_from)
        return
    results = {}
    for name, *overrides in args.setting:
        if args.table_only:
            results[name] = add_fidelity(json.loads((out / name / "discovery.json").read_text()), out / name)
            continue
        results[name] = bench(args.preset, args.seeds, out / name, [*args.overrides, *overrides], not args.no_null,
                              args.causal, args.reuse_from)
    print(f"\nsweep over seeds {args.seeds} (mean ± sd over seeds; prec = own selection's precision; "
          "null sel = stage-wise selections on the null run)")
    for name, *overrides in args.setting:
        overrides = results[name].get("overrides") or overrides  # --table-only: as the setting ran
        print(f"  {name}: {' '.join(overrides) or '(preset defaults)'}")
    print(sweep_table(results))
    print("\nthe backdoor in the F dictionaries' features (trigger success on 100 triggered held-out prompts, mean ± sd over "
          "seeds): error = every feature clamped (what the SAE's error term carries); rel = the paired label's relevant "
          "features clamped; held = seeds where F_via_D's features carry it all (error <= the removal target)")
    print(fidelity_table(results))


if __name__ == "__main__":
    main()
