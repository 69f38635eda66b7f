"""Write weights with direct I/O (``O_DIRECT``), past the page cache: :func:`copy_range` copies a
byte range of one file into another, :func:`direct_writer` writes computed bytes (a transposed or
sliced weight) of one tensor.

Why not ``copy_file_range``: on a filesystem without shared extents (ext4) the kernel copies every
byte into fresh page-cache pages of the output, one CPU ``memcpy`` per byte, and the trailing
``sync`` writes them back. On a VM whose balloon driver hands free memory back to the host, each of
those pages is first faulted in by the host: the 3.5 GB of Qwen2.5-1.5B took 13-14 s of mostly
system time, against 4.2 s for ``dd iflag=direct oflag=direct`` of the same file with 0.2 s of CPU
(benchmarks/RESULTS.md). With direct I/O the disk moves the bytes by DMA between the files and a
few reused buffers; a second thread reads the next chunk while one is written.

Requirements of ``O_DIRECT`` and how they are met: file offsets, lengths and buffer addresses must
be multiples of the device's block size (:data:`ALIGN` covers every common one). The output offset
must be aligned (the save aligns every external tensor to 4096 bytes); the input range is read as
its aligned cover and shifted in memory when it starts mid-block; the last partial block of the
range is written through the caller's ordinary descriptor (no padding, the file's size is exactly
what a plain copy gives). A filesystem that refuses ``O_DIRECT`` (tmpfs, some network filesystems)
or a platform without it makes :func:`copy_range` return ``False``: the caller copies the usual way
(also when a device wants a larger alignment: the range is then written again, whole).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from mha2sha.errors import UserError

__all__ = ["ALIGN", "CHUNK_BYTES", "DIRECT_MIN_BYTES", "DirectWriter", "copy_range", "direct_writer"]

#: Alignment of offsets, lengths and buffers (covers 512-byte and 4 KiB block devices).
ALIGN = 4096
#: Bytes moved per read / write; two reads are in flight at most. 4 MB copied 3 GB in 3.6-3.7 s
#: against 4.0-4.1 s with 8 MB, and three buffers per writing thread stay small.
CHUNK_BYTES = 4 << 20
#: Ranges shorter than this are not worth the extra descriptors: plain copy.
DIRECT_MIN_BYTES = 1 << 20

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_USE_CACHE = sys.platform == "linux"
_buffers = threading.local()


def _buffer(k: int) -> memoryview:
    """This thread's ``k``-th page-aligned buffer, made on first use and kept: 0 and 1 hold the
    reads in flight, 2 a chunk shifted into alignment or a :class:`DirectWriter`'s blocks (a thread
    runs one copy or one writer at a time). Anonymous mappings are page-aligned; reusing them keeps
    their pages resident (fresh pages are exactly what this module avoids)."""
    size = CHUNK_BYTES + ALIGN
    made: dict[int, memoryview] | None = getattr(_buffers, "made", None)
    if made is None or getattr(_buffers, "size", None) != size:
        made = _buffers.made = {}
        _buffers.size = size
    if k not in made:
        made[k] = memoryview(mmap.mmap(-1, size))
    return made[k]


def _open_direct(path: str | os.PathLike, flags: int) -> int | None:
    try:
        return os.open(path, flags | _O_DIRECT)
    except OSError:  # EINVAL: the filesystem refuses direct I/O
        return None


def copy_range(source: str | os.PathLike, offset: int, length: int, out) -> bool:
    """Append ``length`` bytes of ``source`` from ``offset`` to the open binary file ``out`` at its
    position (which then moves past them), like ``out.write(...)``. Returns ``False`` without
    writing anything when direct I/O cannot be used here."""
    src = _open_direct(source, os.O_RDONLY) if _O_DIRECT and length >= DIRECT_MIN_BYTES else None
    if src is None:
        return False
    try:
        opened = _open_output(out, length)
        if opened is None:
            return False
        dst, start = opened
        cached = os.open(source, os.O_RDONLY) if _USE_CACHE else None
        try:
            _copy(src, cached, Path(source), offset, length, dst, out.fileno(), start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            out.seek(start)  # alignment this device does not take: the caller copies the range again
            return False
        finally:
            os.close(dst)
            if cached is not None:
                os.close(cached)
    finally:
        os.close(src)
    out.seek(start + length)
    return True


def _open_output(out, nbytes: int) -> tuple[int, int] | None:
    """A direct-I/O descriptor of ``out``'s file and ``out``'s (flushed) position, for ``nbytes``
    to be written there; None when direct I/O does not apply (small, an unaligned position, not a
    file, a filesystem or platform without it)."""
    if not _O_DIRECT or nbytes < DIRECT_MIN_BYTES:
        return None
    try:
        fileno = out.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    out.flush()
    start = out.tell()
    if start % ALIGN:
        return None
    fd = _open_direct(f"/proc/self/fd/{fileno}", os.O_WRONLY)
    return None if fd is None else (fd, start)


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """All of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recent")]


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_CACHESTAT = 451  # Linux >= 6.5, the same number on every architecture
_libc: ctypes.CDLL | None = None


def _cached_pages(fd: int, offset: int, length: int) -> int:
    """Pages of the range in the page cache (``cachestat``, which starts no I/O); 0 when the
    kernel cannot tell. A buffered read would start readahead, even one with ``RWF_NOWAIT``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    stat, span = _CacheStat(), _CacheRange(offset, length)
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return 0
    return stat.cache


def _read_cached(fd: int, into: memoryview, offset: int) -> bool:
    """``into`` filled from the page cache when all of the range is there, else False."""
    first = offset // mmap.PAGESIZE
    pages = (offset + len(into) - 1) // mmap.PAGESIZE - first + 1
    if _cached_pages(fd, offset, len(into)) < pages:
        return False
    return os.preadv(fd, [into], offset) == len(into)


def _copy(
    src: int, cached: int | None, source: Path, offset: int, length: int, dst: int, tail_fd: int, start: int
) -> None:
    body = length - length % ALIGN  # whole blocks go direct, the rest through ``tail_fd``
    chunks = [(pos, min(CHUNK_BYTES, length - pos)) for pos in range(0, length, CHUNK_BYTES)]
    # taken here, in the calling thread (the reader thread's own would die with it)
    reads = [_buffer(0), _buffer(1) if len(chunks) > 1 else _buffer(0)]
    shifted = _buffer(2) if offset % ALIGN else reads[0]  # chunks start at offset + k * CHUNK_BYTES

    def read(index: int) -> tuple[memoryview, int]:
        """Chunk ``index`` into its read buffer: (buffer, where the chunk's bytes start in it).
        Bytes already in the page cache (an input just exported) are taken from it; the rest
        comes from the disk."""
        pos, n = chunks[index]
        first = offset + pos
        buf = reads[index % 2]
        if cached is not None and _read_cached(cached, buf[:n], first):
            return buf, 0
        aligned = first - first % ALIGN
        shift = first - aligned
        want = -(-(shift + n) // ALIGN) * ALIGN
        got = os.preadv(src, [buf[:want]], aligned)
        if got < shift + n:
            raise UserError(f"external data file {source} became shorter while copying it")
        return buf, shift

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mha2sha-direct-read") as reader:
        pending = reader.submit(read, 0)
        for index, (pos, n) in enumerate(chunks):
            buf, shift = pending.result()
            direct = min(n, max(0, body - pos))  # whole blocks of this chunk
            if shift and direct:
                shifted[:direct] = buf[shift : shift + direct]
                data = shifted[:direct]
            else:
                data = buf[:direct]
            tail = bytes(buf[shift + direct : shift + n])  # copied before the buffer is read into again
            if index + 1 < len(chunks):
                pending = reader.submit(read, index + 1)
            _pwrite_all(dst, data, start + pos)
            _pwrite_all(tail_fd, tail, start + pos + direct)


class DirectWriter:
    """``write`` calls of one tensor sent to ``out`` with direct I/O: whole blocks are gathered in
    an aligned buffer and written past the page cache, the last partial block through ``out``'s
    own descriptor. Made by :func:`direct_writer`."""

    def __init__(self, out, fd: int, start: int):
        self._out, self._fd, self._pos = out, fd, start  # _pos: the file offset of the buffer's start
        self._buf: memoryview = _buffer(2)  # CHUNK_BYTES + ALIGN: whole blocks when full
        self._filled = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = min(len(self._buf) - self._filled, len(view) - done)
            self._buf[self._filled : self._filled + n] = view[done : done + n]
            self._filled += n
            done += n
            if self._filled == len(self._buf):
                self._write_blocks()
        return done

    def _write_blocks(self) -> None:
        whole = self._filled - self._filled % ALIGN
        try:
            _pwrite_all(self._fd, self._buf[:whole], self._pos)
        except OSError as e:
            if e.errno != errno.EINVAL or self._fd == self._out.fileno():
                raise
            self._fd = self._out.fileno()  # alignment this device does not take: the page cache
            _pwrite_all(self._fd, self._buf[:whole], self._pos)
        rest = self._filled - whole
        if rest:
            self._buf[:rest] = self._buf[whole : self._filled]
        self._pos += whole
        self._filled = rest

    def close(self) -> None:
        """Write what is left (the partial block through ``out``) and move ``out`` past the tensor."""
        self._write_blocks()
        _pwrite_all(self._out.fileno(), self._buf[: self._filled], self._pos)
        self._pos += self._filled
        self._filled = 0
        self._out.seek(self._pos)


@contextlib.contextmanager
def direct_writer(out, nbytes: int) -> Iterator:
    """A :class:`DirectWriter` for the ``nbytes`` about to be written at ``out``'s position, or
    ``out`` itself when direct I/O does not apply (small, unaligned position, a filesystem or
    platform without it)."""
    opened = _open_output(out, nbytes)
    if opened is None:
        yield out
        return
    fd, start = opened
    try:
        writer = DirectWriter(out, fd, start)
        yield writer
        writer.close()
    finally:
        os.close(fd)
