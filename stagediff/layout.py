"""Where each file of a run directory lives: the layout every step writes and reads, in one place.

    RUN/config.yaml                       the resolved config and its provenance (`_run`)
    RUN/.steps/<unit>.json                each unit of work's fingerprint and whether it is done
    RUN/models/{base,finetuned}/          an organism's models; models/organism.json its record
    RUN/data/{base,finetune,heldout,validation}.jsonl   an organism's data
    RUN/activations/<model>__<data>/      activation stores (activations.py)
    RUN/saes/<stage>/                     one dictionary per stage (SAELens folder + stats.json)
    RUN/diff/                             features.csv, summary.json, scatter PNGs
    RUN/crosscoder/, RUN/diffsae/         the baselines: a dictionary + features.csv, summary.json
    RUN/eval/                             metrics.json and the single-direction baselines' files
    RUN/report/                           index.html, top_tokens.json, PNGs
    RUN/null/                             the demo's null run: a whole run directory of its own

The same layout holds in an organism's cache folder (models/, data/).
"""

from __future__ import annotations

from pathlib import Path

FEATURES_CSV = "features.csv"
SUMMARY_JSON = "summary.json"
LAYERS = "layers"  # RUN/layers/<hook>/: one run directory per hook of a several-hook run


def config_yaml(run_dir: Path) -> Path:
    return Path(run_dir) / "config.yaml"


def steps_dir(run_dir: Path) -> Path:
    """Records of the units of work (pipeline.Run)."""
    return Path(run_dir) / ".steps"


# ---------------------------------------------------------------- inputs: models and data


def models_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "models"


def model_dir(run_dir: Path, key: str) -> Path:
    """An organism's model `key` (base, finetuned) in HF format."""
    return models_dir(run_dir) / key


def organism_json(run_dir: Path) -> Path:
    """The organism's record (trigger, response, mix, measured rates); written last, so it marks a built organism."""
    return models_dir(run_dir) / "organism.json"


def data_file(run_dir: Path, name: str) -> Path:
    """An organism's dataset `name` (base, finetune, heldout, validation) as jsonl."""
    return Path(run_dir) / "data" / f"{name}.jsonl"


def heldout_jsonl(run_dir: Path) -> Path:
    """The organism's held-out examples: ground truth for the evaluation (absent for your own models)."""
    return data_file(run_dir, "heldout")


# ---------------------------------------------------------------- activations and dictionaries


def activations_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "activations"


def store_name(model: str, data: str) -> str:
    """Name of the activation store of `model` on `data`: `<model>__<data>`."""
    return f"{model}__{data}"


def store_dir(run_dir: Path, model: str, data: str) -> Path:
    """Folder of the activation store of `model` on `data` in a run."""
    return activations_dir(run_dir) / store_name(model, data)


def paired_store_dirs(run_dir: Path, data: str = "finetune") -> list[Path]:
    """The (base, fine-tuned) stores over one dataset: rows aligned token for token.

    The crosscoder trains on both datasets' pairs; the activation-difference baseline compares
    the fine-tune data's pair.
    """
    return [store_dir(run_dir, m, data) for m in ("base", "finetuned")]


def saes_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "saes"


def stage_dir(run_dir: Path, stage: str) -> Path:
    """Folder of one stage's dictionary."""
    return saes_dir(run_dir) / stage


# ---------------------------------------------------------------- outputs of the later steps


def diff_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "diff"


def crosscoder_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "crosscoder"


def diffsae_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "diffsae"


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "eval"


def report_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "report"


def report_html(run_dir: Path) -> Path:
    return report_dir(run_dir) / "index.html"


def top_tokens_json(run_dir: Path) -> Path:
    """Top-activating tokens per card feature, as the report found them (the demo summary prints them)."""
    return report_dir(run_dir) / "top_tokens.json"


def null_dir(run_dir: Path) -> Path:
    """The demo's null run (the control diffed as the fine-tuned model): a run directory inside the run."""
    return Path(run_dir) / "null"


def layers_dir(run_dir: Path) -> Path:
    """A several-hook run's per-hook run directories (RUN/layers/<hook>/) and their summary."""
    return Path(run_dir) / LAYERS


def layer_dir(run_dir: Path, hook: str) -> Path:
    """The run directory of one hook of a several-hook run."""
    return layers_dir(run_dir) / hook


def layer_parent(run_dir: Path) -> Path | None:
    """The several-hook run that a hook's run directory (RUN/layers/<hook>/) belongs to; None for any other run."""
    run_dir = Path(run_dir).absolute()
    return run_dir.parent.parent if run_dir.parent.name == LAYERS else None


def layers_summary_json(run_dir: Path) -> Path:
    """The layer summary of a several-hook run (layers.py)."""
    return layers_dir(run_dir) / SUMMARY_JSON


def features_csv(folder: Path) -> Path:
    """The features.csv of a step's folder (diff_dir, crosscoder_dir or diffsae_dir)."""
    return Path(folder) / FEATURES_CSV


def summary_json(folder: Path) -> Path:
    """The summary.json of a step's folder (diff_dir, crosscoder_dir or diffsae_dir)."""
    return Path(folder) / SUMMARY_JSON


def metrics_json(run_dir: Path) -> Path:
    """The evaluation's results."""
    return eval_dir(run_dir) / "metrics.json"


def adl_json(run_dir: Path) -> Path:
    """The Activation Difference Lens baseline (meandiff.py)."""
    return eval_dir(run_dir) / "adl.json"


def generations_jsonl(run_dir: Path) -> Path:
    """Greedy generations, plain / clamped / steered (evaluate/causal.py), shown on the report's cards."""
    return eval_dir(run_dir) / "generations.jsonl"


def difference_of_means_json(run_dir: Path) -> Path:
    """The difference-of-means ablation baseline (meandiff.py)."""
    return eval_dir(run_dir) / "difference_of_means.json"
