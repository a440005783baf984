"""A reward model's score head: the sequence-classification model it trains, its new head, and its scores.

A reward model (`algorithm.algorithm_type: reward_model`) is read with `AutoModelForSequenceClassification`
(`num_labels` 1), as TRL's `RewardTrainer` reads it: a causal-LM folder's backbone with a new linear `score` head
(its LM head left unread), or a sequence-classification folder whose head is kept. A new head starts from the
run's seed as transformers starts it (`set_seed(seed)` then `from_pretrained`): the model's own `_init_weights` on
a fresh linear layer, drawn from a generator seeded with the seed alone, so it is the same in every process and
whether the model was read whole or built on the meta device and filled shard by shard.

The score of a sequence is the head applied, in fp32, to the backbone's last hidden state at the sequence's last
token that is not the pad id (`batching._last_kept`: transformers' rule, so the saved model gives the scores training
computed); the LM head never runs. Checkpoints are sequence-classification folders that
`AutoModelForSequenceClassification.from_pretrained` loads, head included; with LoRA the head trains beside the
adapters as PEFT's `modules_to_save` (TRL's advice for reward models), saved in the adapter folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config.schema import Config

log = logging.getLogger(__name__)

HEAD = "score"  # transformers' name of the head of its generic sequence-classification models
SUFFIX = "ForSequenceClassification"


def wanted(cfg: Config) -> bool:
    """Whether the run trains a reward model (a sequence-classification model) rather than a causal LM."""
    return cfg.algorithm.algorithm_type == "reward_model"


def auto_class(cfg: Config):
    """(the transformers auto class that reads the run's model, its extra loading arguments)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return (AutoModelForSequenceClassification, {"num_labels": 1}) if wanted(cfg) else (AutoModelForCausalLM, {})


def is_classifier(model: torch.nn.Module) -> bool:
    """Whether `model` is a sequence-classification model with a score head."""
    return type(model).__name__.endswith(SUFFIX) and hasattr(model, HEAD)


def folder_has_head(path: str | Path) -> bool:
    """Whether the model folder at `path` is a sequence-classification model (its config's architecture): its
    stored head is then the starting one."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(SUFFIX) for a in config.get("architectures") or ())


def folder_is_reward_model(path: str | Path) -> bool:
    """A sequence-classification folder, or a PEFT adapter folder of one (task type SEQ_CLS)."""
    try:
        adapter = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return folder_has_head(path)
    return adapter.get("task_type") == "SEQ_CLS"


def fresh_head(model: torch.nn.Module, seed: int) -> torch.Tensor:
    """A new head's weight [1, hidden]: the model's own initialisation of a linear layer, from `seed` alone."""
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, 1, bias=False, device="cpu")
    with torch.random.fork_rng(devices=[]):  # the run's own random state is left as it was
        torch.manual_seed(seed)
        model._init_weights(head)
    return head.weight.detach().float()


def settle(model: torch.nn.Module, path: str, seed: int) -> None:
    """After `from_pretrained` of a reward model: a causal-LM folder's head (random, from the global generator)
    replaced by `fresh_head`; a sequence-classification folder's kept."""
    if not is_classifier(model) or folder_has_head(path):
        return
    with torch.no_grad():
        getattr(model, HEAD).weight.copy_(fresh_head(model, seed))
    log.info("reward model: a new score head on %s's last hidden state, initialised from seed %d", path, seed)


def match_pad(model: torch.nn.Module, pad_id: int) -> None:
    """The saved model finds each sequence's last token by the pad id (transformers' rule): it must be the
    tokenizer's, which training used (TRL sets it the same way)."""
    if is_classifier(model):
        model.config.get_text_config().pad_token_id = pad_id


def file_keys(name: str) -> list[str]:
    """The names a head parameter `name` may have in a model folder's (or PEFT adapter's) files: PEFT's two copies
    of a `modules_to_save` head (the trained one and the original) both start as the folder's `score.weight`."""
    plain = name.replace(f"{HEAD}.modules_to_save.default.", f"{HEAD}.").replace(f"{HEAD}.original_module.", f"{HEAD}.")
    if plain == name:
        return [name]
    trained = f"{HEAD}.modules_to_save." in name
    return ([f"base_model.model.{plain}"] if trained else []) + [plain]  # a continued adapter's copy first


def is_head(key: str) -> bool:
    return key == f"{HEAD}.weight"


def sequence_scores(model: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 [n_seqs]: the score head on the rows `positions` of the backbone's flat hidden states [T, H]."""
    rows = hidden.index_select(0, positions.to(hidden.device)).float()
    with torch.autocast(hidden.device.type, enabled=False):  # fp32, as the LM head's log-probs
        return getattr(model, HEAD)(rows).squeeze(-1).float()


def language_model_folder(path: str, key: str, command: str) -> str:
    """`model_folder` (adapters allowed) for a command that generates text: a reward model's folder (a score head,
    no LM head) is refused, where loading it as a causal LM would give a freshly random head."""
    from ..errors import ConfigError
    from ..sources.local import model_folder

    folder = model_folder(path, key, adapter_ok=True)
    if folder_is_reward_model(folder):
        raise ConfigError(f"{key}: {folder} is a reward model (a score head, no LM head); {command} needs a causal "
                          "language model")
    return folder
