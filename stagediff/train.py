"""Training one stage's dictionary: from scratch (a root stage such as S) or from a parent.

A root stage measures the activation scale (mean norm -> sqrt(d_in)) and starts b_dec at the
mean activation. A fine-tune copies every parameter and buffer of its parent and keeps the
parent's scale: nothing is re-initialised or re-estimated, so feature i stays feature i and
cosines between stages compare like with like. Every stage gets a fresh Adam with a short
warm-up, then a constant lr, then a linear decay to 0 over the last `decay_fraction` of steps.

The run is resumable: a checkpoint (parameters, Adam state, step, counters, RNG) is written
atomically every `checkpoint_every` steps, and a rerun continues from it to a bit-identical
final SAE (on CPU). A stage whose final files exist is loaded, never retrained.

Under torchrun the step is data-parallel (distributed.py): each rank trains on its slice of the
same global batch, gradients and statistics are reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from stagediff import distributed
from stagediff.config import SAEConfig, to_dict
from stagediff.errors import StagediffError
from stagediff.files import atomic_path, atomic_write, fingerprint, write_json
from stagediff.kernels import StepOut
from stagediff.runtime import progress, resolve_device, seed_everything
from stagediff.sae import CFG, SAE, WEIGHTS

FREQ_SHARE = 0.2  # firing rates and final stats are measured over the last 20% of steps (lr decaying, features settled)
LOG_LINES = 100  # about this many lines in train_log.jsonl per stage
MEAN_NORM_ROWS = 65536  # rows measured for an activation scale (activation_scale)


class ActivationSource(Protocol):
    """What training needs from an activation store (stagediff.activations.ActivationStore has it)."""

    d_in: int

    def mean_norm(self, max_rows: int = ...) -> float: ...

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, device: Any = "cpu") -> Iterator[Tensor]: ...


def train_sae(
    store: ActivationSource,
    cfg: SAEConfig,
    *,
    tokens: int,
    out_dir: str | Path,
    stage: str,
    parent: SAE | None = None,
    scale: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    metadata: dict | None = None,
    extra_loss: Callable[[SAE, Tensor], Tensor] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> SAE:
    """Train (or fine-tune from `parent`) one stage's SAE on `tokens` activation rows; save it in `out_dir`.

    Everything about the recipe comes from `cfg`, the learning rate included (`cfg.lr`: a fine-tune
    stage passes its own, e.g. `dataclasses.replace(sae_cfg, lr=stage.lr)`).

    `extra_loss(sae, x_s)` is added to each batch's loss (x_s: this process's scaled rows): the
    seam for a variant with a loss of its own, e.g. the crosscoder's L1 penalty.
    `on_record` gets each train_log.jsonl record as it is written (experiment trackers).

    Writes cfg.json + sae_weights.safetensors + sparsity.safetensors (SAELens layout),
    stats.json and train_log.jsonl. Returns the trained SAE. A folder holding this stage already is
    not trained again: a finished stage is loaded, an interrupted one resumes from its checkpoint
    (each says so; a checkpoint of other settings is an error).
    """
    out_dir = Path(out_dir)
    device = resolve_device(str(device))
    if finished(out_dir):
        if distributed.is_main():
            print(f"train: stage {stage} is already trained in {out_dir}: loading it (delete the folder to train it again)")
        return SAE.load(out_dir, device=device, expected_d_in=store.d_in)
    lr = cfg.lr
    _check_inputs(store, cfg, tokens, stage, parent, scale)
    steps = math.ceil(tokens / cfg.batch_size)
    parent_sha = parent.sha256() if parent is not None else None
    key = fingerprint({"stage": stage, "cfg": to_dict(cfg), "tokens": tokens, "lr": lr, "seed": seed,
                       "scale": scale, "parent_sha256": parent_sha, "d_in": store.d_in})
    ckpt_path = out_dir / "checkpoint" / "state.pt"
    ckpt = _read_checkpoint(ckpt_path, key, device)
    if ckpt is not None and distributed.is_main():
        print(f"train: stage {stage} resumes from its checkpoint at step {int(ckpt['step'])} of {steps} in {out_dir}")

    batches = store.batches(cfg.batch_size, seed=seed, start_step=ckpt["step"] if ckpt else 0, device=device)
    if ckpt is not None:
        sae = SAE(store.d_in, cfg, scale=ckpt["scale"]).to(device)
        sae.load_state_dict(ckpt["model"])
    else:
        # a root stage's b_dec comes from step 0's batch: read it once, for both (a batch is cut from a
        # shuffled group of shards, up to BUFFER_BYTES; reading it twice was ~10% of a short stage)
        first = next(batches) if parent is None else None
        sae = initial_sae(store, cfg, parent=parent, scale=scale, seed=seed,
                          sample=None if first is None else first.cpu()).to(device)
        if first is not None:
            batches = itertools.chain([first], batches)
    distributed.broadcast_parameters(sae)  # every rank starts from rank 0's SAE
    # one fused kernel for the update instead of ~10 ops per tensor: 8% of a tiny-preset step on CPU
    opt = torch.optim.Adam(sae.param_groups(lr), fused=device.type in ("cpu", "cuda"))
    st = _State.fresh(cfg.d_sae, device) if ckpt is None else _State.restore(ckpt, device)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])

    main = distributed.is_main()  # only rank 0 writes files
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    if main:
        _trim_log(log_path, st.step)
    rows = distributed.local_rows(cfg.batch_size)  # this rank's slice of each global batch
    share = (rows.stop - rows.start) / cfg.batch_size
    # BatchTopK keeps the k*B largest activations of the *global* batch, as one process would
    select = distributed.batchtopk_select(cfg.k, cfg.batch_size) \
        if distributed.world_size() > 1 and cfg.architecture == "batchtopk" else None
    log_every = max(1, steps // LOG_LINES)
    window_start = steps - max(1, math.ceil(FREQ_SHARE * steps))
    t0, start_step = time.perf_counter(), st.step
    bar = progress(range(st.step, steps), desc=f"SAE {stage}", unit="step")
    for step in bar:
        x = next(batches).to(device=device, dtype=torch.float32)
        x_s = x * sae.scale
        mine = x_s[rows]
        out = sae.training_forward(mine, st.since_fired >= cfg.dead_tokens, **({"select": select} if select else {}))
        loss = out.loss + extra_loss(sae, mine) if extra_loss is not None else out.loss
        opt.zero_grad(set_to_none=True)
        (loss * share if share < 1 else loss).backward()
        distributed.all_reduce_grads(sae)
        out = distributed.reduce_step(out, share)
        sae.remove_parallel_grad()
        factor = lr_factor(step, steps, cfg)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        opt.step()
        sae.normalize_decoder()
        if out.min_active is not None:
            sae.update_threshold(out.min_active)
        _check_finite(sae, loss, stage, step)

        st.observe(x_s, out, in_window=step >= window_start)
        st.step = step + 1
        if st.step % log_every == 0 or st.step == steps:
            rec = st.log_record(cfg, lr * factor)
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if on_record is not None:
                    on_record(rec)
            bar.set_postfix(mse=f"{rec['mse']:.3g}", ev=f"{rec['explained_variance']:.3f}", l0=f"{rec['l0']:.1f}",
                            dead=f"{rec['dead_fraction']:.2f}")
        if st.step % cfg.checkpoint_every == 0 and st.step < steps:
            st.wall += time.perf_counter() - t0
            t0 = time.perf_counter()
            if main:
                _write_checkpoint(ckpt_path, key, sae, opt, st)

    elapsed = time.perf_counter() - t0
    st.wall += elapsed
    meta = dict(metadata or {})
    meta.update(stage=stage, tokens_seen=steps * cfg.batch_size, lr=lr, seed=seed,
                parent_stage=meta.get("parent_stage") or (parent.metadata.get("stage") if parent else None),
                parent_sha256=parent_sha)
    window_tokens = (steps - window_start) * cfg.batch_size
    sparsity = torch.log10(st.window_counts.double() / window_tokens + 1e-10)  # SAELens convention
    if not main:
        distributed.barrier()  # rank 0 writes the stage's files; they exist once we pass
        return sae
    sae.save(out_dir, meta, sparsity=sparsity)
    w = st.window.tolist()
    stats = {
        "stage": stage, "steps": steps, "tokens": steps * cfg.batch_size, "scale": sae.scale,
        "window_tokens": window_tokens,  # the tokens sparsity.safetensors' rates are over: rate * this = firings
        "mse": w[0] / w[4], "explained_variance": 1 - w[2] / w[3], "l0": w[1] / w[4],
        "dead_fraction": float((st.since_fired >= cfg.dead_tokens).float().mean()),
        "tokens_per_second": (steps - start_step) * cfg.batch_size / max(elapsed, 1e-9),
        "wall_seconds": st.wall,
    }
    write_json(out_dir / "stats.json", stats)  # last: marks the stage finished
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    distributed.barrier()
    return sae


def finished(out_dir: str | Path) -> bool:
    """A stage is finished when its SAE files and stats.json exist."""
    out_dir = Path(out_dir)
    return all((out_dir / n).exists() for n in (CFG, WEIGHTS, "stats.json"))


def lr_factor(step: int, steps: int, cfg: SAEConfig) -> float:
    """Learning-rate multiplier: linear warm-up, constant, linear decay to 0 over the last decay_fraction."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_steps = round(cfg.decay_fraction * steps)
    decay = min(1.0, (steps - step) / decay_steps) if decay_steps > 0 else 1.0
    return warm * decay


# ---------------------------------------------------------------- helpers


def initial_sae(store: ActivationSource, cfg: SAEConfig, *, parent: SAE | None = None, scale: float | None = None,
                seed: int = 0, sample: Tensor | None = None) -> SAE:
    """The SAE at step 0 of a stage, on CPU: an exact copy of `parent`, or a fresh root dictionary.

    A root measures the scale (mean norm -> sqrt(d_in)) unless given, initialises on CPU (the
    same init on any device) and sets b_dec to the mean of a batch of activations: `sample`, or
    else the first batch of `store.batches(cfg.batch_size, seed=seed)` (what training starts with).
    """
    if parent is not None:
        sae = SAE(store.d_in, cfg, scale=parent.scale)
        sae.load_state_dict(parent.state_dict())  # every parameter and buffer, exactly
        return sae
    if scale is None:
        scale = activation_scale(store)
    sae = SAE(store.d_in, cfg, scale=scale, generator=seed_everything(seed))
    if sample is None:
        sample = next(store.batches(cfg.batch_size, seed=seed, device="cpu"))
    sample = sample.float()
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0))  # raw units: the mean of the scaled sample, divided by scale
    return sae


def activation_scale(store: Any) -> float:
    """The factor that brings `store`'s rows to mean norm sqrt(d_in), measured on MEAN_NORM_ROWS rows.

    A root stage's scale, kept by every fine-tune; the crosscoder scales each model's half with it.
    """
    mean_norm = float(store.mean_norm(max_rows=MEAN_NORM_ROWS))
    if not (math.isfinite(mean_norm) and mean_norm > 0):
        raise StagediffError(f"activation store {getattr(store, 'path', '')} has mean norm {mean_norm} (all zero or NaN): "
                             "harvest it again")
    return math.sqrt(store.d_in) / mean_norm


class _State:
    """Counters carried across steps (and checkpoints)."""

    def __init__(self, step: int, since_fired: Tensor, window_counts: Tensor, acc: Tensor, window: Tensor, wall: float):
        self.step, self.since_fired, self.window_counts = step, since_fired, window_counts
        self.acc, self.window, self.wall = acc, window, wall  # acc/window: [mse, l0, sse, ss, n] sums

    @classmethod
    def fresh(cls, d_sae: int, device: torch.device) -> _State:
        z = torch.zeros(5, dtype=torch.float64, device=device)
        return cls(0, torch.zeros(d_sae, dtype=torch.long, device=device),
                   torch.zeros(d_sae, dtype=torch.long, device=device), z, z.clone(), 0.0)

    @classmethod
    def restore(cls, ckpt: dict, device: torch.device) -> _State:
        return cls(int(ckpt["step"]), *(ckpt[k].to(device) for k in ("since_fired", "window_counts", "acc", "window")),
                   float(ckpt["wall"]))

    def observe(self, x_s: Tensor, out: StepOut, in_window: bool) -> None:
        """Count one step: x_s is the whole (global) batch, out its losses, sse and counts."""
        fired = out.counts > 0
        self.since_fired += x_s.shape[0]
        self.since_fired[fired] = 0
        ss = (x_s - x_s.mean(0)).pow(2).sum()  # explained variance is measured around the batch mean
        row = torch.stack([out.mse, out.l0, out.sse, ss, torch.ones_like(ss)]).double()
        self.acc += row
        if in_window:
            self.window += row
            self.window_counts += out.counts

    def log_record(self, cfg: SAEConfig, lr: float) -> dict:
        mse, l0, sse, ss, n = self.acc.tolist()
        self.acc.zero_()
        return {"step": self.step, "tokens": self.step * cfg.batch_size, "lr": lr, "mse": mse / n,
                "explained_variance": 1 - sse / ss, "l0": l0 / n,
                "dead_fraction": float((self.since_fired >= cfg.dead_tokens).float().mean())}


def _check_finite(sae: SAE, loss: Tensor, stage: str, step: int) -> None:
    ok = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(p).all() for p in sae.parameters()])
    if not bool(ok.all()):
        what = "the loss" if not bool(ok[0]) else "the parameters"
        raise StagediffError(
            f"stage {stage}: {what} became NaN/Inf at step {step}; training stopped and nothing was saved as "
            "final. Lower the learning rate (stages.<stage>.lr or sae.lr) or check the activations for "
            "NaN/Inf, then rerun (it resumes from the last good checkpoint)"
        )


def _write_checkpoint(path: Path, key: str, sae: SAE, opt: torch.optim.Optimizer, st: _State) -> None:
    state = {"key": key, "step": st.step, "scale": sae.scale, "model": sae.state_dict(), "optim": opt.state_dict(),
             "since_fired": st.since_fired, "window_counts": st.window_counts, "acc": st.acc, "window": st.window,
             "wall": st.wall, "rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_checkpoint(path: Path, key: str, device: torch.device) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise StagediffError(f"checkpoint {path} is corrupt ({e}): delete {path.parent} and rerun") from None
    if ckpt.get("key") != key:
        raise StagediffError(f"checkpoint {path} was written by a run with other settings (config, tokens, lr, seed "
                             f"or parent): delete {path.parent} to start this stage afresh")
    ckpt["rng"] = ckpt["rng"].cpu()
    return ckpt


def _trim_log(path: Path, step: int) -> None:
    """Keep only log lines up to `step` (the checkpoint we resume from), so a resumed log has no duplicates."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_write(path, "w") as f:
        f.write("".join(ln + "\n" for ln in keep))


def _check_inputs(store: ActivationSource, cfg: SAEConfig, tokens: int, stage: str,
                  parent: SAE | None, scale: float | None) -> None:
    if tokens <= 0:
        raise StagediffError(f"stage {stage}: tokens={tokens} must be positive: set stages.{stage}.tokens")
    if not cfg.lr > 0:
        raise StagediffError(f"stage {stage}: lr={cfg.lr} must be positive: set stages.{stage}.lr or sae.lr")
    if cfg.batch_size < 1 or cfg.checkpoint_every < 1:
        raise StagediffError(f"sae.batch_size ({cfg.batch_size}) and sae.checkpoint_every ({cfg.checkpoint_every}) "
                             "must be at least 1")
    if parent is None:
        return
    if parent.d_in != store.d_in:
        raise StagediffError(f"stage {stage}: the parent SAE reads d_in={parent.d_in} but these activations have "
                             f"width {store.d_in}: fine-tune only on activations of the same hook and model family")
    for name in ("architecture", "d_sae") + (("k",) if cfg.architecture in ("topk", "batchtopk") else ()):
        if getattr(parent.cfg, name) != getattr(cfg, name):
            raise StagediffError(f"stage {stage}: the parent SAE has {name}={getattr(parent.cfg, name)!r} but "
                                 f"sae.{name}={getattr(cfg, name)!r}: a fine-tune keeps the parent's dictionary; "
                                 "use the same sae settings for every stage")
    if scale is not None and scale != parent.scale:
        raise StagediffError(f"stage {stage}: scale={scale} differs from the parent's scale {parent.scale}: the "
                             "scale measured at the root stage is kept for every stage; do not pass one")
