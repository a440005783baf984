"""Where a `trinity run` process's peak memory sits, step by step: its resident size against what glibc's heap holds,
what of it is in use and what is free (mallinfo2), read every 10 ms by a thread beside the run.

    python bench/heap_trace.py [--precision bf16] [--steps 64] [--batch 4] [--max-length 512] [--checkpointing off]
                               [--kernel-cache N] [--json trace.json]

The job is bench/whole_run.py's (SmolLM2-135M-Instruct built in, the first steps x batch real Human-Like pairs), run in
one process with the environment `trinity run` gives itself after its restart (`engine/host_heap.py`: the heap
settings and oneDNN's kernel cache bound); `--kernel-cache N` sizes that cache instead (oneDNN's default: 1024).
A peak well above the heap in use is the heap's free pages, split by blocks that live on (docs/benchmarks.md, History,
ninth session). glibc only: elsewhere there is no mallinfo2 to read.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import REPO, build_model, pairs_file  # noqa: E402
from whole_run import ours_config  # noqa: E402

GB = 1e9
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def trace(config: str, out: str) -> int:
    """In the run's own process: `trinity run --config config` with a sampler thread; the samples (seconds, RSS,
    heap held, mmapped blocks, heap in use, heap free, phase) go to `out` as JSON."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    phase, samples = ["start"], []

    def sample() -> None:
        with open("/proc/self/statm", encoding="ascii") as statm:
            while True:
                statm.seek(0)
                rss = int(statm.read().split()[1]) * page
                m = libc.mallinfo2()
                samples.append((time.perf_counter(), rss, m.arena, m.hblkhd, m.uordblks, m.fordblks, phase[0]))
                time.sleep(0.01)

    from trinity_dpo import cli
    from trinity_dpo.run import train

    inner, count = train.train_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        phase[0] = f"step {count[0]}"
        try:
            return inner(*args, **kwargs)
        finally:
            phase[0] = f"after {count[0]}"

    train.train_step = step
    threading.Thread(target=sample, daemon=True).start()
    code = cli.main(["run", "--config", config])
    Path(out).write_text(json.dumps(samples))
    return code


def report(samples: list) -> None:
    """Per phase, the sample of highest RSS. Phases: "start" (loading, the data, the reference pass), each step,
    and the time after each step (after the last: the final save and the report)."""
    peaks: dict[str, tuple] = {}
    for s in samples:
        if s[6] not in peaks or s[1] > peaks[s[6]][1]:
            peaks[s[6]] = s
    print("GB, at each phase's RSS peak")
    print("     phase" + "".join(f"{h:>9}" for h in ("RSS", "heap", "in use", "free", "mmapped")))
    for name, (_, rss, arena, mmapped, used, free, _) in peaks.items():
        print(f"{name:>10}" + "".join(f"{v / GB:9.2f}" for v in (rss, arena, used, free, mmapped)))
    top = max(samples, key=lambda s: s[1])
    print(f"\npeak RSS {top[1] / GB:.2f} GB in {top[6]}: heap {top[2] / GB:.2f} GB, of it in use "
          f"{top[4] / GB:.2f} GB, free {top[5] / GB:.2f} GB; mmapped blocks {top[3] / GB:.2f} GB")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--checkpointing", dest="ours_checkpointing", default="off", choices=["on", "off"])
    parser.add_argument("--kernel-cache", type=int, help="oneDNN's kernel cache in shapes (default: trinity run's)")
    parser.add_argument("--json", help="also write every sample here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return trace(*args.child)
    from trinity_dpo.engine import host_heap

    with tempfile.TemporaryDirectory(prefix="heap_trace_") as tmp:
        work = Path(tmp)
        model = build_model("smollm2", work, None)
        data, _ = pairs_file(work, args.steps * args.batch)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRINITY_DPO_CACHE": str(work / "cache")}
        if args.kernel_cache:
            env[host_heap.KERNEL_CACHE] = str(args.kernel_cache)
        env = host_heap.training_environment(env)
        out = Path(args.json) if args.json else work / "trace.json"
        config = ours_config(work, model, data, args, args.precision)
        subprocess.run([sys.executable, __file__, "--child", str(config), str(out)], env=env, cwd=work, check=True)
        report(json.loads(out.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
