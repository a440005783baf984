"""Held-out evaluation: DPO metrics on pairs no step trained on, and greedy answers to held-out prompts.

`eval/rewards/accuracies` is TRL's reward accuracy: the share of pairs whose implicit reward (relative to the
reference) is higher for chosen than for rejected; it is 0 before training, where every reward is 0.
`eval/prefers_chosen` needs no reference: the share of pairs whose chosen response has the higher mean per-token
log-prob under the model, so it says where the model stands before training too.
"""
from __future__ import annotations

import torch

from .losses import LOSSES
from .modeling import Runtime, inference_mode
from .pairs import Pair, Turns, prompt_ids, prompt_text


def eval_metrics(policy: torch.Tensor, ref: torch.Tensor, pairs: list[Pair], loss_name: str, beta: float,
                 label_smoothing: float) -> dict[str, float]:
    """Means over `pairs` of the DPO metrics, named `eval/<TRL name>`, plus `eval/prefers_chosen`, from the
    [n, 2] (chosen, rejected) log-prob tables of the policy and the reference."""
    losses, per_pair = LOSSES[loss_name](policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, label_smoothing)
    n_chosen = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float32)
    n_rejected = torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float32)
    out = {"eval/loss": losses.mean().item()}
    out.update({f"eval/{key}": values.mean().item() for key, values in per_pair.items()})
    out["eval/prefers_chosen"] = (policy[:, 0] / n_chosen > policy[:, 1] / n_rejected).float().mean().item()
    return out


def generate(model, tokenizer, prompts: list[Turns], runtime: Runtime, max_new_tokens: int,
             synced: bool = False) -> list[str]:
    """Greedy answers to chat `prompts` (one at a time: no padding to get wrong, and only a few are asked for).
    `synced`: the model is sharded over processes that all answer the same prompts; each keeps stepping until
    all are done, so that their forward passes (and FSDP's collectives) stay matched."""
    answers = []
    with inference_mode(model), runtime.autocast():
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=runtime.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                 synced_gpus=synced)
            answers.append(answer_text(tokenizer, out[0, ids.shape[1]:].tolist()))
    return answers


def answer_text(tokenizer, ids: list[int]) -> str:
    """Decoded answer tokens. An answer cut at max_new_tokens may end inside a multi-byte character (an emoji is
    several byte-level tokens), which decodes to U+FFFD: that partial character is dropped."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()


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
    from .batching import plan_micro
    from .modeling import load_model, load_tokenizer, pick_runtime
    from .reference import score
    from .dataset import load_data, micro_plan

    inputs = cfg.buffer.trainer_input
    if not inputs.eval_buffer.path and not inputs.eval_fraction:
        inputs.eval_buffer = dataclasses.replace(inputs.experience_buffer)
    runtime = pick_runtime(cfg)
    ref_path = builtin.materialize(cfg.model.model_path)
    cfg.trainer.eval_samples = generate_n
    cfg.model.model_path = builtin.materialize(model_path)
    tokenizer = load_tokenizer(cfg)  # the checkpoint's own template and tokens
    data = load_data(cfg, tokenizer)
    pad, args, max_new = tokenizer.pad_token_id, cfg.algorithm.policy_loss_fn_args, cfg.trainer.eval_max_new_tokens
    groups = plan_micro(data.eval, *micro_plan(cfg))
    tables, answers = [], []
    for path in (ref_path, cfg.model.model_path):
        model, _ = load_model(cfg, runtime.device, path)
        tables.append(score(model, groups, len(data.eval), pad, runtime))
        answers.append(generate(model, tokenizer, data.sample_prompts, runtime, max_new))
        del model
    figures = [eval_metrics(t, tables[0], data.eval, cfg.algorithm.policy_loss_fn, args.beta, args.label_smoothing)
               for t in tables]
    text = comparison(figures[0], figures[1], len(data.eval)).replace("before     after", "  base     model")
    if data.sample_prompts:
        prompts = [prompt_text(m) for m in data.sample_prompts]
        text += "\n\n" + side_by_side(prompts, answers[0], answers[1]).replace("trained:", "model:  ")
    return text
