"""The stage graph: the method's five stages, the control continuations, seeds, custom chains, and bad graphs."""

import pytest
import torch

from stagediff.activations import _Rows
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


def test_control_continuations_repeat_each_axis_edge_on_its_own_store():
    cfg = load_config(None, ["stages.F.steps=300", "sae.batch_size=256", "stages.F.lr=1e-4"])
    stages = {s.name: s for s in resolve_stages(cfg)}
    for start, real in (("D", "F_via_D"), ("M", "F_via_M")):
        ctl = [stages[f"{start}_ctl{j}"] for j in range(cfg.diff.controls)]
        assert len(ctl) == 3 and not any(f"{start}_ctl3" == n for n in stages)
        for c in ctl:  # the parent on its own model and data, with the real edge's budget and lr
            assert (c.model, c.data, c.parent, c.control_of) == (stages[start].model, stages[start].data, start, (start, real))
            assert c.tokens == stages[real].tokens == 300 * 256 and c.lr == 1e-4 and not c.aux_k
    assert stages["S"].aux_k and not stages["D"].aux_k  # aux-k only where a dictionary is trained from scratch
    assert not any(n.endswith("_ctl0") for e in stage_edges(list(stages.values())) for n in e)
    assert "S_ctl0" not in stages and len(stages) == 11
    assert len(resolve_stages(load_config(None, ["diff.controls=0"]))) == 5


class _RowIds(_Rows):
    """A store whose row r holds the number r, so a batch shows exactly which rows it drew."""

    def __init__(self, sizes: list[int]):
        self.sizes, self.d_in = sizes, 1

    def _load(self, i, lo=0, hi=None):
        start = sum(self.sizes[:i])
        return torch.arange(start, start + self.sizes[i], dtype=torch.float32)[lo:hi, None]


def test_two_stages_never_share_a_batch_order():
    """Every stage (controls included) draws its own data order: F_via_D and F_via_M read the same
    store, and shared batches would give both axes the same optimizer noise."""
    store = _RowIds([300, 200, 500])
    for seed in (0, 1):
        stages = resolve_stages(load_config(None, [f"seed={seed}"]))
        assert len({s.seed for s in stages}) == len(stages)
        orders = {}
        for s in stages:
            it = store.batches(100, seed=s.seed)
            orders[s.name] = torch.cat([next(it) for _ in range(3)]).flatten()
        names = list(orders)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                same = (orders[a] == orders[b]).float().mean().item()
                assert same < 0.05, (a, b, same)  # two independent shuffles of 1000 rows agree ~0.1% of the time
    # the seed of a stage depends on the run seed too
    assert {s.seed for s in resolve_stages(load_config(None, ["seed=0"]))}.isdisjoint(
        {s.seed for s in resolve_stages(load_config(None, ["seed=1"]))})


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
    (["stages.D.steps=-1"], "steps must be positive"),
])
def test_bad_graphs_are_explained(overrides, message):
    with pytest.raises(StagediffError, match=message):
        resolve_stages(load_config(None, overrides))
