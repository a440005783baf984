"""MKL's vector math settled before a run computes: a fresh process's first element-wise op equals its later ones
(`trinity_dpo/engine/vector_math.py`)."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from trinity_dpo.engine import modeling, vector_math
from trinity_dpo.errors import ConfigError

# A fresh process that settles (unless "bare") and then makes the op's first call over 6160 values (two threads
# share any call over 2048), the call that raced in a run: the first RoPE table's cos.
CHILD = """
import sys, torch
torch.set_num_threads(2)
if sys.argv[1] != "bare":
    from trinity_dpo.engine import vector_math
    vector_math.settle()
x = torch.linspace(0.01, 3.0, 6160)
first = x.cos()
print(int((first != x.cos()).sum()))
"""


@pytest.mark.slow
def test_first_cos_of_a_fresh_process_is_its_usual_one():
    """Unsettled, a fresh process's first cos was wrong in half its values in 1 process of 4 to 1 of 8 here (10
    processes all right by chance: about 1 time in 10 to 1 in 4); settled, 0 in 140 processes over 7 ops."""
    wrong = [int(subprocess.run([sys.executable, "-c", CHILD, "settle"], capture_output=True, text=True,
                                timeout=120, check=True).stdout) for _ in range(10)]
    assert wrong == [0] * 10


def test_runs_settle_before_they_compute(monkeypatch):
    """`trinity run`/`eval` settle at `pick_runtime`, `trinity chat`/`export` at `load_model`, before anything else."""
    calls = []
    monkeypatch.setattr(vector_math, "settle", lambda: calls.append(1))
    ns = types.SimpleNamespace
    modeling.pick_runtime(ns(cluster=ns(device="cpu"), trainer=ns(precision="fp32")))
    assert calls == [1]

    def first_step_of_loading(cfg):
        calls.append("load")
        raise ConfigError("stop here")

    monkeypatch.setattr(modeling.score_head, "auto_class", first_step_of_loading)
    with pytest.raises(ConfigError, match="stop here"):
        modeling.load_model(ns(model=ns(model_path="/nowhere")), None)
    assert calls == [1, 1, "load"]


def test_settle_makes_each_first_call_on_one_element(monkeypatch):
    """Every VML candidate is called on one value in fp32 and fp64 (no op over 2048 values: one thread), once per
    process."""
    import torch

    seen = []
    monkeypatch.setattr(vector_math, "_settled", False)
    for name in vector_math._OPS:
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, real=real, name=name: seen.append((name, str(x.dtype), x.numel()))
                            or real(x))
    vector_math.settle()
    vector_math.settle()
    assert sorted(seen) == sorted((n, str(d), 1) for n in vector_math._OPS for d in (torch.float32, torch.float64))
