"""Loading the policy and its tokenizer, and choosing device and precision.

Weights are kept in fp32 (the optimizer's master copy); bf16 only enters through autocast, so numerics of the
update do not depend on the compute precision.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import SafetensorError

from . import bf16_head, fused_ops, lora, score_head, vector_math
from .attention import is_varlen, use_varlen
from ..config.schema import Config
from ..errors import ConfigError, one_line
from .distributed import local_rank

log = logging.getLogger(__name__)


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


@dataclass
class Runtime:
    """Where and how the computation runs."""

    device: torch.device
    bf16: bool
    share_prompt: bool = False  # micro-batches hold each prompt once (`batching.collate`); set once the model is loaded
    trim_heap: bool = True  # `release_host_memory` acts (CPU, glibc); `for_model` ties it to gradient checkpointing

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def release_host_memory(self) -> None:
        """Hand the C heap's free pages back to the OS (CPU runs on glibc). glibc keeps the pages of freed
        activations mapped while the next phase allocates elsewhere, so without this call between forward, backward
        and optimizer step the process's peak RSS sits above its live tensors (docs/benchmarks.md, History)."""
        if self.trim_heap and self.device.type == "cpu" and _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


@contextlib.contextmanager
def inference_mode(model):
    """No grad, eval mode (generation may use its KV cache even with gradient checkpointing on), restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if hasattr(model, "reshard"):
            # FSDP2 leaves the root's parameters gathered after a forward when no backward follows: give them
            # back, or the optimizer and checkpoints would meet other tensors than their own.
            model.reshard()


@contextlib.contextmanager
def scoring_mode(model, runtime: Runtime):
    """`inference_mode` for a pass over many micro-batches at fixed weights (the reference pass, held-out scoring).
    On CPU under bf16 each weight's bf16 copy is made once for the pass instead of once per micro-batch: autocast
    keeps its casts of parameters until its outermost context ends, and the LM head keeps its own
    (`bf16_head.keep_copies`): the reference pass over 32 pairs of SmolLM2 took 5.7-5.9 s instead of 6.2-6.4 s
    (docs/benchmarks.md, History). The copies hold 2 bytes a weight until the pass ends (the reference pass runs
    before AdamW's moments exist). Not for a sharded model, whose layers are gathered one at a time: copies kept for
    the whole pass would hold the whole model."""
    keep = runtime.bf16 and runtime.device.type == "cpu" and not hasattr(model, "reshard")
    with inference_mode(model), runtime.autocast() if keep else contextlib.nullcontext(), \
            bf16_head.keep_copies() if keep else contextlib.nullcontext():
        yield


def pick_runtime(cfg: Config) -> Runtime:
    vector_math.settle()  # before any op runs on two threads: a run's first step must not depend on a race
    want = cfg.cluster.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cluster.device: cuda was asked for but no CUDA device is available")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":  # a worker process uses the GPU of its local rank
        device = torch.device("cuda", local_rank(default=torch.cuda.current_device()))
        torch.cuda.set_device(device)
    precision = cfg.trainer.precision
    if precision == "auto":
        # Emulated bf16 (V100, T4) runs slower than fp32: only native support counts.
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else cpu_has_fast_bf16()
    else:
        bf16 = precision == "bf16"
    return Runtime(device=device, bf16=bf16)


def for_model(runtime: Runtime, cfg: Config, model) -> Runtime:
    """`runtime` once `model` is loaded: prompts are shared where the config asks and the model attends through
    `attention.py`; other attention implementations would let a rejected answer see the chosen one.

    The heap is trimmed only under gradient checkpointing, the setting by which a user trades speed for memory:
    every page handed back faults in again in the next phase. With checkpointing, trimming lowered the peak at no
    measurable cost in speed; without it, it cost speed for little or no lower peak (docs/benchmarks.md, History)."""
    return dataclasses.replace(runtime, share_prompt=cfg.trainer.share_prompt and is_varlen(model),
                               trim_heap=checkpoint_every(cfg) > 0)


def checkpoint_every(cfg: Config) -> int:
    """0 without gradient checkpointing; else n: decoder layers 0, n, 2n, ... recompute their forward in backward
    (verl's `enable_gradient_checkpointing` and our `gradient_checkpointing_every`, read here only)."""
    verl_model = cfg.trainer.trainer_config.actor_rollout_ref.model
    return verl_model.gradient_checkpointing_every if verl_model.enable_gradient_checkpointing else 0


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products run at about twice fp32's rate; elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.model_path, trust_remote_code=cfg.model.trust_remote_code,
                                            local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.model_path: cannot load the tokenizer from {cfg.model.model_path}: "
                          f"{one_line(e)}") from None
    if cfg.model.custom_chat_template:
        tok.chat_template = cfg.model.custom_chat_template
    if tok.pad_token_id is None:  # pads are never attended to nor scored; any id will do
        tok.pad_token = tok.eos_token or tok.unk_token or tok.bos_token
    if tok.pad_token_id is None:
        raise ConfigError(f"model.model_path: the tokenizer of {cfg.model.model_path} has no pad, eos, unk or bos "
                          "token to pad with; add a pad_token to its tokenizer_config.json")
    return tok


def load_model(cfg: Config, device: torch.device, path: str | None = None, empty: bool = False,
               bf16: bool = False) -> tuple[torch.nn.Module, torch.dtype]:
    """The model at `path` (default: the policy's) in fp32 on `device`, dropout off; and the dtype its folder stores
    (checkpoints keep it). With `empty`, the policy's skeleton: parameters on the meta device (buffers real), to be
    sharded and then filled from `weights_reader`. `bf16`: the run computes in bf16, so LoRA's frozen base may be
    read in bf16 (`lora.frozen_in_bf16`). The policy's adapters are attached by `policy.build_policy`."""
    vector_math.settle()  # `trinity chat` and `export` start here, not at `pick_runtime`
    policy, path = path is None, path or cfg.model.model_path
    auto, extra = score_head.auto_class(cfg)  # a reward model is read as a sequence classifier
    adapter, path = (path, lora.base_of(path)) if lora.is_adapter(path) else (None, path)
    quantized = policy and cfg.model.lora.rank > 0 and cfg.model.lora.load_in_4bit
    stored = stored_dtype(path)
    bf16_base = policy and lora.frozen_in_bf16(cfg.model.lora, bf16, stored)
    trust = cfg.model.trust_remote_code
    try:
        if empty:
            model = _skeleton(path, trust, auto, extra)
        else:
            # A bf16 base is read as stored: no fp32 copy of the whole model on the host, even for a moment.
            model = auto.from_pretrained(
                path, dtype=torch.bfloat16 if bf16_base else torch.float32, trust_remote_code=trust, use_safetensors=True,
                local_files_only=True, **extra, **(_four_bit(device) if quantized else {}))
            score_head.settle(model, path, cfg.trainer.seed)
    except (OSError, ValueError, SafetensorError, ImportError) as e:  # a cut weight file: safetensors' own error;
        # a quantization method whose package is not installed: ImportError
        raise ConfigError(f"cannot load the model from {path}: {one_line(e)}") from None
    if bf16_base and not empty:
        _fp32_buffers(model, path, trust, auto, extra)
    if adapter is not None:  # `trinity eval` of a LoRA checkpoint: score the merged model
        model = lora.merge_into(model, adapter)
    _disable_dropout(model)
    use_varlen(model)
    _no_hub_kernels(model)
    fused_ops.apply(model)
    every = checkpoint_every(cfg)
    if every:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; 4.x has only the old one
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        _checkpoint_every(model, every)
    model.config.use_cache = False
    return (model if quantized or empty else model.to(device)).train(), stored


def _no_hub_kernels(model: torch.nn.Module) -> None:
    """Turn off transformers' hub kernels (on by default since 5.x when the `kernels` package is installed, which
    transformers requires). With them on, every `train()` and `eval()` re-kernelizes the model: each module of a
    class marked for hub kernels (the RMSNorms) gets its forward set again, which would undo the fused nodes'
    routing at the first mode switch. Off, the marked modules run torch's code, as they do wherever no hub kernel
    can be fetched (an offline node, a CPU)."""
    if getattr(model, "use_kernels", False):
        model.use_kernels = False  # resets every marked module to torch's forward, once, before fused_ops routes


def _fp32_buffers(model: torch.nn.Module, path: str, trust: bool, auto=None, extra=None) -> None:
    """The float buffers of a model read in bf16, as an fp32 read gives them. A model built under bf16 computes its
    non-persistent buffers (Gemma's embedding scale sqrt(hidden), rotary tables) in bf16, which no cast back
    restores: they are taken from an fp32 build on the meta device (parameters empty, buffers real). Buffers
    read from the checkpoint are bf16 values there: cast to fp32, exactly."""
    fresh = dict(_skeleton(path, trust, auto, extra).named_buffers())
    computed = {f"{prefix}.{b}" if prefix else b
                for prefix, module in model.named_modules() for b in module._non_persistent_buffers_set}
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            buffer.data = (fresh[name] if name in computed and name in fresh else buffer).float()


def _skeleton(path: str, trust: bool, auto=None, extra=None) -> torch.nn.Module:
    """The model at `path` built in fp32 with its parameters on the meta device (no memory, no weights read) and
    its buffers real (rotary tables and other buffers computed as an fp32 read computes them)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # `auto`, `extra`: the class and its arguments (a reward model)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust, local_files_only=True, **(extra or {}))
        model = (auto or AutoModelForCausalLM).from_config(config, dtype=torch.float32, trust_remote_code=trust)
    model.tie_weights()  # accelerate's context re-registers parameters, which unties them
    return model


def _checkpoint_every(model: torch.nn.Module, every: int) -> None:
    """Keep checkpointing on in decoder layers 0, n, 2n, ... only. Each layer left out keeps its activations for
    backward instead of recomputing its forward there: about a quarter of its compute, for its activation memory."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if every > 1 and not layers:
        raise ConfigError("gradient_checkpointing_every: this model's layers do not support checkpointing by layer; "
                          "set it to 1")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i % every == 0


def weights_reader(cfg: Config, model: torch.nn.Module) -> Callable[[str, tuple[slice, ...]], torch.Tensor] | None:
    """For a skeleton from `load_model(empty=True)`: a function giving any slice of any parameter's starting value
    in fp32, read from the model folder's safetensors (and the adapter's, or `lora.fresh_value`), so that a process
    touches only its own shard. None, with the reason logged, when some parameter has no stored value of its shape
    under its own name (renamed or converted checkpoints): such a folder is loaded whole by `from_pretrained`."""
    from safetensors import safe_open

    files = _tensor_files(cfg.model.model_path, "model.safetensors")
    if cfg.model.lora.path:
        files.update(_tensor_files(cfg.model.lora.path, "adapter_model.safetensors"))
    sources = {}
    for name, p in model.named_parameters():
        key = lora.adapter_file_key(name) if ".lora_" in name and cfg.model.lora.path else name.replace(
            ".base_layer.", ".")
        key = next((k for k in score_head.file_keys(key) if k in files), key)  # a reward model's head (PEFT's copies)
        if key in files and files[key][1] == list(p.shape):
            sources[name] = (files[key][0], key)
        elif key not in files and score_head.is_head(score_head.file_keys(key)[-1]):
            sources[name] = None  # a new score head: `score_head.fresh_head`
        elif ".lora_" not in name or cfg.model.lora.path:
            log.info("loading %s whole in every process: %s has no stored %s of shape %s", cfg.model.model_path,
                     name, key, list(p.shape))
            return None

    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if sources.get(name, False) is None:
            return score_head.fresh_head(model, cfg.trainer.seed)[index]
        if name not in sources:
            return lora.fresh_value(name, model.get_parameter(name).shape, cfg.trainer.seed)[index]
        file, key = sources[name]
        with safe_open(file, framework="pt") as f:  # opened per weight: only this slice is ever mapped in
            return f.get_slice(key)[index].to(torch.float32)

    return read


def _tensor_files(folder: str, single: str) -> dict[str, tuple[str, list[int]]]:
    """Each tensor name in a folder's safetensors (one file or an index's shards): its file and shape."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    index = Path(folder) / f"{single}.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [single]
    found = {}
    for file in (Path(folder) / n for n in names if (Path(folder) / n).is_file()):
        with safe_open(str(file), framework="pt") as f:
            found.update({key: (str(file), f.get_slice(key).get_shape()) for key in f.keys()})
    return found


def _four_bit(device: torch.device) -> dict:
    """QLoRA's loading arguments: NF4 base weights placed on `device` as they load (a 4-bit model cannot move)."""
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": device}}


def stored_dtype(model_path: str) -> torch.dtype:
    """The dtype the model folder's config.json says its weights are stored in (fp32 where it says none, or where
    there is no readable config.json: loading the model then says what is wrong, in one line)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _disable_dropout(model) -> None:
    # Dropout would make the policy differ from the reference at step 1, and the log-probs noisy.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def round_to_bf16(model: torch.nn.Module) -> int:
    """Under bf16 compute, set each trained fp32 weight that autocast casts to bf16 for its products (matrices and
    biases of linear layers, adapters included) to that bf16 value, in place; a sharded one shard by shard. The
    forward is unchanged to the bit: autocast rounds the same way. The update is what changes: a master weight
    exactly halfway between two bf16 values (8% of a Q4 GGUF de-quantized to fp32) has its products jump a whole
    bf16 step at any update, however small, that points away from the value autocast picked; from its bf16 value
    it moves once the updates add up to half a step, as in a run from a bf16 checkpoint. Left alone: embeddings
    (looked up in fp32), norms, the LM head (fp32 on CPU; tied to the embeddings in many models) and frozen weights
    (no update to amplify). Returns how many values this process changed."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer (addmm)

    heads = (model.get_input_embeddings(), model.get_output_embeddings(), getattr(model, score_head.HEAD, None))
    fp32 = [m for m in heads if m is not None]  # a reward model's score head too: it scores in fp32
    seen = {id(p) for m in fp32 for p in m.parameters()}
    changed = ties = total = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Linear, Conv1D)):
                continue
            for p in module.parameters(recurse=False):
                if id(p) in seen or not p.requires_grad or p.dtype != torch.float32:
                    continue
                seen.add(id(p))
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this process's rows, in place
                rounded = local.to(torch.bfloat16).float()
                changed += int((rounded != local).sum())
                ties += int(((local.view(torch.int32) & 0xFFFF) == 0x8000).sum())
                total += local.numel()
                local.copy_(rounded)
    if changed:
        log.info("bf16 compute: %d of %d trained linear-layer weights were not bf16 values (%d of them exactly "
                 "halfway between two): set to the bf16 values their products use", changed, total, ties)
    return changed
