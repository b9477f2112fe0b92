"""BLAKE3, the one hash of the archive: the only module that imports blake3.

Both sides hash: the uploader as it sends, the store as it writes and fsck
as it re-reads.  Streaming through one reused buffer keeps memory flat for
any file size.
"""

from __future__ import annotations

import io
import os
import threading

import blake3

EMPTY_ID = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
SMALL_FILE = 1 << 20        # read in one go, hash before writing anything
CHUNK = 4 << 20             # streaming buffer for larger files
_AUTO = blake3.blake3.AUTO  # docs/design.md, "BLAKE3": blake3.AUTO does not exist


def new_hasher():
    # Single-threaded for streaming: ~6 GB/s is more than the copy loop's I/O,
    # and on 2 cores blake3's pool spins in sched_yield between chunks.
    return blake3.blake3()


def hash_bytes(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


_buffers = threading.local()


def _buffer() -> bytearray:
    # One buffer per thread, reused for every file: allocating 4 MiB per file
    # cost more than hashing a small one (bench/daemon_send.py profile).
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK)
    return buf


if hasattr(os, "readv"):
    def _readinto(fd: int, buf: bytearray) -> int:
        return os.readv(fd, [buf])
else:  # pragma: no cover - Windows, where the sending client hashes too
    def _readinto(fd: int, buf: bytearray) -> int:
        with io.FileIO(fd, "rb", closefd=False) as f:
            return f.readinto(buf) or 0


def pump(src: int, h, dst: int | None = None) -> int:
    """Stream everything readable from *src* into hasher *h* (and *dst*);
    one reused buffer, so memory stays flat for any size.  Returns bytes read."""
    buf = _buffer()
    mv = memoryview(buf)
    total = 0
    while True:
        n = _readinto(src, buf)
        if n == 0:
            return total
        h.update(mv[:n])
        if dst is not None:
            write_all(dst, mv[:n])
        total += n


def hash_path_parallel(path: bytes | str) -> str:
    """Hash a large file of our own by mmap on all cores (only for files no
    one else can change or truncate under us: the store's objects)."""
    h = blake3.blake3(max_threads=_AUTO)
    h.update_mmap(os.fsdecode(path))  # blake3 wants a str path
    return h.hexdigest()


def hash_fd(fd: int) -> tuple[str, int]:
    """Hash everything readable from *fd* (streamed); returns (id, bytes read)."""
    h = new_hasher()
    total = pump(fd, h)
    return h.hexdigest(), total


def write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
