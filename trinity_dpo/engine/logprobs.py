"""Sequence log-probabilities of response tokens: the one place they are computed.

The backbone runs once over a micro-batch; only the hidden states at positions that predict a response token are
kept, and the LM head turns them into log-probs chunk by chunk in fp32 (`_HeadLogprobs`), so neither the forward nor
the backward ever holds a tokens x vocabulary tensor for more than one chunk, and prompt positions never reach the
head.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from . import bf16_head, score_head
from .attention import varlen_kwargs
from ..data.batching import MicroBatch

# Logits per chunk: 32 MiB of fp32 on CPU (170 tokens of a 49k vocabulary), 512 MiB on GPU. Forward holds one such
# block (two where the entropy is wanted), backward one; the CPU size was chosen by timing 16, 32 and 64 MiB on
# SmolLM2 (docs/benchmarks.md, History). Each chunk reads the whole head weight, so a chunk needs enough rows to be
# compute-bound rather than memory-bound: at least _MIN_ROWS (a 152k vocabulary would otherwise give 27-row chunks),
# and on GPU, with its far higher FLOP per byte, the larger budget (~880 rows at 152k).
_CHUNK_ELEMENTS = 1 << 23
_CHUNK_ELEMENTS_GPU = 1 << 27
_MIN_ROWS = 64
METHOD = "trinity_sequence_logps"


# Per-token quantities the LM head can return besides the label's log-prob, from the same fp32 logits and with no
# gradient (metrics and WPO weights): the entropy of the next-token distribution, log sum_v p_v^2, the mean logit
# over the vocabulary, and whether the label is the top-1 token.
HEAD_EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logits", "top1")
# Per-sequence statistics (`objectives.STATS` documents each) and the head extras they sum.
_EXTRA_STATS = {"entropy": "entropy", "entropy_grad": "entropy", "mean_logits": "mean_logits", "top1": "top1",
                "wpo": "log_sum_sq_probs"}


def sequence_stats(model, mb: MicroBatch, autocast: contextlib.AbstractContextManager,
                   wanted: tuple[str, ...] = ("logps",), uniform_grad: bool = False,
                   token_ref: torch.Tensor | None = None, kl=None) -> dict[str, torch.Tensor]:
    """The per-sequence statistics `wanted` (names of `objectives.STATS` or `SCORE_STATS`) of micro-batch `mb`,
    fp32 [mb.n_seqs] each, on the model's device, from one forward; token counts need none. `logps`, `logps_shared`,
    `prompt_logps`, `kl`, `entropy_grad` and `score` carry gradients; `score` (a reward model's head at each
    sequence's last token) runs no LM head, and `margin` is the micro-batch's data, not the model's. `kl` sums
    `kl(logp, ref)` over each sequence's response tokens, `token_ref` [N] being the reference's log-prob of each
    (in `mb.target_ids` order). `token_logps` is per token, [N], not per sequence (what the reference pass keeps for
    a KL term).
    `uniform_grad`: the loss will give every response token's log-prob the same gradient
    (`objectives.Objective.uniform_grad`), so the LM head's backward can be done in its forward."""
    device = mb.input_ids.device
    out = {}
    if "tokens" in wanted:
        out["tokens"] = torch.bincount(mb.target_seq, minlength=mb.n_seqs).float().to(device)
    if "prompt_tokens" in wanted:
        out["prompt_tokens"] = torch.bincount(mb.prompt_seq, minlength=mb.n_seqs).float().to(device)
    if "margin" in wanted:  # data, not the model's: the example's margin column, for each of its sequences
        out["margin"] = mb.margin.to(device).repeat(mb.seqs_per_example)
    computed = [k for k in wanted if k not in ("tokens", "prompt_tokens", "margin")]
    if not computed:
        return out
    bound = getattr(model, METHOD, None)
    token, prompt = (bound or types.MethodType(_token_stats, model))(mb, autocast, tuple(computed),
                                                                   uniform_grad and "entropy_grad" not in wanted)
    if "score" in wanted:  # a reward model's score per sequence (its only statistic from the model)
        out["score"] = token["score"]
    segment = lambda values: _segment_sum(values, mb.target_seq, mb.n_seqs)  # noqa: E731
    if "logps" in wanted:
        out["logps"] = segment(token["logps"])
    if "token_logps" in wanted:
        out["token_logps"] = token["logps"]
    if "kl" in wanted:
        out["kl"] = segment(kl(token["logps"], token_ref.to(device)))
    if "logps_shared" in wanted:
        out["logps_shared"] = segment(token["logps"] * _shared_mask(mb))
    for stat, extra in _EXTRA_STATS.items():
        if stat in wanted:
            values = token["logps"].detach() - token[extra] if stat == "wpo" else token[extra]
            out[stat] = segment(values if stat == "entropy_grad" else values.detach())
    if "prompt_logps" in wanted:
        out["prompt_logps"] = _segment_sum(prompt, mb.prompt_seq, mb.n_seqs)
    return out


def sequence_logps(model, mb: MicroBatch, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Sum of response-token log-probs per sequence, fp32, shape [mb.n_seqs] (slot-major: every example's first
    sequence, then every example's second, ...).

    A packed row carries its sequences' bounds to the attention (`attention.py`), which keeps each sequence to
    itself; padded rows need no mask (right padding under causal attention).
    """
    return sequence_stats(model, mb, autocast)["logps"]


def bind(model) -> str:
    """Make the forward of `sequence_stats` a method of `model` and return its name: FSDP2 gathers the root's
    parameters (the embeddings and the LM head) only inside methods registered with it (`distributed.shard`)."""
    setattr(model, METHOD, types.MethodType(_token_stats, model))
    return METHOD


def _token_stats(model, mb: MicroBatch, autocast: contextlib.AbstractContextManager, wanted: tuple[str, ...],
                 uniform_grad: bool = False):
    """({"logps": [N] and the head extras `wanted` asks for}, the prompt targets' log-probs [P] or None): one
    backbone pass; response and prompt targets go through the head together."""
    backbone = getattr(model, model.base_model_prefix)
    device = mb.input_ids.device.type
    with autocast:
        hidden = backbone(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                          **varlen_kwargs(mb.seq_bounds, mb.input_ids.device, mb.prefixes)).last_hidden_state
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if "score" in wanted:  # a reward model: the score head at each sequence's last token; the LM head never runs
        return {"score": score_head.sequence_scores(model, hidden, mb.score_pos)}, None
    if bf16 and bf16_head.available(hidden.device):
        hidden = hidden.to(torch.bfloat16)  # the head's bf16 products (`bf16_head.py`); its logits stay fp32
    positions, labels = mb.target_pos, mb.target_ids
    with_prompt = "prompt_logps" in wanted
    if with_prompt:
        positions, labels = torch.cat([positions, mb.prompt_pos]), torch.cat([labels, mb.prompt_target_ids])
    extras = tuple(dict.fromkeys(e for s, e in _EXTRA_STATS.items() if s in wanted))
    logps, extra = head_logprobs(hidden.index_select(0, positions), model.get_output_embeddings(), labels,
                                 _logit_transform(model.config), extras, uniform_grad and not with_prompt,
                                 entropy_grad="entropy_grad" in wanted)
    n = mb.target_ids.numel()
    token = {"logps": logps[:n], **{k: v[:n] for k, v in extra.items()}}
    return token, (logps[n:] if with_prompt else None)


def _segment_sum(values: torch.Tensor, seq: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """Per-sequence sums of `values` [N] whose sequences `seq` [N] are sorted. A deterministic sum (index_add is
    not on CUDA, and step 1 must reproduce the reference to the bit): each value gets its own slot of an
    [n_seqs, longest] table, which is summed by rows."""
    if values.numel() == 0:
        return values.new_zeros(n_seqs)
    counts, rank = _ranks(seq, n_seqs)
    table = values.new_zeros(n_seqs, int(counts.max()))
    return table.index_put((seq, rank), values).sum(1)


def _shared_mask(mb: MicroBatch) -> torch.Tensor:
    """1.0 for the response tokens within the length every sequence of its example has (LD-DPO's shared part),
    else 0.0; [N]."""
    counts, rank = _ranks(mb.target_seq, mb.n_seqs)
    shared = counts.view(mb.seqs_per_example, -1).min(0).values.repeat(mb.seqs_per_example)  # [n_seqs]
    return (rank < shared[mb.target_seq]).float()


def _ranks(seq: torch.Tensor, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens per sequence [n_seqs], each token's position within its sequence [N]) for sorted `seq` [N]."""
    counts = torch.bincount(seq, minlength=n_seqs)
    starts = counts.cumsum(0) - counts
    return counts, torch.arange(seq.numel(), device=seq.device) - starts[seq]


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, transform=None) -> torch.Tensor:
    """log softmax(transform(head(hidden)))[label] for each row of `hidden` [N, H] and `labels` [N]; fp32 [N]."""
    return head_logprobs(hidden, head, labels, transform)[0]


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, transform=None,
                  extras: tuple[str, ...] = (), uniform_grad: bool = False, entropy_grad: bool = False
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`token_logprobs` and the `HEAD_EXTRAS` named in `extras`, fp32 [N] each, the latter without gradient but
    the entropy with `entropy_grad` (an entropy term in the loss). `uniform_grad`: the rows' log-probs are expected
    to get one and the same gradient (see `_HeadLogprobs`)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    budget = _CHUNK_ELEMENTS_GPU if hidden.is_cuda else _CHUNK_ELEMENTS
    chunk = max(_MIN_ROWS, budget // weight.shape[0])
    wants = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    # A frozen head (LoRA) needs only d hidden, which scales row by row: done ahead whatever the loss.
    frozen = not (wants[1] or wants[2])
    ahead = wants if (uniform_grad or frozen) and transform is None and torch.is_grad_enabled() and any(wants) else None
    ahead = None if entropy_grad else ahead  # the entropy's gradient is not row-uniform: backward rebuilds
    logps, table = _HeadLogprobs.apply(hidden, weight, bias, labels, transform, chunk, extras, ahead, entropy_grad)
    return logps, {name: table[:, i] for i, name in enumerate(extras)}


class _HeadLogprobs(torch.autograd.Function):
    """Label log-probs of a linear head, chunk by chunk, with no autograd graph inside.

    Forward keeps each row's logsumexp [N] and nothing of vocabulary size. Backward rebuilds a chunk's logits once,
    turns them in place into g * (onehot(label) - softmax) and accumulates dW into one [V, H] buffer. Checkpointing
    each chunk instead would recompute the logsumexp too, and allocate and then add a whole [V, H] weight gradient
    per chunk (113 MB each for a 49k x 576 head).

    With `ahead` (which of hidden, weight, bias want gradients), forward also turns each chunk's logits into the
    gradients for a unit gradient on every row while it has them, and backward scales those, sparing the rebuild
    (a quarter of the head's products, a third where the head is frozen). d hidden scales row by row, so a frozen
    head (LoRA) takes it under any loss; dW sums over rows, so it scales only where every row gets the same gradient
    g (SFT's token mean), for one [V, H] buffer held from forward to backward. Backward checks that g is one value;
    otherwise it rebuilds as above.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, chunk, extras, ahead, entropy_grad=False):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        fast = bf16_head.Products(weight, bias) if bf16_head.wanted(hidden) else None
        unit = _HeadGrads(hidden, weight, bias, ahead, fast) if ahead else None
        lse = torch.empty_like(out)
        table = torch.empty(hidden.shape[0], len(extras), dtype=torch.float32, device=hidden.device)
        buffer = _logits_buffer(hidden, weight, chunk)
        scratch = _logits_buffer(hidden, weight, chunk) if "entropy" in extras else None
        for s in range(0, hidden.shape[0], chunk):
            rows = slice(s, s + chunk)
            logits = _chunk_logits(hidden[rows], weight, bias, buffer, fast, labels[rows])
            if transform is not None:
                logits = transform(logits)
            out[rows] = logits.gather(-1, labels[rows, None]).squeeze(-1)
            lse[rows], e, total = _chunk_lse(logits, labels[rows], extras, table[rows], scratch)
            out[rows] -= lse[rows]
            if unit is not None:  # e -> the logits' gradient for a unit gradient on each row: onehot - e / sum e
                unit.add(s, e.mul_(total.reciprocal().neg_()).scatter_add_(1, labels[rows, None],
                                                                             torch.ones_like(total)))
        if unit is not None:
            unit.finish()
        entropy = table[:, extras.index("entropy")].clone() if entropy_grad else None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.transform, ctx.chunk, ctx.unit, ctx.entropy_col = transform, chunk, unit, \
            extras.index("entropy") if entropy_grad else None
        # A rebuilding backward reuses the weight's bf16 copy; where the gradients are done ahead it needs none.
        ctx.fast = fast if fast is not None and unit is None and any(ctx.needs_input_grad[:3]) else None
        if ctx.fast is not None:
            ctx.fast.release_blocks()
        if not entropy_grad:
            ctx.mark_non_differentiable(table)
        ctx.set_materialize_grads(False)
        return out, table

    @staticmethod
    def backward(ctx, grad, grad_table):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        grad = torch.zeros_like(lse) if grad is None else grad
        g_h = None if grad_table is None or ctx.entropy_col is None else grad_table[:, ctx.entropy_col]
        if ctx.unit is not None and (ctx.unit.rowwise or grad.numel() and bool((grad == grad[0]).all())):
            return (*ctx.unit.result(grad), *(None,) * 6)
        fast = ctx.fast or (bf16_head.Products(weight, bias) if bf16_head.wanted(hidden) else None)
        ctx.fast = None
        grads, n = _HeadGrads(hidden, weight, bias, ctx.needs_input_grad[:3], fast), ctx.chunk
        buffer = _logits_buffer(hidden, weight, n)
        for s in range(0, hidden.shape[0], n):
            rows = slice(s, s + n)
            h_term = None if g_h is None else (g_h[rows, None], entropy[rows, None])
            grads.add(s, _logits_grad(grads.rows(s, n), grads.w, bias, labels[rows, None], grad[rows, None],
                                      lse[rows, None], ctx.transform, buffer, h_term, fast))
        grads.finish()
        return (*grads.result(), *(None,) * 6)


class _HeadGrads:
    """The head's input gradients, summed chunk by chunk from each chunk's logits gradient: in backward from the
    rebuilt logits, or in forward for a unit gradient on every row (`ahead`), to be scaled in backward."""

    def __init__(self, hidden, weight, bias, wants, fast: bf16_head.Products | None):
        self.fast = fast  # the forward's products, so rebuilt logits match its logsumexp
        self.w = fast.w if fast else weight.float()
        self.hidden, self.weight_dtype = hidden, weight.dtype
        self.rowwise = not (wants[1] or wants[2])  # only d hidden: any gradient applies, row by row
        self.d_hidden = torch.empty_like(hidden, dtype=torch.float32) if wants[0] else None
        self.d_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        self.d_bias = torch.zeros_like(weight[:, 0], dtype=torch.float32) if wants[2] else None

    def rows(self, s: int, n: int) -> torch.Tensor:
        """Hidden rows s..s+n as the head's products take them."""
        return self.hidden[s:s + n] if self.fast else self.hidden[s:s + n].float()

    def add(self, s: int, d_logits: torch.Tensor) -> None:
        """The gradient [n, V] of the logits of rows s..s+n."""
        h, rows = self.rows(s, len(d_logits)), slice(s, s + len(d_logits))
        if self.fast:
            self.fast.add_grads(d_logits, h, None if self.d_hidden is None else self.d_hidden[rows], self.d_weight)
        else:
            if self.d_hidden is not None:
                self.d_hidden[rows] = d_logits @ self.w
            if self.d_weight is not None:
                self.d_weight.addmm_(d_logits.t(), h)
        if self.d_bias is not None:
            self.d_bias += d_logits.sum(0)

    def finish(self) -> None:
        """After the last chunk: the sums that wait in groups are added (the bf16 products' d weight), and the
        blocks are let go (done in forward, they would be held until backward)."""
        if self.fast:
            self.fast.flush(self.d_weight)
            self.fast.release_blocks()

    def result(self, grad: torch.Tensor | None = None) -> tuple:
        """(d hidden, d weight, d bias) in the hidden states' and weight's dtypes (d bias fp32); sums made for a unit
        gradient are scaled by `grad` [N]: row by row when `rowwise`, else by its one value."""
        g = None if grad is None else grad[:, None] if self.rowwise else grad[0]
        scale = (lambda t: t) if g is None else (lambda t: t * g)  # noqa: E731
        return (None if self.d_hidden is None else scale(self.d_hidden).to(self.hidden.dtype),
                None if self.d_weight is None else scale(self.d_weight).to(self.weight_dtype),
                None if self.d_bias is None else scale(self.d_bias))


def _chunk_lse(logits, labels, extras, table, scratch):
    """A chunk's logsumexp [n] and its `extras` (written into `table` [n, len(extras)]) in few passes over the
    [n, V] logits and no [n, V] temporaries: e = exp(z - max z) goes into `scratch` (the logits themselves where no
    extra reads them afterwards), and the extras that need the softmax p = e / sum e read e. Returns (lse, e, sum e
    [n, 1]); the caller may overwrite e.
    Row-wise dot products are `vecdot`s: einsum makes them a batch of [1, V] x [V, 1] products, 4x slower at
    [170, 49152]. `top1` takes the maximum's index from the pass that finds the maximum (max's indices are the first
    of equal maxima, as argmax's): a separate argmax took 6.5 ms a chunk."""
    if "mean_logits" in extras:
        table[:, extras.index("mean_logits")] = logits.mean(-1)
    if "top1" in extras:
        top, where = logits.max(-1, keepdim=True)
        table[:, extras.index("top1")] = (where.squeeze(-1) == labels).float()
    else:
        top = logits.amax(-1, keepdim=True)
    target = logits if "entropy" not in extras else None if scratch is None else scratch[:len(logits)]
    e = torch.sub(logits, top, out=target).exp_()
    total = e.sum(-1, keepdim=True)
    lse = (top + total.log()).squeeze(-1)
    for i, name in enumerate(extras):
        if name == "entropy":  # H = lse - sum_v p_v z_v
            table[:, i] = lse - torch.linalg.vecdot(e, logits) / total.squeeze(-1)
        elif name == "log_sum_sq_probs":  # log sum_v p_v^2 = log sum_v e_v^2 - 2 log sum_v e_v
            table[:, i] = (torch.linalg.vecdot(e, e).log() - 2 * total.squeeze(-1).log())
    return lse, e, total


def _chunk_logits(hidden, weight, bias, buffer=None, fast=None, labels=None):
    # fp32 logits even under bf16 autocast: log-softmax over ~1e5 classes loses the differences DPO trains on.
    with torch.autocast(hidden.device.type, enabled=False):
        if fast is not None:
            return fast.logits(hidden, labels, buffer[:hidden.shape[0]] if buffer is not None else None)
        if buffer is None:
            return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        out = buffer[:hidden.shape[0]]
        if bias is None:
            return torch.mm(hidden.float(), weight.float().t(), out=out)
        return torch.addmm(bias.float(), hidden.float(), weight.float().t(), out=out)


def _logits_buffer(hidden, weight, chunk):
    """One fp32 [chunk, V] block that every chunk's logits reuse (None where the bf16 head allocates its own). On
    CPU a fresh 32 MiB block per chunk is a fresh mapping whose pages fault in one by one as the product writes
    them (the head's timings before and after: docs/benchmarks.md, History)."""
    if hidden.is_cuda and bf16_head.wanted(hidden):
        return None
    return torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)


def _logits_grad(h, w, bias, labels, g, lse, transform, buffer=None, h_term=None, fast=None):
    """g * d log softmax(t)[label] / d z (+ g_H * d H / d z with `h_term` = (g_H, H), the entropy H of softmax(t))
    for one chunk: z = h w^T + b, t = transform(z); all [n, V] but labels, g, lse, g_H, H [n, 1]."""
    z = _chunk_logits(h, w, bias, buffer, fast, labels[:, 0])
    if transform is None:
        return _softmax_grad(z, labels, g, lse, h_term)
    with torch.enable_grad():
        z.requires_grad_(True)
        t = transform(z)
    return torch.autograd.grad(t, z, _softmax_grad(t.detach().clone(), labels, g, lse, h_term))[0]


def _softmax_grad(t, labels, g, lse, h_term=None):
    """In place: logits t -> g * (onehot(labels) - p), p = softmax(t), lse = logsumexp(t) from the forward. With
    `h_term` = (g_H, H) also + g_H * dH/dt = -g_H * p * (log p + H), for H = -sum_v p_v log p_v."""
    if h_term is None:
        return t.sub_(lse).exp_().mul_(-g).scatter_add_(1, labels, g)
    g_h, entropy = h_term
    p = t.sub_(lse).exp()  # t now holds log p
    return t.add_(entropy).mul_(-g_h).sub_(g).mul_(p).scatter_add_(1, labels, g)


def _logit_transform(config):
    """The architectures whose logits are not the plain head output, read as their own forwards (and TRL's fused
    head) read them from the text config: one multiplier (Cohere's `logit_scale`, Muse Glimmer's
    `output_multiplier`, Falcon-H1's `lm_head_multiplier`, else `logits_scaling`, which Granite and MiniCPM3 divide
    by and HyperCLOVA X multiplies by), then Gemma's soft cap."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = next((v for v in (getattr(text, k, None) for k in ("logit_scale", "output_multiplier",
                                                                "lm_head_multiplier")) if v is not None), None)
    divide = getattr(text, "logits_scaling", None) if scale is None else None
    if divide is not None and getattr(text, "model_type", None) == "hyperclovax":
        scale, divide = divide, None
    cap = getattr(text, "final_logit_softcapping", None)
    if scale in (None, 1) and divide in (None, 1) and not cap:
        return None

    def transform(logits):
        if scale not in (None, 1):
            logits = logits * scale
        if divide not in (None, 1):
            logits = logits / divide  # as Granite's forward computes it
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform
