"""What a checkpoint holds: `trainer_state/manifest.json`, written last into the temporary folder before it is
renamed into place, lists every file of the checkpoint with its size and an xxh3-64 checksum of its bytes. On
resume it tells a checkpoint that is whole from one that a bad copy or failing storage has cut short or altered.

xxh3-64 is no defence against tampering, only against damage; it reads at memory speed (docs/benchmarks.md has
its cost on a 3 GB checkpoint), so checksumming a 7B model's checkpoint costs little next to writing it.
"""
from __future__ import annotations

import json
from pathlib import Path

import xxhash

NAME = "manifest.json"
ALGORITHM = "xxh3_64"
_BLOCK = 1 << 24


def checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write(folder: Path, where: Path, known: dict[Path, str] | None = None) -> None:
    """Record every file under `folder` (its size and checksum) in `where`, a file inside `folder`. `known`: the
    checksums of files computed as they were written (`direct_io`), which are not read again."""
    known = known or {}
    files = {f.relative_to(folder).as_posix(): [f.stat().st_size, known.get(f) or checksum(f)]
             for f in sorted(folder.rglob("*")) if f.is_file() and f != where}
    where.write_text(json.dumps({"checksum": ALGORITHM, "files": files}, indent=1))


def verify(folder: Path, where: Path) -> str | None:
    """Why `folder` does not hold what the manifest `where` records, or None when it does. No manifest (a
    checkpoint written before manifests existed) is nothing to check against: None."""
    if not where.is_file():
        return None
    try:
        recorded = json.loads(where.read_text())
        files, algorithm = recorded["files"], recorded["checksum"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {where.name} is unreadable ({type(e).__name__})"
    if algorithm != ALGORITHM:
        return f"its {where.name} uses the checksum {algorithm!r}, which this version cannot check"
    # Sizes first: a cut-off file shows without reading a byte of the others.
    for name, (size, _) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes where {size} were written"
    for name, (_, digest) in files.items():
        if checksum(folder / name) != digest:
            return f"{name} does not match its checksum"
    return None
