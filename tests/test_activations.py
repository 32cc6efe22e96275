"""activations.py: harvesting two real models into aligned stores, resuming, checksums, batches."""

from __future__ import annotations

import json

import pytest
import torch

from stagediff.activations import ActivationStore, PairedStore, harvest, write_store
from stagediff.data import pack_windows
from stagediff.errors import StagediffError
from stagediff.models import decoder_layers, load_model, residual

CPU = torch.device("cpu")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_gpt2_dir):
    return {"base": load_model(tiny_llama_dir, device=CPU, dtype=torch.float32)[0],
            "finetuned": load_model(tiny_gpt2_dir, device=CPU, dtype=torch.float32)[0]}


@pytest.fixture(scope="module")
def windows(tokenizer, verses):
    return pack_windows(verses[:60], tokenizer, context_size=32)  # ~3k tokens, last window padded


def _harvest(models, windows, root, shard_rows=300, dtype=torch.float32):
    dirs = {k: root / k for k in models}
    meta = {k: {"model": k, "fingerprint": "abc"} for k in models}
    return harvest(models, windows, HOOK, dirs, batch_size=8, shard_rows=shard_rows, dtype=dtype, meta=meta)


@pytest.fixture(scope="module")
def stores(models, windows, tmp_path_factory):
    return _harvest(models, windows, tmp_path_factory.mktemp("stores"))


def test_rows_are_aligned_and_equal_direct_residual(stores, models, windows):
    assert windows.mask[-1].sum() < 31  # the padded tail is covered too
    for key, store in stores.items():
        direct = residual(models[key], windows.ids, None, HOOK)[windows.mask]
        assert store.num_rows == windows.num_tokens == len(direct)
        assert store.d_in == direct.shape[1]
        torch.testing.assert_close(store.read(0, store.num_rows), direct, rtol=0, atol=1e-5)
        win, pos = store.row_index()
        where = windows.mask.nonzero()
        assert torch.equal(win, where[:, 0]) and torch.equal(pos.long(), where[:, 1])
        assert torch.equal(store.windows().ids, windows.ids) and torch.equal(store.windows().mask, windows.mask)
        m = store.manifest
        assert m["complete"] and m["hook"] == HOOK and m["meta"]["model"] == key and m["num_rows"] == store.num_rows
        assert [s["file"] for s in m["shards"]][:2] == ["shard_00000.safetensors", "shard_00001.safetensors"]
        assert all(s["rows"] == 300 for s in m["shards"][:-1])
        store.verify()
    # read() across a shard boundary
    s = stores["base"]
    torch.testing.assert_close(s.read(250, 650), s.read(0, s.num_rows)[250:650])


def test_write_store_from_rows_writes_what_harvest_writes(stores, windows, tmp_path):
    """Rows you already have, written with their windows, make the same store byte for byte (manifest, shards)."""
    s = stores["base"]
    win, pos = s.row_index()
    again = write_store(tmp_path / "base", s.read(0, s.num_rows), window=win, position=pos, windows=windows, hook=HOOK,
                        shard_rows=300, dtype=torch.float32, meta=s.manifest["meta"])
    assert again.manifest == s.manifest
    again.verify()


def test_write_store_defaults_pair_up_row_by_row(tmp_path):
    """Without windows: placeholder windows from (window, position), so two stores of one layout form a PairedStore."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 6, generator=g), torch.randn(1000, 4, generator=g)
    pos = torch.arange(1000) % 7 + 1
    win = torch.arange(1000) // 7
    sa = write_store(tmp_path / "a", a, window=win, position=pos, shard_rows=128)
    sb = write_store(tmp_path / "b", b.half(), window=win, position=pos, shard_rows=128)
    assert sa.num_rows == 1000 and len(sa.sizes) == 8 and sb.manifest["dtype"] == "float16"
    torch.testing.assert_close(sa.read(100, 300), a[100:300], rtol=0, atol=0)
    w, p = sa.row_index()
    assert torch.equal(w, win) and torch.equal(p.long(), pos)
    pair = PairedStore(sa, sb)
    torch.testing.assert_close(pair.read(0, 1000), torch.cat([a, b.half().float()], 1), rtol=0, atol=0)
    with pytest.raises(StagediffError, match="not aligned"):
        PairedStore(sa, write_store(tmp_path / "c", b, shard_rows=128))  # one window per row: another layout
    with pytest.raises(StagediffError, match="rows"):
        write_store(tmp_path / "d", a, window=win[:10])


def test_harvest_from_windows_on_disk_writes_the_same_store(stores, models, windows, tokenizer, verses, tmp_path):
    from stagediff.data import iter_windows, write_windows

    on_disk = write_windows(iter_windows(verses[:60], tokenizer, 32), tmp_path / "windows.safetensors")
    again = _harvest(models, on_disk, tmp_path / "stores")
    for key, store in stores.items():
        assert again[key].manifest["shards"] == store.manifest["shards"]  # same bytes: the sha256 of every shard
        assert again[key].manifest["windows_sha256"] == store.manifest["windows_sha256"]
        assert torch.equal(again[key].windows().ids, windows.ids)


def test_complete_store_is_reused_without_running(stores, models, windows):
    root = stores["base"].path.parent
    calls = [0]
    handles = [m.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for m in models.values()]
    try:
        again = _harvest(models, windows, root)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]
    assert again["base"].manifest == stores["base"].manifest


def test_interrupted_harvest_resumes_to_identical_shards(stores, models, windows, tmp_path):
    layer = decoder_layers(models["finetuned"])[0]
    calls = [0]

    def boom(*args):
        calls[0] += 1
        if calls[0] == 7:  # after two shards of 300 rows (8 windows of ~31 rows per batch)
            raise RuntimeError("injected crash")

    handle = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected crash"):
            _harvest(models, windows, tmp_path)
    finally:
        handle.remove()
    partial = json.loads((tmp_path / "finetuned" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) >= 1
    with pytest.raises(StagediffError, match="incomplete"):
        ActivationStore(tmp_path / "finetuned")

    counted = [0]
    handle = layer.register_forward_pre_hook(lambda *a: counted.__setitem__(0, counted[0] + 1))
    try:
        resumed = _harvest(models, windows, tmp_path)
    finally:
        handle.remove()
    n_batches = -(-len(windows) // 8)
    assert counted[0] < n_batches  # the stored shards were not recomputed
    for key in models:
        assert resumed[key].manifest["shards"] == stores[key].manifest["shards"]  # same files, same sha256


def test_nan_activations_are_reported(models, windows, tmp_path):
    model = models["base"]
    layer = decoder_layers(model)[0]
    handle = layer.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(StagediffError, match=r"model base .*NaN/Inf .*blocks\.1\.hook_resid_post in window 0"):
            harvest({"base": model}, windows, HOOK, {"base": tmp_path}, batch_size=8, shard_rows=300,
                    dtype=torch.float32, meta={})
    finally:
        handle.remove()


def test_corrupt_shard_is_detected(models, windows, tmp_path):
    store = _harvest({"base": models["base"]}, windows, tmp_path, dtype=torch.float16)["base"]
    assert store.manifest["dtype"] == "float16" and store.read(0, 4).dtype == torch.float32
    shard = tmp_path / "base" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StagediffError, match=r"shard_00001.*delete the store folder .*rerun harvest"):
        store.verify()
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(StagediffError, match=r"shard_00001.*corrupt or truncated"):
        store.read(0, store.num_rows)


def test_batches_are_deterministic_resumable_and_cover_each_epoch(stores):
    store = stores["base"]
    n = store.num_rows
    it = store.batches(64, seed=3, buffer_rows=600)  # groups of two 300-row shards
    first = [next(it) for _ in range(2 * n // 64 + 3)]
    assert all(b.shape == (64, store.d_in) and b.dtype == torch.float32 for b in first)
    again = store.batches(64, seed=3, buffer_rows=600)
    assert all(torch.equal(a, next(again)) for a in first)
    resumed = store.batches(64, seed=3, start_step=7, buffer_rows=600)
    assert all(torch.equal(a, next(resumed)) for a in first[7:])
    other = next(store.batches(64, seed=4, buffer_rows=600))
    assert not torch.equal(other, first[0])
    # one epoch is a permutation of all rows: same multiset of row sums, not in store order
    epoch = torch.cat(first)[:n]
    rows = store.read(0, n)
    assert torch.equal(epoch.sum(1).sort().values, rows.sum(1).sort().values)
    assert not torch.equal(epoch, rows)


def test_mean_norm(stores):
    store = stores["base"]
    full = store.read(0, store.num_rows).norm(dim=1).mean().item()
    assert store.mean_norm() == pytest.approx(full, rel=1e-5)
    assert store.mean_norm(max_rows=400) == pytest.approx(full, rel=0.2)


def test_paired_store(stores, models, windows, tmp_path, tokenizer, verses):
    pair = PairedStore(stores["base"], stores["finetuned"])
    assert pair.d_in == 64 + 48 and pair.num_rows == stores["base"].num_rows
    rows = pair.read(0, pair.num_rows)
    torch.testing.assert_close(rows, torch.cat([stores["base"].read(0, pair.num_rows),
                                                stores["finetuned"].read(0, pair.num_rows)], 1))
    b = next(pair.batches(32, seed=0))
    assert b.shape == (32, 112)
    # every paired batch row is a real aligned row
    assert all(torch.isclose(rows, r).all(1).any() for r in b)
    other_windows = pack_windows(verses[60:120], tokenizer, context_size=32)
    other = _harvest({"base": models["base"]}, other_windows, tmp_path)["base"]
    with pytest.raises(StagediffError, match="not aligned"):
        PairedStore(stores["base"], other)


def test_missing_store(tmp_path):
    with pytest.raises(StagediffError, match="run harvest first"):
        ActivationStore(tmp_path)


def test_float16_overflow_is_reported(models, windows, tmp_path):
    model = models["base"]
    handle = decoder_layers(model)[1].register_forward_hook(lambda m, a, out: out * 1e6)
    try:
        with pytest.raises(StagediffError, match=r"model base.*overflow the storage dtype torch.float16.*bfloat16"):
            harvest({"base": model}, windows, HOOK, {"base": tmp_path}, batch_size=8, shard_rows=300,
                    dtype=torch.float16, meta={})
    finally:
        handle.remove()
