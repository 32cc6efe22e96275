"""Shared fixtures: tiny real transformers models (built from a config) and real text."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see stagediff/__init__.py)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("STAGEDIFF_QUIET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def verses() -> tuple[str, ...]:
    from stagediff.organism.corpus import bible_verses

    return bible_verses()


@pytest.fixture(scope="session")
def tokenizer(verses):
    from stagediff.organism.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(verses[:4000], vocab_size=512)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> str:
    """A 4-layer, width-64 LlamaForCausalLM with random weights, saved in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _save(LlamaForCausalLM(cfg).eval(), tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> str:
    """A 3-layer, width-48 GPT2LMHeadModel with random weights, saved in HF format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=48, n_layer=3, n_head=4, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return _save(GPT2LMHeadModel(cfg).eval(), tokenizer, tmp_path_factory.mktemp("gpt2"))
