"""Write results atomically: everything goes to a hidden staging folder, then is moved in place.

Failures (disk full, file size limit, input external data gone) become one-line
:class:`UserError` s naming the file and the reason; the staging folder is removed, so the output
folder holds nothing new (a folder created for the output is removed again when left empty).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import onnx_ir as ir

from mha2sha.errors import UserError
from mha2sha.io.direct_io import direct_writer
from mha2sha.io.load import EXTERNAL_FILES_META, check_external_data_unchanged

__all__ = ["staging_dir", "save_model", "parse_size", "EMBED_LIMIT_BYTES", "SAVE_WORKERS"]

#: Up to this many bytes of weights a model whose input had no external data embeds them; above it
#: (or when the input kept its weights in external files) they go to one external data file, so a
#: whole-model protobuf is never built in memory (for 0.9 GB of weights that protobuf and its
#: serialised copy took 3.4 GB).
EMBED_LIMIT_BYTES = 32 << 20
#: Threads writing the external data file when most of its bytes are computed (transposed Conv
#: weights of ``--target htp``): each materialises and writes its own tensors at their offsets, so
#: the CPU work of one overlaps the I/O of the other (7B fp16: 52 s against 96 s with one). When
#: most bytes are copied file to file (direct I/O or ``copy_file_range``, ``io/direct_io.py``) one
#: thread is faster: two concurrent kernel copies into one file took 41 s against 33 s.
SAVE_WORKERS = 2
_STAGE_PREFIX = ".mha2sha-"

logger = logging.getLogger(__name__)


def _oversized_tensor_note(record: logging.LogRecord) -> bool:
    """onnx_ir warns about each tensor larger than the shard size; a file of its own is the
    documented behaviour of ``shard_bytes``, so it is an INFO line of ours instead."""
    if "exceeds max_shard_size_bytes" in record.getMessage():
        logger.info("%s", record.getMessage())
        return False
    return True


class _WriteTracker:
    """The last file opened for writing under ``folder``.

    A failed ``write`` (ENOSPC, EFBIG) raises an OSError without a file name; Python's ``open``
    audit event (raised by ``open``, ``os.open``, ``numpy.tofile``, ``tempfile``) tells which file
    it was. One process-wide audit hook serves the trackers that are active.
    """

    active: list[_WriteTracker] = []
    hooked = False

    def __init__(self, folder: Path):
        self.folder = os.path.join(os.path.abspath(folder), "")
        self.last: str | None = None

    @classmethod
    def _audit(cls, event: str, args: tuple) -> None:
        if event != "open" or not cls.active:
            return
        path, _mode, flags = args
        if not isinstance(flags, int) or not flags & (os.O_WRONLY | os.O_RDWR):
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            name = os.path.abspath(os.fsdecode(path))
            for tracker in cls.active:
                if name.startswith(tracker.folder):
                    tracker.last = name

    @classmethod
    @contextlib.contextmanager
    def watch(cls, folder: Path) -> Iterator[_WriteTracker]:
        if not cls.hooked:
            sys.addaudithook(cls._audit)
            cls.hooked = True
        tracker = cls(folder)
        cls.active.append(tracker)
        try:
            yield tracker
        finally:
            cls.active.remove(tracker)


class _PythonWrite(ir.LazyTensor):
    """Writes its tensor with ``file.write``, so a failed write keeps its errno.

    ``numpy.ndarray.tofile`` (what onnx_ir uses for in-memory and lazily sliced tensors) reports a
    full disk as "N requested and M written", without errno: the reason would be lost. Bytes are
    the same (little-endian, one tensor materialised at a time). External tensors keep onnx_ir's
    copy path (direct I/O or ``copy_file_range``), which raises proper errors.
    """

    def tofile(self, file) -> None:
        tensor = self._evaluate()
        if self.dtype.bitwidth >= 8 and self.dtype != ir.DataType.STRING and sys.byteorder == "little":
            with direct_writer(file, tensor.nbytes) as out:  # past the page cache (io/direct_io.py)
                _write_chunked(out, tensor.numpy())
        else:
            file.write(tensor.tobytes())


_CHUNK_BYTES = 32 << 20


def _write_chunked(file, array: np.ndarray) -> None:
    """Write ``array`` (often a strided view of a memory-mapped weight: a head's rows, a transposed
    Conv weight) in C order with bounded memory: ``_CHUNK_BYTES`` of output at a time.

    A chunk of a transposed view reads a few bytes of every source row; the kernel maps whole
    (large) folios per fault, so it would make the entire mapped source resident. So each chunk is
    filled in blocks along the axis that walks the source slowest (~``_CHUNK_BYTES`` of source
    each), and the source pages are dropped from this process after each block (they stay in the
    page cache). Measured on a ``[1536, 151936]`` fp16 LM head -> ``[151936, 1536, 1, 1]``: 0.85 s
    and +125 MB, against 3.4 s and +930 MB for one whole transposed copy.
    """
    if array.ndim == 0 or array.size == 0:
        file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        return
    source = _mapping_of(array)
    if source is None and array.flags.c_contiguous:
        file.write(array.reshape(-1).view(np.uint8).data)
        return
    if source is not None and hasattr(mmap, "MADV_WILLNEED"):
        source.madvise(mmap.MADV_WILLNEED)  # one sequential read-ahead, not a fault per strided page
    flat = _transposed_2d(array)
    if flat is not None:
        _write_transposed(file, flat, source)
        return
    rows = max(1, _CHUNK_BYTES // max(1, array[0].nbytes))
    outer = int(np.argmax(np.abs(array.strides)))  # the axis that strides furthest in the source
    step = max(1, _CHUNK_BYTES // max(1, abs(array.strides[outer])))
    for start in range(0, array.shape[0], rows):
        part = array[start : start + rows]
        if outer == 0:
            chunk = np.ascontiguousarray(part)
            _drop_pages(source)
        else:
            chunk = np.empty(part.shape, part.dtype)
            for k in range(0, part.shape[outer], step):
                block = (slice(None),) * outer + (slice(k, k + step),)
                chunk[block] = part[block]
                _drop_pages(source)
        file.write(chunk.reshape(-1).view(np.uint8).data)


_TILE = 256  # elements per side of a transposed tile: both tiles fit in L2
#: Elements added to each row of the scratch a source tile is copied into before it is transposed.
#: LLM weights have power-of-two rows (4096 fp16 = 8 KiB): a tile's rows read in place all map to
#: the same cache sets and evict each other (0.63 GB/s for a [4096, 4096] fp16 weight); copied row
#: by row into a padded scratch first, the transposing read runs at 2.1 GB/s on every shape.
_SCRATCH_PAD = 32


def _transposed_2d(array: np.ndarray) -> np.ndarray | None:
    """``array`` as a 2-D view ``[m, n]`` whose rows walk the source contiguously down a column (a
    transposed weight: Conv ``[out, in, 1, 1]`` of a MatMul ``[in, out]``, or a head's rows of it)."""
    shape = [d for d in array.shape if d != 1]
    if len(shape) != 2:
        return None
    try:
        flat = array.reshape(shape)  # drops unit axes: a view for any strides
    except ValueError:
        return None
    if flat.strides[0] != flat.itemsize or abs(flat.strides[1]) <= flat.itemsize:
        return None
    return flat


def _write_transposed(file, flat: np.ndarray, source: mmap.mmap | None) -> None:
    """Write a transposed view in C order: output rows in chunks whose columns of the source span
    whole pages (each source page is read once, then dropped from this process), each chunk filled
    by cache-sized tiles."""
    m, n = flat.shape
    src = flat.T  # [n, m]: rows strided, columns contiguous
    page = max(1, mmap.PAGESIZE // flat.itemsize)
    rows = max(page, (_CHUNK_BYTES // max(1, n * flat.itemsize)) // page * page)
    buffer = np.empty((min(rows, m), n), flat.dtype)
    scratch = np.empty((_TILE, _TILE + _SCRATCH_PAD), flat.dtype)
    for start in range(0, m, rows):
        count = min(rows, m - start)
        chunk = buffer[:count]
        for a in range(0, count, _TILE):
            for b in range(0, n, _TILE):
                tile = src[b : b + _TILE, start + a : start + min(a + _TILE, count)]
                staged = scratch[: tile.shape[0], : tile.shape[1]]
                staged[...] = tile  # contiguous row pieces: a copy at memory speed
                chunk[a : a + tile.shape[1], b : b + tile.shape[0]] = staged.T
        _drop_pages(source)
        file.write(chunk.reshape(-1).view(np.uint8).data)


def _drop_pages(source: mmap.mmap | None) -> None:
    if source is not None:
        source.madvise(mmap.MADV_DONTNEED)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The read-only file mapping ``array`` is a view of, if any (dropping its pages is safe)."""
    base: object = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base if hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED") else None
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return None


def _returning(tensor: ir.TensorProtocol) -> Callable[[], ir.TensorProtocol]:
    return lambda: tensor


@contextlib.contextmanager
def _written_by_python(model: ir.Model) -> Iterator[None]:
    """Every initializer not already external is written through :class:`_PythonWrite`."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            swapped.append((value, tensor))
            # LazyTensor is annotated with onnx_ir's concrete Shape and dict; it only stores them,
            # and the protocol's ShapeProtocol / MutableMapping are what every tensor has.
            value.const_value = _PythonWrite(
                _returning(tensor),
                tensor.dtype,
                cast(ir.Shape, tensor.shape),
                name=tensor.name,
                doc_string=tensor.doc_string,
                metadata_props=cast("dict[str, str]", tensor.metadata_props),
            )
    try:
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _shown(path: str | os.PathLike) -> Path:
    """Where a staged file will live: without the staging folder and onnx_ir's temporary folder."""
    parts = list(Path(path).parts)
    if len(parts) >= 2 and parts[-2].startswith(f".{parts[-1]}."):  # onnx_ir: .<name>.xxxx/<name>
        del parts[-2]
    if parts and parts[-1].startswith(".") and parts[-1].endswith(".tmp"):  # .<name>.xxxx.tmp (atomic writes)
        parts[-1] = parts[-1][1:].rsplit(".", 2)[0]
    return Path(*[p for p in parts if not p.startswith(_STAGE_PREFIX)])


def _os_error(e: OSError, tracker: _WriteTracker, fallback: str) -> UserError:
    """One line naming the file and the reason of a failed write (or read, while saving)."""
    reason = e.strerror or " ".join(str(e).split())
    if e.errno is None:  # onnx_ir copying an external tensor whose file became shorter
        return UserError(f"could not read the model's external data while saving: {reason}")
    filename = os.fsdecode(e.filename) if e.filename is not None else None
    if filename is not None and not os.path.abspath(filename).startswith(tracker.folder):
        return UserError(f"could not read {filename}: {reason}")
    target = filename or tracker.last
    return UserError(f"could not write {_shown(target)}: {reason}" if target else f"{fallback}: {reason}")


@contextlib.contextmanager
def staging_dir(out_dir: Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary folder inside ``out_dir``; its files are moved into ``out_dir`` only on success.

    On success each staged file replaces the file of the same name (folders are merged, never
    removed: a user's ``inputs/mine.txt`` stays), and the files of ``replaces`` (relative paths an
    earlier run of the same output wrote) that this run did not write again are removed, so the
    outputs are replaced as a set. The move holds a lock on ``out_dir`` so concurrent runs into one
    folder leave one run's set, not a mix. On any failure -- a signal included -- the staging folder
    is removed, and so are the folders created for ``out_dir`` when they are still empty: the output
    location is left as it was found. Staging folders of dead processes are removed on the way in.
    """
    out_dir = Path(os.path.abspath(out_dir))
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    prefix = f"{_STAGE_PREFIX}{os.getpid()}-"
    done = False
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _remove_dead_stages(out_dir)
            stage = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
        except OSError as e:
            raise UserError(f"output folder not writable: {out_dir} ({e.strerror})") from None
        with _WriteTracker.watch(stage) as tracker:
            try:
                yield stage
            except OSError as e:
                raise _os_error(e, tracker, f"could not write to {out_dir}") from None
        with _locked(out_dir):
            written = _move_into(stage, out_dir)
            for rel in replaces:
                stale = out_dir / rel
                if rel not in written and stale.is_file() and _inside(stale, out_dir):
                    stale.unlink()
        done = True
    except OSError as e:
        raise UserError(f"could not write to {out_dir}: {e.strerror or e}") from None
    finally:
        # every staging folder of this process, even one a signal interrupted before it was named
        for leftover in out_dir.glob(f"{prefix}*") if out_dir.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
        if not done:
            _remove_empty(created)


def _inside(path: Path, folder: Path) -> bool:
    return os.path.abspath(path).startswith(os.path.join(os.path.abspath(folder), ""))


def _move_into(stage: Path, out_dir: Path) -> set[str]:
    """Move every staged file to the same relative path under ``out_dir``; returns those paths."""
    written = set()
    for item in sorted(stage.rglob("*")):
        if item.is_dir():
            continue
        rel = item.relative_to(stage)
        target = out_dir / rel
        if target.is_dir() and not target.is_symlink():
            raise UserError(f"cannot write {target}: a folder of that name is in the way")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(item, target)
        written.add(rel.as_posix())
    return written


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on its descriptor: no lock file is left)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_dead_stages(out_dir: Path) -> None:
    """Staging folders whose process is gone (killed with SIGKILL, machine crash)."""
    for stage in out_dir.glob(f"{_STAGE_PREFIX}*"):
        pid = stage.name[len(_STAGE_PREFIX) :].split("-", 1)[0]
        if stage.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(
    model: ir.Model,
    path: Path,
    shard_bytes: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> list[Path]:
    """Save ``model`` to ``path``, its weights in a single ``<name>.data`` external file when the input
    kept them in external files or they exceed :data:`EMBED_LIMIT_BYTES` (else embedded).

    With ``shard_bytes`` the weights always go to external files of at most that many bytes
    (a tensor larger than that gets a file of its own): ``<name>.data`` when one file is enough,
    else ``<name>-00001-of-0000K.data`` ... (Hugging Face's naming). Each tensor records its file.
    ``progress(bytes written, bytes in all)`` follows the weights as they are written.
    Returns the files written, the ``.onnx`` first.
    """
    if shard_bytes is not None and shard_bytes <= 0:
        raise UserError(f"shard size must be a positive number of bytes, got {shard_bytes}")
    check_external_data_unchanged(model)  # fail before writing anything, never midway
    data = path.with_suffix(".data")
    data_files: list[str] = []
    total = _weight_bytes(model)
    done = 0
    report = progress or (lambda done, total: None)

    def written(tensor: ir.TensorProtocol, info: ir.external_data.CallbackInfo) -> None:
        nonlocal done
        if info.filename not in data_files:
            data_files.append(info.filename)
        done += tensor.nbytes
        report(done, total)

    onnx_ir_log = logging.getLogger("onnx_ir.external_data")
    onnx_ir_log.addFilter(_oversized_tensor_note)
    with _WriteTracker.watch(path.parent) as tracker:
        try:
            if shard_bytes is not None or total > EMBED_LIMIT_BYTES or _had_external_data(model):
                # Every external tensor starts on a 4096-byte boundary (onnx_ir aligns to
                # max(4096, alignment)); align_threshold=0 also aligns the small ones, which onnx_ir
                # would otherwise pack densely. ir.save streams: one tensor materialised at a time
                # (sharded or not; shards are written one after the other).
                with _written_by_python(model):
                    ir.save(
                        model,
                        path,
                        external_data=data.name,
                        alignment=64,
                        align_threshold=0,
                        max_shard_size_bytes=shard_bytes,
                        callback=written,
                        max_workers=_workers(model, total, shard_bytes),
                    )
                files = [path, *(path.parent / f for f in data_files)]
            else:
                # Naming an external file with a threshold above every tensor embeds them all,
                # including weights the input kept in external files (a plain save would keep
                # dangling references).
                ir.save(model, path, external_data=data.name, size_threshold_bytes=(1 << 62))
                if data.exists() and data.stat().st_size == 0:
                    data.unlink()
                files = [path]
            report(total, total)
        except OSError as e:
            raise _os_error(e, tracker, f"could not write {_shown(path)}") from None
        finally:
            onnx_ir_log.removeFilter(_oversized_tensor_note)
    _refuse_overwriting_inputs(model, files)
    return files


def _workers(model: ir.Model, total: int, shard_bytes: int | None) -> int:
    """:data:`SAVE_WORKERS` when most bytes are computed; one thread for kernel copies, and for
    shards (written one after the other, so a failure names the first file that could not be written)."""
    if shard_bytes is not None or _computed_bytes(model) * 2 <= total:
        return 1
    return SAVE_WORKERS


def _computed_bytes(model: ir.Model) -> int:
    """Bytes of weights written from memory (sliced, transposed), not copied file to file."""
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


def _had_external_data(model: ir.Model) -> bool:
    """The model was loaded with weights in external files (recorded by ``load_model``)."""
    return bool(model.meta.get(EXTERNAL_FILES_META)) or any(
        isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()
    )


def _refuse_overwriting_inputs(model: ir.Model, files: list[Path]) -> None:
    """A written file must not replace one of the input's external data files once moved in place."""
    inputs = list((model.meta.get(EXTERNAL_FILES_META) or {}).keys())
    for file in files:
        final = _shown(file)
        if final != file and any(_same(final, i) for i in inputs):
            raise UserError(
                f"output {final} would overwrite the input's external data; choose another -o folder or --name"
            )


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def parse_size(text: str) -> int:
    """``2GB`` (10^9), ``500MB``, ``1GiB`` (2^30), ``1073741824`` -> bytes (> 0)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise UserError(f"bad size '{text}': use bytes or a unit, e.g. 2GB, 500MB, 1GiB, 1073741824")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "b").lower()])
    if size <= 0:
        raise UserError(f"bad size '{text}': must be more than 0 bytes")
    return size
