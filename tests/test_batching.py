"""Micro-batch planning and packed layout: pairs never split, few pad slots, masks keep sequences apart."""
from __future__ import annotations

import random


from trinity_dpo.data.batching import collate, is_padding, plan_micro
from trinity_dpo.data.pairs import Pair


def random_pairs(n, seed=0, lo=5, hi=120):
    rng = random.Random(seed)
    return [Pair(i, i + 1, [1] * rng.randint(lo, 40), [2] * rng.randint(lo, hi), [3] * rng.randint(lo, hi))
            for i in range(n)]


def test_plan_by_count_and_by_token_budget_keeps_pairs_whole():
    pairs = random_pairs(37)
    by_count = plan_micro(pairs, 4)
    assert [len(g) for g in by_count] == [4] * 9 + [1]
    by_budget = plan_micro(pairs, None, token_budget=1000)
    for groups in (by_count, by_budget):
        assert sorted(p.index for g in groups for p in g) == list(range(37))
    assert all(sum(p.n_tokens for p in g) <= 1000 or len(g) == 1 for g in by_budget)
    assert plan_micro(pairs, None) == [sorted(pairs, key=lambda p: -p.n_tokens)]
    assert plan_micro([], None) == [] and plan_micro([], None, token_budget=100) == []


def test_packed_micro_batches_have_no_padding():
    pairs = random_pairs(64, seed=3)
    for group in plan_micro(pairs, None, token_budget=4096):
        packed, padded = collate(group, pad_id=0), collate(group, pad_id=0, pack=False)
        assert packed.n_pad == 0 and packed.input_ids.shape[0] == 1
        assert padded.n_tokens == packed.n_tokens and padded.n_pad > 0


def test_layouts_positions_bounds_and_targets():
    """Pair 0: prompt [1,1], chosen [2,2,2], rejected [3]; pair 1: prompt [1], chosen [2], rejected [3,3].
    Sequences: 0 = [1,1,2,2,2], 1 = [1,2], 2 = [1,1,3], 3 = [1,3,3]; packed end to end: bounds 0,5,7,10,13.
    Response tokens are predicted from one position earlier: seq 0 from 1,2,3; seq 1 from 5; seq 2 from 8;
    seq 3 from 10,11 (padded, rows of width 5: 1,2,3; 5; 11; 15,16).
    """
    pairs = [Pair(0, 1, [1, 1], [2, 2, 2], [3]), Pair(1, 2, [1], [2], [3, 3])]
    mb = collate(pairs, pad_id=0)
    assert mb.input_ids.tolist() == [[1, 1, 2, 2, 2, 1, 2, 1, 1, 3, 1, 3, 3]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert mb.seq_bounds == [0, 5, 7, 10, 13]
    assert mb.target_pos.tolist() == [1, 2, 3, 5, 8, 10, 11]
    assert mb.target_seq.tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert mb.target_ids.tolist() == [2, 2, 2, 2, 3, 3, 3]
    padded = collate(pairs, pad_id=0, pack=False)
    assert padded.input_ids.tolist() == [[1, 1, 2, 2, 2], [1, 2, 0, 0, 0], [1, 1, 3, 0, 0], [1, 3, 3, 0, 0]]
    assert padded.target_pos.tolist() == [1, 2, 3, 5, 11, 15, 16] and padded.seq_bounds is None
    assert (mb.n_tokens, mb.n_pad, padded.n_pad) == (13, 0, 7)


def test_shared_prompt_layout():
    """The same pairs with each prompt once: pair 0 = [1,1 | 2,2,2 | 3] at 0..5, positions 0,1,2,3,4 then 2 (the
    rejected token follows the prompt, not the chosen answer); pair 1 = [1 | 2 | 3,3] at 6..9, positions 0,1 then
    1,2. Segments: [0,5) [5,6) [6,8) [8,10); the rejected ones also see their prompt, [0,2) and [6,7). Targets: chosen
    0 from 1,2,3; chosen 1 from 6; rejected 0 from the prompt's last position 1; rejected 1 from 6, then 8.
    13 sequence tokens (as unshared) in 10 positions, no pad."""
    pairs = [Pair(0, 1, [1, 1], [2, 2, 2], [3]), Pair(1, 2, [1], [2], [3, 3])]
    mb = collate(pairs, pad_id=0, share_prompt=True)
    assert mb.input_ids.tolist() == [[1, 1, 2, 2, 2, 3, 1, 2, 3, 3]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2]]
    assert mb.seq_bounds == [0, 5, 6, 8, 10] and mb.prefixes == [None, (0, 2), None, (6, 7)]
    assert mb.target_pos.tolist() == [1, 2, 3, 6, 1, 6, 8]
    assert mb.target_seq.tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert mb.target_ids.tolist() == [2, 2, 2, 2, 3, 3, 3]
    assert (mb.n_tokens, mb.n_real, mb.n_pad) == (13, 10, 0)


def test_schedule_builds_the_reference_plan_from_the_loops_own_steps():
    """The reference pass scores the first epoch in the very micro-batches each process trains it in (the step-1
    bitwise guarantee rests on it); every epoch visits each pair once and the next reshuffles; no micro-batch
    holds more tokens (a shared prompt once) than the memory check's `micro_tokens`; with one process the
    held-out plan is `plan_micro`'s."""
    from trinity_dpo.data.schedule import Schedule

    train, held_out = random_pairs(21, seed=1), random_pairs(5, seed=2)
    tokens = lambda g: sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in g)  # noqa: E731
    for world, micro, budget in ((1, 2, None), (2, None, 300), (3, 1, None)):
        s = Schedule(train, held_out, batch_size=6, seed=7, total=9, world=world, micro_pairs=micro,
                     token_budget=budget)
        assert s.per_epoch == 4  # 21 pairs in steps of 6: the 4th is short
        first = s.first_epoch()
        assert (first.label, first.n_rows, len(first.per_rank)) == ("train", 21, world)
        for rank in range(world):
            assert first.per_rank[rank] == [g for i in range(4) for g in s.step(i, rank).micro_batches]
        steps = [s.step(i, 0) for i in range(9)]
        assert [st.epoch for st in steps] == [0] * 4 + [1] * 4 + [2]
        for epoch in (steps[:4], steps[4:8]):
            assert sorted(p.index for st in epoch for p in st.examples) == list(range(21))
        assert [p.index for p in steps[4].examples] != [p.index for p in steps[0].examples]
        groups = [g for i in range(9) for r in range(world) for g in s.step(i, r).micro_batches if not is_padding(g)]
        assert max(map(tokens, groups)) <= s.micro_tokens()
        assert len(s.held_out().per_rank) == world and s.held_out().n_rows == 5
    one = Schedule(train, held_out, batch_size=6, seed=7, total=9, world=1, micro_pairs=2, token_budget=None)
    assert one.held_out().per_rank == [plan_micro(held_out, 2)]
    assert one.micro_tokens() == 2 * max(map(tokens, ([p] for p in train)))
    none = Schedule(train, [], batch_size=6, seed=7, total=2, world=2, micro_pairs=None, token_budget=None)
    assert none.held_out().per_rank == [[], []] and len(none.first_epoch().per_rank[0]) == 2


def test_held_out_micro_batches_are_no_larger_than_a_training_share(make_config):
    """Without ppo_micro_batch_size_per_gpu the held-out set was one forward pass, whatever its size; the memory
    check bounds a training share (batch / processes): held-out micro-batches are held to it too."""
    from trinity_dpo.config.loader import load_config
    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.data.schedule import Schedule
    from trinity_dpo.engine.modeling import load_tokenizer

    cfg = load_config(make_config(main={"buffer": {"batch_size": 4, "trainer_input": {"eval_fraction": 0.5}}},
                                  verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": None}}}))
    data = load_data(cfg, load_tokenizer(cfg))
    groups = list(Schedule.of(cfg, data, world=1).held_out().per_rank[0])
    assert len(data.eval) == 12 and [len(g) for g in groups] == [4, 4, 4]
