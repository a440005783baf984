"""The LM head's products under bf16 compute: bf16 operands, fp32 logits, on CUDA and on CPUs with bf16 units.

The head is a fifth of SmolLM2's FLOPs and, done in fp32 while the body runs in bf16, half of a bf16 step on a CPU
with AMX (docs/benchmarks.md). CUDA multiplies bf16 operands into an fp32 output (`out_dtype`). CPU kernels round a
bf16 product's output to bf16 (8 significant bits): a logit near 30 would move by up to 0.06, and every log-prob
with it. So on CPU each row's logits are computed relative to the row's label logit c: the product
[h, -c] . [w, 1] accumulates in fp32 and rounds z - c, which is small where the softmax has its mass when the label
is likely, and c (itself rounded to bf16, so that it is subtracted and added back exactly) is added back in fp32.
A logit's error is then at most 2^-9 |z - c| instead of 2^-9 |z|, z and c without the bias of a biased head, which
is added after, exactly, in fp32; tests/test_bf16_head.py states and checks the
log-probs' tolerance against the fp32 head. Gradients through the head (d hidden, d weight) are bf16 products
too, rounded to bf16 per chunk as autocast's own linear layers round theirs.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_ALIGN = 32  # the centring column is padded to a multiple of this many columns (AVX-512 and AMX tile widths)
# On CPU d weight's product waits for this many bytes of bf16 d_logits (several chunks' rows): one [V, K] product
# and one fp32 accumulation per group instead of per chunk. Adding a bf16 [V, K] product to the fp32 sum makes an
# fp32 copy of it first; per 170-row chunk of SmolLM2's head that was 0.5 s of a 3.3 s bf16 step.
_GROUP_BYTES = 128 << 20
_SLAB_ROWS = 4096
_kept: dict | None = None  # id(weight) -> (weight, (version, data pointer), bf16 copy) inside `keep_copies`


def wanted(hidden: torch.Tensor) -> bool:
    """Whether the head's products run in bf16: bf16 hidden states (bf16 compute) on CUDA or on a CPU with bf16
    units. A CPU without them emulates bf16 products more slowly than fp32 ones: fp32 there."""
    return hidden.dtype == torch.bfloat16 and available(hidden.device)


def available(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


@contextlib.contextmanager
def keep_copies():
    """Within it, each head weight's bf16 copy is made once and reused as long as the weight is unchanged (the same
    storage and version): for a pass over many micro-batches at fixed weights (`modeling.scoring_mode`), where it
    was made once per micro-batch. The copies are let go on leaving."""
    global _kept
    outer, _kept = _kept, {} if _kept is None else _kept
    try:
        yield
    finally:
        _kept = outer


def _copy(weight: torch.Tensor, make) -> torch.Tensor:
    """`make()` (the bf16 copy of `weight`), or the copy `keep_copies` kept of it."""
    if _kept is None:
        return make()
    key = (weight._version, weight.data_ptr())
    kept = _kept.get(id(weight))
    if kept is None or kept[0] is not weight or kept[1] != key:
        kept = _kept[id(weight)] = (weight, key, make())
    return kept[2]


@functools.cache
def cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Products:
    """The bf16 copy of one head weight [V, K], made once per head forward (a micro-batch's) and kept for its
    backward (the weight does not change in between; autograd's version check on the saved weight would say if it
    did), and on CPU the
    bf16 blocks every chunk's products reuse: a fresh block per chunk is a fresh mapping whose pages fault in one by
    one (the fp32 head's `_logits_buffer` for the same reason)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.bias = None if bias is None else bias.detach().float()
        self.cuda = weight.is_cuda
        self._blocks: dict[str, torch.Tensor] = {}
        if self.cuda:
            self.w = _copy(weight, lambda: weight.detach().to(torch.bfloat16))
            return
        v, k = weight.shape
        self.k = k
        self.w_aug = _copy(weight, lambda: _augmented(weight))
        self.w = self.w_aug[:, :k]  # the products read the bf16 weight from the augmented copy: one copy, not two
        self._group_rows = max(1, _GROUP_BYTES // (2 * v))
        self._pending: list[torch.Tensor] = []  # the hidden rows of the chunks whose d_logits wait in the group block
        self._filled = 0

    def release_blocks(self) -> None:
        """Drop the chunk blocks, keeping the weight's copy, between a forward and its backward."""
        self._blocks.clear()

    def _block(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A reused bf16 [rows, cols] block (grown when a chunk is larger)."""
        block = self._blocks.get(name)
        if block is None or block.shape[0] < rows or block.shape[1] != cols:
            block = self._blocks[name] = torch.empty(rows, cols, dtype=torch.bfloat16)
        return block[:rows]

    def logits(self, h: torch.Tensor, labels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [n, V] of bf16 hidden rows `h` [n, K] (`labels` [n] centre them on CPU), into `out` if
        given."""
        if self.cuda:
            z = torch.mm(h, self.w.t(), out_dtype=torch.float32)
            return z if self.bias is None else z.add_(self.bias)
        # The label logit in fp32 from the same bf16 operands, then rounded: subtracted inside the product and added
        # back after, it cancels exactly.
        n = h.shape[0]
        c = torch.einsum("nk,nk->n", h.float(), self.w[labels].float()).to(torch.bfloat16)
        h_aug = self._block("h", n, self.w_aug.shape[1])
        h_aug[:, :self.k] = h
        h_aug[:, self.k] = -c
        h_aug[:, self.k + 1:] = 0
        z = torch.mm(h_aug, self.w_aug.t(), out=self._block("z", n, self.w.shape[0]))
        out = torch.empty(z.shape, dtype=torch.float32) if out is None else out
        torch.add(z, c.float()[:, None], out=out)
        return out if self.bias is None else out.add_(self.bias)

    def add_grads(self, d_logits: torch.Tensor, h: torch.Tensor, d_hidden: torch.Tensor | None,
                  d_weight: torch.Tensor | None) -> None:
        """d_hidden [n, K] (fp32, this chunk's rows) = d_logits @ w and d_weight [V, K] (fp32) += d_logits^T @ h,
        from bf16 operands, d_logits [n, V] cast once for both. On CPU each product is rounded to bf16, as autocast's
        linear layers round theirs, and d_weight sums them in fp32, a group of chunks at a time (`flush`; the caller
        flushes after its last chunk)."""
        if self.cuda:
            a = d_logits.to(torch.bfloat16)
            if d_hidden is not None:
                d_hidden.copy_(torch.mm(a, self.w, out_dtype=torch.float32))
            if d_weight is not None:
                d_weight.add_(torch.mm(a.t(), h.to(torch.bfloat16), out_dtype=torch.float32))
            return
        n = d_logits.shape[0]
        if self._filled + n > self._group_rows and d_weight is not None:
            self.flush(d_weight)
        # Only d weight waits: without it (a frozen head, LoRA) the block holds one chunk, as before groups.
        group = self._block("da", max(self._group_rows, n) if d_weight is not None else n, d_logits.shape[1])
        a = group[self._filled:self._filled + n].copy_(d_logits)
        if d_hidden is not None:
            d_hidden.copy_(torch.mm(a, self.w))
        if d_weight is not None:
            self._pending.append(h.to(torch.bfloat16))
            self._filled += n

    def flush(self, d_weight: torch.Tensor | None) -> None:
        """Add the waiting chunks' d weight to `d_weight` (CPU): one bf16 product over their rows, rounded to bf16
        once, as autocast's linear rounds its weight gradient over a whole batch."""
        if self.cuda or not self._filled or d_weight is None:
            return
        h = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        a = self._blocks["da"][:self._filled]
        product = torch.mm(a.t(), h, out=self._block("dw", *d_weight.shape))
        # A bf16 tensor added to an fp32 one is first copied whole to fp32: slab by slab, that copy stays small.
        for r in range(0, len(product), _SLAB_ROWS):
            d_weight[r:r + _SLAB_ROWS].add_(product[r:r + _SLAB_ROWS])
        self._pending.clear()
        self._filled = 0


def _augmented(weight: torch.Tensor) -> torch.Tensor:
    """[V, K] -> bf16 [V, K + 1 + padding]: the weight, a column of ones (the label logit's), zeros."""
    v, k = weight.shape
    w_aug = torch.empty(v, k + 1 + (-(k + 1)) % _ALIGN, dtype=torch.bfloat16)
    w_aug[:, :k] = weight.detach()  # rounded to bf16 as it is copied, as `.to(torch.bfloat16)` rounds
    w_aug[:, k] = 1
    w_aug[:, k + 1:] = 0
    return w_aug
