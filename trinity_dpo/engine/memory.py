"""The memory check before loading: does the run fit on its devices? A run that cannot fit stops in one line,
before minutes of loading, with the settings that would make it fit.

The estimate is a lower bound, so that no run that fits is refused: the model state is exact (fp32 weights, and
for what trains its gradient and AdamW's two moments: 16 bytes a trained parameter, 4 a frozen one; FSDP2 shards
all of it over the processes), activations count only what no implementation avoids (with gradient checkpointing,
each layer's bf16 input for every token of a micro-batch).
"""
from __future__ import annotations

import logging
import math

import torch

from ..config.schema import Config
from ..errors import ConfigError, one_line
from . import score_head
from .lora import frozen_in_bf16
from .modeling import Runtime, checkpoint_every, stored_dtype

log = logging.getLogger(__name__)

GB = 1e9


def check_fits(cfg: Config, runtime: Runtime, world: int, micro_tokens: int) -> None:
    """Raise ConfigError when `cfg`'s model cannot fit on `runtime`'s device (one of `world` processes) with
    `micro_tokens` tokens in a micro-batch (`Schedule.micro_tokens`)."""
    device = runtime.device
    try:
        shape = model_shape(cfg.model.model_path, cfg.model.trust_remote_code, score_head.wanted(cfg))
    except Exception as e:  # an architecture that cannot be built on the meta device: no estimate, no refusal
        log.info("memory check skipped: the model's shape could not be read (%s)", one_line(e))
        return
    lora = cfg.model.lora
    trained = shape["params"] if not lora.rank else lora.rank * shape["linear_in_out"]
    frozen_bytes = 0.0 if not lora.rank else (0.56 if lora.load_in_4bit else 4.0) * shape["params"]
    if frozen_in_bf16(lora, runtime.bf16, stored_dtype(cfg.model.model_path)):
        frozen_bytes -= 2.0 * shape["linear_weights"]  # all linear layers: a lower bound for any target list
    state = (16 * trained + frozen_bytes) / world
    every = checkpoint_every(cfg)
    recomputed = math.ceil(shape["layers"] / every) if every else 0
    per_token = (recomputed * shape["hidden"] + (shape["layers"] - recomputed) * (
        10 * shape["hidden"] + 2 * shape["intermediate"])) * 2
    activations = micro_tokens * per_token
    have = device_bytes(device, cfg.cluster.gpu_per_node)
    need = state + activations
    log.info("memory: about %.1f GB or more per process (model state %.1f GB, activations %.1f GB) of %.1f GB on %s",
             need / GB, state / GB, activations / GB, have / GB, device)
    if need <= have:
        return
    fixes = []
    if state < have:
        fixes.append(f"fewer tokens per micro-batch (now {micro_tokens}: ppo_micro_batch_size_per_gpu, or "
                     "ppo_max_token_len_per_gpu with use_dynamic_bsz)")
        if not every:
            fixes.append("enable_gradient_checkpointing: true")
    gpus = math.ceil(state * world / max(have - activations, 1))
    if gpus > world:
        fixes.append(f"{gpus} or more GPUs (cluster.gpu_per_node, cluster.node_num)")
    if not lora.rank:
        fixes.append("LoRA (model.lora_configs: [{lora_rank: 16}])")
    raise ConfigError(
        f"memory: this run needs at least {need / GB:.1f} GB per process ({state / GB:.1f} GB of weights, gradients "
        f"and AdamW states for {shape['params'] / 1e9:.2f}B parameters over {world} process{'es' * (world > 1)}, "
        f"{activations / GB:.1f} GB of activations for {micro_tokens} tokens a micro-batch) but {device} has "
        f"{have / GB:.1f} GB; it would fit with {' or '.join(fixes)}")


def model_shape(model_path: str, trust_remote_code: bool, reward_model: bool = False) -> dict[str, int]:
    """Parameter count and sizes from the model's config.json, built on the meta device (no memory, no weights
    read), as the run reads it: a reward model as a sequence classifier (a one-output score head, not the LM
    head's vocabulary x hidden); `linear_in_out` sums in + out features, `linear_weights` in x out, over the linear
    layers LoRA's all-linear adapts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, local_files_only=True)
    auto, extra = (AutoModelForSequenceClassification, {"num_labels": 1}) if reward_model else (AutoModelForCausalLM, {})
    for key, value in extra.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", 0)
    return {"params": sum(p.numel() for p in model.parameters()), "hidden": hidden,
            "linear_in_out": sum(m.in_features + m.out_features for m in linears),
            "linear_weights": sum(m.in_features * m.out_features for m in linears),
            "layers": getattr(text, "num_hidden_layers", 0),
            "intermediate": getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden}


def device_bytes(device: torch.device, processes_per_host: int) -> float:
    """Memory one process may use: its GPU's, or its share of the host's available memory on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf")  # not Linux: no figure to check against
    return available / max(1, processes_per_host)
