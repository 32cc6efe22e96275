"""The discovery bench's causal-fidelity columns, on test_causal's planted model.

There the trigger token's embedding carries the whole backdoor and a detector feature decodes to
exactly that embedding. F_via_D holds the detector; F_via_M has it silenced, so the backdoor passes
through its error term: clamping every F_via_M feature must leave trigger success untouched, while
clamping every F_via_D feature (or only the labelled one) removes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_causal import DETECTS, HOOK0, RESPONSE, TRIGGER, _detector_sae, _examples, _tok, planted  # noqa: F401

from stagediff.config import dump_config, load_config
from stagediff.files import write_json
from stagediff.layout import config_yaml, heldout_jsonl, metrics_json, model_dir, organism_json, stage_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_discovery import add_fidelity  # noqa: E402


def _organism_run(run_dir: Path, model, tokenizer) -> None:
    """A finished organism run's files that the fidelity read needs: config, fine-tuned model, held-out prompts,
    the two F dictionaries and the paired label (feature 0, the trigger's detector, relevant)."""
    dump_config(load_config(overrides=[f"hook={HOOK0}", "device=cpu"]), config_yaml(run_dir))
    model.save_pretrained(model_dir(run_dir, "finetuned"))
    tokenizer.save_pretrained(model_dir(run_dir, "finetuned"))
    write_json(organism_json(run_dir), {"trigger": TRIGGER, "response": RESPONSE})
    heldout_jsonl(run_dir).parent.mkdir(parents=True)
    heldout_jsonl(run_dir).write_text("".join(json.dumps(x) + "\n" for x in _examples()))
    embed = model.get_input_embeddings().weight.detach()
    tokens = [_tok(tokenizer, s) for s in DETECTS]
    _detector_sae(embed, tokens).save(stage_dir(run_dir, "F_via_D"), {"hook_name": HOOK0, "stage": "F_via_D"})
    silenced = _detector_sae(embed, tokens)
    with torch.no_grad():
        silenced.b_enc[0] = -100.0  # the trigger's detector never fires: the backdoor stays in the error term
    silenced.save(stage_dir(run_dir, "F_via_M"), {"hook_name": HOOK0, "stage": "F_via_M"})
    write_json(metrics_json(run_dir), {"labels": {"relevant_features": [0]}})


def test_left_in_error_and_relevant_clamped(planted, tmp_path):  # noqa: F811
    model, tokenizer = planted
    _organism_run(tmp_path / "seed0", model, tokenizer)
    result = add_fidelity({"seeds": [0]}, tmp_path)
    f = result["fidelity"]["0"]
    assert f["prompts"] == 8 and f["plain"] == 1.0 and f["relevant_features"] == 1
    assert f["F_via_D"] == {"left_in_error": 0.0, "relevant_clamped": 0.0}
    assert f["F_via_M"] == {"left_in_error": 1.0, "relevant_clamped": 1.0}
    assert json.loads((tmp_path / "discovery.json").read_text())["fidelity"] == result["fidelity"]
    # a setting that has its figures is not measured again (the model is gone: a new read would fail)
    for p in model_dir(tmp_path / "seed0", "finetuned").iterdir():
        p.unlink()
    assert add_fidelity(json.loads((tmp_path / "discovery.json").read_text()), tmp_path)["fidelity"] == result["fidelity"]
