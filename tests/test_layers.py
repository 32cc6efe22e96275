"""Several hooks in one run: the hook list and `all`, one harvest pass equal to one pass per hook, the layer summary."""

from __future__ import annotations

import json
import re

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


@pytest.fixture(scope="module")
def cfg_of(tmp_path_factory, tiny_llama_dir, verses):
    text = tmp_path_factory.mktemp("layers_text") / "verses.txt"
    text.write_text("\n\n".join(verses[:600]))

    def make(hook):
        return load_config(None, [f"base_model={tiny_llama_dir}", f"finetuned_model={tiny_llama_dir}", f"hook={hook}",
                                  f"base_data.path={text}", f"finetune_data.path={text}", "context_size=32", "device=cpu",
                                  "sae.d_sae=128", "sae.k=8", "sae.batch_size=128", "sae.warmup_steps=2",
                                  "stages.S.tokens=1500", "stages.D.tokens=400", "stages.M.tokens=400", "stages.F.tokens=400",
                                  "diff.controls=0", "diff.selection=percentile", "harvest.shard_rows=500",
                                  "crosscoder.enabled=false", "baselines.diffsae=false"])
    return make


STEPS = ("harvest", "train", "diff")


@pytest.fixture(scope="module")
def two_hooks(cfg_of, tmp_path_factory):
    """A real two-hook run (tiny sizes) through harvest, train, diff and the reports; no evaluation."""
    from stagediff.pipeline import run_steps

    both = tmp_path_factory.mktemp("layers") / "both"
    run_steps(cfg_of(f"[{H1}, {H2}]"), both, (*STEPS, "report"))
    return both


def test_a_two_hook_run_equals_two_one_hook_runs(cfg_of, two_hooks, tmp_path):
    from stagediff.pipeline import run_steps
    from stagediff.report import write_report

    both = two_hooks
    assert not (both / "activations" / "base__base").exists()  # the stores live in each hook's run
    for h in (H1, H2):
        one = tmp_path / h
        run_steps(cfg_of(h), one, STEPS)
        layer = layer_dir(both, h)
        assert (one / "activations" / "base__base" / "manifest.json").exists()  # a one-hook run keeps today's layout
        for store in ("base__base", "base__finetune", "finetuned__base", "finetuned__finetune"):
            a, b = (read_json(d / "activations" / store / "manifest.json") for d in (one, layer))
            assert a == b and a["hook"] == h  # same meta, windows and shard checksums: the same rows bit for bit
        assert (one / "diff" / "features.csv").read_bytes() == (layer / "diff" / "features.csv").read_bytes()
        assert (one / "saes" / "F_via_D" / "sae_weights.safetensors").read_bytes() == \
            (layer / "saes" / "F_via_D" / "sae_weights.safetensors").read_bytes()
        assert load_config(layer / "config.yaml").hook == h  # each hook's run is a run directory of its own
        if h == H1:  # a one-hook run's report has no layer selector
            page = write_report(one, cfg_of(h), with_cards=False).read_text()
            assert _selector(page) == [] and "{{LAYERS}}" not in page
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


def _selector(page: str) -> list[tuple[str, str, bool]]:
    """The layer selector of a page as (label, href, current) in order; [] when the page has none."""
    nav = re.search(r'<nav class="layerbar"[^>]*>(.*?)</nav>', page, re.S)
    return [] if nav is None else [(label, href, bool(current)) for href, current, label in
                                   re.findall(r'<a href="([^"]+)"( class="current")?[^>]*>([^<]+)</a>', nav.group(1))]


def test_each_hook_report_selects_its_sibling_layers(two_hooks):
    """Each hook's report opens with links to the layer index and every hook's report (itself marked); the index
    links back the same way; every link resolves to a page of the run, relative, so the files open anywhere."""
    from stagediff.layers import INDEX_LABEL

    index = two_hooks / "report" / "index.html"
    pages = {None: index, **{h: layer_dir(two_hooks, h) / "report" / "index.html" for h in (H1, H2)}}
    for current, page in pages.items():
        links = _selector(page.read_text())
        assert [label for label, _, _ in links] == [INDEX_LABEL, H1, H2]
        assert [c for _, _, c in links] == [current is None, current == H1, current == H2]
        for (_, href, _), target in zip(links, pages.values()):
            assert not href.startswith("/") and (page.parent / href).resolve() == target.resolve() and target.exists()
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', pages[H2].read_text(), re.S).group(1))
    assert [x["label"] for x in data["layers"] if x["current"]] == [H2]


def test_push_of_a_two_hook_run_lays_out_every_hook(two_hooks, tmp_path, monkeypatch):
    """`stagediff push --dry-run` of a several-hook run: <hook>/<stage>/ per hook with that hook's files and hook_name,
    one card listing hooks and stages; a nested folder loads back through hf://owner/repo/<hook>/<stage>."""
    import huggingface_hub.constants

    from stagediff import hub
    from stagediff.cli import main

    cache = tmp_path / "hf"
    out = cache / "models--me--layers" / "snapshots" / ("cd" * 20)
    assert main(["push", str(two_hooks), "me/layers", "--dry-run", str(out)]) == 0
    stages = ["D", "F_via_D", "F_via_M", "M", "S"]
    assert sorted(str(p.parent.relative_to(out)) for p in out.rglob("cfg.json")) == [f"{h}/{s}" for h in (H1, H2) for s in stages]
    assert sorted(p.name for p in out.iterdir()) == sorted([H1, H2, "README.md"])
    for h in (H1, H2):
        for s in stages:
            assert hub.read_hook(out / h / s) == h
            for name in ("cfg.json", "sae_weights.safetensors"):
                assert (out / h / s / name).read_bytes() == (layer_dir(two_hooks, h) / "saes" / s / name).read_bytes()
    card = (out / "README.md").read_text()
    assert f"Hooks: `{H1}`, `{H2}`" in card and all(f"| `{h}/{s}` | `{h}` |" in card for h in (H1, H2) for s in stages)
    assert f'SAE.from_pretrained("me/layers", "{H1}/D")' in card
    (out.parent.parent / "refs").mkdir()
    (out.parent.parent / "refs" / "main").write_text(out.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._resolve.cache_clear()
    folder, source = hub.resolve_pretrained(f"hf://me/layers/{H2}/F_via_M")
    assert source == {"repo_id": "me/layers", "path": f"{H2}/F_via_M"} and hub.read_hook(folder) == H2
    assert (folder / "sae_weights.safetensors").read_bytes() == \
        (layer_dir(two_hooks, H2) / "saes" / "F_via_M" / "sae_weights.safetensors").read_bytes()
    hub._resolve.cache_clear()


def test_every_method_of_any_hook_is_a_row_of_the_layer_table(tmp_path):
    """The diff-SAE and the crosscoder (any method a hook's metrics.json holds) get the same columns as stage-wise;
    a hook that lacks one shows its row as dashes; the difference-of-means row stays."""
    from stagediff.layers import layer_table, plotted_methods

    hooks = [H1, H2]
    first = _metrics({"stagewise": 40.0, "stagewise_percentile": 60.0, "crosscoder": None, "oracle": 1.0}, {"stagewise": 0.2})
    first["methods"]["diffsae"] = {"selected": 12, "ap": 0.31, "ap_ci": [0.22, 0.41], "at_k": {"25": {"precision": 0.44, "ci": [0.24, 0.65]}}}
    first["causal"]["n_to_remove_detail"]["diffsae"] = {"n": 3.0, "clean_loss_increase": 0.015}
    write_json(layer_dir(tmp_path, H1) / "eval" / "metrics.json", first)
    write_json(layer_dir(tmp_path, H2) / "eval" / "metrics.json", _metrics({"stagewise": 9.0, "crosscoder": 30.0}, {"crosscoder": 0.1}))
    write_json(layer_dir(tmp_path, H2) / "eval" / "difference_of_means.json",
               {"trigger_success": 0.04, "clean_loss_before": 5.0, "clean_loss_after": 5.5})
    summary = write_layer_summary(tmp_path, hooks)
    assert summary["fewest_features"] == {"hook": H1, "method": "diffsae", "n_to_remove": 3.0, "clean_loss_increase": 0.015}
    rows = {(r[0], r[1]): r[2:] for r in layer_table(summary)[1:]}
    assert rows[(H1, "diffsae")] == ["12", "0.44 [0.24, 0.65]", "0.31 [0.22, 0.41]", "3", "+0.015"]
    assert rows[(H2, "diffsae")] == ["–"] * 5  # the diff-SAE did not run at H2: said, not hidden
    assert rows[(H2, "crosscoder")] == ["10", "0.60 [0.40, 0.80]", "0.50 [0.40, 0.60]", "30", "+0.100"]
    assert rows[(H2, "difference of means (1 direction)")][-2:] == ["ts 0.04", "+0.500"]
    assert [m for h, m in rows if h == H1] == ["stagewise", "stagewise_percentile", "crosscoder", "oracle", "diffsae"]
    assert plotted_methods(summary) == ["stagewise", "crosscoder", "diffsae"]
    page = write_layers_index(tmp_path, summary).read_text()
    assert "<td>diffsae</td><td>12</td><td>0.44 [0.24, 0.65]</td>" in page and "diffsae at blocks.1.hook_resid_post, N = 3" in page
