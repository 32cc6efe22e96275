"""torchrun scale-out: two real CPU processes (gloo) must give what one process gives.

Run as a script under torchrun, this file is also the worker of the training test:
    torchrun --nproc_per_node=2 tests/test_distributed.py STORE OUT
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKER_ARCHS = {"topk": 4, "batchtopk": 4}  # architecture -> k
WORKER_BATCH, WORKER_STEPS = 255, 24  # odd batch: the two ranks get 127 and 128 rows


def worker_cfg(arch: str):
    from stagediff.config import SAEConfig

    return SAEConfig(architecture=arch, d_sae=96, k=WORKER_ARCHS[arch], lr=3e-3, batch_size=WORKER_BATCH, warmup_steps=4,
                     dead_tokens=1500, checkpoint_every=10, aux_k=16)


def train_all(store_dir: Path, out: Path) -> None:
    """Train one SAE per architecture on the store (the same call in one process and under torchrun)."""
    from stagediff.activations import ActivationStore
    from stagediff.train import train_sae

    store = ActivationStore(store_dir)
    for arch in WORKER_ARCHS:
        train_sae(store, worker_cfg(arch), tokens=WORKER_BATCH * WORKER_STEPS, out_dir=out / arch,
                  stage="S", seed=0)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STAGEDIFF_QUIET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, verses):
    """The same config run twice: harvest + train + diff in this process, and `torchrun -m stagediff run` on 2 ranks."""
    from stagediff.config import load_config
    from stagediff.pipeline import run_steps

    root = tmp_path_factory.mktemp("dist")
    for name, part in (("base", verses[:600]), ("finetune", verses[600:1200])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in part))
    raw = {
        "base_model": tiny_llama_dir, "finetuned_model": tiny_llama_dir,
        "base_data": {"path": str(root / "base.jsonl"), "format": "jsonl"},
        "finetune_data": {"path": str(root / "finetune.jsonl"), "format": "jsonl"},
        "hook": "blocks.2.hook_resid_post", "context_size": 32, "device": "cpu",
        "harvest": {"batch_size": 8, "shard_rows": 300},
        "sae": {"d_sae": 64, "k": 4, "lr": 2e-3, "batch_size": 256, "warmup_steps": 3, "checkpoint_every": 5},
        "stages": {"S": {"tokens": 3072}, "D": {"tokens": 1024}, "M": {"tokens": 1024}, "F": {"tokens": 1024}},
        "crosscoder": {"enabled": False}, "eval": {"enabled": False}, "report": {"enabled": False},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        run_steps(load_config(config), root / "one", ("harvest", "train", "diff"))
    finally:
        torch.set_num_threads(threads)
    r = _torchrun("-m", "stagediff", "run", str(config), "--out", str(root / "two"), cwd=root)
    return root, r


def _stores(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "activations").iterdir())


def test_parallel_harvest_writes_the_single_process_store(runs):
    from stagediff.activations import ActivationStore

    root, _ = runs
    assert _stores(root / "one") == _stores(root / "two") == ["base__base", "base__finetune", "finetuned__base", "finetuned__finetune"]
    for name in _stores(root / "one"):
        a, b = ActivationStore(root / "one" / "activations" / name), ActivationStore(root / "two" / "activations" / name)
        assert len(a.sizes) >= 3  # several shards, so both ranks wrote some
        # the same shard files, in the same order, with the same rows
        assert [(s["file"], s["rows"]) for s in a.manifest["shards"]] == [(s["file"], s["rows"]) for s in b.manifest["shards"]]
        assert all(torch.equal(x, y) for x, y in zip(a.row_index(), b.row_index()))
        # bit-identical: each rank forwards the same batches a single process would
        assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]
        assert not list(b.path.glob("manifest.rank*.json"))  # merged and removed
        b.verify()


def test_parallel_run_trains_every_stage_like_one_process(runs):
    from stagediff.sae import SAE

    root, r = runs
    assert r.stdout.count("done:") == 1  # rank 0 alone reports (and ran diff)
    for stage in ("S", "D", "M", "F_via_D", "F_via_M"):
        one, two = (SAE.load(root / run / "saes" / stage) for run in ("one", "two"))
        for name, t in one.saelens_tensors().items():
            torch.testing.assert_close(two.saelens_tensors()[name], t, rtol=1e-5, atol=1e-6, msg=f"{stage} {name}")
        log = (root / "two" / "saes" / stage / "train_log.jsonl").read_text().splitlines()
        assert len(log) == len((root / "one" / "saes" / stage / "train_log.jsonl").read_text().splitlines())
    with open(root / "two" / "diff" / "features.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 64


def test_ddp_training_matches_one_process_with_the_same_global_batch(runs, tmp_path):
    """topk and batchtopk (global k*B selection) on an uneven 127/128 split: tight agreement."""
    from stagediff.sae import SAE

    root, _ = runs
    store = root / "one" / "activations" / "base__base"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_all(store, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    _torchrun(str(Path(__file__).resolve()), str(store), str(tmp_path / "two"), cwd=tmp_path)
    for arch in WORKER_ARCHS:
        one, two = SAE.load(tmp_path / "one" / arch), SAE.load(tmp_path / "two" / arch)
        for name, t in one.saelens_tensors().items():
            torch.testing.assert_close(two.saelens_tensors()[name], t, rtol=1e-5, atol=1e-6, msg=f"{arch} {name}")
        s1, s2 = (json.loads((tmp_path / run / arch / "stats.json").read_text()) for run in ("one", "two"))
        for key in ("mse", "explained_variance", "l0", "dead_fraction"):
            assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-6), (arch, key)
        assert s2["l0"] == pytest.approx(WORKER_ARCHS[arch], rel=0.05)  # k per token of the global batch


def test_single_process_is_a_no_op(monkeypatch):
    from stagediff import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.local_rows(255) == slice(0, 255)
    distributed.barrier()


if __name__ == "__main__":  # the torchrun worker
    from stagediff import distributed

    distributed.init()
    try:
        train_all(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        distributed.finish()
