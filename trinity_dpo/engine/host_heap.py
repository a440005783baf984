"""glibc's heap settings for a training process: the `trinity` command restarts itself once with them.

Why: glibc serves a large allocation with its own mapping and returns it to the kernel when freed, and it returns the
free top of its heap past a threshold it adjusts by itself. A training step allocates and frees the same large
tensors every step (activations, the head's bf16 weight copy, gradients set to None), so with those defaults each
step faults hundreds of thousands of fresh pages in again: about 5 million faults in 12 bf16 steps of SmolLM2, where
with the settings below the steps after the first ones fault almost none, and the steps take 19% less time
(docs/benchmarks.md, History, sixth session). Under gradient checkpointing the run still hands free pages back
between phases (`Runtime.release_host_memory` trims whatever the thresholds say), at the same speed as with glibc's
defaults (8 bf16 steps: 56.2 s against 57.8 s).

No transparent huge pages (glibc's `hugetlb=1`): where the page cache fills memory, as after a few checkpoints, the
kernel compacts memory to find each 2 MB page, and the first step, which faults in the whole peak, took 2.5 s (bf16)
to 3.9 s (fp32) longer for steps no faster after it (History, seventh session).

oneDNN, which runs a CPU's bf16 matrix products, compiles kernels for each new matrix shape and keeps them in a
cache of 1,024 shapes by default. A packed row has a new length at nearly every step (~12 new shapes a step on
SmolLM2), and each shape held ~0.8 MB of heap: over a 64-step bf16 job the live heap between steps grew by 0.5 GB,
and the long-lived kernels, allocated amid each step's activations, split the free heap. `bound_kernel_cache` keeps
128 shapes, which is many steps' worth (History, ninth session).

These settings are read by the dynamic loader when a process starts: nothing inside a running process can set them
(glibc's `mallopt` refuses a mapping threshold above 32 MB). A user's own GLIBC_TUNABLES, even empty, is left as it is.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping

VARIABLE = "GLIBC_TUNABLES"
KEPT = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"  # 4 GiB, 16 GiB
MARK = "TRINITY_DPO_HEAP"  # set with the tunables: the restarted process knows they are its own
KERNEL_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
KERNEL_CACHE_SHAPES = "128"


def needed(environ: Mapping[str, str], libc: str | None = None) -> bool:
    """Whether a training process is to start again: on glibc (not macOS, musl), with GLIBC_TUNABLES unset (set, it
    is the user's, or ours after the restart)."""
    if libc is None:
        libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") and sys.platform == "linux" else ""
    return (libc or "").startswith("glibc") and VARIABLE not in environ


def tuned(environ: Mapping[str, str], libc: str | None = None) -> dict[str, str]:
    """The variables to start a training process with, or {} where nothing is to change (`needed`)."""
    if not needed(environ, libc):
        return {}
    return {VARIABLE: KEPT, MARK: KEPT}


def training_environment(environ: Mapping[str, str], libc: str | None = None) -> dict[str, str]:
    """`environ` as `trinity run`'s training process sees it after its restart: the heap settings where `needed`,
    oneDNN's kernel cache bounded unless `environ` sizes it. For a process started for another's work (a benchmark's
    side, a tracer's child), so that it runs as `trinity run` does."""
    env = {**environ, **tuned(environ, libc)}
    bound_kernel_cache(env)
    return env


def restart_tuned() -> None:
    """Start this command again, in this process (same pid, terminal and open files), with `tuned`'s variables;
    returns only where there is nothing to change. Called before torch is imported: the restart costs a Python
    start and a second parse of the config (0.6 s on a 2-core VM, `bench/profile_run.py`'s log)."""
    extra = tuned(os.environ)
    if not extra:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **extra})


def describe() -> str | None:
    """A line for the run's log: the heap settings in force and whose they are."""
    value = os.environ.get(VARIABLE)
    if value is None:
        return None
    if os.environ.get(MARK) == value:
        return f"host heap: {value} (set by trinity; GLIBC_TUNABLES= before the command keeps glibc's defaults)"
    return f"host heap: GLIBC_TUNABLES={value!r} from the environment, kept as it is"


def bound_kernel_cache(environ: MutableMapping[str, str] = os.environ) -> None:
    """oneDNN's kernel cache held to `KERNEL_CACHE_SHAPES` shapes, unless the environment sets its own size. oneDNN
    reads the variable when it first compiles a kernel, so this works after torch is imported, before any product."""
    environ.setdefault(KERNEL_CACHE, KERNEL_CACHE_SHAPES)
