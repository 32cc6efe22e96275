"""Released SAEs in: a stage's `from_pretrained` resolved to a local SAELens-format folder.

`from_pretrained` is one of
- a local folder holding cfg.json + sae_weights.safetensors;
- `hf://owner/repo/folder`: that folder of a Hugging Face model repository;
- `{release, sae_id}`: an entry of sae_lens's pretrained registry (needs `sae_lens`:
  the `[saelens]` extra), whose repository and folder it names. A release stored in
  another format (sae_lens's `conversion_func`, e.g. Gemma Scope's npz) is loaded by
  sae_lens once and saved as a SAELens folder under $STAGEDIFF_CACHE/pretrained.

Downloads go through huggingface_hub's cache; with HF_HUB_OFFLINE=1 only what is
already cached is used, and a miss is an error that says so.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stagediff.errors import StagediffError

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


def offline() -> bool:
    """True when the user forbade downloads (HF_HUB_OFFLINE), read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def describe(spec: Any) -> str:
    """A `from_pretrained` value as the user wrote it, for messages."""
    return json.dumps(spec) if isinstance(spec, dict) else str(spec)


def resolve_pretrained(spec: str | dict) -> tuple[Path, dict]:
    """The local SAELens folder of `spec` (downloaded if needed and allowed) and its source record.

    The source names where the files came from (release/sae_id, repo_id/path, or the
    local path); it goes into the imported stage's cfg.json metadata.
    """
    key = json.dumps(spec, sort_keys=True)
    folder, source = _resolve(key)
    return Path(folder), dict(source)


@functools.cache
def _resolve(key: str) -> tuple[str, tuple]:
    spec = json.loads(key)
    if isinstance(spec, dict):
        folder, source = _from_registry(spec)
    elif spec.startswith("hf://"):
        parts = [p for p in spec[len("hf://"):].split("/") if p]
        if len(parts) < 2:
            raise StagediffError(f"from_pretrained {spec!r} names no repository: use hf://owner/repo/folder")
        repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
        folder, source = hub_folder(repo_id, path, spec), {"repo_id": repo_id, "path": path}
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise StagediffError(f"from_pretrained {spec!r} is not a folder: give a SAELens folder (cfg.json + {WEIGHTS}), "
                                 "hf://owner/repo/folder, or {release: ..., sae_id: ...} from sae_lens's registry")
        source = {"path": str(folder.resolve())}
    for name in (CFG, WEIGHTS):
        if not (folder / name).exists():
            raise StagediffError(f"from_pretrained {describe(spec)} resolves to {folder}, which has no {name}: "
                                 "point at the folder that holds cfg.json and sae_weights.safetensors")
    return str(folder), tuple(source.items())


def hub_folder(repo_id: str, path: str, what: str) -> Path:
    """`path` inside hub repository `repo_id`, fetched into the HF cache (only that folder)."""
    from huggingface_hub import snapshot_download

    patterns = [f"{path}/*"] if path else None
    try:
        root = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline())
    except Exception as e:  # huggingface_hub's errors: not cached, no network, no such repo, gated
        why = ("HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache: download it once online"
               if offline() else "check the repository name and your access (huggingface-cli login for gated repos)")
        raise StagediffError(f"could not fetch {what} ({type(e).__name__}: {str(e)[:200]}): {why}") from None
    return Path(root) / path


def _from_registry(spec: dict) -> tuple[Path, dict]:
    """A `{release, sae_id}` entry of sae_lens's pretrained registry as a local folder."""
    if set(spec) != {"release", "sae_id"}:
        raise StagediffError(f"from_pretrained {describe(spec)} must have exactly the keys release and sae_id "
                             "(as in sae_lens's SAE.from_pretrained)")
    release, sae_id = str(spec["release"]), str(spec["sae_id"])
    directory = _registry()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=3)
        raise StagediffError(f"release {release!r} is not in sae_lens's pretrained registry"
                             + (f"; did you mean {', '.join(close)}?" if close else "") +
                             " (the list: sae_lens.loading.pretrained_saes_directory)")
    entry = directory[release]
    saes = dict(entry.saes_map)
    if sae_id not in saes:
        close = difflib.get_close_matches(sae_id, list(saes), n=3)
        raise StagediffError(f"release {release!r} has no sae_id {sae_id!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else f" ({len(saes)} ids, e.g. {next(iter(saes), '')})"))
    source = {"release": release, "sae_id": sae_id, "repo_id": entry.repo_id, "path": saes[sae_id], "model": entry.model}
    if getattr(entry, "conversion_func", None):
        return _converted_by_saelens(release, sae_id), source
    return hub_folder(entry.repo_id, saes[sae_id], f"{release}/{sae_id} ({entry.repo_id}/{saes[sae_id]})"), source


def _registry() -> dict:
    """sae_lens's pretrained SAE directory {release: lookup with repo_id, model, saes_map, conversion_func}."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        try:
            from sae_lens.toolkit.pretrained_saes_directory import get_pretrained_saes_directory  # sae_lens < 6
        except ImportError:
            raise StagediffError("from_pretrained {release, sae_id} is looked up in sae_lens's registry, and sae_lens is not "
                                 "installed: pip install 'stagediff[saelens]', or name the files as hf://owner/repo/folder") from None
    return get_pretrained_saes_directory()


def _converted_by_saelens(release: str, sae_id: str) -> Path:
    """A release sae_lens converts on load (not stored in its own format), saved once as a SAELens folder."""
    from sae_lens import SAE as SaeLensSAE

    from stagediff.files import fingerprint
    from stagediff.runtime import cache_dir

    folder = cache_dir() / "pretrained" / fingerprint([release, sae_id])[:16]
    if not (folder / CFG).exists():
        try:
            loaded = SaeLensSAE.from_pretrained(release, sae_id, device="cpu")
        except Exception as e:
            why = "HF_HUB_OFFLINE=1 is set: download it once online" if offline() else "check the release and sae_id"
            raise StagediffError(f"sae_lens could not load {release}/{sae_id} ({type(e).__name__}: {str(e)[:200]}): {why}") from None
        sae = loaded[0] if isinstance(loaded, tuple) else loaded  # sae_lens < 6 returns (sae, cfg, sparsity)
        folder.mkdir(parents=True, exist_ok=True)
        sae.save_model(str(folder))
    return folder


def read_hook(folder: Path) -> str | None:
    """The hook an SAELens folder was trained on (metadata.hook_name in sae_lens >= 6, hook_name before)."""
    raw = json.loads((folder / CFG).read_text())
    return (raw.get("metadata") or {}).get("hook_name") or raw.get("hook_name")


# ---------------------------------------------------------------- out: a run's dictionaries on the hub


def load_pretrained(stage: Any, d_in: int | None, hook: str):
    """The SAELens-format dictionary a root stage (`stages.Stage`) starts from, and where it came from.

    Checked before anything is harvested: it must be trained at the run's `hook`, read
    raw activations (no normalisation) and, once the model is known, have d_in = `d_in`.
    """
    from stagediff.sae import SAE

    folder, source = resolve_pretrained(stage.from_pretrained)
    trained_at = read_hook(folder)
    if trained_at and trained_at != hook:
        raise StagediffError(f"stages.{stage.name}.from_pretrained {describe(stage.from_pretrained)} was trained at hook "
                             f"{trained_at!r}, but the run reads {hook!r}: set hook: {trained_at} (or use an SAE of {hook})")
    return SAE.load(folder, device="cpu", expected_d_in=d_in), source


def hub_id_of(path: str) -> str:
    """The hub id of a model or dataset path when it came from the hub (an id, or a folder of the HF cache); else the path."""
    parts = Path(path).parts
    for part in parts:  # .../models--owner--name/snapshots/<commit>: a download in the HF cache
        if part.startswith(("models--", "datasets--")) and part.count("--") >= 2:
            return "/".join(part.split("--")[1:])
    return path


def push_run(run_dir: str | Path, repo_id: str, dry_run: str | Path | None = None, private: bool = False) -> Path:
    """Upload a run's dictionaries to hub repository `repo_id`, one SAELens folder per stage plus a model card.

    Each stage's folder is `<stage>/` (cfg.json, sae_weights.safetensors,
    sparsity.safetensors), so `sae_lens.SAE.from_pretrained(repo_id, stage)` and
    `hf://repo_id/stage` load it. A several-hook run (RUN/layers/<hook>/) pushes every
    hook's dictionaries as `<hook>/<stage>/`. With `dry_run` the repository is laid out in
    that folder and nothing is uploaded. Returns the laid-out folder.
    """
    run_dir = Path(run_dir)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise StagediffError(f"{repo_id!r} is not a hub repository id: use owner/name")
    folders = pushed_folders(run_dir)
    out = Path(dry_run) if dry_run else Path(tempfile.mkdtemp(prefix="stagediff-push-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sae_id, folder in folders.items():
        dst = out / sae_id
        dst.mkdir(parents=True, exist_ok=True)
        for name in (CFG, WEIGHTS, "sparsity.safetensors"):
            if (folder / name).exists():
                shutil.copyfile(folder / name, dst / name)
        cfg = json.loads((folder / CFG).read_text())
        rows.append((sae_id, {**(cfg.get("metadata") or {}), "hook_name": read_hook(folder)}, cfg))
    (out / "README.md").write_text(model_card(repo_id, rows, run_dir))
    if dry_run:
        print(f"push: dry run, {len(rows)} dictionaries and README.md laid out in {out} (nothing uploaded)")
        return out
    from huggingface_hub import HfApi

    if offline():
        raise StagediffError("HF_HUB_OFFLINE=1 is set: unset it to upload, or use --dry-run DIR to lay the repository out locally")
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message=f"stagediff: dictionaries of {run_dir.name}")
    except Exception as e:
        raise StagediffError(f"upload to {repo_id} failed ({type(e).__name__}: {str(e)[:200]}): "
                             "log in with `huggingface-cli login` (a write token) and check the repository name") from None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"push: {len(rows)} dictionaries -> https://huggingface.co/{repo_id}")
    return out


def pushed_folders(run_dir: Path) -> dict[str, Path]:
    """{sae_id: stage folder} of what `push_run` uploads: the trained stages (not the noise controls), as `<stage>`,
    or `<hook>/<stage>` for every hook of a several-hook run."""
    from stagediff.layers import recorded_hooks
    from stagediff.layout import layer_dir, saes_dir
    from stagediff.stages import is_control

    def stages(run: Path) -> dict[str, Path]:
        found = sorted(p.parent for p in saes_dir(run).glob(f"*/{CFG}") if not is_control(p.parent.name))
        if not found:
            raise StagediffError(f"{run} holds no trained dictionaries (saes/*/cfg.json): run `stagediff train {run_dir}` first")
        return {p.name: p for p in found}

    hooks = recorded_hooks(run_dir)
    if not hooks:
        return stages(run_dir)
    return {f"{hook}/{name}": folder for hook in hooks for name, folder in stages(layer_dir(run_dir, hook)).items()}


def model_card(repo_id: str, rows: list[tuple[str, dict, dict]], run_dir: Path) -> str:
    """The README.md of a pushed run: what each dictionary is (its hook among them), and how to load it."""
    first = rows[0][1]
    hooks = list(dict.fromkeys(meta.get("hook_name") for _, meta, _ in rows))
    where = (f"Hook: `{hooks[0]}`" if len(hooks) == 1 else
             f"Hooks: {', '.join(f'`{h}`' for h in hooks)}, one folder per hook (`<hook>/<stage>`)")
    lines = ["---", "library_name: saelens", "tags: [sparse-autoencoder, model-diffing, stagediff]", "---", "",
             f"# Stage-wise model diffing dictionaries ({run_dir.name})", "",
             "Sparse autoencoders trained with [stagediff](https://pypi.org/project/stagediff/): `S` on the base model, then "
             "fine-tuned copies on the fine-tuning data (`D`), on the fine-tuned model (`M`), and on both (`F_via_D`, "
             "`F_via_M`). Features whose decoder direction rotates on both routes to F are the candidates for what "
             "fine-tuning changed.", "",
             f"{where}, context size {first.get('context_size')}.", "",
             "| sae_id | hook | model | data | parent | architecture | d_in | d_sae |", "|---|---|---|---|---|---|---|---|"]
    for name, meta, cfg in rows:
        lines.append(f"| `{name}` | `{meta.get('hook_name')}` | {meta.get('model_name')} | {meta.get('dataset_path')} "
                     f"| {meta.get('parent_stage') or '-'} | {cfg.get('architecture')} | {cfg.get('d_in')} | {cfg.get('d_sae')} |")
    lines += ["", "Load one with SAELens or stagediff:", "", "```python", "from sae_lens import SAE", "",
              f'sae = SAE.from_pretrained("{repo_id}", "{rows[0][0]}")', "```", "",
              f"or, in a stagediff config, `stages: {{S: {{from_pretrained: hf://{repo_id}/{rows[0][0]}}}}}`.", ""]
    return "\n".join(lines)
