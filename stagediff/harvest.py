"""Planning a run's harvest: which stores are left to fill, every input checked, then one pass per dataset.

`harvest_run` fills the activation stores every stage reads (`stages.store_budgets`), for each
hook of the run at once: one forward per batch and model writes the store of every hook
(`activations.harvest`). Every input is checked before the first forward pass, so a bad one
(a missing path, a second model of another width, too little fine-tune data, a full disk...)
costs seconds, not the hours of harvesting the inputs before it.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stagediff import distributed
from stagediff.errors import StagediffError
from stagediff.files import fingerprint
from stagediff.layout import activations_dir, store_dir, store_name
from stagediff.runtime import resolve_dtype
from stagediff.stages import resolve_stages, store_budgets

if TYPE_CHECKING:
    from stagediff.pipeline import Run


def harvest_run(run: Run, layers: dict[str, Run]) -> None:
    """Harvest the stores of every (model, data) pair the stages need into each hook's run (`layers`: hook -> run),
    skipping stores done with the same inputs; `run` holds the config, the device and the windows files."""
    from stagediff.activations import MANIFEST, harvest
    from stagediff.data import WindowsFile, data_fingerprint, iter_windows, read_texts, write_windows
    from stagediff.hub import load_pretrained
    from stagediff.models import check_compatible, check_hook, hidden_size, load_model, model_fingerprint

    cfg = run.cfg
    needs = store_budgets(cfg)
    model_paths, datasets = cfg.model_paths(), cfg.data_configs()
    for hook in layers:  # a released SAE is fetched and checked (hook, format) before anything else
        for stage in resolve_stages(cfg):
            if stage.from_pretrained:
                load_pretrained(stage, None, hook)
    for key, path in model_paths.items():
        if any(m == key for m, _ in needs) and not path:
            setting = {"base": "base_model", "finetuned": "finetuned_model"}.get(key, f"models.{key}")
            raise StagediffError(f"no path is set for the {key} model: set {setting} in the config")
    by_data: dict[str, list[str]] = defaultdict(list)
    for model, data in needs:
        by_data[data].append(model)

    dtype = resolve_dtype(cfg.harvest.model_dtype, run.device)
    store_dtype = resolve_dtype(cfg.harvest.dtype, run.device)  # auto: bfloat16 on GPU (half the disk), float32 on CPU
    store_dtype_name = str(store_dtype).removeprefix("torch.")
    # 1: paths and fingerprints, and what is left to do: plans[data] = (windows, tokens, {(model, hook): fp}, {(model, hook): folder})
    model_fps = {m: model_fingerprint(model_paths[m]) for m in dict.fromkeys(m for m, _ in needs)}
    data_fps, plans = {}, {}
    for data, model_keys in by_data.items():
        dcfg = datasets[data]
        if not dcfg.path:
            raise StagediffError(f"no path is set for the {data} dataset: set {data}_data.path (or datasets.{data}.path) in the config")
        data_fps[data] = data_fingerprint(dcfg)
        tokens = max(needs[(m, data)] for m in model_keys)
        windows_needed = math.ceil(tokens / max(1, cfg.context_size - int(cfg.prepend_bos)))
        fps = {(m, h): fingerprint([model_fps[m], data_fps[data], h, cfg.context_size, cfg.prepend_bos,
                                    store_dtype_name, windows_needed]) for m in model_keys for h in layers}
        stores = {(m, h): store_dir(layer.dir, m, data) for m in model_keys for h, layer in layers.items()}
        # a store deleted by hand (e.g. a damaged one, as its error message says) is harvested again
        todo = [(m, h) for (m, h) in stores
                if not (layers[h].is_done(f"harvest/{store_name(m, data)}", fps[(m, h)]) and (stores[(m, h)] / MANIFEST).exists())]
        if todo:
            plans[data] = (windows_needed, tokens, fps, {t: stores[t] for t in todo})
    for layer in {id(r): r for r in (run, *layers.values())}.values():
        layer.inputs = {"models": model_fps, "data": data_fps}
    if not plans:
        return
    # 2: the models still needed (hook, architecture, width, tokenizer), pretrained SAEs, every dataset's windows
    loaded = {m: load_model(model_paths[m], device=run.device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
              for m in dict.fromkeys(m for *_, todo in plans.values() for m, _ in todo)}
    for m, (model, _) in loaded.items():
        for hook in layers:
            check_hook(model, hook, m)
    check_compatible(loaded)
    for stage in resolve_stages(cfg):
        if stage.from_pretrained and stage.model in loaded:
            for hook in layers:
                load_pretrained(stage, hidden_size(loaded[stage.model][0]), hook)
    rows_per_window = cfg.context_size - int(cfg.prepend_bos)
    check_disk(run.dir, {_store_label(m, data, h, len(layers)): (store_dir(layers[h].dir, m, data), n * rows_per_window, hidden_size(loaded[m][0]))
                         for data, (n, _, _, todo) in plans.items() for m, h in todo},
               {data: n * cfg.context_size for data, (n, *_) in plans.items()}, store_dtype)
    tokenizer = next(iter(loaded.values()))[1]
    windows = {}
    for data, (n, tokens, fps, _) in plans.items():
        # on disk, not in memory (9 bytes a token); named by what it is made of, so a file left by an
        # interrupted run of the same plan is reused (it is written atomically: whole or absent)
        path = activations_dir(run.dir) / f".windows-{data}-{fingerprint(sorted(fps.values()))}.safetensors"
        with distributed.main_first():
            if not path.exists():
                write_windows(iter_windows(read_texts(datasets[data], tokenizer), tokenizer, cfg.context_size, cfg.prepend_bos, max_windows=n), path)
        windows[data] = w = WindowsFile(path)
        if w.num_tokens < tokens:
            print(f"harvest: the {data} data holds {w.num_tokens:,} tokens, fewer than the {tokens:,} its stages ask for: "
                  f"training passes over it {tokens / w.num_tokens:.1f} times")
    # 3: one pass per dataset, every hook's store from the same forwards
    for data, (_, _, fps, out_dirs) in plans.items():
        models, hooks = list(dict.fromkeys(m for m, _ in out_dirs)), list(dict.fromkeys(h for _, h in out_dirs))
        units = {(m, h): f"harvest/{store_name(m, data)}" for m, h in out_dirs}
        for (m, h), unit in units.items():
            layers[h].start(unit, fps[(m, h)], [out_dirs[(m, h)]])
        # a store's meta names its own inputs (the fingerprint covers the hook), as a one-hook harvest records them
        meta = {m: {h: {"model": model_paths[m], "data": datasets[data].path, "fingerprint": fps[(m, h)]} for h in hooks} for m in models}
        dirs = {m: {h: store_dir(layers[h].dir, m, data) for h in hooks} for m in models}
        one = hooks[0] if len(hooks) == 1 else None
        harvest({m: loaded[m][0] for m in models}, windows[data], one or hooks,
                {m: d[one] for m, d in dirs.items()} if one else dirs, meta={m: d[one] for m, d in meta.items()} if one else meta,
                batch_size=cfg.harvest.batch_size, shard_rows=cfg.harvest.shard_rows, dtype=store_dtype)
        for (m, h), unit in units.items():
            layers[h].finish(unit, fps[(m, h)])
        if distributed.is_main():
            windows[data].path.unlink(missing_ok=True)  # every store holds its own copy (windows.safetensors)


def _store_label(model: str, data: str, hook: str, hooks: int) -> str:
    return store_name(model, data) if hooks == 1 else f"{hook}/{store_name(model, data)}"


def check_disk(run_dir: Path, stores: dict[str, tuple[Path, int, int]], windows: dict[str, int], dtype: torch.dtype) -> None:
    """Print what the stores will take (rows x width x bytes) and stop, before any work, if the disk cannot hold it.

    `stores` maps a store's name to (folder, rows, width), `windows` a dataset to its token positions
    (its windows file: 9 bytes each, plus a copy per store where hard links fail).
    What is already in a store (an interrupted harvest resumes) counts as written.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, (_, rows, width) in stores.items():
        size = rows * (width * itemsize + 12)  # + window int64, position int32 per row
        total += size
        print(f"harvest: {name}: up to {rows:,} rows x {width} x {itemsize} bytes ({str(dtype).removeprefix('torch.')}) = {_gb(size)}")
    total += sum(positions * 9 for positions in windows.values()) * 2
    present = sum(f.stat().st_size for folder, *_ in stores.values() if folder.exists() for f in folder.rglob("*") if f.is_file())
    free = shutil.disk_usage(next(p for p in (run_dir, *run_dir.parents) if p.exists())).free
    if total - present > free:
        raise StagediffError(f"the harvest needs about {_gb(total - present)} under {run_dir} (stores and token windows) but the disk "
                             f"has {_gb(free)} free: free space, put the run on a bigger disk (--out), store bfloat16 "
                             "(harvest.dtype=bfloat16 halves float32), or lower stages.*.tokens")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
