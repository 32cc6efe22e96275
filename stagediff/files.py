"""Atomic writes and fingerprints: nothing is ever half-written under a final name.

Every file a step produces goes through `atomic_write`: written to a temporary
file in the same directory, fsync'ed, then renamed over the final name, so a
crash (SIGKILL, full disk) leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stagediff.errors import StagediffError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file that replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Like `atomic_write`, for libraries that want a path: yields a temp path to write to."""
    return _atomic_path(Path(path))


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        full = not isinstance(e, StagediffError) and disk_full(e, path.parent)  # before the temp file frees space
        _remove(tmp)
        if full:
            raise StagediffError(
                f"disk full while writing {path}: free space on {path.parent} "
                "(or point --out / STAGEDIFF_CACHE elsewhere) and run the same command "
                "again; finished work is kept"
            ) from e
        raise
    except BaseException:
        _remove(tmp)
        raise


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc` (raised while writing into `folder`) means the disk is full.

    Writers word it differently: Python raises OSError(ENOSPC), safetensors a SafetensorError
    "No space left on device (os error 28)", torch.save only "unexpected pos 576 vs 534".
    So besides the errno and the words, a folder with under 1 MiB free counts as full.
    """
    err: BaseException | None = exc
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def remove_temp_files(folder: str | os.PathLike) -> None:
    """Delete the temp files of writes killed before their rename, under `folder` (a partial shard can be GBs)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            _remove(str(tmp))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_write(path, "w") as f:
        f.write(data)


def read_json_if_exists(path: str | os.PathLike) -> Any:
    """read_json, or None when the file is absent (an optional output of a step that may not have run)."""
    return read_json(path) if Path(path).exists() else None


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, naming the file if it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StagediffError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise StagediffError(f"{path} is not valid JSON ({e}); delete it and rerun the step") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming it if it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise StagediffError(f"{path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise StagediffError(f"{path} is corrupt or truncated ({e}); delete it and rerun the step") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short stable hash of any JSON-able object (configs, file lists)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
