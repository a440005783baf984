"""The tokenized-data cache: one source's examples as flat integer arrays on disk, memory-mapped when read.

A table holds every usable row of a source (a file, or a dataset folder's split), in row order, as `entries`:
- `tokens` int32 [T] and `mask` uint8 [T] (1: the token trains; pairs train every response token);
- `spans` int64 [n, S, 2]: (start, length) in `tokens` of each entry's S segments (a pair: prompt, chosen,
  rejected; an SFT row: prompt, response);
- `rows` int64 [n] (1-based row in the source), `kept` bool [n] (False: tokenizing dropped the entry, e.g. a pair
  identical after truncation), `events` int32 [n] (index into `meta["events"]`: what tokenizing the entry added to
  the data report, as JSON), `prompt_hash` uint64 [n] (the prompt's identity: held-out prompts also trained on);
- `prompts` bytes and `prompt_offsets` int64 [n + 1]: each entry's prompt as JSON, read only for the few prompts
  answered before and after training.
Per example, memory is a few integers; the tokens stay on disk and in the page cache, shared by every process.

A table lives in a folder named by its key (`fingerprint`), written under a temporary name and renamed into place
with a `done` marker written last, so a reader never sees half of one; a folder that fails to open or to match its
checksums is rebuilt with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VERSION = 2  # of the tokenization code and this layout: a change makes every older table a miss
ARRAYS = ("tokens", "mask", "spans", "rows", "kept", "events", "prompt_hash", "prompt_offsets")
DONE = "done.json"


@dataclass
class TokenTable:
    """One source's tokenized entries (see the module docstring); arrays are memory-mapped from `folder`."""

    folder: Path
    tokens: np.ndarray
    mask: np.ndarray
    spans: np.ndarray
    rows: np.ndarray
    kept: np.ndarray
    events: np.ndarray
    prompt_hash: np.ndarray
    prompt_offsets: np.ndarray
    meta: dict
    labels: np.ndarray | None = None  # uint8 [n], unpaired tables only (`unpaired.py`): each example's label

    def __len__(self) -> int:
        return len(self.rows)

    def segment(self, entry: int, k: int) -> list[int]:
        start, length = self.spans[entry, k]
        return self.tokens[start:start + length].tolist()

    def segment_mask(self, entry: int, k: int) -> list[int]:
        start, length = self.spans[entry, k]
        return self.mask[start:start + length].tolist()

    def prompt(self, entry: int):
        """The entry's prompt (chat messages or text) as the source gave it."""
        with open(self.folder / "prompts.bin", "rb") as fh:
            fh.seek(int(self.prompt_offsets[entry]))
            return json.loads(fh.read(int(self.prompt_offsets[entry + 1] - self.prompt_offsets[entry])))


def fingerprint(parts: dict) -> str:
    """The key of a table: a digest of everything its numbers depend on (`parts`, JSON-able) and `VERSION`."""
    text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def file_digest(path: str | Path) -> str:
    """A digest of a data file's bytes, or of every file of a folder (names and bytes): an edited row makes a new
    key. xxh3 reads a GB in about a second, a small cost beside tokenizing it."""
    import xxhash

    h = xxhash.xxh3_128()
    p = Path(path)
    for f in source_files(p):
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        hash_file(f, h)
    return h.hexdigest()


def hash_file(path: Path, h) -> None:
    """Feed a file's bytes to `h` through one reused buffer: fresh 16 MB blocks would each be a new allocation,
    which malloc keeps in the process's heap once freed (every process that opens a table would hold them)."""
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            h.update(view[:n])


def source_files(path: Path) -> list[Path]:
    """The files of a source: itself, or a folder's files (a download tool's `.cache` folder inside it left out;
    the folder itself may well sit under a `.cache`, as the Hugging Face hub's and the built-in sets do)."""
    if path.is_file():
        return [path]
    return sorted(f for f in path.rglob("*") if f.is_file() and ".cache" not in f.relative_to(path).parts)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftover (an earlier build in it that failed)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Writer:
    """Builds a table in a temporary folder beside its final place, a chunk of entries at a time, appending to
    the array files, so the build holds one chunk in memory; `finish` publishes it atomically."""

    def __init__(self, final: Path, segments: int):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        for stale in final.parent.glob(f".{final.name}.tmp*"):  # a killed build's, never a live builder's (a
            # file system without locks lets several processes build at once: prepare._one_builder)
            pid = stale.name.rpartition(".tmp")[2]
            if not pid.isdigit() or not _running(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files = {name: open(self.tmp / f"{name}.raw", "wb") for name in ARRAYS if name != "prompt_offsets"}
        self.prompts = open(self.tmp / "prompts.bin", "wb")
        self.segments, self.n_tokens, self.n_entries, self.prompt_bytes = segments, 0, 0, 0
        self.offsets = open(self.tmp / "prompt_offsets.raw", "wb")
        self.offsets.write(np.zeros(1, np.int64).tobytes())
        self.events: dict[str, int] = {}
        self.extras: dict = {}  # arrays only some tables have (EXTRAS), opened with their first chunk

    def add(self, chunk: "Chunk") -> None:
        spans = chunk.spans.copy()
        spans[:, :, 0] += self.n_tokens
        for name, array in (("tokens", chunk.tokens), ("mask", chunk.mask), ("spans", spans), ("rows", chunk.rows),
                            ("kept", chunk.kept), ("prompt_hash", chunk.prompt_hash)):
            self.files[name].write(np.ascontiguousarray(array).tobytes())
        ids = np.array([self.events.setdefault(e, len(self.events)) for e in chunk.events], np.int32)
        self.files["events"].write(ids.tobytes())
        for name in EXTRAS:
            if getattr(chunk, name) is not None:
                if name not in self.extras:
                    self.extras[name] = open(self.tmp / f"{name}.raw", "wb")
                self.extras[name].write(np.ascontiguousarray(getattr(chunk, name), DTYPES[name]).tobytes())
        self.prompts.write(chunk.prompts)
        self.offsets.write((chunk.prompt_offsets[1:] + self.prompt_bytes).astype(np.int64).tobytes())
        self.prompt_bytes += int(chunk.prompt_offsets[-1])
        self.n_tokens += len(chunk.tokens)
        self.n_entries += len(chunk.rows)

    def finish(self, meta: dict) -> TokenTable:
        for fh in (*self.files.values(), *self.extras.values(), self.prompts, self.offsets):
            fh.close()
        shapes = {"tokens": (self.n_tokens,), "mask": (self.n_tokens,), "spans": (self.n_entries, self.segments, 2),
                  "prompt_offsets": (self.n_entries + 1,)}
        meta = {**meta, "events": [json.loads(e) for e in sorted(self.events, key=self.events.get)],
                "entries": self.n_entries, "n_tokens": self.n_tokens, "segments": self.segments,
                "checksums": {name: checksum(self.tmp / f"{name}.raw") for name in (*ARRAYS, *self.extras)},
                "extras": list(self.extras)}
        (self.tmp / "meta.json").write_text(json.dumps(meta))
        (self.tmp / DONE).write_text(json.dumps({"shapes": {k: list(v) for k, v in shapes.items()}}))
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if (self.final / DONE).is_file():  # another builder published the same table first (no file locks)
            try:
                table = open_table(self.final, verify=True)
                shutil.rmtree(self.tmp, ignore_errors=True)
                return table
            except (OSError, ValueError, KeyError):
                pass
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.tmp, self.final)
        return open_table(self.final)

    def abort(self) -> None:
        for fh in (*self.files.values(), *self.extras.values(), self.prompts, self.offsets):
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Chunk:
    """A chunk of tokenized entries, as a worker hands them back (spans relative to the chunk's `tokens`)."""

    tokens: np.ndarray
    mask: np.ndarray
    spans: np.ndarray
    rows: np.ndarray
    kept: np.ndarray
    events: list[str]
    prompt_hash: np.ndarray
    prompts: bytes
    prompt_offsets: np.ndarray
    labels: np.ndarray | None = None  # see TokenTable


DTYPES = {"tokens": np.int32, "mask": np.uint8, "spans": np.int64, "rows": np.int64, "kept": np.bool_,
          "events": np.int32, "prompt_hash": np.uint64, "prompt_offsets": np.int64, "labels": np.uint8}
EXTRAS = ("labels",)  # arrays of [n] that a table has only when its chunks carry them (meta["extras"])


def open_table(folder: Path, verify: bool = False) -> TokenTable:
    """The table in `folder`, memory-mapped; raises (OSError, ValueError, KeyError) when it is incomplete or
    damaged. `verify` also checks every array's checksum (a flipped bit would otherwise be trained on)."""
    done = json.loads((folder / DONE).read_text())
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {}
    for name in (*ARRAYS, *meta.get("extras", ())):
        path = folder / f"{name}.raw"
        shape = tuple(done["shapes"].get(name, (meta["entries"],)))
        expected = int(np.prod(shape)) * np.dtype(DTYPES[name]).itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path.name} has {path.stat().st_size} bytes where {expected} were written")
        if verify and checksum(path) != meta["checksums"][name]:
            raise ValueError(f"{path.name} does not hold the bytes it was written with")
        arrays[name] = (np.memmap(path, DTYPES[name], "r", shape=shape) if expected else
                        np.zeros(shape, DTYPES[name]))
    return TokenTable(folder=folder, meta=meta, **arrays)


def checksum(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    hash_file(path, h)
    return h.hexdigest()
