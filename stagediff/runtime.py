"""Where and how computation runs: device, dtype, seeding, progress bars, memory given back."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from stagediff.errors import StagediffError

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; otherwise the named device, checked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise StagediffError(f"device {spec!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StagediffError(f"device {spec!r} was asked for but CUDA is not available: use device=cpu")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` = float32 on CPU (bf16 matmul is ~100x slower there), bfloat16 on GPU."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise StagediffError(f"dtype {spec!r} is not supported: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[spec]


def cache_dir() -> Path:
    """Root of stagediff's reusable artefacts (organisms, converted models, pretrained SAEs), shared by runs:
    $STAGEDIFF_CACHE, default ~/.cache/stagediff."""
    return Path(os.environ.get("STAGEDIFF_CACHE") or "~/.cache/stagediff").expanduser()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


LOG_EVERY_SECONDS = 10.0  # a progress bar written to a file or pipe prints one line this often


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """A tqdm progress bar on stderr; silent when STAGEDIFF_QUIET=1 (tests).

    On a terminal it redraws in place. Written to a file or pipe (CI, nohup, a job
    scheduler) it prints one whole line every LOG_EVERY_SECONDS and a last one when
    it ends, and nothing for a loop shorter than that, so a log stays readable.
    """
    from tqdm.auto import tqdm

    quiet = os.environ.get("STAGEDIFF_QUIET") == "1"
    if quiet or sys.stderr.isatty():  # a worker process (workers.py) draws on its own line
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=False,
                    position=int(os.environ.get("STAGEDIFF_BAR_POSITION", "0")))
    return _log_bar()(iterable, total=total, desc=desc, unit=unit, file=_LineWriter(sys.stderr), ncols=100,
                      mininterval=LOG_EVERY_SECONDS, maxinterval=LOG_EVERY_SECONDS * 6, delay=LOG_EVERY_SECONDS, leave=True)


@functools.lru_cache(maxsize=1)
def _log_bar() -> type:
    """tqdm whose set_postfix / set_description show at the next timed line instead of printing one at once."""
    from tqdm.auto import tqdm

    class LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_description(self, desc=None, refresh=True):
            super().set_description(desc, refresh=False)

    return LogBar


class _LineWriter:
    """Turns tqdm's in-place redraws (carriage returns, cursor moves) into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.strip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks for reuse, and in a long harvest or training run the
    freed buffers of each shard (a few MB, allocated from several threads) leave the
    heaps fragmented, so the resident set creeps up with the number of tokens even
    though nothing is held. Trimming after each shard stops that creep (what remains
    is where the allocator places short-lived buffers, run to run); it costs well
    under a millisecond.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
