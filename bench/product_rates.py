"""The rate of each matrix product a SmolLM2-135M training step makes, against a large square product's: where the
step's products stand against what this CPU can do.

    python bench/product_rates.py [--precision fp32] [--rows 1600] [--head-rows 170] [--reps 20]

Body products are the decoder layers' (hidden 576, MLP 1536, 3 KV heads of 64) over a packed micro-batch of `--rows`
tokens: forward, the input's gradient and the weight's. Head products are the LM head's (vocabulary 49152) over one
chunk of `--head-rows` response positions, as `engine/logprobs.py` makes them: the logits, d hidden, and d weight
added into its fp32 buffer. Under bf16 the products run in bf16 as autocast gives them (the head: fp32 here; its
bf16 products are `engine/bf16_head.py`'s). Each figure is the median of `--reps` timed calls after 3 untimed ones.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import matmul_peak  # noqa: E402

HIDDEN, MLP, KV, VOCAB = 576, 1536, 192, 49152


def rate(fn, flops: float, reps: int) -> tuple[float, float]:
    """(GFLOP/s, ms) of `fn`, median of `reps` calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    best = statistics.median(times)
    return flops / best / 1e9, best * 1e3


def body_cases(rows: int, dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, a, b) of a @ b for each layer product; weights [out, in] as nn.Linear keeps them."""
    x, mid = torch.randn(rows, HIDDEN, dtype=dtype), torch.randn(rows, MLP, dtype=dtype)
    w_up, w_down = torch.randn(MLP, HIDDEN, dtype=dtype), torch.randn(HIDDEN, MLP, dtype=dtype)
    w_q, w_kv = torch.randn(HIDDEN, HIDDEN, dtype=dtype), torch.randn(KV, HIDDEN, dtype=dtype)
    return [("gate/up forward", x, w_up.t()), ("down forward", mid, w_down.t()), ("q/o forward", x, w_q.t()),
            ("k/v forward", x, w_kv.t()), ("gate/up d input", mid, w_up), ("gate/up d weight", mid.t(), x),
            ("down d weight", x.t(), mid)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--head-rows", type=int, default=170)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    print(f"square 2048 x 2048 x 2048, {args.precision}: {matmul_peak(dtype) / 1e9:.0f} GFLOP/s (best of 8)")
    print(f"\n{'product':>22}  {'shape (M x K x N)':>22}  {'GFLOP/s':>8}  {'ms':>7}")
    for name, a, b in body_cases(args.rows, dtype):
        gflops, ms = rate(lambda a=a, b=b: a @ b, 2 * a.shape[0] * a.shape[1] * b.shape[1], args.reps)
        print(f"{name:>22}  {f'{a.shape[0]} x {a.shape[1]} x {b.shape[1]}':>22}  {gflops:8.0f}  {ms:7.2f}")
    n = args.head_rows
    h, weight = torch.randn(n, HIDDEN), torch.randn(VOCAB, HIDDEN) * 0.02
    logits, d_logits = torch.empty(n, VOCAB), torch.randn(n, VOCAB) * 1e-3
    d_hidden, d_weight = torch.empty(n, HIDDEN), torch.zeros(VOCAB, HIDDEN)
    flops = 2 * n * HIDDEN * VOCAB
    for name, shape, fn in (("head logits", (n, HIDDEN, VOCAB), lambda: torch.mm(h, weight.t(), out=logits)),
                            ("head d hidden", (n, VOCAB, HIDDEN), lambda: torch.mm(d_logits, weight, out=d_hidden)),
                            ("head d weight (+=)", (VOCAB, n, HIDDEN), lambda: d_weight.addmm_(d_logits.t(), h))):
        gflops, ms = rate(fn, flops, args.reps)
        print(f"{name:>22}  {' x '.join(map(str, shape)):>22}  {gflops:8.0f}  {ms:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
