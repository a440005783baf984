"""`bench/gpu_check.py`, the GPU validation command, runs on CPU too: what CPU can check passes, and the CUDA-only
parts are named as skipped in the file it writes."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| check") and not line.startswith("| ---")}
    for name in ("versions", "LM head vs autograd, float32", "attention vs autograd, float32",
                 "end to end, 3 steps, stop + resume", "one-rank FSDP2"):
        assert rows.get(name) == "pass", (name, rows)
    assert rows["LM head vs autograd, bf16"] == "skipped" and rows["Qwen2.5-1.5B-shape vs TRL"] == "skipped"
    assert "gloo, one rank: metrics within" in out.read_text()
