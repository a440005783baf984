"""Several processes: the launch, FSDP2 sharding and the few collectives the loop needs; the one module that knows
about ranks.

    trinity run --config dpo.yaml cluster.gpu_per_node=2        # one node: trinity starts the workers itself
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port 29500 \\
        -m trinity_dpo.cli run --config dpo.yaml                 # several nodes: the same command on every node

Workers come from PyTorch's own elastic launcher (`torch.distributed.run`); NCCL joins them on GPUs and gloo on CPUs.
With one process there is no process group and every helper is the identity, so the loop reads the same either way.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config.schema import Config
from ..errors import ConfigError
from .process_env import is_main_process, launched, local_rank  # noqa: F401  (this module's names for them too)

log = logging.getLogger(__name__)


# Set to 1 (with torchrun --nproc-per-node 1), a single worker still shards with FSDP2 over a one-rank process group:
# the sharded code path on one device, as `bench/gpu_check.py` runs it.
ONE_RANK_FSDP = "TRINITY_FSDP_ONE_RANK"


def launch(config_path: str, overrides: list[str], cfg: Config) -> int | None:
    """Start `cluster.gpu_per_node` workers running this same command through `torch.distributed.run`, when the
    config asks for several processes on this node and this process is not one of them. Returns their exit code,
    or None when training should run right here."""
    if launched() or cfg.cluster.node_num * cfg.cluster.gpu_per_node == 1:
        return None
    n = cfg.cluster.gpu_per_node
    if cfg.cluster.node_num > 1:
        raise ConfigError(f"cluster.node_num={cfg.cluster.node_num}: start the run on every node with torchrun "
                          f"--nnodes {cfg.cluster.node_num} --nproc-per-node {n} --node-rank R --master-addr HOST "
                          "--master-port PORT -m trinity_dpo.cli run --config ... (README, 'Several GPUs and nodes')")
    on_gpu = cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and torch.cuda.is_available())
    if on_gpu and torch.cuda.device_count() < n:
        raise ConfigError(f"cluster.gpu_per_node={n} but this machine has {torch.cuda.device_count()} CUDA devices; "
                          "lower gpu_per_node (or set cluster.device: cpu for CPU processes)")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would give each CPU worker one thread; share the cores instead (an explicit OMP_NUM_THREADS wins).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # The launcher passes SIGINT/SIGTERM on, and after a worker's failure sends SIGTERM to the others; either way
    # it kills what still runs after this many seconds: time to finish a step and save (torch's 30 s is short),
    # and the bound on survivors that wait on a dead peer (the variable is torch's own: set it to change this).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "180")
    if not on_gpu:
        log.warning("cluster.gpu_per_node=%d and no CUDA device%s: starting %d CPU worker processes on %d cores; for "
                    "one process, set cluster.gpu_per_node=1", n, "" if cfg.cluster.device == "auto" else " in use", n,
                    os.cpu_count() or 1)
    log.info("starting %d worker processes (torch.distributed.run)", n)
    args = get_args_parser().parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(n), "--module",
                                         "trinity_dpo.cli", "run", "--config", config_path, *overrides])
    try:
        run(args)
    except ChildFailedError as e:
        # Earliest first; a worker that failed because a peer vanished comes after the peer's own error.
        failures = sorted(e.failures.items(), key=lambda item: (
            item[1].timestamp, "remote worker" in _failure_text(item[1]), item[0]))
        lines = [f"  worker {rank} exited with code {f.exitcode}{_failure_text(f)}" for rank, f in failures]
        print("\n".join([f"trinity: stopped: {len(failures)} of {n} workers failed, so every worker was stopped "
                          "(their output is above):", *lines]), file=sys.stderr)
        code = failures[0][1].exitcode
        return code if code > 0 else 1
    except SignalException as e:  # the workers were told too: they finish the step, save and exit
        log.warning("stopped by %s", e.sigval.name)
    return 0


def worker_main(main) -> int:
    """Run `main` in a worker that torchrun started. `record` hands an uncaught exception to the launcher, which
    names it when it stops the others; then the worker leaves at once (os._exit), because Python's own shutdown
    aborts (SIGABRT) while gloo threads still hold tensors of an interrupted collective, hiding the error."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        return record(main)()
    except (Exception, KeyboardInterrupt):
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _failure_text(failure) -> str:
    """The failed worker's exception in one line, from the error file `record` (cli.py) wrote; '' without one."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = str(message or "").strip().splitlines()
    if not lines or "<N/A>" in lines[-1]:
        return ""
    return ": " + (lines[-1] if len(lines[-1]) <= 200 else lines[-1][:197] + "...")


@dataclass
class Dist:
    """This process's place among the workers; with `world == 1` every method is the identity."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # the DeviceMesh FSDP2 shards over; None with one process

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder (metrics, checkpoints' HF copy, reference cache) and prints."""
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def merge_rows(self, table: torch.Tensor) -> torch.Tensor:
        """Every process's rows of a NaN-initialised table in one table: a row is the mean of the processes that
        filled it (one, or several with the same numbers: (v + v) / 2 == v exactly)."""
        if self.world == 1:
            return table
        filled = ~table.isnan()
        values = self.all_sum(torch.where(filled, table, 0.0).to(self.device, torch.float64))
        counts = self.all_sum(filled.to(self.device, torch.float64))
        return (values / counts).float().cpu()  # 0 / 0: rows nobody filled stay NaN

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on some process: decisions that must be the same everywhere (stopping, saving)."""
        if self.world == 1:  # no tensor: on a GPU its .item() would be a host sync every step
            return bool(flag)
        return bool(self.all_sum(torch.tensor([float(flag)], device=self.device)).item())

    def everyone(self, obj) -> list:
        """Every process's `obj` (small: an error text, a few checksums), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def first_error(self, error: str | None) -> str | None:
        """The first process's error text among all processes' (None: none failed), known to every process."""
        return next((e for e in self.everyone(error) if e), None)

    def from_main(self, obj):
        """Rank 0's `obj`, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(cfg: Config, device: torch.device) -> Dist:
    """Join the other workers (if torchrun started some) and check they are as many as the config says."""
    if not launched():
        return Dist(device=device)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    expected = cfg.cluster.node_num * cfg.cluster.gpu_per_node
    if world != expected:
        raise ConfigError(f"{world} worker processes were started but cluster.node_num x cluster.gpu_per_node is "
                          f"{expected}; make them agree")
    if world == 1 and os.environ.get(ONE_RANK_FSDP) != "1":
        return Dist(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    timeout = datetime.timedelta(seconds=cfg.trainer.trainer_config.actor_rollout_ref.nccl_timeout)
    if not dist.is_initialized():  # else a later run of this process (`kept_group`): the first run's group serves
        # A process that dies takes the others down through the launcher; one that hangs, through this timeout.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    if rank != 0:
        logging.getLogger().setLevel(logging.ERROR)  # rank 0 reports for all; the others' failures raise
    return Dist(rank=rank, world=world, device=device, mesh=init_device_mesh(device.type, (world,)))


def teardown(d: Dist) -> None:
    """Leave the process group together, the sharded model freed first (not yet inside `kept_group`). The last
    collective is a barrier, which holds no tensor: a gloo thread dropping a Python-owned tensor after Python began
    shutting down aborts the process (seen as SIGABRT/SIGSEGV at exit after an all-reduce)."""
    if d.world > 1 and dist.is_initialized() and not _keeping:
        _leave()


def _leave() -> None:
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


_keeping = False


@contextlib.contextmanager
def kept_group():
    """Several runs in one process (`stages:`) share the process group the first one joins, left after the last:
    joining again after leaving would meet the launcher's rendezvous keys of the first group. A run that fails
    leaves at once, as one run does (the launcher stops the others)."""
    global _keeping
    _keeping = True
    try:
        yield
    finally:
        _keeping = False
    if dist.is_initialized():
        _leave()


def shard(model: torch.nn.Module, d: Dist, bf16: bool) -> None:
    """FSDP2 over all processes: each decoder layer is one unit, the root (embeddings, final norm, LM head) another;
    parameters, gradients and Adam's moments are sharded. On GPU with bf16 the layers' mixed-precision policy
    gathers and computes in bf16 and reduces gradients in fp32."""
    if d.mesh is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layer_policy = MixedPrecisionPolicy()
    if d.device.type == "cuda" and bf16:
        layer_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = getattr(getattr(model, model.base_model_prefix), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layers at {model.base_model_prefix}.layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=d.mesh, mp_policy=layer_policy)
    # The root keeps fp32 parameters: the LM head's log-softmax runs in fp32 (logprobs.py), as on one process.
    fully_shard(model, mesh=d.mesh, mp_policy=MixedPrecisionPolicy())
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            # Gradients are summed, not averaged: each micro-batch's loss is already divided by the global pair
            # count, so the sum over processes is the full-batch gradient (gloo has no pre-scaled reduction).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def register_forward(model: torch.nn.Module, method: str) -> None:
    """Make FSDP2 treat `model.<method>` as a forward of a model `shard` sharded (nothing otherwise). The root's
    parameters are gathered only inside a forward FSDP knows of; scoring calls the backbone and the head itself
    (`logprobs.bind`), so its method must be one."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        register_fsdp_forward_method(model, method)


def fill(model: torch.nn.Module, d: Dist, read) -> None:
    """Memory on `d.device` and starting values for a model built on the meta device and sharded (`shard`): each
    process reads only the rows of each weight it holds (`read(name, index)`), so no process ever has the whole
    model, on the host or the device. Buffers were built real and are kept."""
    from torch.distributed.tensor import Shard

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=d.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in model.named_parameters():
            if tuple(p.placements) != (Shard(0),):
                raise RuntimeError(f"{name}: expected FSDP2's row sharding, found {p.placements}")
            local = p.to_local()
            start = min(d.rank * -(-p.shape[0] // d.world), p.shape[0])  # FSDP2's torch.chunk rows, last may be short
            if local.numel():
                local.copy_(read(name, (slice(start, start + local.shape[0]),)))


def sync_gradients(model: torch.nn.Module, on: bool) -> None:
    """Whether the next backward reduce-scatters FSDP2's gradients: only on a step's last micro-batch. Before it
    each process adds its micro-batches' gradients locally (unsharded: memory for speed), and the one reduction
    sums them all, the same numbers as reducing every micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every decoder layer's full weights kept on each process for a while: generation then gathers each layer once,
    not once per new token. The root (embeddings, head) stays gathered after a forward anyway (FSDP2's root
    heuristic); `modeling.inference_mode` gives it back. Without FSDP, nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)  # as `shard` made them


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients to `max_norm` in total; returns the norm before clipping, the same on every process."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: each process holds a partial sum
        norm = norm.full_tensor()
    return norm.item()


def full_state_dict(model: torch.nn.Module, main: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU ({} elsewhere), or only those that train (LoRA's adapters);
    every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        # One host copy per memory: a tied head copied from a GPU under its own name would be stored twice.
        weights = per_memory(model.state_dict(), lambda v: v.detach().cpu()) if main else {}
    else:  # frozen weights are not even gathered when only the trained ones are asked for
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                       ignore_frozen_params=trainable_only))
        # Tied parameters come back as separate copies; make them one tensor again so the HF copy stores it once.
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first and name in weights and first[id(param)] in weights:
                weights[name] = weights[first[id(param)]]
            first.setdefault(id(param), name)
    frozen = _frozen(model) if trainable_only else set()
    return {k: v for k, v in weights.items() if k not in frozen}


def per_memory(weights: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """`fn` of each weight, computed once per memory: the names of one tied weight keep sharing one result. An
    empty tensor has no memory to share (its data_ptr may be 0): it is its own."""
    done: dict[object, torch.Tensor] = {}
    out = {}
    for name, v in weights.items():
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else id(v)
        if key not in done:
            done[key] = fn(v)
        out[name] = done[key]
    return out


def _frozen(model: torch.nn.Module) -> set[str]:
    """Names of the weights that do not train (LoRA's base), each name of a tied weight included: torch's
    `ignore_frozen_params` keeps a tied head (`lm_head.weight`) that shares a frozen embedding."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's trained weights and the optimizer's state, as DCP saves and loads them. Frozen weights are the
    model folder's: a checkpoint keeps only what trains."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    frozen = _frozen(model)
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, storage_writer=None) -> None:
    """fp32 weights and optimizer state with torch.distributed.checkpoint: each process writes its shards, and the
    files can be loaded by any number of processes. `storage_writer`: DCP's writer for `path` (its own file writer
    by default)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _trained_state(model, optimizer)
    # DCP stores each tensor as a torch.save zip record, whose CRC-32 (miniz's, ~300 MB/s) took 1.4 s of a 1.7 GB
    # save; the checkpoint's manifest checks every file with xxh3 already (run/manifest.py). torch.load reads
    # records without one.
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), storage_writer=storage_writer)
    finally:
        torch.serialization.set_crc32_options(crc)


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what `save_state` wrote (by however many processes) into this process's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd, optim_sd = _trained_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))  # frozen weights stay as loaded
