"""The `trinity` command's process: its heap settings (`engine/host_heap.py`: which, when, and that a run starts
with them) and how it leaves (`cli._leave`)."""
import os
import subprocess
import sys

import pytest

from trinity_dpo import cli
from trinity_dpo.engine import host_heap

from conftest import REPO


def test_tuned_settings_and_when_nothing_changes():
    """On glibc with no GLIBC_TUNABLES: the kept heap (mapping threshold 4 GiB, trim threshold 16 GiB), no huge
    pages, and a mark holding the same value. A user's GLIBC_TUNABLES, even empty, and a C library other than glibc
    (macOS, musl: no version string) change nothing."""
    kept = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
    assert host_heap.tuned({"PATH": "/bin"}, libc="glibc 2.36") == {"GLIBC_TUNABLES": kept, "TRINITY_DPO_HEAP": kept}
    assert host_heap.tuned({"GLIBC_TUNABLES": ""}, libc="glibc 2.36") == {}
    assert host_heap.tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc="glibc 2.36") == {}
    assert host_heap.tuned({}, libc="") == {}


def test_describe_names_whose_settings_are_in_force(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert host_heap.describe() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "a=1")
    monkeypatch.setenv("TRINITY_DPO_HEAP", "a=1")
    assert host_heap.describe() == ("host heap: a=1 (set by trinity; GLIBC_TUNABLES= before the command keeps "
                                    "glibc's defaults)")
    monkeypatch.delenv("TRINITY_DPO_HEAP")
    assert host_heap.describe() == "host heap: GLIBC_TUNABLES='a=1' from the environment, kept as it is"


def _run(config, env):
    return subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.mark.slow
@pytest.mark.skipif(not host_heap.needed({}), reason="glibc only")
def test_the_command_restarts_once_with_the_settings(make_config, tmp_path):
    """`trinity run` starts again with the kept heap before it reads its config: the line comes from the restarted
    process, whose environment held the settings from its start (the loader reads them only then), and it is logged
    once, as are the config's own lines (the first process does not parse it). A user's GLIBC_TUNABLES is kept, and
    said so."""
    config = make_config({"buffer": {"batch_size": 24}},
                         {"actor_rollout_ref": {"model": {"enable_gradient_checkpointing": False}},
                          "data": {"train_batch_size": 24}})  # a key the config's parse logs as ignored
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TRINITY_DPO_HEAP")}
    proc = _run(config, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("host heap: glibc.malloc.mmap_threshold=4294967296:"
                             "glibc.malloc.trim_threshold=17179869184 (set by trinity;") == 1
    assert proc.stderr.count("ignored, not used by offline DPO") == 1  # the config's lines: the process before says none
    proc = _run(make_config({"name": "mine", "buffer": {"batch_size": 24}}), {**env, "GLIBC_TUNABLES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "host heap: GLIBC_TUNABLES='' from the environment, kept as it is" in proc.stderr


def test_the_kernel_cache_is_bounded_unless_the_environment_sizes_it(monkeypatch, tmp_path):
    """oneDNN's kernel cache: 128 shapes, set by every command before its first product; a size already in the
    environment is kept."""
    environ = {}
    host_heap.bound_kernel_cache(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}
    environ = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "2048"}
    host_heap.bound_kernel_cache(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "2048"}
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "x")  # so that the test's change is undone after it
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert cli.main(["report", str(tmp_path / "no_run")]) == 2
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "128"


def test_the_training_environment_is_what_trinity_run_gives_itself():
    """A process started for `trinity run`'s work (a benchmark's side) gets the restart's heap settings and the
    kernel cache's bound, over the given environment, which is left unchanged; a user's own GLIBC_TUNABLES and cache
    size are kept."""
    kept = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
    given = {"PATH": "/bin"}
    assert host_heap.training_environment(given, libc="glibc 2.36") == {
        "PATH": "/bin", "GLIBC_TUNABLES": kept, "TRINITY_DPO_HEAP": kept, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}
    assert given == {"PATH": "/bin"}
    own = {"GLIBC_TUNABLES": "", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8"}
    assert host_heap.training_environment(own, libc="glibc 2.36") == own


_SHAPES = """
import torch
from trinity_dpo import cli
from trinity_dpo.engine import host_heap
if {bound}:
    host_heap.KERNEL_CACHE_SHAPES = "2"
    host_heap.bound_kernel_cache()
w = torch.randn(256, 128, dtype=torch.bfloat16)
for n in (100, 101, 102, 100):
    torch.randn(n, 256, dtype=torch.bfloat16) @ w
"""


@pytest.mark.parametrize("bound", [True, False])
def test_the_bound_takes_effect_after_torch_is_imported(bound):
    """oneDNN sizes its cache when it first compiles a kernel, after torch's import: held to 2 shapes there, the
    first shape is compiled again after two others (a cache miss); with the default size it is found (a hit)."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    proc = subprocess.run([sys.executable, "-c", _SHAPES.format(bound=bound)], capture_output=True, text=True,
                          timeout=120, env={**env, "ONEDNN_VERBOSE": "2"}, check=True)
    made = [line.split(",")[3] for line in proc.stdout.splitlines() if ",create:cache_" in line]
    if len(made) != 4:
        pytest.skip("bf16 products on this CPU do not go through oneDNN's matmul")
    assert made == ["create:cache_miss"] * 3 + ["create:cache_miss" if bound else "create:cache_hit"]


def test_leaving_runs_the_exit_handlers_then_exits_with_the_code():
    """`_leave` skips Python's teardown (os._exit) but not atexit's handlers, logging's flush among them."""
    code = ("import atexit\nfrom trinity_dpo.cli import _leave\n"
            "atexit.register(lambda: print('handler ran', flush=True))\n_leave(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (done.returncode, done.stdout) == (3, "handler ran\n")


def test_leaving_without_cpythons_exit_hook_takes_pythons_own_exit(monkeypatch):
    """`atexit._run_exitfuncs` is CPython's, not a public API: without it the process exits as Python does."""
    import atexit

    monkeypatch.delattr(atexit, "_run_exitfuncs")
    with pytest.raises(SystemExit) as leaving:
        cli._leave(2)
    assert leaving.value.code == 2
