"""Text datasets in, fixed-size token windows out.

Formats (`DataConfig.format`, `auto` picks by extension):
- text: a `.txt` file, or a folder of `.txt` files; documents are separated by
  blank lines (one or more empty lines end a document);
- jsonl: one JSON object per line, the text under `DataConfig.field`;
- parquet: the column `DataConfig.field` (needs pyarrow);
- hf: a folder written by `datasets.save_to_disk`, or a hub id / local data folder
  loaded with `load_dataset(path, name, split, revision, data_files)`, streamed
  for hub ids (needs `datasets`: the `[data]` extra).
Any format's field may hold chat messages ([{role, content}]) with
`chat_template: true`: they are rendered with the model's chat template.

Windows: documents are tokenized in batches, joined with EOS between them and
cut into windows of `context_size` tokens that each start with BOS. The mask is
False at BOS and padding: BOS activations have outlier norms that wreck SAEs.
`iter_windows` yields them a chunk at a time; `pack_windows` gathers them in
memory (`TokenWindows`), `write_windows` streams them to disk (`WindowsFile`,
what a harvest uses, so its memory does not grow with the data).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stagediff.config import DataConfig, DataFormat
from stagediff.errors import StagediffError
from stagediff.files import atomic_path, fingerprint, save_tensors, sha256_file

_EXTENSIONS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
_FORMATS = typing.get_args(DataFormat)  # checked again here: a DataConfig may be built without load_config


@dataclass
class TokenWindows:
    """Token windows of one dataset, in memory. `mask` is True where an activation is kept (not BOS, not padding).

    Padding, where there is any, is always on the right, so a causal model's
    activations at the valid positions do not depend on it.
    """

    ids: torch.Tensor  # LongTensor [N, T]
    mask: torch.Tensor  # BoolTensor [N, T]

    @property
    def num_tokens(self) -> int:
        """Number of valid (kept) positions."""
        return int(self.mask.sum())

    @property
    def context_size(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of windows start..stop."""
        return self.ids[start:stop], self.mask[start:stop]

    def row_counts(self) -> torch.Tensor:
        """Valid positions per window (LongTensor [N])."""
        return self.mask.sum(1)

    def digest(self) -> str:
        """sha256 of the ids then the mask bytes: two stores with the same digest have aligned rows."""
        h = hashlib.sha256()
        h.update(self.ids.contiguous().numpy())  # the buffer itself: no copy of every token id
        h.update(self.mask.contiguous().numpy())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write ids and mask as safetensors (the layout `WindowsFile` reads), atomically."""
        save_tensors(path, {"ids": self.ids, "mask": self.mask},
                     metadata={"num_tokens": str(self.num_tokens), "sha256": self.digest()})


class WindowsFile:
    """Token windows in a safetensors file (ids [N, T] int64, mask [N, T] bool), read a batch at a time.

    A harvest of a billion tokens holds 9 GB of windows: they stay on disk, written
    by `write_windows` as they are packed and read back with plain file reads (no
    memory map, whose touched pages would count against the process), so the
    harvest's memory does not grow with the number of tokens.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._start = 8 + n
            self._ids, self._mask = header["ids"], header["mask"]
            meta = header.get("__metadata__") or {}
            self.num_tokens, self._digest = int(meta["num_tokens"]), meta["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StagediffError(f"token windows file {self.path} is missing or corrupt ({type(e).__name__}: {e}): "
                                 "delete it and rerun harvest") from None
        self._len, self.context_size = self._ids["shape"]

    def __len__(self) -> int:
        return self._len

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of windows start..stop, read from the file."""
        return self._read(self._ids, np.int64, start, stop), self._read(self._mask, np.bool_, start, stop)

    def row_counts(self, chunk: int = 8192) -> torch.Tensor:
        """Valid positions per window (LongTensor [N]), from the mask alone, read in chunks."""
        return torch.cat([self._read(self._mask, np.bool_, s, s + chunk).sum(1) for s in range(0, self._len, chunk)])

    def _read(self, entry: dict, dtype, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of one tensor of the file."""
        start, stop = max(0, start), min(stop, self._len)
        arr = np.empty((max(0, stop - start), self.context_size), dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self._start + entry["data_offsets"][0] + start * self.context_size * arr.itemsize)
            if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise StagediffError(f"token windows file {self.path} is truncated: delete it and rerun harvest")
        return torch.from_numpy(arr)

    def digest(self) -> str:
        """sha256 of the ids then the mask bytes (recorded when the file was written)."""
        return self._digest

    def save(self, path: str | Path) -> None:
        """Copy the file to `path` (a hard link where the filesystem allows: windows are never modified)."""
        with atomic_path(path) as tmp:
            tmp.unlink()
            try:
                os.link(self.path, tmp)
            except OSError:
                shutil.copyfile(self.path, tmp)


# ---------------------------------------------------------------- reading


def read_texts(cfg: DataConfig, tokenizer=None) -> Iterator[str]:
    """Yield the documents of a dataset, lazily, in file order.

    With `cfg.chat_template` each record's field holds chat messages, rendered
    with `tokenizer`'s chat template (needed then); otherwise it must be a string.
    """
    fmt = resolve_format(cfg)
    if cfg.chat_template and tokenizer is None:
        raise StagediffError(f"dataset {cfg.path} has chat_template: true, which needs the model's tokenizer to render messages")
    if fmt == "hf":
        values = _read_hf(cfg)
    else:
        reader = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
        values = itertools.chain.from_iterable(reader(f, cfg.field) for f in _files(Path(cfg.path).expanduser(), fmt))
    yield from _check_nonempty((_as_text(v, cfg, tokenizer) for v in values), cfg)


def _as_text(value, cfg: DataConfig, tokenizer) -> str:
    """One record's field as text: a string as is, chat messages through the chat template."""
    if not cfg.chat_template:
        if isinstance(value, str):
            return value
        hint = ("it holds chat messages: set chat_template: true to render them with the model's chat template"
                if _is_chat(value) else "set field to a column of text")
        raise StagediffError(f"dataset {cfg.path}: field {cfg.field!r} holds a {type(value).__name__}, not text ({str(value)[:80]!r}): {hint}")
    if not _is_chat(value):
        raise StagediffError(f"dataset {cfg.path}: field {cfg.field!r} holds {str(value)[:80]!r}, not chat messages "
                             "(a list of {role, content}): set field to the messages column, or chat_template: false for text")
    if not getattr(tokenizer, "chat_template", None):
        raise StagediffError(f"dataset {cfg.path} has chat_template: true but the model's tokenizer has no chat template: "
                             "use a chat (instruct) model's tokenizer, or render the messages to text yourself")
    text = tokenizer.apply_chat_template(list(value), tokenize=False)
    bos = tokenizer.bos_token
    # windows start with BOS themselves; one inside the stream would be an outlier activation mid-window
    return text[len(bos):] if bos and text.startswith(bos) else text


def _is_chat(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def resolve_format(cfg: DataConfig) -> str:
    """The concrete format of `cfg` (resolving `auto`), checking the path exists."""
    if cfg.format not in _FORMATS:
        raise StagediffError(f"data format {cfg.format!r} of {cfg.path} is unknown: use one of {', '.join(_FORMATS)}")
    if not cfg.path:
        raise StagediffError("a dataset has no path: set path (and format) in its data section")
    path = Path(cfg.path).expanduser()
    if cfg.format == "hf":
        return "hf"  # may be a hub dataset name, not a local path
    if not path.exists():
        raise StagediffError(f"data path {cfg.path} does not exist: pass a .txt/.jsonl/.parquet file, a folder, "
                             "or a Hugging Face dataset with format: hf")
    if cfg.format != "auto":
        return cfg.format
    if path.is_file():
        if path.suffix in _EXTENSIONS:
            return _EXTENSIONS[path.suffix]
        raise StagediffError(f"cannot tell the format of {cfg.path} from its extension: set format to text, jsonl or parquet")
    if any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return "hf"
    for ext, fmt in _EXTENSIONS.items():
        if any(path.glob(f"*{ext}")):
            return fmt
    raise StagediffError(f"data folder {cfg.path} holds no .txt, .jsonl or .parquet files and is not a saved HF dataset")


def _files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    ext = {v: k for k, v in _EXTENSIONS.items()}[fmt]
    files = sorted(path.glob(f"*{ext}"))
    if not files:
        raise StagediffError(f"data folder {path} holds no {ext} files (format {fmt})")
    return files


def _check_nonempty(texts: Iterable[str], cfg: DataConfig) -> Iterator[str]:
    n = 0
    for t in texts:
        if t:
            n += 1
            yield t
    if n == 0:
        raise StagediffError(f"dataset {cfg.path} holds no text: check the file and the field ({cfg.field!r})")


def _read_text(path: Path, field: str) -> Iterator[str]:
    doc: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                doc.append(line.rstrip("\n"))
            elif doc:
                yield "\n".join(doc)
                doc = []
    if doc:
        yield "\n".join(doc)


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StagediffError(f"{path} line {n} is not valid JSON ({e}): fix or remove that line") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise StagediffError(f"{path} line {n} has no field {field!r} (available: {keys}): set field to the text key")
            if obj[field] is not None:
                yield obj[field]


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StagediffError("reading parquet needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise StagediffError(f"{path} has no column {field!r} (available: {', '.join(names)}): set field to the text column")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for t in batch.column(0).to_pylist():
            if t is not None:
                yield t


def _read_hf(cfg: DataConfig) -> Iterator:
    """Rows' `cfg.field` of a `save_to_disk` folder, or of `load_dataset` (hub id, local data folder), streamed for hub ids."""
    try:
        import datasets
    except ImportError:
        raise StagediffError("reading Hugging Face datasets needs the datasets package: pip install 'stagediff[data]'") from None
    if not sys.stderr.isatty():  # its per-file bars would fill a log (ours print one line every few seconds)
        datasets.disable_progress_bars()
    path = Path(cfg.path).expanduser()
    saved = path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    what = f"dataset {cfg.path}" + (f" ({cfg.name})" if cfg.name else "") + f" split {cfg.split!r}"
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise StagediffError(f"dataset {cfg.path} has no split {cfg.split!r} (splits: {', '.join(ds)}): set split")
                ds = ds[cfg.split]
        else:
            streaming = not path.exists() if cfg.streaming is None else cfg.streaming  # a hub id streams: no full download first
            ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, revision=cfg.revision,
                                       data_files=cfg.data_files, streaming=streaming)
    except StagediffError:
        raise
    except Exception as e:
        offline = " (HF_HUB_OFFLINE=1 is set: only cached datasets load)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise StagediffError(f"could not load {what} ({type(e).__name__}: {str(e)[:300]}){offline}: check path, name "
                             "(the dataset's config), split, revision and data_files") from None
    columns = ds.column_names
    if columns is not None and cfg.field not in columns:
        raise StagediffError(f"{what} has no column {cfg.field!r} (available: {', '.join(columns)}): set field")
    for row in ds:
        if cfg.field not in row:
            raise StagediffError(f"{what} has no column {cfg.field!r} (available: {', '.join(row)}): set field")
        if row[cfg.field] is not None:
            yield row[cfg.field]


def data_fingerprint(cfg: DataConfig) -> str:
    """A stable fingerprint of a dataset: its settings plus the sha256 of every local file."""
    path = Path(cfg.path).expanduser()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
    # the hf options enter only when set, so fingerprints of runs from before they existed stay the same
    options = {k: getattr(cfg, k) for k in ("name", "revision", "data_files", "chat_template") if getattr(cfg, k)}
    return fingerprint({"format": resolve_format(cfg), "field": cfg.field, "split": cfg.split, **options,
                        "path": cfg.path if not files else None,  # only a hub dataset is known by its name
                        "files": [(str(f.relative_to(path)) if path.is_dir() else f.name, sha256_file(f)) for f in files]})


# ---------------------------------------------------------------- windows


def iter_windows(texts: Iterable[str], tokenizer, context_size: int, prepend_bos: bool = True,
                 max_windows: int | None = None, batch_docs: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenize `texts` and yield (ids [n, T], mask [n, T]) chunks of windows of T = `context_size` tokens.

    Documents are joined with EOS between them. Each window starts with BOS
    (when `prepend_bos` and the tokenizer has one) followed by the next
    `context_size - 1` tokens of the stream. A last, shorter window is padded on
    the right. Reading stops as soon as `max_windows` windows are filled. Only
    one batch of `batch_docs` documents is in memory at a time.
    """
    bos = tokenizer.bos_token_id if prepend_bos else None
    eos = tokenizer.eos_token_id
    pad = next(t for t in (tokenizer.pad_token_id, eos, 0) if t is not None)
    start = int(bos is not None)
    body = context_size - start  # stream tokens per window
    if body < 1:
        raise StagediffError(f"context_size {context_size} is too small: use at least 2")

    def fill(tokens: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:  # n windows, the last maybe short
        ids = torch.full((n, context_size), pad, dtype=torch.long)
        mask = torch.zeros((n, context_size), dtype=torch.bool)
        if bos is not None:
            ids[:, 0] = bos
        flat = torch.tensor(tokens, dtype=torch.long)
        full = len(tokens) // body
        ids[:full, start:] = flat[:full * body].view(full, body)
        mask[:full, start:] = True
        if full < n:  # the padded tail
            ids[full, start:start + len(tokens) - full * body] = flat[full * body:]
            mask[full, start:start + len(tokens) - full * body] = True
        return ids, mask

    n_windows = 0
    stream: list[int] = []
    first = True
    docs = iter(texts)
    while max_windows is None or n_windows < max_windows:
        batch = list(itertools.islice(docs, batch_docs))
        if not batch:
            break
        with _no_word_cache(tokenizer):
            # verbose=False: long documents are fine here, we cut them into windows ourselves
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if not first and eos is not None:
                stream.append(eos)
            first = False
            stream.extend(ids)
        n_full = len(stream) // body
        if max_windows is not None:
            n_full = min(n_full, max_windows - n_windows)
        if n_full:
            yield fill(stream[:n_full * body], n_full)
            n_windows += n_full
        del stream[:n_full * body]
    if n_windows == 0:
        raise StagediffError(f"the data holds {len(stream)} tokens, less than one window of {body} (context_size {context_size}): "
                             "add more text or lower context_size")
    if stream and (max_windows is None or n_windows < max_windows):  # shorter than body, padded
        yield fill(stream, 1)


@contextlib.contextmanager
def _no_word_cache(tokenizer) -> Iterator[None]:
    """Switch off a fast BPE tokenizer's word cache for a while.

    The cache keeps the split of every word met (up to 10,000 words); its memory
    grows with the data and, freed or not, stays with the process (measured: +5 MB
    from 50k to 1M tokens of KJV). Tokenizing without it is ~20% slower, still
    hundreds of times faster than the forward that follows.
    """
    resize = getattr(getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None), "_resize_cache", None)
    if resize is None:  # not a BPE model, or a tokenizers version without the switch
        yield
        return
    resize(0)
    try:
        yield
    finally:
        resize(10_000)  # tokenizers' default capacity, for the tokenizer's other users


def pack_windows(texts: Iterable[str], tokenizer, context_size: int, prepend_bos: bool = True,
                 max_windows: int | None = None, batch_docs: int = 256) -> TokenWindows:
    """The windows of `iter_windows` in memory (small data, tests); `write_windows` keeps them on disk."""
    chunks = list(iter_windows(texts, tokenizer, context_size, prepend_bos, max_windows, batch_docs))
    return TokenWindows(ids=torch.cat([c[0] for c in chunks]), mask=torch.cat([c[1] for c in chunks]))


def write_windows(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> WindowsFile:
    """Stream window chunks (of `iter_windows`) into a safetensors file at `path`, atomically; return it.

    The ids and masks go to two unnamed temp files as they come; once their count
    is known, the safetensors header is written and both are copied behind it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, width, tokens = 0, None, 0
    with tempfile.TemporaryFile(dir=path.parent) as ids_f, tempfile.TemporaryFile(dir=path.parent) as mask_f:
        for ids, mask in chunks:
            width = ids.shape[1]
            ids_f.write(ids.contiguous().numpy())  # the buffer itself, no bytes copy
            mask_f.write(mask.contiguous().numpy())
            n, tokens = n + len(ids), tokens + int(mask.sum())
        if width is None:
            raise StagediffError(f"no token windows to write to {path}: the data is empty")
        n_ids = n * width * 8
        placeholder = "0" * 64  # the sha256 is known once the data is written: one pass over it, not two
        header = {"ids": {"dtype": "I64", "shape": [n, width], "data_offsets": [0, n_ids]},
                  "mask": {"dtype": "BOOL", "shape": [n, width], "data_offsets": [n_ids, n_ids + n * width]},
                  "__metadata__": {"num_tokens": str(tokens), "sha256": placeholder}}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads its header to 8 bytes
        h = hashlib.sha256()
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little") + blob)
            for f in (ids_f, mask_f):
                f.seek(0)
                while block := f.read(1 << 22):
                    out.write(block)
                    h.update(block)
            out.seek(8 + blob.index(f'"sha256":"{placeholder}"'.encode()) + len('"sha256":"'))
            out.write(h.hexdigest().encode())
    return WindowsFile(path)
