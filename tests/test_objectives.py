"""The objective interface: what each objective declares, and the statistics the core computes for it."""
from __future__ import annotations

import math

import contextlib

import pytest
import torch


def test_built_objective_declares_what_it_needs():
    """The default objective is sigmoid DPO with beta 0.1; pair 0 has chosen ratio +1, rejected ratio -1, so
    z = 0.1 * 2 = 0.2 and loss = log(1 + e^-0.2); pair 1 has policy == reference: ln 2."""
    from trinity_dpo.config.schema import AlgorithmConfig
    from trinity_dpo.objective.objectives import build

    objective = build(AlgorithmConfig())
    assert (objective.name, objective.sequences, objective.needs_reference) == ("dpo", 2, True)
    assert objective.ref_stats == ("logps",)
    assert set(objective.stats) == {"logps", "tokens", "mean_logits", "entropy", "top1"}
    assert objective.metrics == ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                                 "mean_token_accuracy")
    # Stats come slot-major: [chosen of every pair, then rejected of every pair].
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    policy = {"logps": t(-10.0, -5.0, -12.0, -7.0), "tokens": t(2, 2, 3, 1), "mean_logits": t(1, 2, 3, 4),
              "entropy": t(1, 1, 1, 1), "top1": t(1, 0, 2, 1)}
    totals = {"examples": 2, "tokens/0": 4, "tokens/1": 4, "prompt_tokens": 6}
    losses, m = objective.compute(policy, {"logps": t(-11.0, -5.0, -11.0, -7.0)}, totals)
    assert torch.allclose(losses, t(math.log(1 + math.exp(-0.2)), math.log(2)), atol=1e-7)
    assert set(m) == set(objective.metrics)
    # Token-weighted metrics: each pair's share, so that their mean is the mean over the step's tokens:
    # logits/chosen = (1 + 2) / 4 chosen tokens = 0.75; entropy = 4 / 8 tokens = 0.5; top-1 share = 1 / 4.
    assert m["logits/chosen"].mean().item() == 0.75 and m["logits/rejected"].mean().item() == 7 / 4
    assert m["entropy"].mean().item() == 0.5 and m["mean_token_accuracy"].mean().item() == 0.25


def test_sequence_stats_equal_full_logits_per_sequence(qwen_dir):
    """Two pairs, prompts [5, 6] and [5], responses of 3/1 (chosen) and 2/4 (rejected) tokens; stats slot-major.
    - tokens [3, 1, 2, 4]; the shared length of a pair is its shorter response: 2 for pair 0, 1 for pair 1, so
      logps_shared sums the first 2, 1, 2, 1 response tokens of the four sequences.
    - prompt tokens after the first, on the chosen sequences only: [1, 0, 0, 0] (token 6 of pair 0; pair 1's prompt
      is one token, which nothing predicts).
    - entropy, mean_logits, top1 and wpo sum, over response tokens, the next-token entropy, the mean logit, whether
      the token is the argmax, and log p(token) - log sum_v p_v^2; entropy_grad is the entropy's sum.
    - kl sums k3 of each response token against a reference 0.3 below it: d = 0.3, k3 = e^-0.3 - 1 + 0.3 =
      0.040818 a token, times the sequence's tokens.
    Each is checked against the model's full logits on each sequence alone, in both layouts."""
    from transformers import AutoModelForCausalLM

    from trinity_dpo.engine.attention import use_varlen
    from trinity_dpo.data.batching import collate
    from trinity_dpo.engine.logprobs import sequence_stats
    from trinity_dpo.objective.objectives import STATS
    from trinity_dpo.data.pairs import Pair

    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    use_varlen(model)
    pairs = [Pair(0, 1, [5, 6], [7, 8, 9], [10, 11]), Pair(1, 2, [5], [12], [13, 14, 15, 16])]
    seqs = [(pairs[0].prompt_ids, pairs[0].chosen_ids), (pairs[1].prompt_ids, pairs[1].chosen_ids),
            (pairs[0].prompt_ids, pairs[0].rejected_ids), (pairs[1].prompt_ids, pairs[1].rejected_ids)]
    shared = [2, 1, 2, 1]
    expect, ref_tokens, k3 = {k: [] for k in STATS}, [], math.exp(-0.3) - 1 + 0.3
    with torch.no_grad():
        for s, (prompt, response) in enumerate(seqs):
            ids = torch.tensor([prompt + response])
            logits = model(ids).logits[0, :-1].float()  # position t predicts token t + 1
            logp = torch.log_softmax(logits, -1)
            token = logp.gather(1, ids[0, 1:, None])[:, 0]
            r = slice(len(prompt) - 1, None)  # the positions predicting response tokens
            expect["logps"].append(token[r].sum())
            expect["tokens"].append(float(len(response)))
            expect["logps_shared"].append(token[r][:shared[s]].sum())
            expect["prompt_logps"].append(token[:len(prompt) - 1].sum() if s < 2 else torch.tensor(0.0))
            expect["prompt_tokens"].append(float(len(prompt) - 1) if s < 2 else 0.0)
            expect["entropy"].append(-(logp.exp() * logp).sum(-1)[r].sum())
            expect["mean_logits"].append(logits.mean(-1)[r].sum())
            expect["top1"].append((logits.argmax(-1) == ids[0, 1:]).float()[r].sum())
            expect["wpo"].append((token - torch.logsumexp(2 * logp, -1))[r].sum())
            expect["entropy_grad"].append(expect["entropy"][-1])
            expect["kl"].append(torch.tensor(k3 * len(response)))
            ref_tokens.append(token[r] - 0.3)
    from trinity_dpo.objective.losses import kl_penalty

    for share in (False, True):
        stats = sequence_stats(model, collate(pairs, 0, share_prompt=share), contextlib.nullcontext(),
                               tuple(k for k in STATS), token_ref=torch.cat(ref_tokens),
                               kl=lambda logp, ref: kl_penalty("k3", logp, ref))
        assert stats["tokens"].tolist() == [3.0, 1.0, 2.0, 4.0] and stats["prompt_tokens"].tolist() == [1, 0, 0, 0]
        for k in STATS:
            torch.testing.assert_close(stats[k], torch.tensor(expect[k]).float(), atol=2e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("fn", ["simpo", "cpo", "orpo"])
def test_reference_free_objectives_declare_no_reference(fn):
    from trinity_dpo.config.schema import AlgorithmConfig
    from trinity_dpo.objective.objectives import build

    objective = build(AlgorithmConfig(policy_loss_fn=fn))
    assert not objective.needs_reference and objective.ref_stats == ()
    assert ("prompt_logps" in objective.stats) == (fn == "orpo")
    assert ("nll_loss" in objective.metrics) == (fn != "simpo")  # SimPO has no NLL term (cpo_alpha 0)


@pytest.mark.slow
def test_evaluate_does_not_import_the_training_loop():
    import subprocess
    import sys

    code = "import sys, trinity_dpo.run.evaluate; assert 'trinity_dpo.run.train' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
