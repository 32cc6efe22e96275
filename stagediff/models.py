"""Causal LMs: loading (HF dirs, hub ids, GGUF), hook names, the residual stream at a hook.

Hook names follow TransformerLens: `blocks.L.hook_resid_pre` is the residual
stream entering decoder layer L, `blocks.L.hook_resid_post` the stream leaving
it (so resid_post of L == resid_pre of L+1). Both are the *raw* residual
stream, never the final-norm output.

We hook the decoder layers with plain PyTorch forward hooks, which works for
every HF causal LM (Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, ...) without
a model zoo of wrappers. To read a hook we raise an exception right after the
hooked layer: later layers and the LM head never run, so a mid-layer hook costs
about half a full forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagediff.errors import StagediffError
from stagediff.files import sha256_file
from stagediff.runtime import cache_dir

SITES = ("hook_resid_pre", "hook_resid_post")
_HOOK = re.compile(r"^blocks\.(\d+)\.(\w+)$")


# ---------------------------------------------------------------- loading


def load_model(path: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    `path` is an HF model folder, a hub id already in the local HF cache (we
    never download), or a `.gguf` file. A GGUF file is de-quantized once
    (~20 s for a 135M model) and cached as safetensors under
    `$STAGEDIFF_CACHE/models/<name>-<sha256 prefix>/`; later loads read that
    folder (~1 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(path)
    if folder.is_file() and folder.suffix == ".gguf":
        folder = _convert_gguf(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not recognize this architecture" in str(e):
            raise StagediffError(f"model {path} is not a causal language model ({e}): pass a *ForCausalLM checkpoint") from None
        raise StagediffError(f"could not load model {path} ({e}): pass an HF model folder (config.json, weights "
                             "and tokenizer files), a hub id or a .gguf file") from None
    except Exception as e:  # corrupt safetensors, missing weight files, bad config...
        raise StagediffError(f"could not read the weights of model {path} ({type(e).__name__}: {e}): "
                             "check the files are complete (re-download or re-save the model)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise StagediffError(f"could not load the tokenizer of model {path} ({type(e).__name__}: {e}): "
                             "the model folder needs its tokenizer files (tokenizer.json / tokenizer_config.json)") from None
    model = model.to(device).eval()
    model.requires_grad_(False)
    # On CPU transformers leaves safetensors weights memory-mapped. The embedding table is the one
    # weight a forward reads by data: its rows would page in as new token ids turn up, and a
    # process's footprint would climb with the tokens it has seen (up to vocab x d_model, 113 MB
    # for SmolLM2). Read it once, so a short trial run shows the footprint of a long one.
    table = getattr(model.get_input_embeddings(), "weight", None)
    if isinstance(table, torch.Tensor) and table.device.type == "cpu":
        table.sum()
    return model, tokenizer


def resolve_model_dir(path: str) -> Path:
    """A local folder or .gguf file for `path`; hub ids are looked up in the local HF cache only."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception:
            raise StagediffError(f"model {path} is neither a local path nor in the Hugging Face cache: "
                                 f"download it first (`hf download {path}`) or pass a local folder") from None
    raise StagediffError(f"model path {path} does not exist: pass an HF model folder, a hub id or a .gguf file")


def _convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file into a safetensors HF folder in the cache, once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = f"{gguf.stem}-{sha256_file(gguf)[:16]}"  # content-keyed: a changed file gets a new folder
    final = cache_dir() / "models" / key
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:
            raise StagediffError(f"could not read GGUF file {gguf} ({type(e).__name__}: {e}): "
                                 "check the file is complete and that `gguf` and `accelerate` are installed") from None
        # The tensors are de-quantized floats already; the gguf "quantizer" marker only
        # blocks save_pretrained, so drop it and save a plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, final)  # atomic: the folder appears complete or not at all
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def model_fingerprint(path: str) -> str:
    """A cheap, stable fingerprint of a model's files (no full hash of GBs of weights).

    Hashes config.json, the weight files' names and sizes, each safetensors
    header, and 16 small chunks sampled through each weight file (headers
    alone are identical for a base model and its fine-tune).
    """
    p = resolve_model_dir(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    if p.is_dir() and (p / "config.json").exists():
        h.update((p / "config.json").read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors" and size >= 8:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(min(n, size - 8)))
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- hooks


def parse_hook(hook: str) -> tuple[int, str]:
    """`blocks.L.hook_resid_pre|hook_resid_post` -> (L, site)."""
    m = _HOOK.match(hook.strip())
    if not m:
        raise StagediffError(f"hook {hook!r} is not of the form blocks.L.<site>: use e.g. blocks.6.hook_resid_post "
                             f"(sites: {', '.join(SITES)})")
    layer, site = int(m.group(1)), m.group(2)
    if site not in SITES:
        raise StagediffError(f"hook {hook!r} has unknown site {site!r}: valid sites are {', '.join(SITES)}")
    return layer, site


def num_layers(model) -> int:
    """Number of decoder layers, from the (text) config."""
    return _config_layers(model.config, type(model).__name__)


def count_layers(path: str, trust_remote_code: bool = False) -> int:
    """Number of decoder layers of the model at `path`, from its config alone (no weights read)."""
    from transformers import AutoConfig

    folder = resolve_model_dir(path)
    if folder.is_file() and folder.suffix == ".gguf":
        folder = _convert_gguf(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise StagediffError(f"could not read the config of model {path} ({type(e).__name__}: {e}): "
                             "pass an HF model folder with its config.json") from None
    return _config_layers(config, path)


def _config_layers(config, name: str) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        raise StagediffError(f"model {name} has no num_hidden_layers / n_layer in its config")
    return int(n)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers: the first (shallowest) ModuleList of length num_layers.

    Searched in the text decoder first (`get_decoder()`), so a vision tower of a
    multimodal model with as many layers is never picked.
    """
    n = num_layers(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for root in (decoder, model):
        if isinstance(root, torch.nn.Module):
            for _, module in root.named_modules():
                if isinstance(module, torch.nn.ModuleList) and len(module) == n:
                    return module
    raise StagediffError(f"could not find the {n} decoder layers of {type(model).__name__}: "
                         "stagediff needs a ModuleList of decoder layers (standard HF causal LMs have one)")


def check_hook(model, hook: str, name: str) -> None:
    """Raise if `hook` is malformed or its layer does not exist in `model` (named `name` in the message)."""
    layer, _ = parse_hook(hook)
    n = num_layers(model)
    if layer >= n:
        raise StagediffError(f"hook {hook!r}: layer {layer} is out of range for {name} ({n} layers): use a layer in 0..{n - 1}")


def check_compatible(named: dict) -> None:
    """Raise unless every (model, tokenizer) in `named` shares architecture, width and vocabulary."""
    items = list(named.items())
    (ref, (ref_model, ref_tok)) = items[0]
    for name, (model, tok) in items[1:]:
        arch_a, arch_b = _arch(ref_model), _arch(model)
        if arch_a != arch_b:
            raise StagediffError(f"models {ref} and {name} differ in architecture ({arch_a} vs {arch_b}): "
                                 "stage-wise diffing needs two checkpoints of the same model")
        d_a, d_b = hidden_size(ref_model), hidden_size(model)
        if d_a != d_b:
            raise StagediffError(f"models {ref} and {name} differ in hidden size ({d_a} vs {d_b}): "
                                 "stage-wise diffing needs two checkpoints of the same model")
        if len(ref_tok) != len(tok) or ref_tok.get_vocab() != tok.get_vocab():
            raise StagediffError(f"models {ref} and {name} have different tokenizer vocabularies "
                                 f"({len(ref_tok)} vs {len(tok)} tokens): both models must use the same tokenizer, "
                                 "so the same token ids feed both")


def _arch(model) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def hidden_size(model) -> int:
    """Width of the residual stream (config hidden_size / n_embd)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


class _Stop(Exception):
    """Raised by a capture hook to end the forward right after the hooked layer."""


def residual(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hook: str) -> torch.Tensor:
    """The residual stream [B, T, d] at `hook`, running the model only up to that layer."""
    return residuals(model, input_ids, attention_mask, [hook])[hook]


def residuals(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hooks: list[str]) -> dict[str, torch.Tensor]:
    """The residual stream [B, T, d] at each of `hooks`, from one forward that stops after the deepest of them."""
    sites = {h: parse_hook(h) for h in hooks}
    layers = decoder_layers(model)
    # resid_post of L is captured at the end of L, resid_pre at its start: the forward stops at the last capture
    last = max(sites.values(), key=lambda ls: (ls[0], ls[1] == "hook_resid_post"))
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def grabber(hook: str, stop: bool):
        def grab(x: torch.Tensor):
            captured[hook] = x
            if stop:
                raise _Stop
        return grab

    for hook, (layer, site) in sites.items():
        grab = grabber(hook, (layer, site) == last)
        if site == "hook_resid_pre":
            handles.append(layers[layer].register_forward_pre_hook(
                lambda m, args, kwargs, grab=grab: grab(_hidden_arg(args, kwargs)), with_kwargs=True))
        else:
            handles.append(layers[layer].register_forward_hook(lambda m, args, out, grab=grab: grab(_first(out))))
    _forward_to_stop(model, input_ids, attention_mask, handles)
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise StagediffError(f"hook {missing[0]} never ran in {type(model).__name__}: the model skipped its decoder layer {sites[missing[0]][0]}")
    return captured


def _forward_to_stop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, handles: list) -> None:
    """A forward that a capture hook may end early (`_Stop`); the hooks are removed however it ends."""
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def all_hooks(n_layers: int) -> list[str]:
    """`hook: all`: the residual stream leaving every block (resid_post of 0..n-1; resid_post of L is resid_pre of L+1)."""
    return [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


@contextlib.contextmanager
def splice(model, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """During ordinary forwards (and `generate`), replace the residual at `hook` by `fn(resid)`."""
    layer, site = parse_hook(hook)
    block = decoder_layers(model)[layer]
    if site == "hook_resid_pre":
        def pre(m, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(m, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)

        handle = block.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Prefix:
    """The output of the layer that leaves the residual at a hook, for one batch, as the model's own forward returned it."""

    output: Any  # a tensor (transformers 5) or the layer's tuple (older code)


def capture_prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hook: str) -> Prefix | None:
    """The residual at `hook` for this batch, kept for forwards that start there (`from_prefix`); None when nothing
    comes before the hook (resid_pre of layer 0)."""
    last = _last_prefix_layer(hook)
    if last < 0:
        return None
    got = {}

    def grab(m, args, out):
        got["out"] = out
        raise _Stop

    _forward_to_stop(model, input_ids, attention_mask, [decoder_layers(model)[last].register_forward_hook(grab)])
    return Prefix(got["out"])


@contextlib.contextmanager
def from_prefix(model, hook: str, prefix: Prefix | None) -> Iterator[None]:
    """During forwards of the batch `prefix` was captured on, the layers before `hook` return the captured residual
    instead of computing it again: the same outputs, bit for bit, for a fraction of the cost when many forwards
    differ only after the hook (the causal checks' splices). Hooks on those layers (`splice`) still run."""
    if prefix is None:
        yield
        return
    skipped = list(decoder_layers(model))[: _last_prefix_layer(hook) + 1]
    own = [layer.__dict__.get("forward") for layer in skipped]  # an instance forward (accelerate's hooks) comes back after
    for layer in skipped:
        layer.forward = lambda *args, **kwargs: prefix.output
    try:
        yield
    finally:
        for layer, forward in zip(skipped, own):
            if forward is None:
                del layer.forward  # the class's own forward again
            else:
                layer.forward = forward


def _last_prefix_layer(hook: str) -> int:
    """The layer whose output is the residual at `hook` (-1: the embeddings)."""
    layer, site = parse_hook(hook)
    return layer if site == "hook_resid_post" else layer - 1


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(out) -> torch.Tensor:
    # Decoder layers return a tensor in transformers 5, a tuple (hidden, ...) in older code.
    return out[0] if isinstance(out, (tuple, list)) else out
