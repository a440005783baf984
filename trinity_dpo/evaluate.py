"""Held-out evaluation: DPO metrics on pairs no step trained on, and greedy answers to held-out prompts.

`eval/rewards/accuracies` is TRL's reward accuracy: the share of pairs whose implicit reward (relative to the
reference) is higher for chosen than for rejected; it is 0 before training, where every reward is 0.
`eval/prefers_chosen` needs no reference: the share of pairs whose chosen response has the higher mean per-token
log-prob under the model, so it says where the model stands before training too.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from .batching import collate, split_micro
from .logprobs import sequence_logps
from .losses import LOSSES
from .modeling import Runtime
from .pairs import Pair, render


@contextlib.contextmanager
def inference_mode(model):
    """Eval mode (so generation may use its KV cache even with gradient checkpointing on), restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(model, pairs: list[Pair], ref: torch.Tensor, loss_name: str, beta: float, label_smoothing: float,
             runtime: Runtime, pad_id: int, batch_pairs: int) -> dict[str, float]:
    """Means over `pairs` of the DPO metrics, named `eval/<TRL name>`, plus `eval/prefers_chosen`."""
    sums: dict[str, float] = defaultdict(float)
    with inference_mode(model):
        for group in split_micro(list(range(len(pairs))), batch_pairs):
            batch = [pairs[i] for i in group]
            mb = collate(batch, pad_id).to(runtime.device)
            chosen, rejected = sequence_logps(model, mb, runtime.autocast()).cpu().chunk(2)
            ref_pairs = ref[mb.pair_index.cpu()]
            losses, per_pair = LOSSES[loss_name](chosen, rejected, ref_pairs[:, 0], ref_pairs[:, 1], beta,
                                                 label_smoothing)
            n_chosen = torch.tensor([len(p.chosen_ids) for p in batch], dtype=torch.float32)
            n_rejected = torch.tensor([len(p.rejected_ids) for p in batch], dtype=torch.float32)
            sums["eval/loss"] += losses.sum().item()
            for key, values in per_pair.items():
                sums[f"eval/{key}"] += values.sum().item()
            sums["eval/prefers_chosen"] += (chosen / n_chosen > rejected / n_rejected).float().sum().item()
    return {k: v / len(pairs) for k, v in sums.items()}


def generate(model, tokenizer, prompts: list[list[dict]], runtime: Runtime, max_new_tokens: int) -> list[str]:
    """Greedy answers to chat `prompts` (one at a time: no padding to get wrong, and only a few are asked for)."""
    answers = []
    with inference_mode(model), runtime.autocast():
        for messages in prompts:
            ids = tokenizer(render(tokenizer, messages, True), add_special_tokens=False,
                            return_tensors="pt")["input_ids"].to(runtime.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def comparison(before: dict[str, float], after: dict[str, float], n_pairs: int) -> str:
    """A small before/after table of the headline held-out figures."""
    rows = [("preference accuracy (reward)", "eval/rewards/accuracies"),
            ("mean reward margin", "eval/rewards/margins"),
            ("prefers chosen (logp/token)", "eval/prefers_chosen"),
            ("loss", "eval/loss")]
    lines = [f"held-out evaluation ({n_pairs} pairs)      before     after"]
    lines += [f"  {label:<32}{before[key]:>8.3f}  {after[key]:>8.3f}" for label, key in rows]
    return "\n".join(lines)


def side_by_side(prompts: list[str], base: list[str], trained: list[str]) -> str:
    blocks = []
    for prompt, a, b in zip(prompts, base, trained):
        blocks.append(f"prompt:  {prompt}\n  base:    {a}\n  trained: {b}")
    return "\n\n".join(blocks)


def evaluate_checkpoint(cfg, model_path: str, generate_n: int) -> str:
    """`trinity eval`: the held-out figures of the model at `model_path` against the reference
    `cfg.model.model_path`, on the config's held-out data (or, with none, all of its data), plus greedy answers
    from both models."""
    import dataclasses

    from . import builtin
    from .modeling import load_model, load_tokenizer, pick_runtime
    from .reference import reference_logps
    from .train import load_data

    inputs = cfg.buffer.trainer_input
    if not inputs.eval_buffer.path and not inputs.eval_fraction:
        inputs.eval_buffer = dataclasses.replace(inputs.experience_buffer)
    runtime = pick_runtime(cfg)
    ref_path = builtin.materialize(cfg.model.model_path)
    cfg.trainer.eval_samples = generate_n
    cfg.model.model_path = builtin.materialize(model_path)
    tokenizer = load_tokenizer(cfg)  # the checkpoint's own template and tokens
    data = load_data(cfg, tokenizer)
    pad, batch, args, max_new = tokenizer.pad_token_id, 8, cfg.algorithm.policy_loss_fn_args, cfg.trainer.eval_max_new_tokens
    figures, answers = [], []
    for path in (ref_path, cfg.model.model_path):
        model, _ = load_model(cfg, runtime.device, path)
        if not figures:
            ref = reference_logps(model, data.eval, pad, batch, runtime)
        figures.append(evaluate(model, data.eval, ref, cfg.algorithm.policy_loss_fn, args.beta, args.label_smoothing,
                                runtime, pad, batch))
        answers.append(generate(model, tokenizer, data.sample_prompts, runtime, max_new))
        del model
    text = comparison(figures[0], figures[1], len(data.eval)).replace("before     after", "  base     model")
    if data.sample_prompts:
        prompts = [m[-1]["content"] for m in data.sample_prompts]
        text += "\n\n" + side_by_side(prompts, answers[0], answers[1]).replace("trained:", "model:  ")
    return text
