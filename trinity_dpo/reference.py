"""Reference log-probs, computed once before training.

The reference is the policy's initial weights, frozen. Rather than keep a second copy of the model, the policy
itself scores every pair before its first update, in no-grad passes; training then reads the per-pair numbers
from a [n_pairs, 2] table (chosen, rejected). The passes use the very micro-batches the first epoch trains on,
so at step 1 policy and reference agree to the bit (loss exactly ln 2), in bf16 as in fp32. The table is kept in
the run folder under a fingerprint of what it depends on and reused by any run (or resume) with the same one.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from .batching import collate, plan_micro, step_indices, steps_per_epoch
from .logprobs import sequence_logps
from .modeling import Runtime, inference_mode
from .pairs import Pair

log = logging.getLogger(__name__)


def score(model, groups: list[list[Pair]], n_rows: int, pad_id: int, runtime: Runtime) -> torch.Tensor:
    """fp32 [n_rows, 2]: summed response log-probs of chosen and rejected under the current weights, in the row of
    each pair's index, one no-grad pass per group; rows of pairs in no group are NaN, so a use shows at once."""
    table = torch.full((n_rows, 2), float("nan"), dtype=torch.float32)
    with inference_mode(model):
        for group in groups:
            mb = collate(group, pad_id).to(runtime.device)
            chosen, rejected = sequence_logps(model, mb, runtime.autocast()).float().cpu().chunk(2)
            table[mb.pair_index.cpu(), 0] = chosen
            table[mb.pair_index.cpu(), 1] = rejected
    return table


def first_epoch_groups(pairs: list[Pair], batch_size: int, seed: int, total_steps: int,
                       plan: tuple[int | None, int | None]) -> list[list[Pair]]:
    """The micro-batches of the first epoch's steps (at most `total_steps` of them): every pair the run visits."""
    steps = min(total_steps, steps_per_epoch(len(pairs), batch_size))
    groups = []
    for step in range(steps):
        _, indices = step_indices(step, len(pairs), batch_size, seed)
        groups += plan_micro([pairs[i] for i in indices], *plan)
    return groups


def fingerprint(model_path: str, groups: list[list[Pair]], runtime: Runtime, extra: str = "") -> str:
    """A digest of everything the reference numbers depend on: the weight files, the token ids of every pair
    (which carry the tokenizer, chat template, data and length settings), the micro-batch composition (bf16
    sums depend on it) and the precision."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(Path(model_path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    h.update(f"{runtime.device.type}|{runtime.bf16}|{extra}".encode())
    for group in groups:
        h.update(b"|")
        for p in group:
            h.update(repr((p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()


def cached_score(model, model_path: str, groups: list[list[Pair]], n_rows: int, pad_id: int, runtime: Runtime,
                 run_dir: Path, label: str) -> torch.Tensor:
    """`score`, read from `ref_cache/<fingerprint>.pt` of this run or a sibling run when there, else computed and
    stored there. The file is written to a temporary name and renamed, so a reader never sees half of one."""
    fp = fingerprint(model_path, groups, runtime, extra=f"{label}|{n_rows}")
    name = f"ref_cache/{label}-{fp}.pt"
    for path in (run_dir / name, *sorted(run_dir.parent.parent.glob(f"*/*/{name}"))):
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["fingerprint"] == fp and saved["table"].shape == (n_rows, 2):
                log.info("reference log-probs (%s) reused from %s", label, path)
                if path != run_dir / name:
                    _save(run_dir / name, saved)
                return saved["table"]
    table = score(model, groups, n_rows, pad_id, runtime)
    _save(run_dir / name, {"fingerprint": fp, "table": table})
    return table


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
