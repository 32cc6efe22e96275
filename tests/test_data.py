"""data.py: readers for every format, window packing, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from stagediff.config import DataConfig
from stagediff.data import WindowsFile, data_fingerprint, iter_windows, pack_windows, read_texts, write_windows
from stagediff.errors import StagediffError


def test_text_file_documents_are_separated_by_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\nstill first\n\n\nsecond doc\n\nthird\n")
    assert list(read_texts(DataConfig(path=str(f)))) == ["first line\nstill first", "second doc", "third"]
    (tmp_path / "b.txt").write_text("fourth")
    (tmp_path / "skip.md").write_text("not text")
    assert list(read_texts(DataConfig(path=str(tmp_path)))) == ["first line\nstill first", "second doc", "third", "fourth"]


def test_jsonl_reader_and_missing_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c d", "e"])) + "\n\n")
    assert list(read_texts(DataConfig(path=str(f)))) == ["a b", "c d", "e"]
    with pytest.raises(StagediffError, match=r"no field 'body' \(available: text, id\)"):
        list(read_texts(DataConfig(path=str(f), field="body")))


def test_parquet_reader_and_missing_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x y", None, "z"], "n": [1, 2, 3]}), f)
    assert list(read_texts(DataConfig(path=str(f), field="content"))) == ["x y", "z"]
    with pytest.raises(StagediffError, match=r"no column 'text' \(available: content, n\)"):
        list(read_texts(DataConfig(path=str(f))))


def test_bad_inputs(tmp_path):
    with pytest.raises(StagediffError, match="does not exist"):
        list(read_texts(DataConfig(path=str(tmp_path / "missing.txt"))))
    with pytest.raises(StagediffError, match="unknown"):
        list(read_texts(DataConfig(path=str(tmp_path), format="csv")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(StagediffError, match="set format"):
        list(read_texts(DataConfig(path=str(tmp_path / "x.csv"))))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(StagediffError, match="holds no text"):
        list(read_texts(DataConfig(path=str(tmp_path / "empty.txt"))))


def test_pack_windows_masks_bos_and_padding(tokenizer, verses):
    texts = list(verses[:20])
    w = pack_windows(texts, tokenizer, context_size=32)
    assert w.ids.dtype == torch.long and w.mask.dtype == torch.bool and w.ids.shape[1] == 32
    assert (w.ids[:, 0] == tokenizer.bos_token_id).all() and not w.mask[:, 0].any()
    # the stream is the documents joined by EOS, in order, with nothing lost
    stream = w.ids[w.mask].tolist()
    expected = []
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        expected += ([tokenizer.eos_token_id] if i else []) + ids
    assert stream == expected and w.num_tokens == len(expected)
    # only the last window is padded, on the right, and padding is masked
    assert w.mask[:-1, 1:].all()
    tail = int(w.mask[-1].sum())
    assert 0 < tail < 31 and (w.ids[-1, 1 + tail:] == tokenizer.pad_token_id).all() and not w.mask[-1, 1 + tail:].any()
    again = pack_windows(texts, tokenizer, context_size=32)
    assert torch.equal(again.ids, w.ids) and torch.equal(again.mask, w.mask)
    no_bos = pack_windows(texts, tokenizer, context_size=32, prepend_bos=False)
    assert no_bos.mask[:-1].all() and no_bos.ids[no_bos.mask].tolist() == expected


def test_pack_windows_stops_reading_at_max_windows(tokenizer, verses):
    read = [0]

    def texts():
        for v in verses:
            read[0] += 1
            yield v

    w = pack_windows(texts(), tokenizer, context_size=64, max_windows=5, batch_docs=16)
    assert w.ids.shape == (5, 64) and w.mask[:, 1:].all()
    assert read[0] <= 64  # a few batches of 16 verses, not the whole Bible


def test_windows_streamed_to_disk_equal_windows_in_memory(tokenizer, verses, tmp_path):
    from safetensors.torch import load_file

    texts = list(verses[:200])
    mem = pack_windows(texts, tokenizer, context_size=32)
    assert mem.mask[-1].sum() < 31  # a padded tail, so the last chunk is covered
    disk = write_windows(iter_windows(texts, tokenizer, 32, batch_docs=16), tmp_path / "w.safetensors")
    assert (len(disk), disk.context_size, disk.num_tokens) == (len(mem), 32, mem.num_tokens)
    assert disk.digest() == mem.digest()
    assert torch.equal(disk.row_counts(chunk=7), mem.row_counts())
    for lo, hi in ((0, 5), (13, 40), (len(mem) - 3, len(mem) + 10)):
        ids, mask = disk.batch(lo, hi)
        assert torch.equal(ids, mem.ids[lo:hi]) and torch.equal(mask, mem.mask[lo:hi])
    plain = load_file(str(tmp_path / "w.safetensors"))  # a valid safetensors file for any reader
    assert torch.equal(plain["ids"], mem.ids) and torch.equal(plain["mask"], mem.mask)
    # a copy (hard link) reads the same; windows saved from memory read as a WindowsFile too
    disk.save(tmp_path / "copy.safetensors")
    mem.save(tmp_path / "mem.safetensors")
    for f in ("copy.safetensors", "mem.safetensors"):
        again = WindowsFile(tmp_path / f)
        assert again.digest() == mem.digest() and torch.equal(again.batch(0, len(again))[0], mem.ids)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(StagediffError, match="bad.safetensors is missing or corrupt.*rerun harvest"):
        WindowsFile(tmp_path / "bad.safetensors")


def test_pack_windows_too_little_data(tokenizer):
    with pytest.raises(StagediffError, match=r"holds \d+ tokens, less than one window of 127.*lower context_size"):
        pack_windows(["a short text"], tokenizer, context_size=128)


def test_data_fingerprint(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\n\ntwo")
    fp = data_fingerprint(DataConfig(path=str(f)))
    assert fp == data_fingerprint(DataConfig(path=str(f)))
    assert fp != data_fingerprint(DataConfig(path=str(f), field="other"))
    f.write_text("one\n\nthree")
    assert fp != data_fingerprint(DataConfig(path=str(f)))


def test_hf_format_needs_datasets_or_loads_from_disk(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "saved"), format="hf")
    try:
        import datasets
    except ImportError:
        with pytest.raises(StagediffError, match="pip install datasets"):
            list(read_texts(cfg))
        return
    datasets.Dataset.from_dict({"text": ["a b", "c"]}).save_to_disk(cfg.path)
    assert list(read_texts(DataConfig(path=cfg.path))) == ["a b", "c"]  # auto-detected as hf


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}")


def _chat_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE  # what a chat model's tokenizer_config.json carries
    return tok


def test_chat_jsonl_is_rendered_with_the_chat_template(tmp_path, tokenizer):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "who begat Enos"}, {"role": "assistant", "content": "Seth"}]},
            {"messages": [{"role": "user", "content": "and Enos"}, {"role": "assistant", "content": "Cainan"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(f), field="messages", chat_template=True)
    texts = list(read_texts(cfg, _chat_tokenizer(tokenizer)))
    # BOS is dropped (each window starts with its own), every turn is marked, EOS between turns
    assert texts == ["<|user|>who begat Enos</s><|assistant|>Seth</s>", "<|user|>and Enos</s><|assistant|>Cainan</s>"]
    with pytest.raises(StagediffError, match=r"field 'messages' holds a list.*set chat_template: true"):
        list(read_texts(DataConfig(path=str(f), field="messages"), tokenizer))  # was silently str()-ed before
    with pytest.raises(StagediffError, match="tokenizer has no chat template"):
        list(read_texts(cfg, tokenizer))
    with pytest.raises(StagediffError, match="needs the model's tokenizer"):
        list(read_texts(cfg))
    f.write_text(json.dumps({"messages": "plain"}) + "\n")
    with pytest.raises(StagediffError, match="not chat messages"):
        list(read_texts(cfg, _chat_tokenizer(tokenizer)))
    n = tmp_path / "num.jsonl"
    n.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(StagediffError, match=r"field 'text' holds a int.*set field to a column of text"):
        list(read_texts(DataConfig(path=str(n))))


def test_local_hf_dataset_folder_with_configs_files_and_streaming(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    repo = tmp_path / "repo"  # a dataset repository as on the hub: data files and a card naming its configs
    for config, words in (("small", ["in the beginning", "was the word"]), ("large", ["and the word", "was with God", "amen"])):
        (repo / config).mkdir(parents=True)
        (repo / config / "part-0.jsonl").write_text("".join(json.dumps({"body": w, "n": i}) + "\n" for i, w in enumerate(words)))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: small/*.jsonl\n"
                                    "- config_name: large\n  data_files: large/*.jsonl\n---\n")
    base = dict(path=str(repo), format="hf", field="body")
    assert list(read_texts(DataConfig(**base, name="small"))) == ["in the beginning", "was the word"]
    assert list(read_texts(DataConfig(**base, name="large", streaming=True))) == ["and the word", "was with God", "amen"]
    assert list(read_texts(DataConfig(**base, data_files=["large/*.jsonl"]))) == ["and the word", "was with God", "amen"]
    with pytest.raises(StagediffError, match=r"could not load dataset .*\(nope\).*check path, name"):
        list(read_texts(DataConfig(**base, name="nope")))
    with pytest.raises(StagediffError, match=r"no column 'text' \(available: body, n\)"):
        list(read_texts(DataConfig(path=str(repo), format="hf", name="small")))
    fps = {data_fingerprint(DataConfig(**base, name=n)) for n in ("small", "large")}
    assert len(fps) == 2  # the config name is part of what was read
    # chat rows in a saved HF dataset, rendered through the template
    import datasets

    saved = tmp_path / "chat"
    datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "peace"}]]}).save_to_disk(saved)
    assert list(read_texts(DataConfig(path=str(saved), field="messages", chat_template=True), _chat_tokenizer(tokenizer))) == \
        ["<|user|>hi</s><|assistant|>peace</s>"]
