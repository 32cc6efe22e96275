"""Before a harvest: the disk estimate and check; bfloat16 stores that training reads; bad data named early."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch

from stagediff.config import load_config
from stagediff.errors import StagediffError
from stagediff.pipeline import Run, step_harvest

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def cfg_of(tmp_path, tiny_llama_dir, verses):
    text = tmp_path / "verses.txt"
    text.write_text("\n\n".join(verses[:600]))

    def make(*overrides):
        return load_config(None, [f"base_model={tiny_llama_dir}", f"finetuned_model={tiny_llama_dir}", f"hook={HOOK}",
                                  f"base_data.path={text}", f"finetune_data.path={text}", "context_size=32",
                                  "stages.S.tokens=1500", "stages.D.tokens=300", "stages.M.tokens=300",
                                  "stages.F.tokens=300", "diff.controls=0", "harvest.shard_rows=1000", *overrides])
    return make


def test_disk_estimate_matches_the_stores_and_a_full_disk_stops_first(cfg_of, tmp_path, monkeypatch, capsys):
    import stagediff.pipeline as pipeline

    run_dir = tmp_path / "run"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 20_000, 20_000))  # a full disk
    with pytest.raises(StagediffError, match=r"needs about [\d.]+ MB under .* has 0\.0 MB free: free space.*harvest.dtype=bfloat16"):
        step_harvest(Run(cfg_of(), run_dir))
    assert not list(run_dir.glob("activations/*/shard_*"))  # nothing harvested
    monkeypatch.undo()
    capsys.readouterr()
    step_harvest(Run(cfg_of(), run_dir))
    out = capsys.readouterr().out
    estimate = {line.split(":")[1].strip(): int(line.split(" rows")[0].rsplit(" ", 1)[1].replace(",", ""))
                for line in out.splitlines() if line.startswith("harvest: ") and " rows x 64 x 4 bytes (float32)" in line}
    assert set(estimate) == {"base__base", "base__finetune", "finetuned__base", "finetuned__finetune"}
    for name, rows in estimate.items():
        manifest = json.loads((run_dir / "activations" / name / "manifest.json").read_text())
        stored = sum(s["rows"] for s in manifest["shards"])
        assert rows - 31 <= stored <= rows  # the estimate counts full windows; the last may be padded
        assert manifest["dtype"] == "float32"  # on CPU, `auto` stores float32


def test_bfloat16_store_is_read_by_training(cfg_of, tmp_path):
    from stagediff.activations import ActivationStore
    from stagediff.config import SAEConfig
    from stagediff.train import train_sae

    step_harvest(Run(cfg_of("harvest.store_dtype=bfloat16"), tmp_path / "run"))
    store = ActivationStore(tmp_path / "run" / "activations" / "base__base")
    assert store.manifest["dtype"] == "bfloat16"
    batch = next(store.batches(64, seed=0))
    assert batch.dtype == torch.float32 and batch.shape == (64, 64) and batch.abs().sum() > 0
    sae = train_sae(store, SAEConfig(d_sae=128, k=4, lr=1e-3, batch_size=128, warmup_steps=2), tokens=1280,
                    out_dir=tmp_path / "S", stage="S")
    assert torch.isfinite(sae.W_dec).all()


def test_chat_messages_without_chat_template_stop_before_the_harvest(cfg_of, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cfg = cfg_of(f"finetune_data.path={chat}", "finetune_data.field=messages")
    with pytest.raises(StagediffError, match="set chat_template: true"):
        step_harvest(Run(cfg, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("activations/*/shard_*"))


def test_expansion_factor_sizes_the_dictionary_from_the_model_width(cfg_of, tmp_path):
    from stagediff.pipeline import apply_expansion_factor

    run = Run(cfg_of("expansion_factor=3"), tmp_path / "run")  # SAELens's name, read as sae.expansion_factor
    apply_expansion_factor(run)
    assert run.cfg.sae.d_sae == 4096  # width unknown before a harvest: unchanged
    (run.dir / "activations" / "base__base").mkdir(parents=True)
    (run.dir / "activations" / "base__base" / "manifest.json").write_text(json.dumps({"d_in": 64}))
    apply_expansion_factor(run)
    assert run.cfg.sae.d_sae == 192
