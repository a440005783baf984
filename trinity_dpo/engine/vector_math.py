"""Settle MKL's vector math before any element-wise op can make its first call from two threads at once.

PyTorch's CPU build sends contiguous fp32/fp64 unary ops (exp, log, sin, cos, sqrt, tanh, erf, ...) to MKL's VML,
each intra-op thread on its own chunk of a tensor over 2048 elements. MKL picks a VML function's kernel on its
first call; when two threads make that first call together, one of them can run a low-accuracy kernel for its whole
chunk of that one call (pytorch/pytorch#188792). Measured here (2-core Xeon, torch 2.13.0): a fresh process's first
`cos` of 6160 values was wrong in half its elements in 14 of 60 processes, cos(1) = 0.5403335 instead of 0.5403023;
sin, exp, log, tanh, sqrt and erf did the same in 2-4 of 12. In a run it was the first micro-batch's RoPE table, so a
fresh process's step 1 differed from another's and the step-1 loss missed ln 2 (`tests/test_vector_math.py`).

One call of each function on a single element, before anything runs on more than one thread, picks every kernel
while only one thread asks; later calls reuse it. Each call costs microseconds.
"""
from __future__ import annotations

import torch

# The unary ops ATen may send to VML (aten/src/ATen/cpu/vml.h), and their neighbours: a name not routed costs one
# ordinary call. The ops without a torch function of the same name are left out.
_OPS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "floor",
        "lgamma", "log", "log10", "log1p", "log2", "round", "rsqrt", "sigmoid", "sin", "sinh", "sqrt", "tan", "tanh",
        "trunc")
_settled = False


def settle() -> None:
    """Make every VML function's first call now, on one thread (idempotent)."""
    global _settled
    if _settled:
        return
    for dtype in (torch.float32, torch.float64):  # VML's single- and double-precision functions are separate
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in _OPS:
            getattr(torch, name)(x)
    _settled = True
