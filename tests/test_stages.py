"""The stage graph: the method's five stages, the noise control, custom chains, and bad graphs."""

import pytest

from stagediff.config import load_config
from stagediff.errors import StagediffError
from stagediff.stages import required_stores, resolve_stages, stage_edges


def test_standard_graph_order_parents_and_edges():
    cfg = load_config(None, ["stages.F.tokens=123"])
    stages = resolve_stages(cfg)
    names = [s.name for s in stages]
    assert names.index("S") < names.index("D") < names.index("F_via_D")
    assert names.index("M") < names.index("F_via_M")
    by = {s.name: s for s in stages}
    assert (by["D"].model, by["D"].data, by["D"].parent) == ("base", "finetune", "S")
    assert (by["M"].model, by["M"].data, by["M"].parent) == ("finetuned", "base", "S")
    assert by["F_via_D"].tokens == by["F_via_M"].tokens == 123  # `F` sets both
    assert by["S"].lr == cfg.sae.lr and by["D"].lr == pytest.approx(cfg.sae.lr * cfg.sae.finetune_lr_scale)
    assert set(stage_edges(stages)) == {("S", "D"), ("S", "M"), ("D", "F_via_D"), ("M", "F_via_M"), ("S", "F_via_D"), ("S", "F_via_M")}
    assert set(required_stores(stages)) == {"base__base", "base__finetune", "finetuned__base", "finetuned__finetune"}


def test_noise_control_stage_for_noise_selection():
    stages = {s.name: s for s in resolve_stages(load_config(None, ["diff.selection=noise"]))}
    noise = stages["S_noise"]
    assert (noise.model, noise.data, noise.parent) == ("base", "base", "S")
    assert noise.seed != stages["S"].seed and noise.tokens == stages["D"].tokens


def test_chain_of_checkpoints(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(
        "base_model: m0\nfinetuned_model: m2\nmodels: {ckpt1: m1}\n"
        "stages:\n"
        "  c0: {model: base, data: base, tokens: 100}\n"
        "  c1: {model: ckpt1, data: finetune, parent: c0, tokens: 50}\n"
        "  c2: {model: finetuned, data: finetune, parent: c1, tokens: 50}\n"
    )
    stages = resolve_stages(load_config(path))
    assert [s.name for s in stages] == ["c0", "c1", "c2"]  # custom names replace the standard graph
    assert stage_edges(stages) == [("c0", "c1"), ("c1", "c2"), ("c0", "c2")]


@pytest.mark.parametrize("overrides, message", [
    (["stages.X.tokens=5"], "not a standard stage"),
    (["stages.D.model=nope"], "not a model of the run"),
    (["stages.D.parent=Q"], "not a stage of the run"),
    (["stages.S.tokens=0"], "must be positive"),
    (["stages.S.parent=D"], "cycle"),
])
def test_bad_graphs_are_explained(overrides, message):
    with pytest.raises(StagediffError, match=message):
        resolve_stages(load_config(None, overrides))
