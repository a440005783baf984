"""Tokenizing a source once: rows are read a chunk at a time, turned into conversations and tokenized in worker
processes over the node's cores, and appended to a token table on disk (`token_cache.py`) that every later run,
resume and `trinity eval` on the same data, tokenizer and settings memory-maps instead of tokenizing again.

One process per node builds a table: the others (and other runs) wait on its lock file, then map the same files,
so data memory does not grow with the number of processes. A build that stops half-way (an error, a kill) leaves
only a temporary folder, which no reader takes.
"""
from __future__ import annotations

import collections
import errno
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..config.schema import FormatConfig, StorageConfig
from ..sources.files import LineBlock, iter_blocks
from . import token_cache
from .conversations import BadRow, DataReport, to_conversation
from .pairs import Limits, tokenize_pairs
from .render import template_kwargs
from .sft import to_dialogue, tokenize_dialogues
from .unpaired import label_codes, to_unpaired, tokenize_unpaired

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How rows become examples: `kind` 'pairs' or 'unpaired' (KTO's labelled completions; with `limits`) or 'sft'
    (with `max_len` and `truncation`)."""

    kind: str
    limits: Limits | None = None
    max_len: int | None = None
    truncation: str | None = None

    @property
    def segments(self) -> int:
        return 3 if self.kind == "pairs" else 2


def load_table(storage: StorageConfig, key: str, tokenizer, tokenizer_folder: str, recipe: Recipe,
               cache_dir: Path, workers: int = 0) -> tuple[token_cache.TokenTable, DataReport]:
    """The token table of `storage` (built now, or found), and the report of reading it (rows read, bad rows by
    reason; what tokenizing added is kept per entry in the table)."""
    parts = {"source": _source_digest(storage.path, cache_dir), "split": storage.split, "subset": storage.subset_name,
             "format": dataclasses.asdict(storage.format), "on_bad_row": storage.on_bad_row,
             "tokenizer": _tokenizer_digest(tokenizer, tokenizer_folder), "recipe": dataclasses.asdict(recipe)}
    folder = cache_dir / token_cache.fingerprint(parts)
    table = _open(folder)
    if table is None:
        with _one_builder(folder, storage.path):
            table = _open(folder)  # another process may have built it while this one waited
            if table is None:
                table = _build(storage, key, tokenizer, recipe, folder, workers or os.cpu_count() or 1)
    else:
        log.info("tokenized data reused from %s", folder)
    report = DataReport(source=storage.path, unit="pairs" if recipe.kind == "pairs" else "rows")
    report.read = table.meta["report"]["read"]
    report.dropped.update(table.meta["report"]["dropped"])
    return table, report


def _source_digest(path: str, cache_dir: Path) -> str:
    """The digest of a source's bytes (`token_cache.file_digest`), computed once per file version: it is kept
    under the files' (path, size, modification time) in the cache folder, so the other processes of a run and later
    runs read it instead of reading the whole source again; one process computes it while the others wait."""
    files = token_cache.source_files(Path(path).resolve())
    # ctime and inode too: a copy that keeps the old modification time (cp -p, rsync -t, tar) still changes them.
    stamp = "|".join(f"{f}:{(s := f.stat()).st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}:{s.st_ino}" for f in files)
    key = hashlib.blake2b(stamp.encode(), digest_size=16).hexdigest()
    memo = cache_dir / "sources" / key
    with _one_builder(memo, path, quiet=True):
        if memo.is_file():
            return memo.read_text()
        digest = token_cache.file_digest(path)
        tmp = memo.with_name(f".{key}.tmp{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    return digest


def _open(folder: Path) -> token_cache.TokenTable | None:
    if not (folder / token_cache.DONE).is_file():
        return None
    try:
        return token_cache.open_table(folder, verify=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("tokenized data %s is damaged (%s); tokenizing again", folder, e)
        return None


_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)  # flock on a file system that has none


@contextmanager
def _one_builder(folder: Path, source: str, quiet: bool = False):
    """An exclusive lock beside `folder`: the first process builds, the others wait on the file, not on a
    collective with a timeout."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                log.info("another process is tokenizing %s into %s; waiting for it", source, folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            # Some network file systems take no locks: each process builds on its own, and the table's
            # publication by rename keeps whichever finishes last, the same bytes.
            log.warning("%s takes no file locks (%s); each process tokenizes %s on its own", folder.parent,
                        e.strerror, source)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_WORKER: dict = {}  # what a worker process tokenizes with: set before the pool forks, so it is inherited, not sent


def _build(storage: StorageConfig, key: str, tokenizer, recipe: Recipe, folder: Path, workers: int
           ) -> token_cache.TokenTable:
    from tqdm import tqdm

    _WORKER.update(tokenizer=tokenizer, storage=storage, recipe=recipe)
    writer = token_cache.Writer(folder, recipe.segments)
    read, dropped = 0, Counter()
    start = time.perf_counter()
    jobs = _jobs(storage, key)
    head = list(itertools.islice(jobs, 2))  # a source of one chunk is tokenized here: no processes to start
    jobs = itertools.chain(head, jobs)
    bar = tqdm(total=_count_rows(storage.path), unit=" rows", desc="tokenizing", mininterval=2, disable=None)
    try:
        with _pool(workers if len(head) > 1 else 1) as pool:
            for chunk, n_rows, bad in (_bounded_map(pool, jobs, 2 * workers) if pool else map(_tokenize_chunk, jobs)):
                writer.add(chunk)
                read += n_rows
                dropped.update(bad)
                bar.update(n_rows)
        table = writer.finish({"report": {"read": read, "dropped": dict(dropped)}, "source": storage.path})
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        _WORKER.clear()
    elapsed = time.perf_counter() - start
    log.info("tokenized %d rows of %s in %.1f s (%.0f rows/s, %d processes): %d tokens in %s", read, storage.path,
             elapsed, read / max(elapsed, 1e-9), workers, table.meta["n_tokens"], folder)
    return table


def _jobs(storage: StorageConfig, key: str):
    """(first row number, rows or a `LineBlock` the worker parses) for each chunk of the source."""
    first = 1
    for rows in iter_blocks(storage.path, storage.split, storage.subset_name, key):
        yield first, rows
        first += len(rows) if isinstance(rows, list) else rows.n_rows


@contextmanager
def _pool(workers: int):
    """Worker processes, forked so that they inherit the tokenizer; none for one worker."""
    if workers <= 1:
        yield None
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust thread pool does not survive a fork
    with multiprocessing.get_context("fork").Pool(workers, initializer=_default_signals) as pool:
        yield pool


def _default_signals() -> None:
    """A worker's signals as a fresh process's: a fork inherits the run's stop handler (`train.Stop`), under which
    the SIGTERM the pool closes its workers with is caught and the close waits forever."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _bounded_map(pool, jobs, window: int):
    """`_tokenize_chunk` of each job in order, with at most `window` chunks read ahead: `Pool.imap` would read the
    whole source into its queue, which is what reading in chunks is for not to do."""
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(_tokenize_chunk, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _count_rows(path: str) -> int | None:
    """The rows of a JSON lines file (its lines: cheap to count, for the progress bar's time left); None else."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".jsonl":
        return None
    with open(p, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))


def _tokenize_chunk(job: tuple[int, list[dict] | LineBlock]) -> tuple[token_cache.Chunk, int, Counter]:
    """One chunk of rows (parsed here from a `LineBlock`): converted (bad rows counted, or the run stopped at their row) and tokenized."""
    first, rows = job
    rows = rows if isinstance(rows, list) else rows.rows()
    tokenizer, storage, recipe = _WORKER["tokenizer"], _WORKER["storage"], _WORKER["recipe"]
    report, seen = DataReport(storage.path), Counter()
    convert = {"pairs": to_conversation, "sft": to_dialogue, "unpaired": to_unpaired}[recipe.kind]
    items = []
    for number, row in enumerate(rows, start=first):
        try:
            item = convert(row, number, storage.format)
            items += item if recipe.kind == "unpaired" else [item]  # a pair unpaired is two examples
        except BadRow as e:
            report.refuse(storage, number, e, seen)
    if recipe.kind == "pairs":
        results = tokenize_pairs(items, tokenizer, recipe.limits, template_kwargs(storage.format), storage)
    elif recipe.kind == "unpaired":
        results = tokenize_unpaired(items, tokenizer, recipe.limits, template_kwargs(storage.format), storage)
    else:
        results = tokenize_dialogues(items, tokenizer, storage.format, recipe.max_len, recipe.truncation,
                                     storage.on_bad_row, storage.path)
    return _chunk_of(items, results, recipe), len(rows), report.dropped


def _chunk_of(items: list, results: list, recipe: Recipe) -> token_cache.Chunk:
    tokens, mask, spans, prompts, offsets = [], [], [], [], [0]
    for example, _ in results:
        if example is None:
            spans.append([(0, 0)] * recipe.segments)
            continue
        if recipe.kind == "unpaired":  # the completion trains
            segments = [example.prompt_ids, example.completion_ids]
            masks = [[0] * len(example.prompt_ids), [1] * len(example.completion_ids)]
        else:
            segments = ([example.prompt_ids, example.chosen_ids, example.rejected_ids] if recipe.kind == "pairs"
                        else [example.prompt_ids, example.response_ids])
            masks = ([[1] * len(s) for s in segments] if recipe.kind == "pairs"
                     else [[0] * len(example.prompt_ids), example.response_mask])
        row_spans = []
        for ids, m in zip(segments, masks):
            row_spans.append((len(tokens), len(ids)))
            tokens += ids
            mask += m
        spans.append(row_spans)
    hashes = []
    for item in items:
        text = json.dumps(item.prompt, ensure_ascii=False, default=str).encode()
        prompts.append(text)
        offsets.append(offsets[-1] + len(text))
        hashes.append(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little"))
    return token_cache.Chunk(
        tokens=np.array(tokens, np.int32), mask=np.array(mask, np.uint8),
        spans=np.array(spans, np.int64).reshape(len(items), recipe.segments, 2),
        rows=np.array([item.row for item in items], np.int64),
        kept=np.array([example is not None for example, _ in results], np.bool_),
        events=[json.dumps(counts.counts(), sort_keys=True) for _, counts in results],
        prompt_hash=np.array(hashes, np.uint64), prompts=b"".join(prompts), prompt_offsets=np.array(offsets, np.int64),
        labels=label_codes(items) if recipe.kind == "unpaired" else None)


def _tokenizer_digest(tokenizer, folder: str) -> str:
    """The tokenizer's files and the chat template in use (a config's custom template replaces the folder's)."""
    h = hashlib.blake2b(digest_size=16)
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode())
            h.update(path.read_bytes())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr((tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__)).encode())
    return h.hexdigest()
