"""The resumable state written past the page cache (`run/direct_io.py`): the same bytes as a plain write, their
checksum taken on the way out, a fallback where the filesystem refuses O_DIRECT, and a checkpoint whose manifest
does not read the state back."""
from __future__ import annotations

import errno
import fcntl
import os

import pytest
import torch
import xxhash

from trinity_dpo.engine.distributed import Dist
from trinity_dpo.run import checkpoint, direct_io, manifest

BLOCK = 3 * 4096  # a small block, so that a few kilobytes cross several of them


def pieces() -> list[bytes]:
    """Sizes around the block and the 4096-byte alignment: 1, 4095, a block plus 3, 10, two blocks, 4097 (sum
    1 + 4095 + 12291 + 10 + 24576 + 4097 = 45070 bytes, which ends 45070 - 11 * 4096 = 14 bytes past an
    aligned offset: the tail goes out buffered)."""
    g = torch.Generator().manual_seed(0)
    return [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
            for n in (1, 4095, BLOCK + 3, 10, 2 * BLOCK, 4097)]


def direct_supported(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False


def write_all(path, written, **kwargs) -> direct_io.DirectFile:
    f = direct_io.DirectFile(path, written, **kwargs)
    opened_direct = f.direct and bool(fcntl.fcntl(f.fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
    with f:
        for p in pieces():
            assert f.write(memoryview(p)) == len(p)
        assert f.tell() == sum(map(len, pieces()))
    f.opened_direct = opened_direct
    return f


def test_the_file_holds_the_bytes_and_its_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "_BLOCK", BLOCK)
    written: direct_io.Written = {}
    f = write_all(tmp_path / "state.bin", written)
    data = b"".join(pieces())
    assert (tmp_path / "state.bin").read_bytes() == data
    assert written == {str(tmp_path / "state.bin"): (len(data), xxhash.xxh3_64(data).hexdigest())}
    assert written[str(tmp_path / "state.bin")][1] == manifest.checksum(tmp_path / "state.bin")
    assert f.opened_direct == direct_supported(tmp_path)  # O_DIRECT wherever the filesystem takes it


def test_a_filesystem_without_o_direct_gets_the_same_bytes_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "_BLOCK", BLOCK)
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    written: direct_io.Written = {}
    f = write_all(tmp_path / "state.bin", written)
    assert not f.direct and (tmp_path / "state.bin").read_bytes() == b"".join(pieces())
    assert written[str(tmp_path / "state.bin")][0] == len(b"".join(pieces()))


def test_direct_writes_refused_after_the_open_go_buffered(tmp_path, monkeypatch):
    """A filesystem may accept O_DIRECT at open and refuse the writes (EINVAL): the file is written buffered
    from there on, whole."""
    monkeypatch.setattr(direct_io, "_BLOCK", BLOCK)
    real_write, refused = os.write, []

    def refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    written: direct_io.Written = {}
    f = write_all(tmp_path / "state.bin", written)
    assert (tmp_path / "state.bin").read_bytes() == b"".join(pieces()) and not f.direct
    assert refused == ([BLOCK] if f.opened_direct else [])


def test_other_errors_are_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "_BLOCK", BLOCK)
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match="No space"):
        write_all(tmp_path / "state.bin", {})


def test_a_checkpoint_manifest_takes_the_state_checksums_as_written(tmp_path, monkeypatch):
    """The DCP shard is checksummed while it is written, not read back for the manifest; the manifest's entry is
    the file's true checksum, and the state loads back."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    read_back, real_checksum = [], manifest.checksum
    monkeypatch.setattr(manifest, "checksum", lambda path: read_back.append(path.name) or real_checksum(path))
    path = checkpoint.save(tmp_path, 1, model, None, torch.float32, optimizer, {"step": 1}, Dist(), hf=False)
    shard = path / "trainer_state" / "dcp" / "__0_0.distcp"
    assert shard.is_file() and "__0_0.distcp" not in read_back and "rng.pt" in read_back
    monkeypatch.setattr(manifest, "checksum", real_checksum)
    assert manifest.verify(path, path / "trainer_state" / manifest.NAME) is None
    fresh = torch.nn.Linear(64, 32)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    checkpoint._load(path, fresh, fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_rank_0s_manifest_takes_the_other_processes_checksums_as_gathered(tmp_path, monkeypatch):
    """With two processes each writes its own shard; its checksums reach rank 0 with the gather that follows the
    write, and rank 0's manifest reads neither shard back. The second process is a stand-in: at the gather it
    writes its shard (`__1_0.distcp`) beside rank 0's with a `DirectFile` of its own, and hands over its ledger."""
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    d = Dist(rank=0, world=2)

    def everyone(obj):
        if not isinstance(obj, tuple):  # the gathers of errors alone, before the state's write
            return [obj, None]
        error, written = obj
        other = {}
        shard = next(iter(written)).rsplit("/", 1)[0] + "/__1_0.distcp"
        write_all(shard, other)
        return [obj, (None, other)]

    monkeypatch.setattr(d, "everyone", everyone)
    read_back, real_checksum = [], manifest.checksum
    monkeypatch.setattr(manifest, "checksum", lambda path: read_back.append(path.name) or real_checksum(path))
    path = checkpoint.save(tmp_path, 1, model, None, torch.float32, optimizer, {"step": 1}, d, hf=False)
    dcp = path / "trainer_state" / "dcp"
    assert (dcp / "__1_0.distcp").is_file() and not {"__0_0.distcp", "__1_0.distcp"} & set(read_back)
    monkeypatch.setattr(manifest, "checksum", real_checksum)
    assert manifest.verify(path, path / "trainer_state" / manifest.NAME) is None
    assert manifest.checksum(dcp / "__1_0.distcp") == xxhash.xxh3_64(b"".join(pieces())).hexdigest()


def test_an_error_in_any_process_fails_the_save_everywhere(tmp_path, monkeypatch):
    """The gather after the state's write carries each process's error: one process's failure (here the second's,
    a full disk) fails the save on rank 0 too, and nothing is published."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    d = Dist(rank=0, world=2)
    monkeypatch.setattr(d, "everyone", lambda obj: [obj, ("No space left on device", {}) if isinstance(obj, tuple)
                                                     else None])
    with pytest.raises(checkpoint.CheckpointError, match=r"saving checkpoint 1 into .* failed \(No space left on "
                                                           r"device\); no earlier checkpoint exists"):
        checkpoint.save(tmp_path, 1, model, None, torch.float32, optimizer, {"step": 1}, d, hf=False)
    assert not list(tmp_path.iterdir())


def test_each_file_is_synced_by_its_writer_after_its_tail(tmp_path, monkeypatch):
    """With several nodes rank 0's sync before the rename cannot flush another node's page cache, where a file's
    buffered tail sits: the process that writes a file syncs it at close, after the tail (45070 bytes: 14 buffered)."""
    monkeypatch.setattr(direct_io, "_BLOCK", BLOCK)
    real_fsync, real_write, events = os.fsync, os.write, []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "write", lambda fd, data: events.append(len(data)) or real_write(fd, data))
    write_all(tmp_path / "state.bin", {})
    assert events[-1] == "fsync" and events[-2] == 14 and events.count("fsync") == 1
