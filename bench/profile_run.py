"""Where a whole `trinity run` process spends its time: each line of its log with the seconds since the process
started and since the line before, after the cost of the imports alone, then the step times from metrics.jsonl.

    python bench/profile_run.py [--precision bf16] [--steps 8] [--batch 4] [--max-length 512] [--checkpointing on]

The job is bench/whole_run.py's (SmolLM2-135M-Instruct built in, the first steps x batch real Human-Like pairs).
The data cache is a fresh folder, so the tokenizing is in the figures as on a first run. `python bench/profile_step.py`
goes one level down: a step's operators.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import REPO, build_model, pairs_file  # noqa: E402
from whole_run import ours_config  # noqa: E402


def timed_lines(cmd: list[str], env: dict, cwd: Path) -> tuple[float, list[tuple[float, str]]]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait():
        raise SystemExit("\n".join(x for _, x in lines[-40:]))
    return time.perf_counter() - start, lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--checkpointing", dest="ours_checkpointing", default="on", choices=["on", "off"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile_run_") as tmp:
        work = Path(tmp)
        model = build_model("smollm2", work, None)
        data, _ = pairs_file(work, args.steps * args.batch)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRINITY_DPO_CACHE": str(work / "cache")}
        imports, _ = timed_lines([sys.executable, "-c", "import trinity_dpo.cli, trinity_dpo.run.train"], env, work)
        wall, lines = timed_lines([sys.executable, "-m", "trinity_dpo.cli", "run", "--config",
                                   str(ours_config(work, model, data, args, args.precision))], env, work)
        print(f"imports alone (python -c 'import trinity_dpo.cli, trinity_dpo.run.train'): {imports:.1f} s")
        print(f"whole process: {wall:.1f} s\n\n    t (s)   +dt  line")
        before = 0.0
        for t, line in lines:
            if line.strip() and "it/s]" not in line:
                print(f"{t:9.1f} {t - before:5.1f}  {line[:150]}")
                before = t
        run_dir = next((work / "runs").glob(f"bench/whole_{args.precision}*"))
        steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [s["step_time_s"] for s in steps if "step_time_s" in s]
        print(f"\nsteps: {', '.join(f'{x:.2f}' for x in times)} s (sum {sum(times):.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
