"""Cost of the checkpoint manifest (trinity_dpo/manifest.py: sizes and xxh3-64 checksums) on a checkpoint of a
given size: writing it as a save does (the files just written, so in the page cache), and verifying it as a resume
does, from the page cache and from disk. The checkpoint is one file of random bytes in a temporary folder under
--dir, removed at the end.

    python bench/checksum_cost.py --gb 3 --dir /tmp
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trinity_dpo.run import manifest  # noqa: E402


def _evict(folder: Path) -> None:
    """Drop the folder's pages from the page cache, as a resume on a freshly started machine finds them."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="checksum_cost_", dir=args.dir))
    try:
        (folder / "trainer_state").mkdir()
        size = int(args.gb * 1e9)
        with open(folder / "model.safetensors", "wb") as fh:
            for start in range(0, size, 1 << 26):
                fh.write(os.urandom(min(1 << 26, size - start)))
        where = folder / "trainer_state" / manifest.NAME
        manifest.checksum(folder / "model.safetensors")  # the pages in memory, as right after a save
        rows = {"write (page cache, as after a save)": [], "verify (page cache)": [], "verify (from disk)": []}
        for _ in range(args.repeats):
            rows["write (page cache, as after a save)"].append(_timed(lambda: manifest.write(folder, where)))
            rows["verify (page cache)"].append(_timed(lambda: manifest.verify(folder, where)))
            _evict(folder)
            rows["verify (from disk)"].append(_timed(lambda: manifest.verify(folder, where)))
            manifest.checksum(folder / "model.safetensors")
        print(f"{size / 1e9:.2f} GB, {os.cpu_count()} cores, median of {args.repeats}:")
        for label, times in rows.items():
            t = statistics.median(times)
            print(f"  {label}: {t:.2f} s ({size / 1e9 / t:.1f} GB/s; runs {', '.join(f'{x:.2f}' for x in times)})")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
