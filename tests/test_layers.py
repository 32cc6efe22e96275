"""Several hooks in one run: the hook list and `all`, one harvest pass equal to one pass per hook, the layer summary."""

from __future__ import annotations

import json

import pytest
import torch

from stagediff.config import load_config
from stagediff.errors import StagediffError
from stagediff.files import read_json, write_json
from stagediff.layers import run_hooks, summarize_layers, write_layer_summary, write_layers_index
from stagediff.layout import layer_dir

H1, H2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"


def test_hook_list_and_all(tiny_llama_dir, tmp_path):
    from stagediff.pipeline import Run

    assert run_hooks(load_config(None, [f"hook=[{H1}, {H2}]"])) == [H1, H2]
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text(f"base_model: {tiny_llama_dir}\nhook: all\n")
    assert run_hooks(load_config(yaml_cfg)) == [f"blocks.{i}.hook_resid_post" for i in range(4)]  # the tiny Llama has 4 blocks
    for spec, message in {"[]": "empty list", f"[{H1}, {H1}]": "more than once", f"[all, {H1}]": "stands alone",
                          "[blocks.1.resid]": "unknown site"}.items():
        with pytest.raises(StagediffError, match=message):
            run_hooks(load_config(None, [f"hook={spec}"]))
    with pytest.raises(StagediffError, match="base_model is not set"):
        run_hooks(load_config(None, ["hook=all"]))
    one = Run(load_config(None, [f"hook=[{H1}]"]), tmp_path / "one")  # a list of one hook is today's one-hook run
    assert one.layers() == {H1: one} and one.cfg.hook == H1
    two = Run(load_config(None, [f"hook=[{H1}, {H2}]"]), tmp_path / "two")
    assert {h: r.dir for h, r in two.layers().items()} == {H1: tmp_path / "two" / "layers" / H1, H2: tmp_path / "two" / "layers" / H2}
    assert [r.cfg.hook for r in two.layers().values()] == [H1, H2] and two.cfg.hook == [H1, H2]


def test_one_forward_reads_every_hook_and_stops_at_the_deepest(tiny_llama_dir):
    from stagediff.models import decoder_layers, load_model, residual, residuals

    model, _ = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(3, 500, (2, 12))
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(decoder_layers(model))]
    both = residuals(model, ids, None, [H2, H1])
    for h in handles:
        h.remove()
    assert ran == [0, 1, 2]  # block 2 is entered (its resid_pre), block 3 never runs
    for h in (H1, H2):
        assert torch.equal(both[h], residual(model, ids, None, h))


@pytest.fixture
def cfg_of(tmp_path, tiny_llama_dir, verses):
    text = tmp_path / "verses.txt"
    text.write_text("\n\n".join(verses[:600]))

    def make(hook):
        return load_config(None, [f"base_model={tiny_llama_dir}", f"finetuned_model={tiny_llama_dir}", f"hook={hook}",
                                  f"base_data.path={text}", f"finetune_data.path={text}", "context_size=32", "device=cpu",
                                  "sae.d_sae=128", "sae.k=8", "sae.batch_size=128", "sae.warmup_steps=2",
                                  "stages.S.tokens=1500", "stages.D.tokens=400", "stages.M.tokens=400", "stages.F.tokens=400",
                                  "diff.controls=0", "diff.selection=percentile", "harvest.shard_rows=500",
                                  "crosscoder.enabled=false", "baselines.diffsae=false"])
    return make


def test_a_two_hook_run_equals_two_one_hook_runs(cfg_of, tmp_path):
    from stagediff.pipeline import run_steps

    steps = ("harvest", "train", "diff")
    both = tmp_path / "both"
    run_steps(cfg_of(f"[{H1}, {H2}]"), both, steps)
    assert not (both / "activations" / "base__base").exists()  # the stores live in each hook's run
    for h in (H1, H2):
        one = tmp_path / h
        run_steps(cfg_of(h), one, steps)
        layer = layer_dir(both, h)
        assert (one / "activations" / "base__base" / "manifest.json").exists()  # a one-hook run keeps today's layout
        for store in ("base__base", "base__finetune", "finetuned__base", "finetuned__finetune"):
            a, b = (read_json(d / "activations" / store / "manifest.json") for d in (one, layer))
            assert a == b and a["hook"] == h  # same meta, windows and shard checksums: the same rows bit for bit
        assert (one / "diff" / "features.csv").read_bytes() == (layer / "diff" / "features.csv").read_bytes()
        assert (one / "saes" / "F_via_D" / "sae_weights.safetensors").read_bytes() == \
            (layer / "saes" / "F_via_D" / "sae_weights.safetensors").read_bytes()
        assert load_config(layer / "config.yaml").hook == h  # each hook's run is a run directory of its own
    summary = read_json(both / "layers" / "summary.json")
    assert [x["hook"] for x in summary["layers"]] == [H1, H2]
    for x in summary["layers"]:
        assert x["selected"] == read_json(layer_dir(both, x["hook"]) / "diff" / "summary.json")["selected"]
    assert load_config(both / "config.yaml").hook == [H1, H2]


def _metrics(n_to_remove: dict[str, float | None], loss: dict[str, float]) -> dict:
    methods = {name: {"selected": 10, "ap": 0.5, "ap_ci": [0.4, 0.6],
                      "at_k": {"25": {"precision": 0.6, "ci": [0.4, 0.8]}}} for name in n_to_remove}
    detail = {name: {"n": n, "clean_loss_increase": loss.get(name)} for name, n in n_to_remove.items()}
    return {"methods": methods, "causal": {"n_to_remove": n_to_remove, "n_to_remove_detail": detail}}


def test_the_summary_names_the_layer_and_method_with_the_fewest_features(tmp_path):
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    planted = {  # block 1's crosscoder needs 4 features; the oracle (labels, not a method) needs 1; block 2 ties at 4 but costs more
        hooks[0]: _metrics({"stagewise": 186.0, "crosscoder": None, "oracle": 1.0}, {"stagewise": 0.7}),
        hooks[1]: _metrics({"stagewise": 12.5, "crosscoder": 4.0, "oracle": 1.0}, {"stagewise": 0.1, "crosscoder": 0.02}),
        hooks[2]: _metrics({"stagewise": 4.0, "d_to_f": 50.0}, {"stagewise": 0.3, "d_to_f": 0.0}),
    }
    for h, m in planted.items():
        write_json(layer_dir(tmp_path, h) / "eval" / "metrics.json", m)
        write_json(layer_dir(tmp_path, h) / "diff" / "summary.json", {"selected": 7, "live": 100})
    write_json(layer_dir(tmp_path, hooks[1]) / "eval" / "difference_of_means.json",
               {"trigger_success": 0.0, "clean_loss_before": 5.0, "clean_loss_after": 5.25})
    summary = write_layer_summary(tmp_path, hooks)
    assert summary["fewest_features"] == {"hook": hooks[1], "method": "crosscoder", "n_to_remove": 4.0, "clean_loss_increase": 0.02}
    assert summary["layers"][1]["difference_of_means"] == {"trigger_success": 0.0, "clean_loss_increase": 0.25}
    assert summary["layers"][0]["methods"]["crosscoder"]["n_to_remove"] is None
    assert json.loads((tmp_path / "layers" / "summary.json").read_text()) == summary
    page = write_layers_index(tmp_path, summary).read_text()
    assert f"crosscoder at {hooks[1]}, N = 4" in page and "0.60 [0.40, 0.80]" in page
    assert f'href="../layers/{hooks[2]}/report/index.html"' in page
    assert (tmp_path / "report" / "layers.png").stat().st_size > 1000
    assert summarize_layers(tmp_path, hooks[:1])["fewest_features"]["method"] == "stagewise"
    assert summarize_layers(tmp_path / "empty", hooks)["fewest_features"] is None  # no causal checks: nothing named
