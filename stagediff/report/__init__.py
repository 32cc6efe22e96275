"""The self-contained HTML report: `RUN/report/index.html`, plus PNGs of the main figures.

The page is one file: the template's CSS and JS inlined, and the run's data
embedded as one JSON blob, so it opens from file:// with no network. The data is
gathered by `data.py` (plots, tables) and `cards.py` (contexts, output tokens).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from stagediff.config import Config
from stagediff.errors import StagediffError
from stagediff.files import atomic_write, write_json
from stagediff.layers import layer_selector_html
from stagediff.layout import report_dir, report_html, top_tokens_json
from stagediff.report.cards import build_cards, card_features
from stagediff.report.data import gather
from stagediff.report.figures import write_figures

__all__ = ["write_report", "render_html"]


def write_report(run_dir: Path, cfg: Config, with_cards: bool = True) -> Path:
    """Write RUN/report/index.html and its PNGs from whatever the run directory holds; return the page's path."""
    run_dir = Path(run_dir)
    data = gather(run_dir, cfg)
    cards = {"cards": {}, "out_tokens": None, "vocab": {}, "notes": []}
    if with_cards:
        ids = card_features(data["features"], cfg.report.cards)
        cards = build_cards(run_dir, cfg, ids, data["n_features"])
        cards["card_order"] = ids  # JSON objects keyed by number lose their order in JS
    data.update(cards)
    data["title"] = f"stagediff report — {run_dir.resolve().name}"
    data["generated"] = datetime.datetime.now().isoformat(timespec="seconds")
    data["figures"] = write_figures(data, report_dir(run_dir))
    page = report_html(run_dir)
    with atomic_write(page, "w") as f:
        f.write(render_html(data))
    write_json(top_tokens_json(run_dir), top_tokens(data))
    for note in data["notes"]:
        print(f"report: {note}", file=sys.stderr)
    return page


def top_tokens(data: dict[str, Any], n: int = 3) -> dict[str, str]:
    """Per card feature, the tokens its strongest fine-tune-data contexts peak on (most frequent first)."""
    out = {}
    for fid, card in data.get("cards", {}).items():
        counts: dict[int, int] = {}
        contexts = card.get("contexts", {})
        for source in [contexts["finetune"]] if "finetune" in contexts else contexts.values():
            for item in source.get("items", []):
                tok = item["tokens"][item["at"]]
                counts[tok] = counts.get(tok, 0) + 1
        best = sorted(counts, key=counts.get, reverse=True)[:n]
        out[fid] = " ".join(repr(data.get("vocab", {}).get(str(t), str(t))) for t in best)
    return out


def render_html(data: dict[str, Any]) -> str:
    """The page: template + inline CSS + inline JS + the data as one JSON blob."""
    pkg = resources.files("stagediff.report")
    template, css, js = (pkg.joinpath(n).read_text(encoding="utf-8") for n in ("template.html", "report.css", "report.js"))
    if "</script" in js.lower():
        raise StagediffError("report.js contains '</script', which would end the inline script early")
    # JSON inside <script> must not contain '</script>' or '<!--': escaping every '<', '>' and '&'
    # as \u escapes keeps the blob valid JSON and inert HTML, whatever token texts it holds.
    blob = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False, default=str)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = data.get("title", "stagediff report").replace("&", "&amp;").replace("<", "&lt;")
    # the layer selector is static HTML (a hook's report in a several-hook run; empty otherwise)
    return (template.replace("{{TITLE}}", title).replace("{{LAYERS}}", layer_selector_html(data.get("layers")))
            .replace("/*{{CSS}}*/", css).replace("/*{{JS}}*/", js).replace("{{DATA}}", blob))


def _finite(obj: Any) -> Any:
    """NaN and inf (which other steps' JSON may hold) become null: JSON.parse rejects them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
