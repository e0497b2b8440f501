"""Saving and loading pyinf results: one safetensors file holding the tensors, with JSON
metadata (format, versions, module names and shapes, settings, a CRC32 per tensor) in
its header. Files are written to a temporary name and renamed into place, so a crash
never leaves a half-written file under the final name; loading checks the format, the
kind and every tensor's checksum, and names what is wrong."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "pyinf/1"

# The process's umask, read once (os.umask can only be read by setting it): saved files get
# the mode a plain open() would give them, not mkstemp's private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class CorruptFileError(ValueError):
    """A saved pyinf file that cannot be trusted: truncated, altered or of another kind."""


def versions() -> Dict[str, str]:
    from . import __version__

    return {"pyinf": __version__, "torch": torch.__version__}


def _raw(t: torch.Tensor):
    """A tensor's bytes as a numpy array (bf16/fp16 through a same-size integer view: numpy has no bf16)."""
    raw = t.detach().contiguous().cpu()
    if raw.dtype in (torch.bfloat16, torch.float16):
        raw = raw.view(torch.int16)
    return raw.numpy()


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(_raw(t))  # checksum of the raw bytes


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary name next to ``path`` to write to; when the block ends without an error the
    file is synced to disk, given the mode of a plain ``open()`` (mkstemp creates 0600) and
    renamed to ``path``, so a
    reader never sees a half-written file and a crash leaves the previous one in place. On an
    error the temporary file is removed. Unique per writer: processes (shards) writing the
    same path at once each rename a whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder, older_than: float = 600.0, names: Optional[Iterable[str]] = None) -> None:
    """Removes the temporary files (:func:`atomic_path`'s) that processes killed while
    saving left in ``folder`` (those of files called ``names`` only, when given: a user's
    folder may hold other programs' ``.*.tmp``); those written to in the last ``older_than``
    seconds may be another process's save in progress, and stay."""
    now = time.time()
    patterns = [".*.tmp"] if names is None else [f".{glob.escape(name)}.*.tmp" for name in names]
    for tmp in (t for pattern in patterns for t in Path(folder).glob(pattern)):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            pass


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def _meta_crc(header: Dict) -> int:
    """Checksum of the metadata itself (everything but this checksum), in a canonical JSON
    form: settings that results depend on (a query's measurement, the damping) live there."""
    body = {k: v for k, v in header.items() if k != "meta_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


# what save adds to a file's metadata about the file itself (a loaded object's meta holds them)
FILE_KEYS = ("format", "kind", "versions", "crc32", "layout", "meta_crc32")


def save(path, kind: str, tensors: Dict[str, torch.Tensor], meta: Dict) -> Path:
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = dict(meta, format=FORMAT, kind=kind, versions=versions(),
                  crc32={k: _crc(v) for k, v in tensors.items()},
                  layout={k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in tensors.items()})
    header = json.loads(json.dumps(header))  # as it will read back (tuples become lists)
    header["meta_crc32"] = _meta_crc(header)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={"pyinf": json.dumps(header)})
        except Exception as exc:  # safetensors' own error (a full disk) names no file
            if isinstance(exc, OSError):
                raise
            raise OSError(f"could not write {path}: {exc}") from exc
    return path


# safetensors' names of the dtypes pyinf saves
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_streamed(path, kind: str, layout: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int]],
                  tensor: Callable[[str], torch.Tensor], meta: Dict, *, checked: bool = False) -> Path:
    """:func:`save` of a file too large to hold in memory (a 7B model's merged factors, ~123
    GB): ``layout`` gives each tensor's dtype, shape and CRC32 up front, and ``tensor(key)``
    produces it when its bytes are written, one tensor in memory at a time. :func:`load`
    reads the file as one :func:`save` wrote of the same tensors (the same tensors and
    metadata; the header's key order may differ). A tensor that is not what ``layout`` says
    (dtype, shape; and checksum, unless ``checked``: ``tensor`` gives tensors already checked
    against these very checksums, as :func:`reading` does) stops the write, and nothing is
    left under ``path``."""
    path = Path(path)
    # safetensors' order: larger elements first, so every tensor's offset stays aligned to its size
    keys = sorted(layout, key=lambda k: (-layout[k][0].itemsize, k))
    header = dict(meta, format=FORMAT, kind=kind, versions=versions(),
                  crc32={k: layout[k][2] for k in keys},
                  layout={k: [str(layout[k][0]).replace("torch.", ""), list(layout[k][1])] for k in keys})
    header = json.loads(json.dumps(header))
    header["meta_crc32"] = _meta_crc(header)
    entries, offset = {"__metadata__": {"pyinf": json.dumps(header)}}, 0
    for k in keys:
        dtype, shape, _ = layout[k]
        size = dtype.itemsize * math.prod(shape)
        entries[k] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(head)))
                f.write(head)
                for k in keys:
                    t = tensor(k)
                    dtype, shape, crc = layout[k]
                    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                        raise ValueError(f"could not write {path}: tensor {k!r} is {t.dtype} {tuple(t.shape)}, its "
                                         f"layout says {dtype} {tuple(shape)}")
                    if not checked and _crc(t) != crc:
                        raise ValueError(f"could not write {path}: tensor {k!r} does not match its given checksum")
                    f.write(_raw(t).data)
        except OSError as exc:  # a full disk: name the file
            raise OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}") from exc
    return path


def _read(path: Path, what: str, read_tensors: Callable) -> Tuple[Dict, Dict]:
    """``(read_tensors(f), pyinf metadata)`` of a safetensors file, naming what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("pyinf")
            tensors = read_tensors(f)
    except Exception as exc:
        raise CorruptFileError(f"{path} is not a readable {what} (truncated or corrupt): {exc}") from exc
    if raw_meta is None:
        raise CorruptFileError(f"{path} is a safetensors file without pyinf metadata")
    try:
        return tensors, json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: its pyinf metadata is not valid JSON: {exc}") from exc


def _check_meta(path: Path, meta: Dict) -> None:
    # files saved before the metadata had a checksum have neither it nor a layout; a file with
    # one of them has both, so damage to the checksum's own key does not switch the check off
    if ("meta_crc32" in meta or "layout" in meta) and _meta_crc(meta) != meta.get("meta_crc32"):
        raise CorruptFileError(f"{path}: its metadata fails its checksum (the file was altered or damaged)")


def _check_kind(path: Path, meta: Dict, kind: str) -> None:
    if meta.get("format") != FORMAT:
        raise CorruptFileError(f"{path}: format {meta.get('format')!r}, this pyinf reads {FORMAT!r}")
    if meta.get("kind") != kind:
        raise CorruptFileError(f"{path} holds pyinf {meta.get('kind')!r}, not {kind!r}")
    _check_meta(path, meta)


def load_meta(path, kind: str) -> Dict:
    """The metadata of a pyinf ``kind`` file, checked (format, kind, its checksum), without
    reading any tensor."""
    path = Path(path)
    _, meta = _read(path, f"pyinf {kind} file", lambda f: None)
    _check_kind(path, meta, kind)
    return meta


def load(path, kind: str, keys: Optional[Callable[[str], bool]] = None) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """A pyinf ``kind`` file's tensors and metadata, every tensor checked against the
    metadata's layout and checksum. ``keys``: read only the tensors it says yes to (the file's
    list of tensors is still checked whole)."""
    path = Path(path)

    def read(f):
        names = list(f.keys())
        return names, {k: f.get_tensor(k) for k in names if keys is None or keys(k)}

    (names, tensors), meta = _read(path, f"pyinf {kind} file", read)
    _check_kind(path, meta, kind)
    _check_names(path, meta, names)
    for k, t in tensors.items():
        _check_tensor(path, meta, k, t)
    return tensors, meta


@contextlib.contextmanager
def reading(path, kind: str) -> Iterator[Tuple[Dict, Callable[[str], torch.Tensor]]]:
    """A pyinf ``kind`` file's metadata (checked) and a function that reads one of its tensors,
    checked against the metadata's layout and checksum as it is read: for files too large to
    load whole (a 7B model's factors), one tensor in memory at a time."""
    path = Path(path)
    meta = load_meta(path, kind)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CorruptFileError(f"{path} is not a readable pyinf {kind} file (truncated or corrupt): {exc}") from exc
    with handle as f:
        _check_names(path, meta, f.keys())

        def tensor(key: str) -> torch.Tensor:
            try:
                t = f.get_tensor(key)
            except Exception as exc:
                raise CorruptFileError(f"{path}: tensor {key!r} cannot be read (truncated or corrupt): {exc}") from exc
            _check_tensor(path, meta, key, t)
            return t

        yield meta, tensor


def verify(path, kind: str) -> Dict:
    """:func:`load`'s checks of the whole file (its metadata, then every tensor's layout and
    checksum) with one tensor in memory at a time: the file's metadata, or a CorruptFileError.
    For files too large to load only to be told they are whole (a 7B model's factors)."""
    with reading(path, kind) as (meta, tensor):
        for key in meta.get("crc32", {}):
            tensor(key)
    return meta


def _check_names(path: Path, meta: Dict, names) -> None:
    expected = meta.get("crc32", {})
    if set(expected) != set(names):
        missing = sorted(set(expected) ^ set(names))[:5]
        raise CorruptFileError(f"{path}: tensors do not match its metadata (differences: {missing})")


def _check_tensor(path: Path, meta: Dict, k: str, t: torch.Tensor) -> None:
    layout = (meta.get("layout") or {}).get(k)
    if layout is not None and (str(t.dtype).replace("torch.", ""), list(t.shape)) != (layout[0], layout[1]):
        raise CorruptFileError(f"{path}: tensor {k!r} is {t.dtype} {tuple(t.shape)}, its metadata says "
                               f"{layout[0]} {tuple(layout[1])} (the file was altered or damaged)")
    if _crc(t) != meta.get("crc32", {})[k]:
        raise CorruptFileError(f"{path}: tensor {k!r} fails its checksum (the file was altered or damaged)")


def hash_tensor(h, t: torch.Tensor) -> None:
    """Feeds a tensor's dtype, shape and raw bytes into the hashlib object ``h``."""
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def differences(found: Dict, want: Dict) -> List[str]:
    """``key: found there, wanted now`` for each entry of ``want`` that ``found`` does not match.
    ``want`` is compared as it reads back from a file's JSON (a tuple is a list there)."""
    want = json.loads(json.dumps(want))
    return [f"{k}: {found.get(k)!r} there, {v!r} now" for k, v in want.items() if found.get(k) != v]


def load_if_same_run(path, kind: str, want: Dict, *, on_damaged: Callable[[str], None], remedy: str,
                     keys: Optional[Callable[[str], bool]] = None) -> Optional[Tuple[Dict[str, torch.Tensor], Dict]]:
    """A saved piece of a resumable run: ``(tensors, meta)`` if the file at ``path`` records
    every value of ``want`` in its metadata (``keys``: only the tensors it says yes to, as for
    :func:`load`); None if it is absent, or damaged (``on_damaged``
    is told why, and the caller computes it again). A file of another run raises a
    ValueError naming each difference, then ``remedy``: never a silent mix of two runs."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors, meta = load(path, kind, keys=keys)
    except CorruptFileError as exc:
        on_damaged(str(exc))
        return None
    diff = differences(meta, want)
    if diff:
        raise ValueError(f"{path} belongs to another run ({'; '.join(diff)}); {remedy}")
    return tensors, meta


def describe(path) -> Dict:
    """What a saved pyinf file holds, read from its header without loading or checking the
    tensors (``pyinf info``): kind, format, versions, every tensor's dtype and shape, and the
    rest of its metadata (run fingerprints, settings). Metadata that fails its checksum is a
    CorruptFileError, as for :func:`load`: its settings would be shown as if they held."""
    path = Path(path)

    def shapes(f):
        return {k: dict(dtype=str(v.get_dtype()), shape=list(v.get_shape()))
                for k, v in ((k, f.get_slice(k)) for k in f.keys())}

    tensors, meta = _read(path, "pyinf file", shapes)
    _check_meta(path, meta)
    for key in ("crc32", "meta_crc32", "layout"):  # checksums and the dtypes / shapes shown as `tensors`
        meta.pop(key, None)
    record = meta.get("model_weights")
    if isinstance(record, dict) and isinstance(record.get("tensors"), list):  # a hash per parameter: summarised
        meta["model_weights"] = f"record of {len(record['tensors'])} parameters (see pyinf.fingerprint)"
    # the file's own facts win over metadata keys of the same name (a run_meta may hold "path")
    return {**meta, "path": str(path), "bytes": path.stat().st_size, "tensors": tensors}
