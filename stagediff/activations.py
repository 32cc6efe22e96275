"""Harvesting residual activations into sharded on-disk stores, and reading them back.

`harvest` makes ONE pass over the token windows and feeds the same ids to every
model, so row i of every store is the same (window, position): this is what
pairs (base, fine-tuned) rows for the crosscoder. BOS and padding rows are
dropped via the window mask.

A store folder holds
  manifest.json            meta (model/data fingerprints), hook, d_in, dtype, context_size,
                           num_rows, shards [{file, rows, sha256}], complete
  windows.safetensors      ids [N, T], mask [N, T]: the contexts the rows come from
  shard_00000.safetensors  acts [n, d_in] (storage dtype), window int64 [n], position int32 [n]

Shards are written atomically by a background thread, and the manifest is
rewritten after each one, so an interrupted harvest resumes after its last
recorded shard.

Under torchrun the harvest is data-parallel: rank r writes the whole shards of its
contiguous block of rows (the very files one process would write, same names), records
them in its own `manifest.rank<r>.json`, and rank 0 merges those into manifest.json.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from stagediff import distributed
from stagediff.data import TokenWindows, WindowsFile
from stagediff.errors import StagediffError
from stagediff.files import load_tensors, read_json, save_tensors, sha256_file, write_json
from stagediff.models import hidden_size, parse_hook, residuals
from stagediff.runtime import progress, release_memory

MANIFEST = "manifest.json"
WINDOWS = "windows.safetensors"
FORMAT = "stagediff-activations/1"
PARTS = "manifest.rank*.json"  # the ranks' manifests during a data-parallel harvest
BUFFER_BYTES = 512 << 20  # shuffle buffer of `batches`, as float32


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def part_manifest(rank: int) -> str:
    """The manifest of one rank's shards during a data-parallel harvest."""
    return f"manifest.rank{rank}.json"


# ---------------------------------------------------------------- harvesting


def harvest(models: dict, windows: TokenWindows | WindowsFile, hook: str | list[str], out_dirs: dict, *, batch_size: int,
            shard_rows: int, dtype: torch.dtype, meta: dict[str, dict]) -> dict:
    """Run every model over the same windows and stream its residual at `hook` into `out_dirs[key]`.

    `hook` may be a list: then `out_dirs[key]` and `meta[key]` map each hook to its store folder and meta, one forward per
    batch and model stops after the deepest hook, and the stores are returned as {key: {hook: store}}.
    `windows` may be in memory or on disk (`data.write_windows`): only one batch of
    them is read at a time. `meta[key]` (model and data fingerprints, names) is recorded in the manifest;
    a complete store with the same meta, hook, dtype and windows is reused as is,
    a partial one is continued after its last recorded shard.
    """
    hooks = [hook] if isinstance(hook, str) else list(hook)
    for h in hooks:
        parse_hook(h)
    if batch_size < 1 or shard_rows < 1:
        raise StagediffError(f"harvest batch_size ({batch_size}) and shard_rows ({shard_rows}) must be at least 1")
    folders = {(key, h): Path(out_dirs[key] if isinstance(hook, str) else out_dirs[key][h]) for key in models for h in hooks}
    if len({d.resolve() for d in folders.values()}) < len(folders):
        raise StagediffError(f"harvest needs one output folder per model and hook, got {out_dirs}")
    digest = windows.digest()
    identity = {(key, h): _identity(meta.get(key, {}) if isinstance(hook, str) else meta.get(key, {}).get(h, {}), h,
                                    hidden_size(models[key]), dtype, windows, digest, shard_rows)
                for key, h in folders}
    with distributed.main_first():  # rank 0 (re)starts the stores; the others then find them as left
        writers = {t: _Writer(folder, identity[t], windows, dtype) for t, folder in folders.items()}
    todo = {t: w for t, w in writers.items() if not w.complete}
    world = distributed.world_size()
    if todo and world > 1:
        # this rank's block of whole shards, as a writer of its own (resumable on its own)
        n_shards = math.ceil(windows.num_tokens / shard_rows)
        r = distributed.rank()
        rows = (n_shards * r // world * shard_rows, min(n_shards * (r + 1) // world * shard_rows, windows.num_tokens))
        todo = {t: _Writer(w.folder, {**identity[t], "rows": list(rows)}, windows, dtype, part=r) for t, w in todo.items()}
    if todo:
        _run(models, todo, windows, batch_size)
    if todo and world > 1:
        distributed.barrier()
        if distributed.is_main():
            for w in todo.values():
                _merge_parts(w.folder, world)
        distributed.barrier()
    stores = {t: ActivationStore(folder) for t, folder in folders.items()}
    if isinstance(hook, str):
        return {key: stores[(key, hook)] for key in models}
    return {key: {h: stores[(key, h)] for h in hooks} for key in models}


def write_store(path: str | Path, rows: torch.Tensor, *, window: torch.Tensor | None = None,
                position: torch.Tensor | None = None, windows: TokenWindows | None = None, hook: str = "",
                shard_rows: int = 65536, dtype: torch.dtype | None = None, meta: dict | None = None) -> ActivationStore:
    """Write activation rows you already have as a finished store, in the very layout `harvest` writes.

    rows [n, d_in] in store order; window / position [n]: where each row comes from (default: row i
    is position 0 of window i); windows: the token windows they index (default: placeholder windows of
    token id 0 with exactly those positions kept, so two stores written with the same window / position
    pair up row by row, as a harvest's do). dtype: the storage dtype (default: that of `rows`).
    A store already there with the same identity is kept as it is.
    """
    rows = torch.as_tensor(rows)
    n = len(rows)
    window = torch.arange(n) if window is None else torch.as_tensor(window).long()
    position = torch.zeros(n, dtype=torch.int32) if position is None else torch.as_tensor(position).to(torch.int32)
    if len(window) != n or len(position) != n or rows.ndim != 2:
        raise StagediffError(f"write_store needs rows [n, d_in] and n windows and positions, got rows {tuple(rows.shape)}, "
                             f"{len(window)} windows, {len(position)} positions")
    if windows is None:
        mask = torch.zeros(int(window.max()) + 1 if n else 0, int(position.max()) + 1 if n else 1, dtype=torch.bool)
        mask[window, position.long()] = True
        windows = TokenWindows(ids=torch.zeros(mask.shape, dtype=torch.long), mask=mask)
    dtype = dtype or rows.dtype
    identity = {**_identity(meta or {}, hook, rows.shape[1], dtype, windows, windows.digest(), shard_rows), "num_rows": n}
    writer = _Writer(Path(path), identity, windows, dtype)
    if not writer.complete:
        for job in writer.add(rows.to(dtype), window, position, 0) + writer.finish():
            job()
    return ActivationStore(path)


def _identity(meta: dict, hook: str, d_in: int, dtype: torch.dtype, windows: TokenWindows | WindowsFile, digest: str,
              shard_rows: int) -> dict:
    """What a store is made of (its manifest's head): a store with the same identity is the same store."""
    return {"format": FORMAT, "meta": meta, "hook": hook, "d_in": d_in, "dtype": str(dtype).removeprefix("torch."),
            "context_size": windows.context_size, "num_windows": len(windows), "windows_sha256": digest,
            "num_rows": windows.num_tokens, "shard_rows": shard_rows}


def _merge_parts(folder: Path, world: int) -> None:
    """Rank 0, after every rank finished: the ranks' shards, in row order, make the store's manifest."""
    manifest = read_json(folder / MANIFEST)
    parts = [read_json(folder / part_manifest(r)) for r in range(world)]
    manifest["shards"] = [s for p in parts for s in p["shards"]]
    manifest["complete"] = all(p["complete"] for p in parts) and \
        sum(s["rows"] for s in manifest["shards"]) == manifest["num_rows"]
    if not manifest["complete"]:
        raise StagediffError(f"the data-parallel harvest into {folder} is missing rows (a rank stopped early): rerun it")
    write_json(folder / MANIFEST, manifest)
    for f in folder.glob(PARTS):
        f.unlink()


def _run(models: dict, todo: dict[tuple[str, str], _Writer], windows: TokenWindows | WindowsFile, batch_size: int) -> None:
    """Fill the writers of `todo` (by (model key, hook)) from one forward per batch and model."""
    row_end = windows.row_counts().cumsum(0)  # rows in windows 0..i
    start_row = min(w.rows_emitted for w in todo.values())
    stop_row = max(w.end_row for w in todo.values())
    first_window = int(torch.searchsorted(row_end, start_row, right=True))
    # start on the batch grid of a fresh harvest: the model sees the same batches, so a resumed
    # (or data-parallel) harvest computes the rows a single uninterrupted one would
    first_window -= first_window % batch_size
    hooks = list(dict.fromkeys(h for _, h in todo))
    bar = progress(total=stop_row - start_row, desc=f"harvest {hooks[0]}" if len(hooks) == 1 else f"harvest {len(hooks)} hooks", unit="tok")
    pending: deque[Future] = deque()
    # One writer thread: the disk writes overlap the next forwards, and at most two
    # finished shards per model wait in memory.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stagediff-shards") as pool:
        def submit(jobs: list[Callable[[], None]]) -> None:
            for job in jobs:
                pending.append(pool.submit(job))
            while len(pending) > 2 * len(todo):
                pending.popleft().result()  # re-raises a failed write

        try:
            for b in range(first_window, len(windows), batch_size):
                first_row = int(row_end[b - 1]) if b else 0
                if first_row >= stop_row:
                    break  # the end of this rank's block
                ids, mask = windows.batch(b, b + batch_size)
                n_rows = int(mask.sum())
                where = mask.nonzero()
                win, pos = where[:, 0] + b, where[:, 1].to(torch.int32)
                for key, model in models.items():
                    # the writers of this model still short of this batch's rows (resumed, or past this rank's block)
                    writing = {h: w for (k, h), w in todo.items() if k == key and w.rows_emitted + w.buffered < min(first_row + n_rows, w.end_row)}
                    if not writing:
                        continue
                    device = next(model.parameters()).device
                    # Padding is on the right, so causal attention needs no attention mask.
                    acts = residuals(model, ids.to(device), None, list(writing))
                    for h, w in writing.items():
                        rows = acts[h][mask.to(device)]
                        stored = rows.to("cpu", w.dtype)
                        if not torch.isfinite(stored).all():
                            _report_nonfinite(key, h, rows, stored, win)
                        submit(w.add(stored, win, pos, first_row))
                bar.update(max(0, min(first_row + n_rows, stop_row) - max(first_row, start_row)))
            for w in todo.values():
                submit(w.finish())
            while pending:
                pending.popleft().result()
        except BaseException:
            # Let shards already handed to the writer land (they are valid), then re-raise.
            for f in pending:
                f.exception()
            raise
        finally:
            bar.close()


def _report_nonfinite(key: str, hook: str, rows: torch.Tensor, stored: torch.Tensor, win: torch.Tensor) -> None:
    bad = int(win[(~torch.isfinite(stored)).any(1).nonzero()[0, 0]])
    if torch.isfinite(rows).all():  # finite in the model, too large for the storage dtype
        raise StagediffError(f"model {key}'s activations at hook {hook} in window {bad} overflow the storage dtype "
                             f"{stored.dtype} (max |x| = {rows.abs().max().item():.0f}): use harvest.dtype=bfloat16 or float32")
    raise StagediffError(f"model {key} produced NaN/Inf activations at hook {hook} in window {bad}: "
                         "load the model in float32 (harvest.model_dtype=float32) or check its weights")


class _Writer:
    """The store of one model under construction: its shard buffer and its manifest.

    With `part=r` it writes only rows identity["rows"] = [start, end) (whole shards) of a
    data-parallel harvest, recorded in manifest.rank<r>.json; the store itself exists already.
    """

    def __init__(self, folder: Path, identity: dict, windows: TokenWindows | WindowsFile, dtype: torch.dtype, part: int | None = None):
        self.folder, self.dtype, self.shard_rows = folder, dtype, identity["shard_rows"]
        self.manifest_path = folder / (MANIFEST if part is None else part_manifest(part))
        start, self.end_row = identity.get("rows", (0, identity["num_rows"]))
        self.manifest = self._resume(identity)
        if not self.manifest:
            if part is None:
                self._clear()
                windows.save(folder / WINDOWS)
            self.manifest = {**identity, "shards": [], "complete": False}
            write_json(self.manifest_path, self.manifest)
        self.complete = self.manifest["complete"]
        # rows handed to the writer thread
        self.rows_emitted = start + sum(s["rows"] for s in self.manifest["shards"])
        self.next_shard = start // self.shard_rows + len(self.manifest["shards"])
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.buffered = 0
        self.failed = False  # a shard write failed (e.g. disk full): later ones are dropped, resumed next run

    def _resume(self, identity: dict) -> dict | None:
        """The existing manifest if it belongs to this very harvest, its shards checked; else None."""
        path = self.manifest_path
        if not path.exists():
            return None
        try:
            manifest = read_json(path)
        except StagediffError:
            return None
        if {k: manifest.get(k) for k in identity} != identity or not (self.folder / WINDOWS).exists():
            return None  # another model, dataset, hook or dtype: start over
        if manifest["complete"]:
            return manifest
        good = []
        for s in manifest["shards"]:  # keep the recorded shards up to the first damaged one
            f = self.folder / s["file"]
            if not f.exists() or sha256_file(f) != s["sha256"]:
                break
            good.append(s)
        manifest["shards"] = good
        return manifest

    def _clear(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stale = [*self.folder.glob("shard_*.safetensors"), *self.folder.glob(PARTS)]
        for f in [self.folder / MANIFEST, *stale]:
            f.unlink(missing_ok=True)

    def add(self, acts: torch.Tensor, win: torch.Tensor, pos: torch.Tensor, first_row: int) -> list[Callable[[], None]]:
        """Buffer the rows of one batch (those not stored yet); return write jobs for full shards."""
        skip = self.rows_emitted + self.buffered - first_row
        if skip > 0:
            acts, win, pos = acts[skip:], win[skip:], pos[skip:]
        keep = self.end_row - (self.rows_emitted + self.buffered)  # rows past this writer's block are another's
        acts, win, pos = acts[:keep], win[:keep], pos[:keep]
        self.chunks.append((acts, win, pos))
        self.buffered += len(acts)
        jobs = []
        while self.buffered >= self.shard_rows:
            jobs.append(self._emit(self.shard_rows))
        return jobs

    def finish(self) -> list[Callable[[], None]]:
        """Write jobs for the last partial shard and the completed manifest."""
        jobs = [self._emit(self.buffered)] if self.buffered else []
        return jobs + [self._complete]

    def _emit(self, n: int) -> Callable[[], None]:
        acts, win, pos = (torch.cat(t) for t in zip(*self.chunks))
        rest = (acts[n:], win[n:], pos[n:])
        self.chunks, self.buffered = ([rest], len(rest[0])) if len(rest[0]) else ([], 0)
        index, self.next_shard = self.next_shard, self.next_shard + 1
        self.rows_emitted += n
        tensors = {"acts": acts[:n].clone(), "window": win[:n].clone(), "position": pos[:n].clone()}
        return lambda: self._write_shard(index, tensors)

    def _write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:  # writer thread
        if self.failed:
            return  # the jobs queued after a failed write must not record a store with a gap
        path = self.folder / shard_name(index)
        try:
            save_tensors(path, tensors)
        except BaseException:
            self.failed = True
            raise
        self.manifest["shards"].append({"file": path.name, "rows": len(tensors["acts"]), "sha256": sha256_file(path)})
        write_json(self.manifest_path, self.manifest)
        tensors.clear()
        release_memory()  # the shard's buffers are free now: keep the harvest's footprint flat

    def _complete(self) -> None:  # writer thread
        if self.failed:
            return
        self.manifest["complete"] = True
        write_json(self.manifest_path, self.manifest)


# ---------------------------------------------------------------- reading


class _Rows:
    """Row access shared by a store and a pair of stores: shuffled batches, norms, ranges."""

    sizes: list[int]  # rows per shard
    d_in: int

    def _load(self, i: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of shard i as float32 [rows, d_in]."""
        raise NotImplementedError

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, device: str | torch.device = "cpu",
                buffer_rows: int | None = None) -> Iterator[torch.Tensor]:
        """Endless shuffled float32 batches [batch_size, d_in], the same for the same (seed, step).

        Rows form one endless stream: epoch e visits the shards in a seeded
        permutation, in groups of about `buffer_rows` rows (a few shards), each
        group shuffled by its own seed. Batch k is rows [k*B, (k+1)*B) of that
        stream, so a trainer resumed at `start_step` gets exactly the batches an
        uninterrupted run would, and skipped groups are never read.
        """
        if batch_size < 1:
            raise StagediffError(f"batch size {batch_size} must be at least 1")
        if buffer_rows is None:
            buffer_rows = max(batch_size, BUFFER_BYTES // (4 * self.d_in))
        epoch, skip = divmod(start_step * batch_size, self.num_rows)
        parts: list[torch.Tensor] = []
        have = 0
        while True:
            for rows, order in self._epoch(seed, epoch, skip, buffer_rows):
                at = 0
                while at < len(order):
                    take = min(batch_size - have, len(order) - at)
                    parts.append(rows[order[at : at + take]])  # the batch's rows gathered straight from the group
                    at, have = at + take, have + take
                    if have == batch_size:
                        yield (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device, non_blocking=True)
                        parts, have = [], 0
            epoch, skip = epoch + 1, 0

    def _epoch(self, seed: int, epoch: int, skip: int, buffer_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch from row `skip` on, one shard group at a time: the group's rows and the shuffled order to read them in."""
        order = np.random.default_rng([seed % 2**63, epoch]).permutation(len(self.sizes))
        groups: list[list[int]] = [[]]
        for i in order:
            if groups[-1] and sum(self.sizes[j] for j in groups[-1]) + self.sizes[i] > buffer_rows:
                groups.append([])
            groups[-1].append(int(i))
        start = 0
        for g, group in enumerate(groups):
            n = sum(self.sizes[i] for i in group)
            if start + n > skip:
                release_memory()  # give back what the groups read so far freed, before the next one is read
                rows = torch.empty(n, self.d_in)
                at = 0
                for i in group:  # each shard read straight into its place in the group
                    self._load_into(i, rows[at : at + self.sizes[i]])
                    at += self.sizes[i]
                perm = torch.from_numpy(np.random.default_rng([seed % 2**63, epoch, g]).permutation(n))
                yield rows, perm[max(0, skip - start):]
            start += n

    def _load_into(self, i: int, out: torch.Tensor) -> None:
        """Shard i's rows into `out` [rows, d_in]."""
        out.copy_(self._load(i))

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in store order, as float32."""
        out, offset = [], 0
        for i, n in enumerate(self.sizes):
            if offset < stop and offset + n > start:
                out.append(self._load(i, max(0, start - offset), min(n, stop - offset)))  # reads only these rows
            offset += n
        return torch.cat(out) if out else torch.zeros(0, self.d_in)

    def mean_norm(self, max_rows: int = 100_000) -> float:
        """Mean L2 norm of the rows, over up to `max_rows` rows from shards spread across the store."""
        picks = len(self.sizes) if self.num_rows <= max_rows else math.ceil(max_rows / max(self.sizes))
        total, count = 0.0, 0
        for i in sorted(set(np.linspace(0, len(self.sizes) - 1, picks).round().astype(int).tolist())):
            rows = self._load(i, 0, min(self.sizes[i], max_rows - count))
            total += rows.double().norm(dim=1).sum().item()
            count += len(rows)
            if count >= max_rows:
                break
        return total / count


class ActivationStore(_Rows):
    """A finished activation store (one model, one dataset, one hook)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).exists():
            raise StagediffError(f"no activation store at {self.path} (no {MANIFEST}): run harvest first")
        self.manifest = read_json(self.path / MANIFEST)
        if not self.manifest.get("complete"):
            raise StagediffError(f"activation store {self.path} is incomplete (harvest was interrupted): "
                                 "rerun harvest to finish it")
        self.sizes = [s["rows"] for s in self.manifest["shards"]]
        self.d_in = int(self.manifest["d_in"])

    def _load(self, i: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        shard = self.manifest["shards"][i]
        hi = shard["rows"] if hi is None else hi
        try:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                acts = f.get_slice("acts")
                shape = tuple(acts.get_shape())
                if shape != (shard["rows"], self.d_in):
                    raise self._damaged(shard["file"], f"shape {shape}, manifest says ({shard['rows']}, {self.d_in})")
                return acts[lo:hi].float()
        except StagediffError:
            raise
        except Exception as e:
            raise self._damaged(shard["file"], f"unreadable: {type(e).__name__}: {e}") from None

    def _damaged(self, name: str, why: str) -> StagediffError:
        return StagediffError(f"activation shard {self.path / name} is corrupt or truncated ({why}): "
                              f"delete the store folder {self.path} and rerun harvest")

    def verify(self) -> None:
        """Check every shard against the checksum in the manifest."""
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            if not path.exists():
                raise self._damaged(shard["file"], "missing")
            if sha256_file(path) != shard["sha256"]:
                raise self._damaged(shard["file"], "checksum mismatch")

    def row_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(window int64 [num_rows], position int32 [num_rows]): where each row comes from."""
        wins, poss = [], []
        for shard in self.manifest["shards"]:
            try:
                with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                    wins.append(f.get_tensor("window"))
                    poss.append(f.get_tensor("position"))
            except Exception as e:
                raise self._damaged(shard["file"], f"unreadable: {e}") from None
        return torch.cat(wins), torch.cat(poss)

    def windows(self) -> TokenWindows:
        """The token windows the rows were harvested from."""
        t = load_tensors(self.path / WINDOWS)
        return TokenWindows(ids=t["ids"], mask=t["mask"])


class PairedStore(_Rows):
    """Two aligned stores (same windows, same rows) read as one: row i = [a_i, b_i] (for the crosscoder)."""

    def __init__(self, a: ActivationStore | str | Path, b: ActivationStore | str | Path):
        self.a = a if isinstance(a, ActivationStore) else ActivationStore(a)
        self.b = b if isinstance(b, ActivationStore) else ActivationStore(b)
        ma, mb = self.a.manifest, self.b.manifest
        if ma["windows_sha256"] != mb["windows_sha256"] or self.a.sizes != self.b.sizes:
            raise StagediffError(f"activation stores {self.a.path} and {self.b.path} are not aligned "
                                 f"({self.a.num_rows} vs {self.b.num_rows} rows, windows {ma['windows_sha256'][:8]} vs "
                                 f"{mb['windows_sha256'][:8]}): harvest both models together on the same data")
        self.sizes = self.a.sizes
        self.d_in = self.a.d_in + self.b.d_in

    def _load(self, i: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return torch.cat([self.a._load(i, lo, hi), self.b._load(i, lo, hi)], dim=1)

    def _load_into(self, i: int, out: torch.Tensor) -> None:
        self.a._load_into(i, out[:, : self.a.d_in])
        self.b._load_into(i, out[:, self.a.d_in :])
