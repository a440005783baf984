"""LoRA adapters (PEFT) on the policy: attached at load, the reference they start from, their files in a checkpoint
and the merged model.

The Hugging Face model stays the model every other module sees: PEFT replaces the targeted layers inside it, so
scoring, FSDP2, generation and the optimizer (trainable parameters only) need no LoRA branch. The PeftModel
wrapper is kept on the side, only to write PEFT's own files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from . import lora_linear, score_head
from ..config.schema import LoraConfig
from ..errors import ConfigError, one_line
from ..sources.local import ADAPTER_CONFIG, is_adapter  # noqa: F401  (lora.is_adapter: one definition)

log = logging.getLogger(__name__)

_WRAPPER = "_trinity_peft"  # set with object.__setattr__: a plain attribute, not a submodule (no second state dict)
MERGED = "merged"


def attach(model: torch.nn.Module, lora: LoraConfig, base_path: str, seed: int) -> torch.nn.Module:
    """Put adapters on `model` in place (a fresh one as `lora` says, or the one at `lora.path` to continue) and
    freeze every other weight. A fresh adapter starts at `fresh_value`. On a model built on the meta device only the
    structure is made: its values are read later, shard by shard (`modeling.weights_reader`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftConfig, PeftModel, get_peft_model

    empty = any(p.is_meta for p in model.parameters())
    if lora.path and not empty:
        wrapper = PeftModel.from_pretrained(model, lora.path, is_trainable=True)
    else:
        if lora.path:
            config = PeftConfig.from_pretrained(lora.path)
            config.inference_mode = False
        else:
            config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                    exclude_modules=lora.exclude_modules, lora_dropout=lora.dropout, bias="none",
                                    # A reward model: PEFT then trains (and saves) its score head beside the adapters
                                    task_type="SEQ_CLS" if score_head.is_classifier(model) else "CAUSAL_LM",
                                    modules_to_save=[score_head.HEAD] if score_head.is_classifier(model) else None)
        try:
            wrapper = get_peft_model(model, config)
        except ValueError as e:  # target modules that match nothing, or layers PEFT cannot adapt
            raise ConfigError(f"model.lora.target_modules: {one_line(e)}") from None
    if lora.path:
        c = wrapper.peft_config["default"]
        log.info("LoRA: continuing the adapter %s (rank %d, alpha %s, targets %s); its own settings apply",
                 lora.path, c.r, c.lora_alpha, sorted(c.target_modules) if c.target_modules else "?")
    elif not empty:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and ".lora_" in name:  # a reward model's head keeps its value (PEFT copied it)
                    p.copy_(fresh_value(name, p.shape, seed))
    wrapper.peft_config["default"].base_model_name_or_path = base_path
    lora_linear.fuse(model)
    object.__setattr__(model, _WRAPPER, wrapper)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %.2fM trainable parameters of %.1fM", trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def frozen_in_bf16(lora: LoraConfig, bf16: bool, stored: torch.dtype) -> bool:
    """Whether the adapted layers' frozen base weights are kept in bf16 rather than fp32: under bf16 compute, for a
    checkpoint stored in bf16. Every product autocasts them to bf16 anyway, and a bf16 file's values are exactly
    bf16, so the numbers (and a merged model, formed in fp32) are the same, for half their memory. QLoRA keeps its
    own 4-bit base."""
    return lora.rank > 0 and bf16 and stored == torch.bfloat16 and not lora.load_in_4bit


def base_in_bf16(model: torch.nn.Module) -> int:
    """The base weight (and bias) of every adapted linear layer in bf16, every other parameter (adapters,
    embeddings, norms, LM head) in fp32, in place: from a model read in either dtype, also on the meta device
    (before `distributed.fill` reads the values in). The residual stream and the head's log-softmax stay fp32.
    Returns how many layers."""
    from peft.tuners.lora.layer import Linear

    base = set()
    for module in model.modules():
        if type(module) is Linear:
            base.update(id(p) for p in module.base_layer.parameters(recurse=False))
    for p in model.parameters():
        dtype = torch.bfloat16 if id(p) in base else torch.float32
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return sum(type(m) is Linear for m in model.modules())


def fresh_value(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A new adapter weight's starting value, the same in every process and however the model was built: PEFT's
    initialisation (A uniform in +-1/sqrt(fan_in), PEFT's kaiming-uniform with a = sqrt(5); B zero; for embeddings
    A zero and B standard normal), drawn from a generator seeded by the run's seed and the weight's name, not from
    the global one (a model built on the meta device draws nothing there)."""
    value = torch.zeros(shape)
    if ".lora_B." in name or name.endswith(".lora_embedding_A.default"):
        return value
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=7).digest()))
    if ".lora_A." in name:
        bound = 1.0 / shape[1] ** 0.5
        return value.uniform_(-bound, bound, generator=g)
    if name.endswith(".lora_embedding_B.default"):
        return value.normal_(generator=g)
    raise ValueError(f"{name}: not a LoRA weight this tool initialises")


def adapter_file_key(name: str) -> str:
    """The name PEFT's adapter_model.safetensors gives the model's parameter `name` (no adapter name)."""
    return "base_model.model." + re.sub(r"\.default(?=\.|$)", "", name)


def enabled(model: torch.nn.Module) -> bool:
    return hasattr(model, _WRAPPER)


def reference(model: torch.nn.Module, lora: LoraConfig) -> contextlib.AbstractContextManager:
    """Where the reference pass runs. A fresh adapter starts as zero (PEFT's B = 0), so the reference is the base
    with adapters switched off: the same numbers without the adapters' work. A continued adapter is part of the
    starting policy, which is the reference (as TRL does with a copy of it)."""
    if not enabled(model) or lora.path:
        return contextlib.nullcontext()
    return getattr(model, _WRAPPER).disable_adapter()


def initial_digest(model: torch.nn.Module) -> str:
    """A digest of the adapter's initial weights ('' without LoRA), for the reference cache's fingerprint."""
    if not enabled(model):
        return ""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if p.requires_grad:  # a sharded weight is gathered: a collective every process makes, in the same order
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            h.update(name.encode())
            h.update(full.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model: torch.nn.Module, folder: Path, trainable: dict[str, torch.Tensor]) -> None:
    """PEFT's layout in `folder` (adapter_config.json, adapter_model.safetensors), from the trainable weights'
    full state dict (`distributed.full_state_dict(..., trainable_only=True)`)."""
    wrapper = getattr(model, _WRAPPER)
    prefixed = {f"base_model.model.{k}": v for k, v in trainable.items()}
    wrapper.save_pretrained(folder, state_dict=prefixed, save_embedding_layers=False, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub


def merged_weights(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's weights from the LoRA model's full state dict: W + scaling * B @ A for every adapted layer,
    in fp32, under the base layer's own names."""
    from peft.tuners.lora import LoraLayer

    merged = {k: v for k, v in full.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.scaling:
            continue
        key = f"{name}.base_layer.weight"
        variant = getattr(module, "lora_variant", {}).get("default")
        if variant is not None:  # DoRA and the like rescale by learned magnitudes: W + s B A is not their model
            log.warning("model.lora.save_merged: the adapter of %s is a %s adapter, whose merge this tool does not "
                        "compute: no merged/ model is written (merge the saved adapter with PEFT's "
                        "merge_and_unload)", name, type(variant).__name__)
            return None
        if f"{name}.lora_A.default.weight" in full:
            delta = full[f"{name}.lora_B.default.weight"].float() @ full[f"{name}.lora_A.default.weight"].float()
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
        elif f"{name}.lora_embedding_A.default" in full:
            delta = (full[f"{name}.lora_embedding_B.default"].float() @ full[f"{name}.lora_embedding_A.default"].float()).T
        else:
            raise ConfigError(f"model.lora.save_merged: cannot merge the adapter of {name} "
                              f"({type(module).__name__}); set save_merged: never")
        merged[key] = full[key].float() + delta * module.scaling["default"]
        bias = full.get(f"{name}.lora_B.default.bias")  # PEFT's lora_bias: the adapter's output bias, scaled too
        if bias is not None:
            base_bias = f"{name}.base_layer.bias"
            merged[base_bias] = (full[base_bias].float() if base_bias in full else 0) + bias.float() * module.scaling[
                "default"]
    # PEFT's `modules_to_save` (a reward model's head): the trained copy under the module's own name
    merged = {k.replace(".modules_to_save.default.", "."): v for k, v in merged.items() if ".original_module." not in k}
    return {k.replace(".base_layer.", "."): v for k, v in merged.items()}


def wants_merged(lora: LoraConfig, step: int, total: int) -> bool:
    return lora.rank > 0 and (lora.save_merged == "every" or (lora.save_merged == "final" and step == total))


def base_of(adapter: str | Path) -> str:
    """The base model folder an adapter folder names (`base_model_name_or_path`)."""
    base = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"{adapter}: a LoRA adapter whose base model {base!r} is not a local model folder; give "
                          "the checkpoint's merged/ folder instead")
    return base


def merge_into(model: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """`model` (the adapter's base) with the adapter at `adapter` merged in: a plain model for scoring."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
