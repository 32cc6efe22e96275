"""Several hooks in one run: which hooks, where each hook's run lives, and the layer summary.

`hook:` is one hook name, a list of them, or `all` (the residual stream leaving every block,
`models.all_hooks`). With one hook the run directory is laid out as always. With several, one
harvest pass writes every hook's stores and each hook gets a run directory of its own,
`RUN/layers/<hook>/`, that shares RUN/models and RUN/data; the per-hook steps (train, diff,
baselines, evaluation, report) run in it as in a one-hook run. The layer summary
(RUN/layers/summary.json, RUN/report/index.html) then compares the hooks on what each
hook's evaluation measured, and names the hook and method that remove the behaviour with
the fewest features. Each hook's report and the index open with a layer selector: static,
relative links, so the pages stay files that open anywhere.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import yaml

from stagediff.config import Config
from stagediff.errors import StagediffError
from stagediff.files import atomic_write, read_json_if_exists, write_json
from stagediff.layout import (
    config_yaml,
    diff_dir,
    difference_of_means_json,
    layer_dir,
    layer_parent,
    layers_summary_json,
    metrics_json,
    report_dir,
    report_html,
    summary_json,
)

SHARED = ("models", "data")  # what every hook's run reads from the run itself (the organism, its held-out data)
SUMMARY_K = 25  # precision@k shown in the layer table (every k the evaluation scored is in summary.json)
NOT_A_METHOD = ("oracle",)  # ranks by the labels themselves: a ceiling, never the answer to "which method"
ABSENT = {"selected": None, "precision_at_k": {}, "ap": None, "ap_ci": None,  # a method a hook's evaluation lacks
          "n_to_remove": None, "clean_loss_increase": None}


def run_hooks(cfg: Config) -> list[str]:
    """The hooks of a run: `hook` as one name, a list of names, or `all` (every block of the base model)."""
    from stagediff.models import all_hooks, count_layers, parse_hook

    spec = cfg.hook
    if spec == "all":
        if not cfg.base_model:
            raise StagediffError("hook: all counts the blocks of the base model, but base_model is not set: set base_model "
                                 "(or list the hooks, e.g. hook: [blocks.1.hook_resid_post, blocks.2.hook_resid_post])")
        return all_hooks(count_layers(cfg.base_model, trust_remote_code=cfg.trust_remote_code))
    hooks = [spec] if isinstance(spec, str) else list(spec)
    if not hooks:
        raise StagediffError("hook is an empty list: name at least one hook (e.g. hook: [blocks.1.hook_resid_post]) or use hook: all")
    for h in hooks:
        if h == "all":
            raise StagediffError("hook: all stands alone (every block's residual), not inside a list: write hook: all")
        parse_hook(h)
    repeated = sorted({h for h in hooks if hooks.count(h) > 1})
    if repeated:
        raise StagediffError(f"hook lists {', '.join(repeated)} more than once: name each hook once")
    return hooks


def link_shared(run_dir: Path, hook: str) -> Path:
    """Make RUN/layers/<hook>/ a run directory that reads the run's models/ and data/ (relative links)."""
    out = layer_dir(run_dir, hook)
    out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if (Path(run_dir) / name).exists() and not (out / name).exists():
            os.symlink(Path("..") / ".." / name, out / name, target_is_directory=True)
    return out


def recorded_hooks(run_dir: Path) -> list[str]:
    """The hooks of a several-hook run as its commands resolved them (config.yaml's `_run.hooks`, written once the
    harvest knows them; else RUN/layers/summary.json); [] for a one-hook run or a folder that is not a run."""
    path, provenance = config_yaml(run_dir), {}
    if path.exists():
        try:
            provenance = (yaml.safe_load(path.read_text()) or {}).get("_run") or {}
        except yaml.YAMLError:  # a damaged config: the summary may still name the hooks
            pass
    hooks = provenance.get("hooks") or (read_json_if_exists(layers_summary_json(run_dir)) or {}).get("hooks") or []
    return [str(h) for h in hooks] if len(hooks) > 1 else []


# ---------------------------------------------------------------- the layer selector


INDEX_LABEL = "all layers"  # the selector's entry for the layer index (RUN/report/index.html)


def layer_links(page_dir: Path, run_dir: Path, hooks: list[str], current: str | None) -> list[dict[str, Any]]:
    """The layer selector of a page in `page_dir`: the layer index, then each hook's report, as links relative to the
    page (so the files open from anywhere, with no server); `current` (a hook, or None for the index) is marked."""
    def href(page: Path) -> str:
        return Path(os.path.relpath(Path(page).absolute(), Path(page_dir).absolute())).as_posix()

    index = {"label": INDEX_LABEL, "href": href(report_html(run_dir)), "current": current is None}
    return [index] + [{"label": h, "href": href(report_html(layer_dir(run_dir, h))), "current": h == current} for h in hooks]


def sibling_layers(run_dir: Path) -> list[dict[str, Any]] | None:
    """The layer selector of a hook's report (RUN/layers/<hook>/report/), its siblings read from the parent run's
    recorded hooks; None for a one-hook run (its report has no selector)."""
    parent = layer_parent(run_dir)
    hooks = [] if parent is None else recorded_hooks(parent)
    hook = Path(run_dir).absolute().name
    return layer_links(report_dir(run_dir), parent, hooks, hook) if hook in hooks else None


def layer_selector_html(links: list[dict[str, Any]] | None) -> str:
    """The selector as a static <nav> (works without scripts); '' without links."""
    if not links:
        return ""
    items = "".join(f'<a href="{html.escape(x["href"])}"' + (' class="current" aria-current="page"' if x["current"] else "")
                    + f">{html.escape(x['label'])}</a>" for x in links)
    return f'<nav class="layerbar" id="layers" aria-label="layers"><span>layer</span>{items}</nav>'


# ---------------------------------------------------------------- the layer summary


def summarize_layers(run_dir: Path, hooks: list[str]) -> dict[str, Any]:
    """Per hook: selected count, each method's precision@k (with intervals), AP, N to remove and clean-loss cost,
    the difference-of-means reference; and the (hook, method) that removes the behaviour with the fewest features."""
    layers = []
    for hook in hooks:
        d = layer_dir(run_dir, hook)
        diff = read_json_if_exists(summary_json(diff_dir(d))) or {}
        metrics = read_json_if_exists(metrics_json(d)) or {}
        dom = read_json_if_exists(difference_of_means_json(d))
        causal = metrics.get("causal") or {}
        removal = causal.get("n_to_remove_detail") or {}
        methods = {}
        for name, m in (metrics.get("methods") or {}).items():
            r = removal.get(name) or {}
            methods[name] = {
                "selected": m.get("selected"),
                "precision_at_k": {k: {"precision": v.get("precision"), "ci": v.get("ci")} for k, v in (m.get("at_k") or {}).items()},
                "ap": m.get("ap"), "ap_ci": m.get("ap_ci"),
                "n_to_remove": r.get("n"), "clean_loss_increase": r.get("clean_loss_increase"),
            }
        layers.append({
            "hook": hook, "selected": diff.get("selected"), "live": diff.get("live"), "methods": methods,
            "difference_of_means": None if dom is None else {
                "trigger_success": dom.get("trigger_success"),
                "clean_loss_increase": _minus(dom.get("clean_loss_after"), dom.get("clean_loss_before"))},
        })
    return {"hooks": hooks, "layers": layers, "fewest_features": fewest_features(layers), "k": SUMMARY_K}


def fewest_features(layers: list[dict]) -> dict | None:
    """The (hook, method) whose clamp sweep removes the behaviour with the fewest features (ties: the lower
    clean-loss cost); None where no sweep reached its target."""
    found = [(m["n_to_remove"], _or_inf(m["clean_loss_increase"]), layer["hook"], name)
             for layer in layers for name, m in layer["methods"].items()
             if name not in NOT_A_METHOD and m["n_to_remove"] is not None]
    if not found:
        return None
    n, loss, hook, method = min(found)
    return {"hook": hook, "method": method, "n_to_remove": n, "clean_loss_increase": None if math.isinf(loss) else loss}


def write_layer_summary(run_dir: Path, hooks: list[str]) -> dict[str, Any]:
    """RUN/layers/summary.json, from each hook's finished steps."""
    summary = summarize_layers(run_dir, hooks)
    write_json(layers_summary_json(run_dir), summary)
    return summary


def layer_table(summary: dict[str, Any]) -> list[list[str]]:
    """The method x layer table as rows of text: hook, method, precision@k [CI], AP [CI], N to remove, clean-loss cost."""
    k = str(summary.get("k", SUMMARY_K))
    rows = [["hook", "method", "selected", f"p@{k} [95% CI]", "AP [95% CI]", "N to remove", "clean-loss cost"]]
    for layer in summary["layers"]:
        for name in table_methods(summary):  # every method of any hook (diff-SAE, crosscoder, ...) at every hook
            m = layer["methods"].get(name) or ABSENT
            at = m["precision_at_k"].get(k) or {}
            rows.append([layer["hook"], name, _num(m["selected"], "{:.0f}"), _with_ci(at.get("precision"), at.get("ci")),
                         _with_ci(m["ap"], m["ap_ci"]), _num(m["n_to_remove"], "{:g}"), _num(m["clean_loss_increase"], "{:+.3f}")])
        dom = layer["difference_of_means"]
        if dom:
            rows.append([layer["hook"], "difference of means (1 direction)", "", "", "", f"ts {_num(dom['trigger_success'], '{:.2f}')}",
                         _num(dom["clean_loss_increase"], "{:+.3f}")])
    return rows


def table_methods(summary: dict[str, Any]) -> list[str]:
    """The methods any hook's evaluation scored, in the order they first appear: a method a hook lacks (a baseline
    that did not run there) still gets its row, of dashes, rather than vanishing from the table."""
    return list(dict.fromkeys(n for layer in summary["layers"] for n in layer["methods"]))


def plotted_methods(summary: dict[str, Any]) -> list[str]:
    """The methods of the layer figure: every method but the oracle (labels, not a method) and the stage-wise
    selection variants (one line for stage-wise)."""
    return [n for n in table_methods(summary) if n not in NOT_A_METHOD and not n.startswith("stagewise_")]


def describe_fewest(summary: dict[str, Any]) -> str:
    best = summary.get("fewest_features")
    if not best:
        return "no method's clamp sweep removed the behaviour at any hook (or the causal checks did not run)"
    return (f"fewest features to remove the behaviour: {best['method']} at {best['hook']}, N = {best['n_to_remove']:g}"
            + (f", clean-loss cost {best['clean_loss_increase']:+.3f}" if best["clean_loss_increase"] is not None else ""))


def write_layers_index(run_dir: Path, summary: dict[str, Any]) -> Path:
    """RUN/report/index.html of a several-hook run: the layer summary and a link to each hook's own report."""
    rows = layer_table(summary)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    page = report_html(run_dir)
    selector = layer_links(page.parent, run_dir, summary["hooks"], None)
    links = "".join(f'<li><a href="{html.escape(x["href"])}">{html.escape(x["label"])}</a>: '
                    f"{_num(layer['selected'], '{:.0f}')} of {_num(layer['live'], '{:.0f}')} live features selected</li>"
                    for x, layer in zip(selector[1:], summary["layers"]))
    figure = write_layers_figure(page.parent / "layers.png", summary)
    img = f'<p><img src="{figure.name}" style="max-width:100%"></p>' if figure else ""
    with atomic_write(page, "w") as f:
        f.write(f"""<!doctype html><html><head><meta charset="utf-8"><title>stagediff layers — {html.escape(Path(run_dir).resolve().name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}th{{background:#f4f4f4}}
.layerbar{{display:flex;flex-wrap:wrap;gap:.4em;align-items:center}}.layerbar a{{padding:.15em .5em;border:1px solid #ccc;border-radius:4px}}
.layerbar a.current{{background:#17202a;color:#fff}}</style></head><body>
{layer_selector_html(selector)}
<h1>stagediff: {len(summary['hooks'])} hooks</h1>
<p>Each hook is a run of its own (stage-wise diff, baselines, evaluation): open its report below.
<b>{html.escape(describe_fewest(summary))}</b>.</p>
<ul>{links}</ul>{img}
<h2>Method &times; layer</h2>
<p>precision@{summary.get('k', SUMMARY_K)} and AP with 95% intervals against each hook's paired labels;
N to remove: features clamped until trigger success reaches the causal target; clean-loss cost at that N.</p>
<table><tr>{head}</tr>{body}</table></body></html>
""")
    return page


def write_layers_figure(path: Path, summary: dict[str, Any]) -> Path | None:
    """layers.png: per hook, each method's precision@k (95% CI) and N to remove (log scale); None without methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stagediff.files import atomic_path

    hooks, k = summary["hooks"], str(summary.get("k", SUMMARY_K))
    names = plotted_methods(summary)
    if not names:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"wspace": 0.3})
    x = list(range(len(hooks)))
    for i, name in enumerate(names):
        ms = [layer["methods"].get(name, {}) for layer in summary["layers"]]
        at = [(m.get("precision_at_k") or {}).get(k) or {} for m in ms]
        p = [a.get("precision") if a.get("precision") is not None else math.nan for a in at]
        err = [[pi - a["ci"][0], a["ci"][1] - pi] if a.get("ci") else [0, 0] for pi, a in zip(p, at)]
        shift = [xi + (i - len(names) / 2) * 0.06 for xi in x]
        left.errorbar(shift, p, yerr=list(zip(*err)), marker="o", ms=4, capsize=2, label=name)
        right.plot(x, [m.get("n_to_remove") or math.nan for m in ms], marker="o", ms=4, label=name)
    left.set(ylabel=f"precision@{k} (95% CI)", ylim=(0, 1))
    right.set(ylabel="N to remove (features clamped)", yscale="log")
    for ax in (left, right):
        ax.set_xticks(x, [h.replace(".hook_", "\n") for h in hooks], fontsize=7)
    right.legend(fontsize=7, frameon=False, loc="best")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _or_inf(x: float | None) -> float:
    return math.inf if x is None else x


def _num(x: Any, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _with_ci(x: float | None, ci: list | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{x:.2f}"
