"""Training and fine-tuning on synthetic activations built from planted sparse features."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from stagediff.config import SAEConfig
from stagediff.errors import StagediffError
from stagediff.files import load_tensors
from stagediff.sae import SAE, weights_sha256
from stagediff.train import initial_sae, train_sae

D_IN, N_FEAT = 32, 48
CFG = SAEConfig(architecture="batchtopk", d_sae=96, k=6, lr=3e-3, batch_size=256, warmup_steps=10, dead_tokens=5000,
                checkpoint_every=10)
FT_CFG = dataclasses.replace(CFG, lr=6e-4)  # a fine-tune's rate


class TensorStore:
    """The ActivationStore API over an in-memory tensor: deterministic batches given (seed, step)."""

    def __init__(self, x: torch.Tensor, nan_at_step: int | None = None, fail_at_step: int | None = None):
        self.x, self.d_in = x, x.shape[1]
        self.nan_at_step, self.fail_at_step = nan_at_step, fail_at_step

    def mean_norm(self, max_rows: int = 100_000) -> float:
        return float(self.x[:max_rows].norm(dim=1).mean())

    def batches(self, batch_size, *, seed, start_step=0, device="cpu"):
        step = start_step
        while True:
            if step == self.fail_at_step:
                raise RuntimeError(f"injected interruption at step {step}")
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            batch = self.x[torch.randint(len(self.x), (batch_size,), generator=g)].clone()
            if step == self.nan_at_step:
                batch[0, 0] = float("nan")
            yield batch.to(device)
            step += 1


def planted(dirs: torch.Tensor, n: int = 20000, p: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Each row: a few planted unit directions with magnitudes in [5, 10], an offset, a little noise."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, len(dirs), generator=g) < p
    mags = 5 * (1 + torch.rand(n, len(dirs), generator=g))
    return (on * mags) @ dirs + 3.0 + 0.05 * torch.randn(n, dirs.shape[1], generator=g)


def directions(seed: int = 0) -> torch.Tensor:
    d = torch.randn(N_FEAT, D_IN, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matmuls are tiny: on a shared 2-core machine extra OpenMP threads only add sync cost (10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stage_s(tmp_path_factory):
    """Stage S: a BatchTopK dictionary trained from scratch on planted features (shared by several tests)."""
    dirs = directions()
    out = tmp_path_factory.mktemp("S")
    sae = train_sae(TensorStore(planted(dirs)), CFG, tokens=256 * 400, out_dir=out, stage="S",
                    metadata={"model_name": "synthetic", "hook_name": "blocks.0.hook_resid_post"})
    return sae, out, dirs


def test_root_stage_learns_planted_features(stage_s):
    sae, out, dirs = stage_s
    stats = json.loads((out / "stats.json").read_text())
    assert stats["explained_variance"] > 0.9 and stats["l0"] == pytest.approx(6.0)
    assert stats["steps"] == 400 and stats["tokens_per_second"] > 0
    x = planted(dirs, n=2000, seed=9)
    ev = 1 - ((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert ev > 0.9  # inference path (estimated threshold) on held-out rows
    assert 4 < (sae.encode(x) > 0).sum(-1).float().mean() < 8  # batchtopk inference L0 near k = 6
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)
    assert (sae.scale * x.norm(dim=1).mean()).item() == pytest.approx(D_IN**0.5, rel=0.05)
    # files: SAELens layout, log10 firing rates, a log, no checkpoint left
    assert not (out / "checkpoint").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 400 and {"mse", "explained_variance", "l0", "dead_fraction"} <= set(log[-1])
    sparsity = load_tensors(out / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (96,) and sparsity.max() <= 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["stage"] == "S" and cfg["metadata"]["tokens_seen"] == 256 * 400
    assert cfg["metadata"]["parent_stage"] is None and cfg["metadata"]["model_name"] == "synthetic"


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_other_architectures_train_with_unit_decoder_rows(tmp_path, arch):
    cfg = dataclasses.replace(CFG, architecture=arch, l1_coefficient=0.05, jumprelu_bandwidth=0.05,
                              jumprelu_init_threshold=0.1)
    sae = train_sae(TensorStore(planted(directions())), cfg, tokens=256 * 150, out_dir=tmp_path, stage="S")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)
    assert stats["explained_variance"] > 0.6, stats
    if arch == "topk":
        assert 5 < stats["l0"] <= 6
    assert SAE.load(tmp_path).architecture == arch


def test_extra_loss_is_added_to_every_step(tmp_path):
    """The seam for a variant's own loss (the crosscoder's L1): a penalty on b_dec pulls it toward 0."""
    x = planted(directions(), n=5000)
    kw = dict(tokens=256 * 60, stage="S", seed=1)
    plain = train_sae(TensorStore(x), CFG, out_dir=tmp_path / "plain", **kw)
    pulled = train_sae(TensorStore(x), CFG, out_dir=tmp_path / "pulled", extra_loss=lambda sae, x_s: 10 * sae.b_dec.pow(2).sum(),
                       **kw)
    # the same run but for the penalty: every coordinate of b_dec (~3, the data's offset) moved toward 0,
    # about as far as Adam's steps allow (60 steps of lr / scale ~ 0.01 in raw units)
    assert float(plain.b_dec.min()) > 1.5
    shift = plain.b_dec - pulled.b_dec  # 0 everywhere without the hook: same seed, same batches
    assert float(shift.min()) > 0.1 and float(shift.mean()) > 0.3


def test_finetune_starts_exactly_at_parent(stage_s):
    parent, out, dirs = stage_s
    loaded = SAE.load(out)
    for p in (parent, loaded):
        child = initial_sae(TensorStore(planted(dirs, seed=5)), CFG, parent=p, seed=3)
        assert child.scale == parent.scale
        assert child.state_dict().keys() == parent.state_dict().keys()
        for name, t in child.state_dict().items():
            assert torch.equal(t, parent.state_dict()[name]), name  # b_dec not re-initialised, threshold kept


def _cosines(a: SAE, b: SAE) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.W_dec, b.W_dec, dim=1)


def test_finetune_keeps_features_and_finds_the_moved_one(stage_s, tmp_path):
    parent, out, dirs = stage_s
    parent = SAE.load(out)  # as a later process would: from disk
    # move the planted feature that S learned most cleanly; `match` is the S feature carrying it
    best = (parent.W_dec @ dirs.T).max(0)
    j = best.values.argmax().item()
    match = best.indices[j].item()
    assert best.values[j] > 0.98
    live = load_tensors(out / "sparsity.safetensors")["sparsity"] > -4

    same = train_sae(TensorStore(planted(dirs, seed=1)), FT_CFG, tokens=256 * 150, out_dir=tmp_path / "D",
                     stage="D", parent=parent)
    cos_same = _cosines(parent, same)
    assert cos_same[live].min() > 0.95 and same.scale == parent.scale
    meta = json.loads((tmp_path / "D" / "cfg.json").read_text())["metadata"]
    assert meta["parent_stage"] == "S" and meta["parent_sha256"] == weights_sha256(out)
    assert meta["lr"] == meta["stagediff"]["sae"]["lr"] == 6e-4  # the rate is the config's: one source

    moved = dirs.clone()
    moved[j] = dirs[j] * 0.8 + 0.6 * torch.linalg.qr(torch.stack([dirs[j], torch.randn(D_IN, generator=torch.Generator().manual_seed(7))]).T)[0][:, 1]
    moved[j] /= moved[j].norm()
    shifted = train_sae(TensorStore(planted(moved, seed=1)), FT_CFG, tokens=256 * 150,
                        out_dir=tmp_path / "M", stage="M", parent=parent)
    cos_shift = _cosines(parent, shifted)
    cos_shift[~live] = 2.0
    assert cos_shift.argmin().item() == match  # the moved feature ranks first by rotation
    assert 1 - cos_shift[match] > 3 * (1 - cos_same[match])  # well above its drift on unchanged data


def test_resume_after_interruption_is_bit_identical(tmp_path, capsys):
    x = planted(directions(), n=5000)
    tokens = 256 * 45
    full = train_sae(TensorStore(x), CFG, tokens=tokens, out_dir=tmp_path / "full", stage="S", seed=4)
    with pytest.raises(RuntimeError, match="injected"):
        train_sae(TensorStore(x, fail_at_step=27), CFG, tokens=tokens, out_dir=tmp_path / "cut", stage="S",
                  seed=4)
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").exists() and not (tmp_path / "cut" / "cfg.json").exists()
    capsys.readouterr()
    resumed = train_sae(TensorStore(x), CFG, tokens=tokens, out_dir=tmp_path / "cut", stage="S", seed=4)
    assert "stage S resumes from its checkpoint at step 20 of 45" in capsys.readouterr().out  # announced
    for name, t in full.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    assert weights_sha256(tmp_path / "full") == weights_sha256(tmp_path / "cut")
    sp = [load_tensors(tmp_path / d / "sparsity.safetensors")["sparsity"] for d in ("full", "cut")]
    assert torch.equal(*sp)
    logs = [(tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("full", "cut")]
    assert [json.loads(a)["mse"] for a in logs[0]] == [json.loads(b)["mse"] for b in logs[1]]


def test_finished_stage_is_loaded_not_retrained(stage_s, capsys):
    sae, out, dirs = stage_s
    again = train_sae(TensorStore(planted(dirs), fail_at_step=0), CFG, tokens=256 * 400, out_dir=out, stage="S")
    assert f"stage S is already trained in {out}: loading it" in capsys.readouterr().out  # announced, not silent
    for name, t in sae.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name


def test_nan_stops_training_with_stage_and_step(tmp_path):
    store = TensorStore(planted(directions(), n=3000), nan_at_step=7)
    with pytest.raises(StagediffError, match=r"stage S:.*NaN/Inf at step 7"):
        train_sae(store, CFG, tokens=256 * 30, out_dir=tmp_path, stage="S")
    assert not (tmp_path / "cfg.json").exists() and not (tmp_path / "stats.json").exists()


def test_finetune_input_errors(stage_s, tmp_path):
    parent, _, dirs = stage_s
    store = TensorStore(planted(dirs, n=2000))
    with pytest.raises(StagediffError, match="differs from the parent's scale"):
        train_sae(store, CFG, tokens=256, out_dir=tmp_path / "a", stage="D", parent=parent, scale=1.0)
    with pytest.raises(StagediffError, match="architecture='batchtopk'.*sae.architecture='topk'"):
        train_sae(store, dataclasses.replace(CFG, architecture="topk"), tokens=256, out_dir=tmp_path / "b",
                  stage="D", parent=parent)
    with pytest.raises(StagediffError, match="width 16"):
        train_sae(TensorStore(torch.randn(500, 16)), CFG, tokens=256, out_dir=tmp_path / "c", stage="D",
                  parent=parent)


def test_root_stage_reads_its_data_once_and_starts_b_dec_at_step_0s_mean(tmp_path):
    """The b_dec sample is step 0's batch, taken from the stream training reads: the store's batches
    are opened once (a second opening re-reads and re-shuffles a whole shard group)."""
    opened = []

    class Counting(TensorStore):
        def batches(self, batch_size, *, seed, start_step=0, device="cpu"):
            opened.append(start_step)
            return super().batches(batch_size, seed=seed, start_step=start_step, device=device)

    store = Counting(planted(directions(), n=4000))
    cfg = dataclasses.replace(CFG, checkpoint_every=1000, lr=1e-3)
    train_sae(store, cfg, tokens=256 * 3, out_dir=tmp_path / "S", stage="S")
    assert opened == [0]
    init = initial_sae(TensorStore(store.x), cfg)  # reads step 0's batch on its own
    first = next(TensorStore(store.x).batches(cfg.batch_size, seed=0))
    assert torch.equal(init.b_dec, first.mean(0))
