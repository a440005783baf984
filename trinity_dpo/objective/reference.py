"""Reference log-probs, computed once before training.

The reference is the policy's initial weights, frozen. Rather than keep a second copy of the model, the policy
itself scores every pair before its first update, in no-grad passes; training then reads the per-pair numbers
from [n_pairs, 2] tables (chosen, rejected), one per statistic the objective reads from the reference (summed
log-probs, and for LD-DPO their shared-length part). An objective without a reference has no such pass. The
passes use the very micro-batches the first epoch trains on (`Schedule.first_epoch`), so at step 1 policy and
reference agree to the bit (loss exactly ln 2), in bf16 as in fp32. The table is kept in the run folder under a
fingerprint of what it depends on and reused by any run (or resume) with the same one.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .token_ref import TokenStore, checksum, publish, tmp_name
from ..data.batching import by_slot, collate, is_padding
from ..data.schedule import Plan
from ..engine.distributed import Dist
from ..engine.logprobs import sequence_stats
from ..engine.modeling import Runtime, scoring_mode
from ..engine.policy import Policy
from ..data.pairs import Pair
from ..errors import RunFolderError, one_line

log = logging.getLogger(__name__)


Tables = dict[str, torch.Tensor]  # statistic -> fp32 [n_rows, sequences]


def score(model, groups: Iterable[list[Pair]], n_rows: int, pad_id: int, runtime: Runtime, sequences: int = 2,
          stats: tuple[str, ...] = ("logps",), store: TokenStore | None = None) -> Tables:
    """Per-sequence statistics `stats` (`objectives.STATS`) of each example's sequences (a pair: chosen, rejected)
    under the current weights, one fp32 [n_rows, sequences] table each, in the row of each example's index, one
    no-grad pass per group; rows of examples in no group are NaN, so a use shows at once. Padding groups
    (`shard_step`) are run and dropped. With `store`, each response token's log-prob is written there too."""
    tables = {k: torch.full((n_rows, sequences), float("nan"), dtype=torch.float32) for k in stats}
    wanted = stats + (("token_logps",) if store is not None else ())
    with scoring_mode(model, runtime):
        for group in groups:
            mb = collate(group, pad_id, share_prompt=runtime.share_prompt).to(runtime.device)
            values = sequence_stats(model, mb, runtime.autocast(), wanted)
            if not is_padding(group):
                for k in stats:
                    tables[k][mb.pair_index.cpu()] = by_slot(values[k].float().cpu(), sequences).t()
                if store is not None:
                    store.write(mb.pair_index, torch.bincount(mb.target_seq, minlength=mb.n_seqs),
                                values["token_logps"])
    return tables


def rows_of(tables: Tables, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The statistics of the examples `index` as per-sequence vectors in micro-batch (slot-major) order."""
    return {k: t[index.cpu()].t().reshape(-1).to(device) for k, t in tables.items()}


def fingerprint(model_path: str, plan: Plan, runtime: Runtime, extra: str = "") -> str:
    """A digest of everything the reference numbers depend on: the weight files, the token ids of every example
    and which share a micro-batch on each process (`Plan.digest`: bf16 sums depend on it; the ids carry the
    tokenizer, chat template, data and length settings), the precision, the layout and the CPU thread count."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_weights_digest(model_path).encode())
    # CPU kernels split sums by thread count: a table scored with other threads is off in the last bits, and the
    # step-1 policy would no longer equal its reference to the bit.
    threads = torch.get_num_threads() if runtime.device.type == "cpu" else 0
    h.update(f"{runtime.device.type}|{threads}|{runtime.bf16}|{runtime.share_prompt}|{extra}|{plan.world}".encode())
    h.update(plan.digest.encode())
    return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}  # (file name, size, mtime) of every weight file -> their digest, for this process


def _weights_digest(model_path: str) -> str:
    """A digest of the weight files' bytes and of what else defines the model's forward (config.json: rope_theta,
    the norms' eps...; a remote-code model's .py files), read once per process for as long as no file changes (a
    7B model is 14 GB to read; the train and held-out tables both need it)."""
    folder = Path(model_path)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json"), *folder.glob("*.py")])
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


@dataclass(frozen=True)
class Scoring:
    """What a run's reference passes share: the policy that scores (its starting adapter is part of what the
    tables depend on), the folder its weights come from, the pad id, the run folder that caches them, the processes."""

    policy: Policy
    model_path: str
    pad_id: int
    run_dir: Path
    d: Dist


def cached_score(scoring: Scoring, plan: Plan, stats: tuple[str, ...] = ("logps",),
                 counts: np.ndarray | None = None, sequences: int = 2) -> tuple[Tables, TokenStore | None]:
    """`score` of `plan` (each process scores its own part; the parts are merged), read from
    `ref_cache/<label>-<fingerprint>.pt` of this run or a sibling run when there, else computed and stored there by
    rank 0. The file is written to a temporary name and renamed, so a reader never sees half of one. With `counts`
    (`token_ref.target_counts` of the plan's examples) also every response token's log-prob, in the `.tokens`
    file beside it (`token_ref.py`)."""
    d, run_dir = scoring.d, scoring.run_dir
    # Rank 0 hashes (every process would read every weight file), looks the tables up and decides for all, in
    # one broadcast.
    fp, found = d.from_main(_lookup(scoring, plan, stats, counts is not None) if d.main else None)
    name = _cache_name(plan, fp)
    tokens = run_dir / _tokens_name(name)
    if found is not None:
        saved, source = found
        if d.main and source != run_dir / name:
            if counts is not None:
                _copy(source.parent.parent / _tokens_name(name), tokens)
            _save(run_dir / name, saved)
        d.from_main(None)  # the others open the per-token file once it is there
        return saved["tables"], None if counts is None else TokenStore(tokens, counts)
    store = None
    if counts is not None:
        if d.main:
            TokenStore.create(tmp_name(tokens), counts)
        d.from_main(None)
        store = TokenStore(tmp_name(tokens), counts, "r+")
    policy = scoring.policy
    tables = score(policy.model, plan.groups(d.rank), plan.n_rows, scoring.pad_id, policy.runtime, sequences, stats,
                   store=store)
    tables = {k: d.merge_rows(t) for k, t in tables.items()}  # also: every process has written its tokens
    if d.main:
        digest = None
        if store is not None:
            store.flush()
            digest = publish(tokens)
        _save(run_dir / name, {"fingerprint": fp, "tables": tables, "token_digest": digest})
    d.from_main(None)
    return tables, None if counts is None else TokenStore(tokens, counts)


def _lookup(scoring: Scoring, plan: Plan, stats: tuple[str, ...], tokens: bool
            ) -> tuple[str, tuple[dict, Path] | None]:
    """(the plan's fingerprint, the cached tables and their file, or None)."""
    extra = f"{plan.label}|{plan.n_rows}|{','.join(stats)}|{scoring.policy.adapter}|{'tokens' if tokens else ''}"
    fp = fingerprint(scoring.model_path, plan, scoring.policy.runtime, extra=extra)
    return fp, _find(scoring.run_dir, _cache_name(plan, fp), fp, plan.n_rows, tokens)


def _cache_name(plan: Plan, fp: str) -> str:
    return f"ref_cache/{plan.label}-{fp}.pt"


def _tokens_name(name: str) -> str:
    return name[:-len(".pt")] + ".tokens"


def _find(run_dir: Path, name: str, fp: str, n_rows: int, tokens: bool = False) -> tuple[dict, Path] | None:
    """The cached tables under `name` and the file they came from (this run's, else a sibling run's); a damaged
    file (or per-token file, with `tokens`) is passed over with a warning, and this run's copy is then rewritten."""
    for path in dict.fromkeys((run_dir / name, *sorted(run_dir.parent.parent.glob(f"*/*/{name}")))):
        if path.is_file():
            saved, problem = _read(path, fp, n_rows)
            if problem is None and tokens:
                problem = _tokens_problem(path, saved)
            if problem is None:
                log.info("reference log-probs reused from %s", path)
                return saved, path
            log.warning("reference cache %s %s; not used (recomputed, or another run's good copy reused)", path,
                        problem)
    return None


def _read(path: Path, fp: str, n_rows: int) -> tuple[dict | None, str | None]:
    """(the cache file's contents, None), or (None, what is wrong with it)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cut-off or overwritten file: torch's zip reader raises RuntimeError, pickle others
        return None, f"is unreadable ({type(e).__name__})"
    tables = saved.get("tables") if isinstance(saved, dict) else None
    if (not isinstance(tables, dict) or not tables or saved.get("fingerprint") != fp
            or any(not isinstance(t, torch.Tensor) or t.shape[0] != n_rows for t in tables.values())):
        return None, "does not match its fingerprint"
    if saved.get("digest") not in (None, _digest(tables)):  # None: written before digests were kept
        return None, "does not hold the numbers it was written with"
    return saved, None


def _tokens_problem(path: Path, saved: dict) -> str | None:
    """What is wrong with the per-token file beside the tables at `path`, or None."""
    tokens = path.parent.parent / _tokens_name(f"{path.parent.name}/{path.name}")
    if not saved.get("token_digest") or not tokens.is_file():
        return "has no per-token file"
    if checksum(tokens) != saved["token_digest"]:
        return "has a per-token file that does not hold the numbers it was written with"
    return None


def _copy(source: Path, target: Path) -> None:
    """Copy a sibling run's per-token file under a temporary name, then rename it into place."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, tmp_name(target))
    os.replace(tmp_name(target), target)


def _digest(tables: Tables) -> str:
    """A checksum of the tables' numbers: a flipped bit in a float would pass torch.load unseen."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tables):
        h.update(key.encode())
        h.update(tables[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save({**obj, "digest": _digest(obj["tables"])}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"{path}: cannot write the reference cache ({one_line(e)}); free space and run "
                             "again") from None
