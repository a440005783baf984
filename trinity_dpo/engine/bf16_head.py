"""The LM head's products under bf16 compute: bf16 operands, fp32 logits, on CUDA and on CPUs with bf16 units.

The head is a fifth of SmolLM2's FLOPs and, done in fp32 while the body runs in bf16, half of a bf16 step on a CPU
with AMX (docs/benchmarks.md). CUDA multiplies bf16 operands into an fp32 output (`out_dtype`). CPU kernels round a
bf16 product's output to bf16 (8 significant bits): a logit near 30 would move by up to 0.06, and every log-prob
with it. So on CPU each row's logits are computed relative to the row's label logit c: the product
[h, -c] . [w, 1] accumulates in fp32 and rounds z - c, which is small where the softmax has its mass when the label
is likely, and c (itself rounded to bf16, so that it is subtracted and added back exactly) is added back in fp32.
A logit's error is then at most 2^-9 |z - c| instead of 2^-9 |z|; tests/test_bf16_head.py states and checks the
log-probs' tolerance against the fp32 head. Gradients through the head (d hidden, d weight) are bf16 products
too, rounded to bf16 per chunk as autocast's own linear layers round theirs.
"""
from __future__ import annotations

import functools

import torch

_ALIGN = 32  # the centring column is padded to a multiple of this many columns (AVX-512 and AMX tile widths)


def wanted(hidden: torch.Tensor) -> bool:
    """Whether the head's products run in bf16: bf16 hidden states (bf16 compute) on CUDA or on a CPU with bf16
    units. A CPU without them emulates bf16 products more slowly than fp32 ones: fp32 there."""
    return hidden.dtype == torch.bfloat16 and available(hidden.device)


def available(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


@functools.cache
def cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Products:
    """The bf16 copies of one head weight [V, K], made once per head call (forward, backward)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.w = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().float()
        self.cuda = weight.is_cuda
        if not self.cuda:
            v, k = self.w.shape
            self.k = k
            self.w_aug = torch.zeros(v, k + 1 + (-(k + 1)) % _ALIGN, dtype=torch.bfloat16)
            self.w_aug[:, :k] = self.w
            self.w_aug[:, k] = 1

    def logits(self, h: torch.Tensor, labels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [n, V] of bf16 hidden rows `h` [n, K] (`labels` [n] centre them on CPU), into `out` if
        given."""
        if self.cuda:
            z = torch.mm(h, self.w.t(), out_dtype=torch.float32)
            return z if self.bias is None else z.add_(self.bias)
        # The label logit in fp32 from the same bf16 operands, then rounded: subtracted inside the product and added
        # back after, it cancels exactly.
        c = torch.einsum("nk,nk->n", h.float(), self.w[labels].float()).to(torch.bfloat16)
        h_aug = h.new_zeros(h.shape[0], self.w_aug.shape[1])
        h_aug[:, :self.k] = h
        h_aug[:, self.k] = -c
        z = torch.mm(h_aug, self.w_aug.t())
        out = torch.add(z, c.float()[:, None], out=out) if out is not None else z.float().add_(c.float()[:, None])
        return out if self.bias is None else out.add_(self.bias)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b with bf16 operands, as fp32 (CPU: the bf16-rounded product, as autocast's linear layers give)."""
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        return torch.mm(a, b, out_dtype=torch.float32) if self.cuda else torch.mm(a, b).float()
