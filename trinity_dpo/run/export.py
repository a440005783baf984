"""`trinity export`: a checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile.

    trinity export --model RUN/global_step_N --gguf out/model.gguf [--type f32|f16|bf16|q8_0]

The checkpoint is read like `trinity chat --model` reads it (a LoRA adapter merged into its base in memory, a
run's merged/ folder as it is), in fp32, and written the way llama.cpp's `convert_hf_to_gguf.py` writes the same
model: its tensor names, Llama's rotary permutation of the query and key rows, the embedding alone when the
output head is tied to it, norms and biases in f32 whatever the type, Q8_0 blocks of 32 along each row (a row
of another length falls back to f16, as there). The tokenizer and the chat template go in as metadata
(`gguf_vocab.py`); the Modelfile beside the file (`modelfile.py`).

Tensors are converted and written one at a time, so beyond the model itself only one tensor's copy is in memory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import gguf_vocab, modelfile

ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # model_type -> gguf.MODEL_ARCH member
SUPPORTED = "llama (Llama, SmolLM2) and qwen2 (Qwen2, Qwen2.5)"
TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Shape:
    """The numbers of a checkpoint's config that the GGUF states, checked to be ones llama.cpp reads the same."""

    arch: str
    n_vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float


def export(model: str, gguf_file: str, out_type: str = "f16") -> str:
    """Write `gguf_file` and its Modelfile from the checkpoint `model`; a line saying what was written."""
    import torch

    from ..config.schema import Config
    from ..engine.lora import base_of
    from ..engine.modeling import load_model
    from ..engine.score_head import language_model_folder
    from ..sources.local import is_adapter

    if out_type not in TYPES:
        raise ConfigError(f"--type: {out_type!r} is not one of {', '.join(TYPES)}")
    target = _target(gguf_file)
    folder = language_model_folder(model, "--model", "trinity export")
    base = base_of(folder) if is_adapter(folder) else folder
    shape = shape_of(base)
    tokenizer = _tokenizer(folder, base)
    vocab = gguf_vocab.vocab_of(tokenizer, shape.n_vocab, "--model")  # all checks before the weights are read
    cfg = Config()
    cfg.model.model_path = folder
    net, _ = load_model(cfg, torch.device("cpu"), folder)
    with torch.no_grad():
        _write_gguf(target, net, shape, vocab, out_type, Path(folder).name)
    recognised = modelfile.recognise(tokenizer)
    written = modelfile.write(target, tokenizer, recognised)
    size = target.stat().st_size / 2**20
    template = (f"{recognised.form.name} template" if recognised
                else "no TEMPLATE: the chat template is not one it translates")
    return f"wrote {target} ({out_type}, {size:.1f} MiB) and {written} ({template})"


def shape_of(folder: str) -> Shape:
    """The checkpoint's config as the GGUF will state it; one line for a model this export does not write."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot read the config of {folder}: {str(e).splitlines()[0]}") from None
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ConfigError(f"--model: {folder} is a {kind} model; export writes {SUPPORTED}")
    _refuse_unmapped(config, kind, folder)
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return Shape(arch=kind, n_vocab=config.vocab_size, hidden=config.hidden_size, ffn=config.intermediate_size,
                 layers=config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 context=config.max_position_embeddings,
                 rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
                 rms_eps=float(config.rms_norm_eps))


def _refuse_unmapped(config, kind: str, folder: str) -> None:
    """Settings that change the computation in ways the GGUF would not state (or that transformers' reader would
    drop): refused, so a file that loads is a file that computes what the checkpoint does."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    problems = [f"rope scaling {rope_type!r}"] if rope_type != "default" else []
    if kind == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        problems.append("attention or MLP biases")
    if kind == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if kind == "qwen2" and head_dim * heads != config.hidden_size:  # the reader computes it from those two
        problems.append("a head size other than hidden_size / heads")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if problems:
        raise ConfigError(f"--model: {folder} has {', '.join(problems)}, which this export does not write")


def _target(gguf_file: str) -> Path:
    """The GGUF's path, checked before anything is read: a file name ending in .gguf, in a folder that exists (or
    can be made) and takes files, with no folder where its Modelfile goes."""
    target = Path(gguf_file)
    if target.suffix != ".gguf" or target.is_dir():
        raise ConfigError(f"--gguf: {gguf_file} is not a file name ending in .gguf")
    if target.with_suffix(".Modelfile").is_dir():
        raise ConfigError(f"--gguf: {target.with_suffix('.Modelfile')} is a folder; the Modelfile is written there")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.with_name(f".{target.name}.probe{os.getpid()}")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--gguf: cannot write into {target.parent} ({e.strerror or e})") from None
    return target


def _tokenizer(folder: str, base: str):
    """The checkpoint's tokenizer: beside an adapter when saved there (a run's checkpoints), else its base's."""
    from transformers import AutoTokenizer

    tokens = folder if (Path(folder) / "tokenizer_config.json").is_file() else base
    try:
        return AutoTokenizer.from_pretrained(tokens, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot load the tokenizer from {tokens}: {str(e).splitlines()[0]}") from None


def _write_gguf(target: Path, net, shape: Shape, vocab: gguf_vocab.Vocab, out_type: str, name: str) -> None:
    """Metadata, then each tensor converted and written in turn, into a temporary file renamed into place (an
    interrupted export leaves no half-written .gguf)."""
    import gguf

    plan = list(_tensors(net, shape, out_type))
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[shape.arch])])
    try:
        _add_metadata(writer, shape, out_type, name)
        gguf_vocab.add_to(writer, vocab)
        for gguf_name, tensor, qtype in plan:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), qtype)
            writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32), math.prod(byte_shape),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor, qtype in plan:
            writer.write_tensor_data(gguf.quants.quantize(tensor.float().contiguous().numpy(), qtype))
        writer.close()
        os.replace(tmp, target)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def _add_metadata(writer, shape: Shape, out_type: str, name: str) -> None:
    """The keys llama.cpp's converter writes for these architectures (and transformers' reader maps back)."""
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # transformers reads Llama's head size from the rotary dimension; llama.cpp reads the key and value lengths
    for key, value in (("context_length", shape.context), ("embedding_length", shape.hidden),
                       ("feed_forward_length", shape.ffn), ("block_count", shape.layers), ("head_count", shape.heads),
                       ("head_count_kv", shape.kv_heads), ("rope_freq_base", shape.rope_theta),
                       ("layer_norm_rms_eps", shape.rms_eps), ("vocab_size", shape.n_vocab),
                       ("rope_dimension_count", shape.head_dim), ("key_length", shape.head_dim),
                       ("value_length", shape.head_dim)):
        getattr(writer, f"add_{key}")(value)


def _tensors(net, shape: Shape, out_type: str):
    """(GGUF name, tensor as written, its GGML type) for every parameter of `net`, in order."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[shape.arch]), shape.layers)
    # named_parameters lists a tied output head once, under the embedding: llama.cpp reads an absent output.weight
    # as tied, and so does transformers' reader
    for hf_name, param in net.named_parameters():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"--model: the weight {hf_name} has no GGUF name for {shape.arch}; export cannot "
                              "write this checkpoint")
        tensor = param.detach()
        if shape.arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _rotary_rows(tensor, shape.heads if "q_proj" in hf_name else shape.kv_heads)
        yield gguf_name, tensor, _ggml_type(gguf_name, tensor, out_type)


def _rotary_rows(weight, heads: int):
    """Llama's query/key rows reordered for llama.cpp's rotary embedding: HF rotates the two halves of each head
    against each other, GGML rotates adjacent pairs, so each head's rows go from (half, pair) order to
    (pair, half) order. transformers' reader applies the inverse."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _ggml_type(gguf_name: str, tensor, out_type: str):
    import gguf

    kinds = gguf.GGMLQuantizationType
    if out_type == "f32" or tensor.dim() < 2:  # norms and biases: f32 in every file type, as llama.cpp keeps them
        return kinds.F32
    wanted = {"f16": kinds.F16, "bf16": kinds.BF16, "q8_0": kinds.Q8_0}[out_type]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if tensor.shape[-1] % block == 0 else kinds.F16
