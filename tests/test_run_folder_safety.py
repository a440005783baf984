"""Run folders that cannot be corrupted: one run at a time (the lock), checkpoints verified before a resume, a
reference cache that heals itself, a metrics.jsonl whose cut-off last line is repaired, and the exit codes."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trinity_dpo.run import checkpoint, folder as run_folder, lock as run_lock, train
from trinity_dpo import cli
from trinity_dpo.objective import reference
from trinity_dpo.errors import CheckpointError, ConfigError, DataError, NumericError, RunFolderError
from trinity_dpo.config.loader import load_config
from trinity_dpo.engine.distributed import Dist

from test_resume import assert_same_run, records, run_killed_in_step
from tiny import write_pairs

DCP_FILE = "trainer_state/dcp/__0_0.distcp"


@pytest.fixture(scope="module")
def root(tmp_path_factory, qwen_dir):
    """A folder with 24 pairs and a tiny model; `config` writes configs for 6-step runs (2 epochs of 3 steps)
    that save every step."""
    root = tmp_path_factory.mktemp("safety")
    (root / "model").symlink_to(qwen_dir)
    write_pairs(root / "pairs.json", n=24)
    (root / "train_dpo.yaml").write_text(yaml.safe_dump({
        "data": {"max_prompt_length": 128, "max_response_length": 64},
        "actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": 4, "optim": {"lr": 1e-3}}}}))
    return root


def config(root: Path, name: str, ckpt: str = "ckpt", **trainer) -> Path:
    cfg = {
        "project": "proj", "name": name, "mode": "train", "algorithm": {"algorithm_type": "dpo"},
        "checkpoint_root_dir": str(root / ckpt), "model": {"model_path": str(root / "model")},
        "cluster": {"node_num": 1, "gpu_per_node": 1},
        "buffer": {"total_epochs": 2, "batch_size": 8, "trainer_input": {"experience_buffer": {
            "name": "dpo_buffer", "storage_type": "file", "path": str(root / "pairs.json"),
            "format": {"prompt_type": "plaintext"}}}},
        "trainer": {"trainer_config_path": "train_dpo.yaml", "save_interval": 1, "eval_samples": 0,
                    "precision": "fp32", "actor_kl_loss_coef": 0.1, **trainer},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(root):
    """(whole: 6 uninterrupted steps, crashed: killed inside step 5, with checkpoints 1-4 and metrics 1-4)."""
    whole = train.run(load_config(config(root, "whole")))
    with pytest.MonkeyPatch.context() as mp:
        run_killed_in_step(config(root, "crashed"), 5, mp)
    return whole, whole.parent / "crashed"


def copy_of(runs, root, name: str, ckpt: str = "ckpt", **trainer) -> tuple[Path, Path]:
    """A copy of the crashed run folder named `name` (under `ckpt`), and its config."""
    run_dir = root / ckpt / "proj" / name
    shutil.copytree(runs[1], run_dir)
    return run_dir, config(root, name, ckpt, **trainer)


def cut(path: Path) -> tuple[int, int]:
    """Truncate `path` to half, as a bad copy leaves it; (its size now, its size before)."""
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return size // 2, size


# -- verified checkpoints -------------------------------------------------------------------------------------


def test_corrupt_newest_checkpoints_are_skipped_and_the_run_equals_an_uninterrupted_one(runs, root, caplog):
    """Step 4 fails verification (a cut-off file); step 3, without a manifest as written before manifests existed,
    passes it but its loading raises; the run resumes from step 2 and ends as the uninterrupted run."""
    run_dir, cfg = copy_of(runs, root, "fallback")
    now, before = cut(run_dir / "global_step_4" / DCP_FILE)
    (run_dir / "global_step_3" / "trainer_state" / "manifest.json").unlink()
    cut(run_dir / "global_step_3" / DCP_FILE)
    with caplog.at_level(logging.INFO):
        train.run(load_config(cfg))
    assert f"resumed from {run_dir / 'global_step_2'} at step 2" in caplog.text  # the checkpoint used, named
    assert (run_dir / "run.lock").resolve() not in run_lock.held()  # the finished run gave its folder back
    assert (f"checkpoint {run_dir / 'global_step_4'} skipped: {DCP_FILE} has {now} bytes where {before} were "
            "written; kept as global_step_4.skipped; resuming from global_step_3") in caplog.text
    assert (f"checkpoint {run_dir / 'global_step_3'} skipped: loading it raised RuntimeError: PytorchStreamReader "
            "failed reading zip archive") in caplog.text
    assert "kept as global_step_3.skipped; resuming from global_step_2" in caplog.text
    assert (run_dir / "global_step_4.skipped" / DCP_FILE).stat().st_size == now  # kept, not deleted
    assert (run_dir / "global_step_3.skipped").is_dir()
    assert_same_run(runs[0], run_dir, 6)  # bitwise, through a partial load and the fallback to step 2


def test_no_checkpoint_verifies_is_one_line_naming_what_to_do(runs, root):
    run_dir, cfg = copy_of(runs, root, "none_verify")
    for step in (1, 2, 3, 4):
        cut(run_dir / f"global_step_{step}" / DCP_FILE)
    with pytest.raises(CheckpointError) as err:
        train.run(load_config(cfg))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no checkpoint of {run_dir} can be resumed from (")
    assert all(f"global_step_{step}: {DCP_FILE} has" in message for step in (1, 2, 3, 4))
    assert message.endswith("set trainer.resume_from_path to a checkpoint you trust, or trainer.resume_mode: "
                            "disable (with a new `name`) to start afresh")
    assert all((run_dir / f"global_step_{step}").is_dir() for step in (1, 2, 3, 4))  # nothing set aside


def test_resume_from_path_to_a_corrupt_checkpoint_is_one_line(runs, root):
    source, _ = copy_of(runs, root, "bad_source")
    now, before = cut(source / "global_step_4" / DCP_FILE)
    cfg = config(root, "from_bad", resume_from_path=str(source / "global_step_4"))
    with pytest.raises(CheckpointError, match=r"^trainer.resume_from_path: cannot resume from .*global_step_4: "
                                          rf"{DCP_FILE} has {now} bytes where {before} were written; point it at "
                                          "another checkpoint, or set trainer.resume_mode: disable to start afresh$"):
        train.run(load_config(cfg))
    # Without a manifest to check it against, the same checkpoint fails in loading: one line too, no fallback.
    (source / "global_step_4" / "trainer_state" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"^trainer.resume_from_path: cannot resume from .*global_step_4: loading "
                                          "it raised RuntimeError: PytorchStreamReader failed reading zip archive"):
        train.run(load_config(cfg))


def test_rolling_back_inside_the_run_folder_sets_the_newer_checkpoints_aside(runs, root, caplog):
    """resume_from_path names step 2 of the same folder (checkpoints 1-4 there) and two are kept: steps 3 and 4
    belong to the run given up, so they are set aside, kept, rather than left for pruning by step to delete the
    continued run's own step 3 (and for a later auto resume to take). The continued run ends as the uninterrupted
    one and keeps its own newest two."""
    run_dir, _ = copy_of(runs, root, "rollback")
    cfg = config(root, "rollback", resume_from_path=str(run_dir / "global_step_2"), max_checkpoints_to_keep=2)
    with caplog.at_level(logging.WARNING):
        train.run(load_config(cfg))
    assert (f"checkpoint {run_dir / 'global_step_4'} skipped: newer than global_step_2, which "
            "trainer.resume_from_path continues from; kept as global_step_4.skipped") in caplog.text
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == [
        "global_step_2", "global_step_3.skipped", "global_step_4.skipped", "global_step_5", "global_step_6"]
    assert checkpoint.latest(run_dir) == run_dir / "global_step_6"
    assert_same_run(runs[0], run_dir, 6)


def test_auto_resume_of_a_run_trained_with_other_settings_is_refused(runs, root, caplog):
    """The same command with another learning rate and data file would have continued the old run's weights and
    optimizer on the new settings, silently: refused in one line naming what changed. Naming the checkpoint in
    resume_from_path continues it on purpose, with the change logged, and config.yaml then says what this run uses."""
    run_dir, _ = copy_of(runs, root, "changed")
    shutil.copyfile(root / "pairs.json", root / "pairs_v2.json")
    cfg = load_config(config(root, "changed"))
    cfg.algorithm.optimizer.lr = 2e-3
    cfg.buffer.trainer_input.experience_buffer.path = str(root / "pairs_v2.json")
    with pytest.raises(RunFolderError) as err:
        train.run(cfg)
    assert str(err.value) == (
        f"run folder {run_dir}: its checkpoint global_step_4 was trained with other settings (algorithm.optimizer.lr: "
        f"0.001 -> 0.002; buffer.trainer_input.experience_buffer.path: {str(root / 'pairs.json')!r} -> "
        f"{str(root / 'pairs_v2.json')!r}); to continue it with these, name it in trainer.resume_from_path; to start "
        "afresh, give this run another `name`")
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == [f"global_step_{s}" for s in (1, 2, 3, 4)]
    cfg.trainer.resume_from_path = str(run_dir / "global_step_4")
    with caplog.at_level(logging.WARNING):
        train.run(cfg)
    assert f"continuing {run_dir / 'global_step_4'} with changed settings: algorithm.optimizer.lr: 0.001 -> 0.002" \
        in caplog.text
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["algorithm"]["optimizer"]["lr"] == 2e-3


def test_resuming_into_a_shorter_or_longer_schedule_is_said(runs, root, caplog):
    """A checkpoint of a 6-step run continued for 3 epochs (9 steps): the new count is followed, and said; one past
    the new count has nothing to train: refused in one line."""
    run_dir, path = copy_of(runs, root, "longer")
    cfg = load_config(path)
    cfg.buffer.total_epochs = 3
    with caplog.at_level(logging.WARNING):
        train.run(cfg)
    assert f"{run_dir / 'global_step_4'}: its run was planned for 6 steps, this one for 9" in caplog.text
    _, cfg = copy_of(runs, root, "shorter", total_steps=3)
    with pytest.raises(CheckpointError, match=r"global_step_4 is at step 4, past this run's 3 steps; raise "
                                              "buffer.total_epochs or trainer.total_steps"):
        train.run(load_config(cfg))


def test_manifest_records_every_file_and_catches_a_changed_byte(runs):
    path = runs[0] / "global_step_6"
    files = json.loads((path / "trainer_state" / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "config.json", DCP_FILE, "trainer_state/dcp/.metadata", "trainer_state/rng.pt",
            "trainer_state/state.json"} <= files.keys()
    assert checkpoint.verify(path) is None
    damaged = runs[0].parent / "flipped"
    shutil.copytree(path, damaged)
    with open(damaged / "model.safetensors", "r+b") as fh:
        fh.seek(-5, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-5, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 1]))
    assert checkpoint.verify(damaged) == "model.safetensors does not match its checksum"


def test_a_full_disk_inside_dcp_is_named_in_the_save_error():
    """DCP wraps each process's error as (exception, traceback) by rank: the reason is the OS's, not the wrapper's."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    def dcp_write():
        raise CheckpointException("write_data", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})

    assert checkpoint._attempt(dcp_write) == "No space left on device"


def test_a_failed_safetensors_write_is_a_save_error(tmp_path):
    """safetensors reports an OS error (a full disk, a folder gone) as its own SafetensorError, neither OSError nor
    RuntimeError: it is the save's failure too, one line, not a traceback (and not a hang of the other ranks)."""
    from safetensors.torch import save_file

    reason = checkpoint._attempt(lambda: save_file({"w": torch.zeros(2)}, str(tmp_path / "gone" / "x.safetensors")))
    assert reason.startswith("Error while serializing: I/O error: No such file or directory (os error 2)")


# -- the reference cache and metrics.jsonl --------------------------------------------------------------------


def test_damaged_reference_cache_is_recomputed_with_a_warning(runs, root, caplog):
    # Resumed at its last step: no training, but the reference pass runs. No sibling run holds a good copy.
    run_dir, cfg = copy_of(runs, root, "cache", ckpt="alone", total_steps=4)
    cache = next(run_dir.glob("ref_cache/train-*.pt"))
    original = torch.load(cache, weights_only=True)["tables"]
    cut(cache)
    with caplog.at_level(logging.WARNING):
        train.run(load_config(cfg))
    assert f"reference cache {cache} is unreadable (RuntimeError); not used" in caplog.text
    assert all(torch.equal(original[k], v) for k, v in torch.load(cache, weights_only=True)["tables"].items())

    fp = torch.load(cache, weights_only=True)["fingerprint"]
    n_rows = original["logps"].shape[0]
    torch.save({"fingerprint": "another", "tables": original}, cache)
    assert reference._read(cache, fp, n_rows) == (None, "does not match its fingerprint")
    tampered = {"logps": original["logps"].clone()}
    reference._save(cache, {"fingerprint": fp, "tables": tampered})
    tampered["logps"][0, 0] += 1e-3
    torch.save({**torch.load(cache, weights_only=True), "tables": tampered}, cache)
    assert reference._read(cache, fp, n_rows) == (None, "does not hold the numbers it was written with")


def test_cut_off_last_metrics_line_is_repaired_and_reported(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "loss": 0.4')  # the crash came mid-write
    with caplog.at_level(logging.WARNING):
        run_folder.truncate_metrics(tmp_path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert ("the last line was cut off by a crash in mid-write and is dropped: "
            "'{\"step\": 4, \"loss\": 0.4'") in caplog.text
    # A write that fails midway (a full disk, here a file-size limit) leaves the history whole, and says so.
    import resource

    path.write_text("\n".join(lines * 200) + "\n")
    whole, limit = path.read_text(), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limit[1]))
    try:
        with pytest.raises(RunFolderError, match=r"metrics.jsonl: cannot rewrite it to step 2 \(File too large\); it "
                                              "is unchanged: free space and run the same command again"):
            run_folder.truncate_metrics(tmp_path, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert path.read_text() == whole and not list(tmp_path.glob(".metrics*"))
    path.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(RunFolderError, match=r"metrics.jsonl: line 2 is not a metrics record \(edited by hand\?\); "
                                          "correct or delete it"):
        run_folder.truncate_metrics(tmp_path, 2)


# -- the lock ---------------------------------------------------------------------------------------------------

HOLD = ("import sys, time; from pathlib import Path; from trinity_dpo.run import lock as run_lock; "
        "run_lock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)")


def test_held_folder_refused_readable_and_taken_over_when_its_holder_dies(runs, root, caplog, pairs_file):
    """Another process holds the folder: a run is refused with a line naming it, `trinity report` and `trinity
    eval` still read the folder; once the holder is killed, its stale lock is taken over with a warning."""
    run_dir = runs[0]
    run_lock.release(run_dir)  # this process trained there
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = json.loads((run_dir / run_lock.NAME).read_text())["started"]
        before = _snapshot(run_dir)
        with pytest.raises(RunFolderError) as err:
            run_folder.prepare_run_dir(load_config(config(root, "whole")), Dist())
        assert _snapshot(run_dir) == before  # refused before it wrote anything
        assert str(err.value) == (f"run folder {run_dir} is in use by another run (pid {holder.pid} on host "
                                  f"{socket.gethostname()}, started {started}); wait for it to end, or give this "
                                  "run another `name`")
        assert cli.main(["report", str(run_dir)]) == 0
        assert cli.main(["eval", "--model", str(run_dir / "global_step_6"), "--ref", str(root / "model"),
                         "--data", str(pairs_file)]) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING):
        run_lock.acquire(run_dir)
    assert (f"run folder {run_dir}: taking over the lock of a run that no longer runs (pid {holder.pid} on host "
            f"{socket.gethostname()}, started {started})") in caplog.text
    assert json.loads((run_dir / run_lock.NAME).read_text())["pid"] == os.getpid()
    run_lock.release(run_dir)
    assert not (run_dir / run_lock.NAME).exists()


@pytest.mark.parametrize("same_pid", [False, True])
def test_lock_left_by_another_host_is_not_taken(tmp_path, same_pid):
    """Another host's lock is refused, also when its pid is this process's (containers reuse small pids)."""
    pid = os.getpid() if same_pid else 1
    (tmp_path / run_lock.NAME).write_text(json.dumps({"pid": pid, "host": "node-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunFolderError, match=rf"^run folder {tmp_path} is locked by a run on another host \(pid {pid} "
                                          r"on host node-7, started 2026-01-01T00:00:00\), which this host cannot "
                                          rf"check; if that run has ended, delete {tmp_path / run_lock.NAME} and run "
                                          "again$"):
        run_lock.acquire(tmp_path)


def test_rank_0_holds_the_lock_for_all_processes(make_config, tmp_path):
    cfg = load_config(make_config(main={"name": "ranks"}))
    run_dir = run_folder.run_dir_of(cfg)
    run_folder.prepare_run_dir(cfg, Dist())
    assert (run_dir / run_lock.NAME).is_file() and run_dir.resolve() / run_lock.NAME in run_lock.held()
    run_lock.release(run_dir)
    launch = (run_dir / ".launch").read_text()
    other = types.SimpleNamespace(main=False, from_main=lambda obj: (None, launch))  # rank 1, given rank 0's answer
    run_folder.prepare_run_dir(cfg, other)
    assert not (run_dir / run_lock.NAME).exists() and run_dir.resolve() / run_lock.NAME not in run_lock.held()


@pytest.mark.slow
def test_two_runs_started_at_once_one_trains_the_other_stops_with_exit_2(make_config):
    path = make_config(main={"name": "twice", "trainer": {"total_steps": 2}})
    run_dir = path.parent / "ckpt" / "proj" / "twice"
    command = [sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(path)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        end = time.time() + 120
        while time.time() < end and all(p.poll() is None for p in procs) and _holder(run_dir) not in {
                p.pid for p in procs}:
            time.sleep(0.02)
        first = next(p for p in procs if p.pid == _holder(run_dir))
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, however fast the other one is
        second = next(p for p in procs if p is not first)
        _, second_err = second.communicate(timeout=120)
        started = json.loads((run_dir / run_lock.NAME).read_text())["started"]
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert second.returncode == 2 and "Traceback" not in second_err
    assert second_err.strip().splitlines()[-1] == (
        f"trinity: error: run folder {run_dir} is in use by another run (pid {first.pid} on host "
        f"{socket.gethostname()}, started {started}); wait for it to end, or give this run another `name`")
    assert first.returncode == 0, first_err[-3000:]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2]  # each step once
    assert not (run_dir / run_lock.NAME).exists()  # released at exit


def _holder(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / run_lock.NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run_dir.rglob("*") if p.is_file()}


# -- exit codes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error,line", [(ConfigError("bad"), "trinity: error: bad"),
                                        (DataError("rows.jsonl: line 3: malformed JSON"),
                                         "trinity: error: rows.jsonl: line 3: malformed JSON"),
                                        (RunFolderError("held"), "trinity: error: held"),
                                        (CheckpointError("disk full"), "trinity: stopped: disk full"),
                                        (NumericError("diverged"), "trinity: stopped: diverged")])
def test_exit_codes(monkeypatch, capsys, error, line):
    """Every user error is one line and exit code 2; anything else is a bug with its traceback."""
    def fail(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "report", fail)
    assert cli.main(["report", "x"]) == 2
    assert capsys.readouterr().err.strip() == line
    monkeypatch.setitem(cli.COMMANDS, "report", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug: its traceback, and Python's exit code 1
        cli.main(["report", "x"])


# -- a full disk, and file systems without locks -----------------------------------------------------------------


def test_a_full_disk_anywhere_in_the_run_folder_or_its_caches_is_one_line(make_config, tmp_path, monkeypatch):
    """Preparing the run folder, the reference cache and its per-token file: the OS's reason in one line (exit 2,
    every process told), and no temporary file left. A mapped per-token file the disk could not fill killed the
    process with SIGBUS and no word: its blocks are reserved first."""
    import errno

    from trinity_dpo.engine.distributed import Dist
    from trinity_dpo.objective.token_ref import TokenStore

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = load_config(make_config(main={"name": "full"}))
    with monkeypatch.context() as mp:
        mp.setattr(run_lock, "acquire", full)
        with pytest.raises(RunFolderError, match=r"^run folder .*full: No space left on device; free space or fix its "
                                                 "permissions$"):
            run_folder.prepare_run_dir(cfg, Dist())
    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("[enforce fail] file write "
                                                                                  "failed")))
        with pytest.raises(RunFolderError, match=r"train.pt: cannot write the reference cache \(\[enforce fail\] file "
                                                 r"write failed\); free space and run again$"):
            reference._save(tmp_path / "ref" / "train.pt", {"tables": {"logps": torch.zeros(2, 2)}})
    assert list((tmp_path / "ref").iterdir()) == []
    with monkeypatch.context() as mp:
        mp.setattr(os, "posix_fallocate", full)
        with pytest.raises(RunFolderError, match=r"x.tokens: cannot reserve 40 bytes for the reference's per-token "
                                                 r"values \(No space left on device\); free space and run again$"):
            TokenStore.create(tmp_path / "x.tokens", np.array([[3, 7]]))
    store = TokenStore.create(tmp_path / "y.tokens", np.array([[3, 7]]))
    assert store.values.shape == (10,) and np.isnan(store.values).all()


def test_a_token_cache_on_a_file_system_without_locks_still_builds(monkeypatch, tmp_path, caplog):
    import errno
    import fcntl

    from trinity_dpo.data import prepare

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level(logging.WARNING):
        with prepare._one_builder(tmp_path / "table", "pairs.jsonl"):
            ran.append(1)
    assert ran == [1]
    assert f"{tmp_path} takes no file locks (Function not implemented); each process tokenizes pairs.jsonl on its " \
           "own" in caplog.text


def test_a_signal_during_a_save_stops_after_it(runs, root, caplog):
    """SIGTERM arriving while checkpoint 2 is written: the state was just saved, so the run stops there (it
    trained and saved step 3 first, which a short grace period may not allow)."""
    real = train._save
    cfg = config(root, "signal_in_save")

    def save(s, step, last):
        real(s, step, last)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(train, "_save", save)
        run_dir = train.run(load_config(cfg))
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == ["global_step_1", "global_step_2"]
    assert "stopped by SIGTERM after step 2 of 6" in caplog.text


def test_resuming_at_the_new_last_step_evaluates_and_saves_it_as_final(runs, root):
    """Checkpoints 1-4 of a 6-step run, continued with total_steps 4: no step is left, but step 4's checkpoint
    was a periodic one of a longer plan. Its final evaluation and save are made (it finished with neither, and a
    stage there would never count as finished)."""
    run_dir, cfg = copy_of(runs, root, "at_total", total_steps=4)
    train.run(load_config(cfg))
    assert checkpoint.final_of(run_dir) == run_dir / "global_step_4"
    assert checkpoint.saved_state(run_dir / "global_step_4")["total"] == 4


def test_a_full_disk_while_logging_a_step_is_one_line(runs, root, monkeypatch):
    import errno

    from trinity_dpo.run import metrics

    _, cfg = copy_of(runs, root, "log_full")
    real = metrics.MetricsLog._sinks

    def sinks(self, record):
        self.file = types.SimpleNamespace(write=lambda text: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")), flush=lambda: None, close=lambda: None)
        return real(self, record)

    monkeypatch.setattr(metrics.MetricsLog, "_sinks", sinks)
    with pytest.raises(RunFolderError, match=r"metrics.jsonl: cannot write \(No space left on device\); free space "
                                             "and run the same command again to resume"):
        train.run(load_config(cfg))


def test_a_signal_while_the_run_starts_stops_it_with_exit_0(root, caplog):
    """SIGTERM during the start (tokenizing, loading, the reference pass: minutes on a large set) is caught: the run
    stops before its first step with the resume line and exit 0 (the process died with 143, SIGINT with a traceback)."""
    cfg = config(root, "signal_at_start")
    real = train._reference_tables

    def tables(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(train, "_reference_tables", tables)
        assert cli.main(["run", "--config", str(cfg)]) == 0
    assert "stopped by SIGTERM before step 1; run the same command again to resume" in caplog.text
    assert not list((root / "ckpt" / "proj" / "signal_at_start").glob("global_step_*"))
