"""Several processes (CPU, gloo, two workers, a tiny model): equal to one process, checkpoints that cross process
counts, failures that stop every worker within a bound, and the rules that split a step between workers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trinity_dpo.run import checkpoint, folder as run_folder, train
from trinity_dpo.engine import distributed, host_heap
from trinity_dpo.data.batching import is_padding, plan_micro, shard_step
from trinity_dpo.errors import ConfigError, RunFolderError
from trinity_dpo.config.loader import load_config
from trinity_dpo.data.pairs import Pair

from conftest import REPO
from tiny import write_pairs

TIMING = ("tokens_per_s", "step_time_s")


def cli(config, *overrides, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(config), *overrides],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, step, name="model.safetensors"):
    return load_file(str(run_dir / f"global_step_{step}" / name))


def assert_close_runs(a, b, step, tol=1e-5, files=("model.safetensors",)):
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x.keys() - set(TIMING):
            assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])
    for name in files:
        wa, wb = weights(a, step, name), weights(b, step, name)
        assert wa.keys() == wb.keys()  # tied embeddings are stored once by both
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


@pytest.fixture(scope="module")
def config(tmp_path_factory, qwen_dir):
    """23 pairs, 6 held out: 17 train pairs in steps of 8, 8 and 1, so in the short step the second worker has no
    pair and runs a padding micro-batch. Two pairs per micro-batch, gradient checkpointing on, fp32."""
    root = tmp_path_factory.mktemp("dist")
    data = write_pairs(root / "pairs.json", n=23)
    cfg = {
        "project": "proj", "name": "run", "mode": "train", "algorithm": {"algorithm_type": "dpo"},
        "checkpoint_root_dir": str(root / "ckpt"), "model": {"model_path": str(qwen_dir)},
        "cluster": {"node_num": 1, "gpu_per_node": 1},
        "buffer": {"total_epochs": 2, "batch_size": 8, "trainer_input": {"eval_fraction": 0.25, "experience_buffer": {
            "name": "dpo_buffer", "storage_type": "file", "path": str(data),
            "format": {"prompt_type": "plaintext", "prompt_key": "prompt", "chosen_key": "chosen",
                       "rejected_key": "rejected"}}}},
        "trainer": {"trainer_config_path": "train_dpo.yaml", "save_interval": 2, "eval_interval": 3,
                    "eval_samples": 1, "eval_max_new_tokens": 4, "precision": "fp32", "actor_use_kl_loss": True,
                    "actor_kl_loss_coef": 0.1},
    }
    (root / "train_dpo.yaml").write_text(yaml.safe_dump({
        "data": {"max_prompt_length": 128, "max_response_length": 64},
        "actor_rollout_ref": {"model": {"enable_gradient_checkpointing": True},
                              "actor": {"ppo_micro_batch_size_per_gpu": 2, "optim": {"lr": 1e-3}}}}))
    (root / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    return root / "dpo.yaml"


@pytest.fixture(scope="module")
def runs(config):
    """The same run in one process and in two."""
    one = train.run(load_config(config, ["name=one"]))
    proc = cli(config, "cluster.gpu_per_node=2", "name=two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting 2 worker processes" in proc.stderr
    # The command restarted with the kept heap (`host_heap`), and
    # torchrun's workers inherited it.
    if host_heap.needed(os.environ):
        assert proc.stderr.count("host heap: glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold="
                                 "17179869184 (set by trinity;") == 3
    cores = os.cpu_count()
    assert (f"cluster.gpu_per_node=2 and no CUDA device: starting 2 CPU worker processes on {cores} cores; for one "
            "process, set cluster.gpu_per_node=1") in proc.stderr
    return one, one.parent / "two"


@pytest.mark.slow
def test_two_processes_equal_one(runs):
    one, two = runs
    assert_close_runs(one, two, 6)
    assert [r["pairs"] for r in records(two) if "pairs" in r] == [8, 8, 1] * 2
    assert abs(records(two)[1]["loss"] - 0.6931471805599453) < 1e-6  # step 1: policy = reference
    # Greedy answers before and after, generated with every layer gathered once (`distributed.gathered`).
    for name in ("samples_base.json", "samples.json"):
        assert json.loads((one / name).read_text()) == json.loads((two / name).read_text())


def test_gradients_reduce_once_per_step_on_the_last_micro_batch(make_config, monkeypatch):
    """Two micro-batches a step: the first backward keeps its gradients local, the second reduces (under FSDP2:
    one reduce-scatter a step); the numbers are those of `test_two_processes_equal_one`."""
    calls = []
    monkeypatch.setattr(distributed, "sync_gradients", lambda model, on: calls.append(on))
    train.run(load_config(make_config(main={"trainer": {"total_steps": 2, "eval_samples": 0}})))
    assert calls == [False, True] * 2  # batch 8, ppo_micro_batch_size_per_gpu 4


@pytest.mark.slow
def test_two_processes_equal_one_for_sft(config, tmp_path):
    """SFT's token-mean loss over the step's global trained-token count: 2 workers equal 1 (13 rows in steps of 4,
    4, 4, 1: the last step's second worker runs a padding micro-batch), held-out evaluation included. It stands for
    every objective without a reference and with step-wide token means (ORPO's and CPO's NLL terms, the token
    metrics): they share this path, and each equals its full-batch step in one process (test_train)."""
    from test_sft import sft_rows

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(17)))
    fmt = "buffer.trainer_input.experience_buffer.format"
    overrides = ["algorithm.algorithm_type=sft", "buffer.batch_size=4", "trainer.total_steps=4",
                 f"buffer.trainer_input.experience_buffer.path={data}", f"{fmt}.prompt_type=messages",
                 f"{fmt}.messages_key=messages", f"{fmt}.enable_concatenated_multi_turn=true"]
    one = train.run(load_config(config, ["name=sft1", *overrides]))
    proc = cli(config, "cluster.gpu_per_node=2", "name=sft2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_runs(one, one.parent / "sft2", 4)
    assert [r["rows"] for r in records(one) if "rows" in r] == [4, 4, 4, 1]


@pytest.mark.slow
def test_reference_scored_in_shares_and_gathered_into_one_cache(runs):
    one, two = runs
    tables = [torch.load(next(d.glob("ref_cache/train-*.pt")), weights_only=True)["tables"]["logps"] for d in runs]
    assert not tables[1].isnan().any()  # every pair scored by one of the two workers
    torch.testing.assert_close(tables[1], tables[0], rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_of_two_processes_loads_in_one(runs, config):
    one, two = runs
    model = AutoModelForCausalLM.from_pretrained(two / "global_step_6")  # the consolidated HF copy
    saved = weights(one, 6)
    assert max((model.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5
    # The resumable state (DCP, written in two shards) resumes in one process, and the reverse.
    crossed = train.run(load_config(config, ["name=two_to_one", f"trainer.resume_from_path={two / 'global_step_2'}"]))
    assert_close_runs(two, crossed, 6)
    proc = cli(config, "cluster.gpu_per_node=2", "name=one_to_two", f"trainer.resume_from_path={one / 'global_step_2'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_runs(one, one.parent / "one_to_two", 6)


@pytest.mark.slow
def test_readme_multi_node_command_as_two_nodes_on_one_machine(runs, config):
    """The README's torchrun line, once per "node" (node_num 2 x gpu_per_node 1), trains what 2 workers on one
    node train."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "trinity_dpo.cli", "run",
         "--config", str(config), "cluster.node_num=2", "name=nodes"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert_close_runs(runs[1], runs[1].parent / "nodes", 6)


def fault_env(how: str) -> dict:
    env = dict(os.environ, TRINITY_TEST_FAIL_RANK="1", TRINITY_TEST_FAIL_HOW=how)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests" / "faults"), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_exception_in_one_worker_stops_all_with_its_error(config):
    start = time.time()
    proc = cli(config, "cluster.gpu_per_node=2", "name=raises", env=fault_env("raise"), timeout=180)
    assert proc.returncode == 1
    assert "workers failed, so every worker was stopped (their output is above):" in proc.stderr
    assert "  worker 1 exited with code 1: RuntimeError: simulated failure in rank 1" in proc.stderr
    assert time.time() - start < 120


@pytest.mark.slow
def test_hung_worker_is_bounded_by_the_timeout(config):
    start = time.time()
    proc = cli(config, "cluster.gpu_per_node=2", "name=hangs", "trainer.trainer_config.actor_rollout_ref.nccl_timeout=5",
               env=fault_env("hang"), timeout=180)
    assert proc.returncode == 1
    assert "workers failed, so every worker was stopped" in proc.stderr and "Timed out" in proc.stderr
    assert time.time() - start < 120


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "one worker"])
def test_sigterm_stops_every_worker_after_the_same_step(config, target):
    """SIGTERM to the launcher reaches every worker; SIGTERM to one worker alone (a node told to go) must stop the
    others after the same step too, or the save, a collective, would find them gone on."""
    name = f"stopped_{target.replace(' ', '_')}"
    run_dir = config.parent / "ckpt" / "proj" / name
    cmd = [sys.executable, "-m", "trinity_dpo.cli", "run", "--config", str(config), "cluster.gpu_per_node=2",
           f"name={name}", "buffer.total_epochs=40", "trainer.save_interval=0", "trainer.eval_samples=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 120
    while time.time() < end and proc.poll() is None and not (
            (run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 5):
        time.sleep(0.05)
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        psutil.Process(proc.pid).children()[-1].send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "run the same command again to resume" in err
    saved = checkpoint.latest(run_dir)
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert saved is not None and int(saved.name[12:]) == steps[-1] < 120


@pytest.mark.slow
def test_several_nodes_are_started_by_torchrun_and_gpus_must_exist(config):
    proc = cli(config, "cluster.node_num=2", timeout=120)
    assert proc.returncode == 2
    assert "cluster.node_num=2: start the run on every node with torchrun --nnodes 2 --nproc-per-node 1" in proc.stderr
    if not torch.cuda.is_available():
        proc = cli(config, "cluster.gpu_per_node=2", "cluster.device=cuda", timeout=120)
        assert proc.returncode == 2
        assert "cluster.gpu_per_node=2 but this machine has 0 CUDA devices; lower gpu_per_node" in proc.stderr


def test_worker_count_must_match_the_config(config, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(config, ["cluster.gpu_per_node=2"])
    with pytest.raises(ConfigError, match="3 worker processes were started but cluster.node_num x "
                                          "cluster.gpu_per_node is 2; make them agree"):
        distributed.setup(cfg, torch.device("cpu"))


def test_run_folder_must_be_shared_storage(config):
    """A worker on a node that cannot see rank 0's run folder stops with a clear error instead of a split run."""
    cfg = load_config(config, ["name=unshared"])
    other = types.SimpleNamespace(main=False, from_main=lambda obj: (None, "rank 0's launch token"))
    with pytest.raises(RunFolderError, match="does not see rank 0's run folder .* it must be on storage they all share"):
        run_folder.prepare_run_dir(cfg, other)


def _pairs(n: int, seed: int = 0) -> list[Pair]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n, 3), generator=gen).tolist()
    return [Pair(i, i + 1, [5] * a, [6] * b, [7] * c) for i, (a, b, c) in enumerate(lengths)]


@pytest.mark.parametrize("world,micro,budget", [(2, 2, None), (3, None, 120), (4, 1, None), (2, None, None)])
def test_shard_step_gives_distinct_pairs_and_equal_micro_batch_counts(world, micro, budget):
    for n in (12, 5, 1):  # a full step, then short last steps (fewer pairs than workers)
        batch = _pairs(n)
        shares = shard_step(batch, world, micro, budget)
        assert len(shares) == world and len({len(groups) for groups in shares}) == 1
        real = [p.index for groups in shares for g in groups if not is_padding(g) for p in g]
        assert sorted(real) == list(range(n))  # every pair once, on one worker
        sizes = [sum(len(g) for g in groups if not is_padding(g)) for groups in shares]
        assert max(sizes) - min(sizes) <= 1
        for groups in shares:
            for g in groups:
                assert g and (is_padding(g) == (len(g) == 1 and g[0].index == -1))
            if any(is_padding(g) for g in groups):  # padding only where no group is left to split
                assert all(len(g) == 1 for g in groups)
                if budget and len(g) > 1:
                    assert sum(p.n_tokens for p in g) <= budget


def test_shard_step_with_one_process_is_plan_micro():
    batch = _pairs(12)
    assert shard_step(batch, 1, 4) == [plan_micro(batch, 4)]
    assert shard_step(batch, 1, None, 150) == [plan_micro(batch, None, 150)]


@pytest.mark.slow
def test_two_processes_equal_one_with_lora(config):
    """A rank-4 adapter on every linear layer, under FSDP2 with frozen base weights in every unit: 2 workers equal
    1 (losses, metrics and the saved adapter), and each writes one PEFT adapter folder plus the merged model."""
    overrides = ["model.lora.rank=4", "model.lora.alpha=8", "trainer.total_steps=3", "algorithm.optimizer.lr=1e-2"]
    one = train.run(load_config(config, ["name=lora1", *overrides]))
    proc = cli(config, "cluster.gpu_per_node=2", "name=lora2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = one.parent / "lora2"
    assert_close_runs(one, two, 3, files=("adapter_model.safetensors", "merged/model.safetensors"))
    assert abs(records(two)[1]["loss"] - 0.6931471805599453) < 1e-6


@pytest.mark.slow
def test_lora_bf16_base_under_fsdp2_equals_an_fp32_base(config, qwen_dir, tmp_path):
    """bf16 compute from a bf16 checkpoint: the adapted layers' frozen base stays bf16 (`lora.base_in_bf16`) next
    to fp32 norms and adapters in each FSDP2 unit. Two workers give the same numbers, to the bit, as two workers
    from the same values stored in fp32 (whose base stays fp32 and is cast to bf16 product by product): losses,
    metrics and adapters."""
    import shutil

    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype)
        AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16).to(dtype).save_pretrained(folder)
        for f in qwen_dir.iterdir():
            if "token" in f.name or f.name.endswith(".jinja"):
                shutil.copy(f, folder / f.name)
        name = f"lora_{str(dtype)[6:]}"
        proc = cli(config, "cluster.gpu_per_node=2", f"name={name}", "model.lora.rank=4", "model.lora.alpha=8",
                   "trainer.total_steps=2", "algorithm.optimizer.lr=1e-2", f"model.model_path={folder}",
                   "trainer.precision=bf16", "trainer.save_interval=2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("the frozen base of 14 adapted layers kept in bf16" in proc.stderr) is (dtype == torch.bfloat16)
        runs[dtype] = config.parent / "ckpt" / "proj" / name
    assert_close_runs(*runs.values(), 2, tol=0.0, files=("adapter_model.safetensors",))
    # Each merged model is stored in its folder's dtype: the fp32 one, rounded to bf16, is the bf16 one.
    wa, wb = (weights(r, 2, "merged/model.safetensors") for r in runs.values())
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k].to(torch.bfloat16)) for k in wa)


@pytest.mark.slow
def test_two_processes_equal_one_with_trinitys_kl_and_entropy_terms(config):
    """k3 KL and an entropy term: each worker writes its pairs' per-token reference log-probs into the one file,
    and the terms' token means over the step's global token count add up across workers (the short step's second
    worker runs a padding micro-batch, whose copies have no places in the file)."""
    terms = ["algorithm.policy_loss_fn=dpo", "algorithm.kl_loss_fn=k3", "algorithm.kl_loss_fn_args.kl_coef=0.5",
             "algorithm.entropy_loss_fn_args.entropy_coef=0.05", "buffer.total_epochs=1"]
    one = train.run(load_config(config, ["name=kl1", *terms]))
    proc = cli(config, "cluster.gpu_per_node=2", "name=kl2", *terms)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_runs(one, one.parent / "kl2", 3)
    assert all("actor/kl_loss" in r for r in records(one) if "loss" in r)
