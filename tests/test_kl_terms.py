"""Trinity's KL and entropy terms beside DPO (issue 26): the losses of whole runs against a plain computation of
Trinity's objective, written here from its definition with nothing of the tool's log-prob code."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trinity_dpo.config.loader import load_config
from trinity_dpo.data.dataset import load_data
from trinity_dpo.data.schedule import Schedule
from trinity_dpo.engine.modeling import load_tokenizer
from trinity_dpo.engine.optim import build_optimizer, lr_factor, set_lr
from trinity_dpo.run import train

BETA, STEPS = 0.1, 3


def _config(make_config, name, algorithm, micro=8, extra=None):
    main = {"name": name, "algorithm": {"algorithm_type": "dpo", "policy_loss_fn": "dpo",
                                        "policy_loss_fn_args": {"beta": BETA}, **algorithm},
            "buffer": {"total_steps": STEPS}, "trainer": {"eval_samples": 0, **(extra or {})}}
    return load_config(make_config(main=main, verl={"actor_rollout_ref": {"actor": {
        "ppo_micro_batch_size_per_gpu": micro}}}))


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _token_logps(model, pair):
    """Per-token log-probs of chosen and rejected response tokens, and their entropies: one plain forward each."""
    out = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + response])
        logits = model(input_ids=ids).logits[0, len(pair.prompt_ids) - 1:-1].float()
        logp = F.log_softmax(logits, -1)
        out.append((logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)))
    return out


def _kl(name, logp, ref):
    d = logp - ref
    if name == "k1":
        return d
    if name == "k2":
        return d * d / 2
    r = torch.clamp(-d, -20, 20) if name == "low_var_kl" else -d
    k3 = torch.exp(r) - 1 - r
    return torch.clamp(k3, -10, 10) if name == "low_var_kl" else k3


def plain_trinity(cfg, kl_name, kl_coef, entropy_coef):
    """STEPS full-batch AdamW steps of Trinity's objective, as its actor computes it for one micro-batch holding
    the whole step (token-mean aggregation over every response token of chosen and rejected alike):
    mean over pairs of DPO's -log sigmoid(beta x margin) + kl_coef x mean_t KL(logp_t, ref_t)
    - entropy_coef x mean_t H_t."""
    tokenizer = load_tokenizer(cfg)
    data = load_data(cfg, tokenizer)
    schedule = Schedule.of(cfg, data, 1)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.model_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(cfg.model.model_path, dtype=torch.float32).eval()
    optimizer = build_optimizer(model, cfg.algorithm.optimizer)
    losses = []
    for i in range(STEPS):
        pairs = schedule.step(i, 0).examples
        set_lr(optimizer, cfg.algorithm.optimizer.lr * lr_factor(i, cfg.algorithm.optimizer, STEPS))
        dpo, kl_sum, h_sum, tokens = [], 0.0, 0.0, 0
        for pair in pairs:
            (pc, hc), (pr, hr) = _token_logps(model, pair)
            with torch.no_grad():
                (rc, _), (rr, _) = _token_logps(reference, pair)
            margin = (pc.sum() - rc.sum()) - (pr.sum() - rr.sum())
            dpo.append(-F.logsigmoid(BETA * margin))
            kl_sum = kl_sum + _kl(kl_name, pc, rc).sum() + _kl(kl_name, pr, rr).sum()
            h_sum = h_sum + hc.sum() + hr.sum()
            tokens += len(pc) + len(pr)
        loss = torch.stack(dpo).mean() + kl_coef * kl_sum / tokens - entropy_coef * h_sum / tokens
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    return losses


CASES = [("k1", 0.1, 0.0), ("k2", 0.5, 0.0), ("k3", 0.5, 0.0), ("low_var_kl", 0.5, 0.0), ("k2", 0.5, 0.05)]


@pytest.mark.slow
@pytest.mark.parametrize("kl_name,kl_coef,entropy_coef", CASES)
def test_runs_equal_a_plain_computation_of_trinitys_objective(make_config, kl_name, kl_coef, entropy_coef):
    cfg = _config(make_config, f"{kl_name}-{entropy_coef}", {
        "kl_loss_fn": kl_name, "kl_loss_fn_args": {"kl_coef": kl_coef},
        "entropy_loss_fn_args": {"entropy_coef": entropy_coef}})
    ours = _losses(train.run(cfg))
    if not entropy_coef:
        assert abs(ours[0] - math.log(2)) < 1e-6  # KL estimators are 0 at policy = reference
    expected = plain_trinity(cfg, kl_name, kl_coef, entropy_coef)
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-4, (ours, expected)


def test_kl_runs_micro_batched_equal_full_batch_and_log_trinitys_names(make_config):
    """k3 with an entropy term: micro-batches of 2 pairs give the full batch's losses; the
    metrics carry actor/kl_loss and actor/entropy_loss."""
    algorithm = {"kl_loss_fn": "k3", "kl_loss_fn_args": {"kl_coef": 0.5},
                 "entropy_loss_fn_args": {"entropy_coef": 0.05}}
    full = train.run(_config(make_config, "full", algorithm))
    micro = train.run(_config(make_config, "micro", algorithm, micro=2))
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (micro / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b):
        for key in ("loss", "actor/kl_loss", "actor/entropy_loss"):
            assert abs(ra[key] - rb[key]) < 1e-5, key
    assert a[0]["actor/kl_loss"] == 0.0 and a[1]["actor/kl_loss"] > 0
    assert (full / "kl.png").is_file() and (full / "entropy.png").is_file()


@pytest.mark.slow
def test_kl_resume_is_bitwise_and_a_damaged_token_cache_is_scored_again(make_config, monkeypatch, caplog):
    """Killed in step 3 and run again: the per-token reference file is reused (not scored again) and the run
    ends as the uninterrupted one did, to the bit. A per-token file with one value changed is noticed by its
    checksum and scored again, with a warning; the run is the same."""
    from test_resume import assert_same_run, run_killed_in_step

    algorithm = {"kl_loss_fn": "k2", "kl_loss_fn_args": {"kl_coef": 0.5}}
    extra = {"save_interval": 1}
    whole = train.run(_config(make_config, "whole", algorithm, extra=extra))
    path = make_config(main={"name": "cut", "algorithm": {"algorithm_type": "dpo", "policy_loss_fn": "dpo",
                                                          "policy_loss_fn_args": {"beta": BETA}, **algorithm},
                             "buffer": {"total_steps": STEPS}, "trainer": {"eval_samples": 0, **extra}},
                       verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 8}}})
    run_killed_in_step(path, 3, monkeypatch)
    scored = []
    real = train.score
    monkeypatch.setattr("trinity_dpo.objective.reference.score", lambda *a, **k: scored.append(1) or real(*a, **k))
    cut = train.run(load_config(path))
    assert not scored  # reused: the .pt tables and the .tokens file
    assert_same_run(whole, cut, STEPS)
    for run in (whole, cut):  # the sibling run's good copy would be taken otherwise
        tokens = next((run / "ref_cache").glob("train-*.tokens"))
        raw = bytearray(tokens.read_bytes())
        raw[0] ^= 1
        tokens.write_bytes(bytes(raw))
    for step in (2, 3):
        import shutil

        shutil.rmtree(cut / f"global_step_{step}")
    with caplog.at_level("WARNING"):
        again = train.run(load_config(path))
    assert scored and "per-token file that does not hold the numbers it was written with" in caplog.text
    assert_same_run(whole, again, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["dpo_humanlike", "dpo_human_in_the_loop"])
def test_trinitys_current_examples_run_verbatim_with_trinitys_numbers(example, qwen_dir, pairs_file, tmp_path,
                                                                     monkeypatch):
    """Trinity's current DPO examples, unedited: paths through their environment variables (the human-in-the-loop
    one reads the annotation tool's output folder, relative to the working directory), steps, batch, learning
    rate and the CPU through overrides. They train DPO + 0.1 x token-mean k1 KL, full batch, and give the losses
    of the plain computation of Trinity's objective."""
    import shutil

    from conftest import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRINITY_MODEL_PATH", str(qwen_dir))
    monkeypatch.setenv("TRINITY_TASKSET_PATH", str(pairs_file))
    monkeypatch.setenv("TRINITY_CHECKPOINT_ROOT_DIR", str(tmp_path / "ckpt"))
    annotated = tmp_path / "outputs" / "human_annotation_output"
    annotated.mkdir(parents=True)
    shutil.copy(pairs_file, annotated / "annotated.json")
    cfg = load_config(REPO / "tests" / "data" / "trinity_current" / f"{example}.yaml", [
        "trainer.total_steps=3", "buffer.train_batch_size=8", "algorithm.optimizer.lr=1e-3",
        "cluster.gpu_per_node=1", "trainer.trainer_config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "trainer.eval_samples=0", "trainer.precision=fp32"])
    assert (cfg.algorithm.kl_loss_fn, cfg.algorithm.kl_loss_fn_args.kl_coef) == ("k1", 0.1)
    ours = _losses(train.run(cfg))
    expected = plain_trinity(cfg, "k1", 0.1, 0.0)
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-4, (ours, expected)


def test_entropy_term_on_a_reference_free_objective_and_sft(make_config, tmp_path):
    """The entropy term needs no reference: SimPO with it has no reference pass, its micro-batched steps equal the
    full-batch ones, and its step-1 loss is SimPO's minus entropy_coef x the token-mean entropy it logs. SFT takes
    it too."""
    from test_sft import sft_rows

    algorithm = {"policy_loss_fn": "simpo", "entropy_loss_fn_args": {"entropy_coef": 0.1}}
    runs = [train.run(_config(make_config, f"simpo{m}", algorithm, micro=m)) for m in (8, 2)]
    full, micro = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    for a, b in zip(full, micro):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["actor/entropy_loss"] - b["actor/entropy_loss"]) < 1e-5
    assert not (runs[0] / "ref_cache").exists() and "actor/kl_loss" not in full[0]
    plain = train.run(_config(make_config, "simpo_plain", {"policy_loss_fn": "simpo"}))
    first = json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(full[0]["loss"] - (first["loss"] - 0.1 * full[0]["actor/entropy_loss"])) < 1e-6
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(16)))
    sft = load_config(make_config(main={"name": "sft", "algorithm": {
        "algorithm_type": "sft", "entropy_loss_fn_args": {"entropy_coef": 0.1}},
        "buffer": {"total_steps": 2, "trainer_input": {"experience_buffer": {
            "path": str(data), "format": {"prompt_type": "messages", "messages_key": "messages"}}}},
        "trainer": {"eval_samples": 0}}))
    records = [json.loads(x) for x in (train.run(sft) / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["loss"] - (r["nll"] - 0.1 * r["actor/entropy_loss"])) < 1e-5 for r in records)
