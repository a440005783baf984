"""The resumable state's files written past the page cache (O_DIRECT), checksummed as they are written.

Why: a checkpoint's state is 12 bytes per trained parameter (fp32 weights and AdamW's two moments: 1.7 GB for
SmolLM2-135M) that nothing reads until a resume. Written through the page cache, each byte first takes a fresh
page of memory: on a 2-core VM that cost 1.9-5.1 s for 1.7 GB (the disk took 0.75 s of it), where the same bytes
written with O_DIRECT from one reused aligned block took 0.95 s, disk included (docs/benchmarks.md, History). On
a training node the page cache would otherwise hold gigabytes of checkpoint in place of the data's pages.

The manifest (`manifest.py`) needs each file's xxh3: computed here from the bytes as they go out, so the manifest
does not read the files back (from disk, now that they are not cached).

Where the filesystem refuses O_DIRECT (tmpfs, some FUSE and network mounts, macOS), the file is written as any
other: the same bytes, through the page cache. Each file is synced when it is closed, by the process that wrote
it; `checkpoint._publish` then syncs every file of the checkpoint before the rename, as before.
"""
from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
from pathlib import Path

import xxhash

_ALIGN = 4096  # O_DIRECT's offsets, lengths and buffer addresses: a multiple of the device's logical block
_BLOCK = 16 << 20  # bytes gathered before each write: few system calls, little memory
_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none (macOS)

Written = dict[str, tuple[int, str]]  # path -> (size, xxh3) of the files written here


class DirectFile(io.RawIOBase):
    """A file opened for writing that gathers what it is given into an aligned block and writes whole blocks with
    O_DIRECT (the tail, shorter than a block, through the page cache), keeping the size and xxh3 of the bytes;
    `close` records them in `written`."""

    def __init__(self, path: Path, written: Written, direct: bool = True):
        super().__init__()
        self.path, self.written = str(path), written
        self.fd, self.direct = _open(self.path, direct and bool(_DIRECT))
        self.block = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT wants its buffer
        self.view = memoryview(self.block)
        self.fill = self.size = 0
        self.hash = xxhash.xxh3_64()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        source = memoryview(data).cast("B")
        self.hash.update(source)
        done = 0
        while done < len(source):
            n = min(_BLOCK - self.fill, len(source) - done)
            self.view[self.fill:self.fill + n] = source[done:done + n]
            self.fill += n
            done += n
            if self.fill == _BLOCK:
                self._drain(_BLOCK)
        self.size += len(source)
        return len(source)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing: a block goes out when full or at `close` (O_DIRECT writes whole aligned blocks only)."""

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._drain(self.fill - self.fill % _ALIGN)
            self._buffered()  # the last partial block: O_DIRECT cannot write it
            self._drain(self.fill)
            # The blocks are on disk already; this flushes the tail. Each process syncs its own files: rank 0's
            # sync before the rename cannot reach another node's page cache.
            os.fsync(self.fd)
            self.written[self.path] = (self.size, self.hash.hexdigest())
        finally:
            os.close(self.fd)
            self.view.release()
            self.block = None  # freed with the last view of it (a failed write's traceback may hold one)
            super().close()

    def _drain(self, n: int) -> None:
        """Write the block's first `n` bytes and keep the rest at its start."""
        start = 0
        while start < n:
            try:
                k = os.write(self.fd, self.view[start:n])
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # a filesystem that opened with O_DIRECT but refuses its writes
                continue
            if k % _ALIGN:
                self._buffered()  # a short write leaves the offset unaligned: the rest goes buffered
            start += k
        rest = self.fill - n
        self.view[:rest] = self.view[n:self.fill]
        self.fill = rest

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
            self.direct = False


def _open(path: str, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct:
        try:
            return os.open(path, flags | _DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def storage_writer(path: Path, written: Written):
    """torch.distributed.checkpoint's file writer for `path` whose data files are `DirectFile`s, each synced as it
    is closed (DCP's own fsync came before the close, so before the buffered tail)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class _Direct(FileSystem):
        def create_stream(self, where, mode: str):
            if mode != "wb":
                return super().create_stream(where, mode)
            return DirectFile(Path(where), written)

    writer = FileSystemWriter(str(path), sync_files=False)
    writer.fs = _Direct()
    return writer


def known_checksums(written: Written) -> dict[Path, str]:
    """The xxh3 of each file of `written` still as written (same size), for `manifest.write`."""
    return {Path(p): digest for p, (size, digest) in written.items()
            if os.path.isfile(p) and os.path.getsize(p) == size}

