"""Held-out evaluation: the objective's loss and metrics on pairs no step trained on, and greedy answers to held-out prompts.

`eval/rewards/accuracies` is TRL's reward accuracy: the share of pairs whose implicit reward (relative to the
reference) is higher for chosen than for rejected; it is 0 before training, where every reward is 0.
`eval/prefers_chosen` needs no reference: the share of pairs whose chosen response has the higher mean per-token
log-prob under the model, so it says where the model stands before training too.
"""
from __future__ import annotations

import torch

from ..engine import distributed
from ..objective.extrema import reduce
from ..objective.objectives import Objective, step_totals
from ..engine.modeling import Runtime, inference_mode
from ..data.pairs import Pair, Turns, prompt_ids, prompt_text


def eval_metrics(policy: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | None, pairs: list[Pair],
                 objective: Objective) -> dict[str, float]:
    """Means over `pairs` of the objective's loss and metrics, named `eval/<TRL name>`, plus `eval/prefers_chosen`,
    from the policy's and the reference's statistics tables ({statistic: [n, 2] (chosen, rejected)}; the reference
    None when the objective needs none). The held-out set is one batch: its token means are over all its pairs."""
    flat = lambda tables: {k: t.t().reshape(-1) for k, t in tables.items()}  # noqa: E731
    losses, metrics = objective.compute(flat(policy), flat(ref) if objective.needs_reference else None,
                                        step_totals(pairs))
    means = {"loss": losses.mean().item(),
             **{key: reduce(values, objective.extrema.get(key)) for key, values in metrics.items()}}
    out = {f"eval/{key}": value for key, value in {**means, **objective.derived(means)}.items()}
    if objective.sequences == 2 and "logps" in policy and objective.name != "kto":  # a reward model has no
        # log-probs; KTO's second sequence is its KL sequence, not a rejected answer
        per_token = policy["logps"] / policy["tokens"]
        out["eval/prefers_chosen"] = (per_token[:, 0] > per_token[:, 1]).float().mean().item()
    return out


def generate(model, tokenizer, prompts: list[Turns], runtime: Runtime, max_new_tokens: int,
             synced: bool = False, template: dict | None = None) -> list[str]:
    """Greedy answers to chat `prompts` (one at a time: no padding to get wrong, and only a few are asked for).
    `synced`: the model is sharded over processes that all answer the same prompts; each keeps stepping until
    all are done, so that their forward passes (and FSDP's collectives) stay matched."""
    answers = []
    with inference_mode(model), distributed.gathered(model), runtime.autocast():
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt, template)], device=runtime.device)
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
    rows = [("perplexity", "eval/ppl"), ("token accuracy (top-1)", "eval/mean_token_accuracy"),
            ("preference accuracy (reward)", "eval/rewards/accuracies"),
            ("mean reward margin", "eval/rewards/margins"),
            ("prefers chosen (logp/token)", "eval/prefers_chosen"),
            ("reward accuracy (score)", "eval/accuracy"), ("mean score margin", "eval/margin"),
            ("loss", "eval/loss")]
    unit = "pairs" if "eval/rewards/margins" in before or "eval/margin" in before else "rows"
    unit = "examples" if "eval/kl" in before else unit  # KTO: labelled completions, not pairs
    lines = [f"held-out evaluation ({n_pairs} {unit})      before     after"]
    lines += [f"  {label:<32}{before[key]:>8.3f}  {after[key]:>8.3f}" for label, key in rows if key in before]
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

    from ..sources.local import localize, model_folder
    from ..engine.modeling import load_model, load_tokenizer, pick_runtime
    from ..objective.reference import score
    from ..data.dataset import load_data
    from ..data.schedule import Schedule
    from ..objective.objectives import build as build_objective

    cfg = localize(cfg)
    inputs = cfg.buffer.trainer_input
    if not inputs.eval_buffer.path and not inputs.eval_fraction:
        inputs.eval_buffer = dataclasses.replace(inputs.experience_buffer)
    runtime = pick_runtime(cfg)
    ref_path = cfg.model.model_path
    cfg.trainer.eval_samples = generate_n
    cfg.model.model_path = model_folder(model_path, "trinity eval --model", adapter_ok=True)
    reward_model_eval(cfg, generate_n)
    tokenizer = load_tokenizer(cfg)  # the checkpoint's own template and tokens
    data = load_data(cfg, tokenizer)
    pad, max_new = tokenizer.pad_token_id, cfg.trainer.eval_max_new_tokens
    groups = Schedule.of(cfg, data, world=1).held_out().per_rank[0]  # one process: `plan_micro` of the held-out set
    tables, answers = [], []
    objective = build_objective(cfg.algorithm, terms=False, held_out=True)  # held-out figures: the objective's own
    stats = tuple(dict.fromkeys(objective.ref_stats + objective.stats))
    for path in (ref_path, cfg.model.model_path):
        model, _ = load_model(cfg, runtime.device, path)
        tables.append(score(model, groups, len(data.eval), pad, runtime, objective.sequences, stats))
        answers.append(generate(model, tokenizer, data.sample_prompts, runtime, max_new, template=data.template))
        del model
    if objective.data_tables is not None:  # per-example data the loss reads beside the reference (KTO's labels)
        tables[0].update(objective.data_tables(data.eval))
    figures = [eval_metrics(t, tables[0], data.eval, objective) for t in tables]
    text = comparison(figures[0], figures[1], len(data.eval)).replace("before     after", "  base     model")
    if data.sample_prompts:
        prompts = [prompt_text(m) for m in data.sample_prompts]
        text += "\n\n" + side_by_side(prompts, answers[0], answers[1]).replace("trained:", "model:  ")
    return text


def reward_model_eval(cfg, generate_n: int) -> None:
    """A reward model checkpoint (a sequence-classification folder, or an adapter of one) is evaluated as one,
    whatever objective the config names: its held-out accuracy, margin and loss on the config's or `--data`'s
    pairs."""
    from ..config.schema import AlgorithmConfig
    from ..engine import score_head
    from ..errors import ConfigError

    if score_head.folder_is_reward_model(cfg.model.model_path) and not score_head.wanted(cfg):
        cfg.algorithm = AlgorithmConfig(algorithm_type="reward_model", policy_loss_fn="reward_model",
                                        kl_loss_fn="none")
    if score_head.wanted(cfg) and generate_n:
        raise ConfigError("trinity eval --generate: a reward model scores answers and writes none; leave --generate "
                          "out")
