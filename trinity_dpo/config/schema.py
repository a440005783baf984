"""The one typed schema of a run: every setting, its default and a line of doc.

Two files fill it: the Trinity-RFT style `dpo.yaml` (the sections below `Config`) and the verl style trainer
file named by `trainer.trainer_config_path`, which lands in `trainer.trainer_config` (`VerlConfig`). Several
settings have more than one spelling (the document's, newer Trinity's, verl's); `ALIASES` lists them and
`loader.resolve` folds each group into its canonical field, refusing two spellings that disagree.
Sections and keys that verl or Trinity accept but that do not apply to offline DPO are listed in each class's
`IGNORED` and logged once, never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from .verl import OptimizerConfig, VerlConfig  # noqa: F401  (part of the schema)


# --------------------------------------------------------------------------- algorithm


@dataclass
class LossArgs:
    """`algorithm.policy_loss_fn_args`."""

    beta: float = 0.1  # DPO beta (KL strength); CPO/SimPO's temperature; ORPO's lambda (weight of the odds term)
    label_smoothing: float = 0.0  # assumed share of flipped labels (sigmoid: conservative DPO, robust, exo_pair, aot)
    loss_type: Union[list[str], str] = "sigmoid"  # TRL's loss type, or a list of them summed with loss_weights (MPO)
    loss_weights: Optional[list[float]] = None  # one weight per loss_type (default: 1 each)
    ld_alpha: Optional[float] = None  # LD-DPO: weight in [0, 1] of response tokens past the shorter one's length
    use_weighting: bool = False  # WPO: weigh each pair by its responses' probability under the current policy
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"  # f-DPO
    f_alpha_divergence_coef: float = 0.5  # alpha of the alpha-divergence
    discopop_tau: float = 0.05  # DiscoPOP's temperature
    gamma: float = 0.5  # SimPO's target reward margin
    simpo_gamma: Optional[float] = None  # TRL's spelling of gamma
    cpo_alpha: Optional[float] = None  # weight of CPO's chosen-NLL term (default: 1 for cpo, 0 for simpo)
    desirable_weight: float = 1.0  # KTO: weight of each desirable example's loss
    undesirable_weight: float = 1.0  # KTO: weight of each undesirable example's loss
    center_rewards_coefficient: Optional[float] = None  # reward_model: weight of mean((r_chosen + r_rejected)^2)


@dataclass
class KlLossArgs:
    """`algorithm.kl_loss_fn_args`: Trinity 0.2+ adds kl_coef x a per-token KL to the DPO loss (not DPO's beta)."""

    kl_coef: Optional[float] = None  # weight of that KL term; unset: 0.001 where the term is on (Trinity's default)

    IGNORED: ClassVar[tuple[str, ...]] = ("adaptive", "target_kl", "horizon")  # Trinity adapts only a reward penalty


@dataclass
class EntropyLossArgs:
    """`algorithm.entropy_loss_fn_args`."""

    entropy_coef: Optional[float] = None  # the loss subtracts entropy_coef x the responses' aggregated entropy; unset: 0


@dataclass
class AlgorithmConfig:
    """`algorithm`."""

    algorithm_type: Literal["dpo", "sft", "reward_model", "kto"] = "dpo"  # on pairs, conversations, pairs, completions
    policy_loss_fn: Literal["dpo", "simpo", "cpo", "orpo", "sft", "reward_model", "kto"] = "dpo"  # the objective
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"  # SFT's NLL, KL, entropy
    use_token_level_loss: Optional[bool] = None  # older Trinity spelling: true is token-mean, false seq-mean-token-mean
    policy_loss_fn_args: LossArgs = field(default_factory=LossArgs)  # loss hyper-parameters
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW and schedule
    kl_loss_fn: Optional[Literal["none", "k1", "k2", "k3", "low_var_kl", "abs", "corrected_k3"]] = None  # KL term; unset: by the config's Trinity version
    kl_loss_fn_args: KlLossArgs = field(default_factory=KlLossArgs)  # its weight
    entropy_loss_fn: Optional[Literal["default", "none"]] = None  # Trinity's entropy term; its weight below
    entropy_loss_fn_args: EntropyLossArgs = field(default_factory=EntropyLossArgs)  # its weight

    IGNORED: ClassVar[tuple[str, ...]] = (
        "repeat_times", "advantage_fn", "advantage_fn_args", "kl_penalty_fn", "kl_penalty_fn_args",
        "sample_strategy", "sample_strategy_args", "add_strategy",
    )


# --------------------------------------------------------------------------- model, cluster


@dataclass
class LoraConfig:
    """`model.lora`: train low-rank adapters (PEFT's LoRA) instead of every weight. `model.lora_configs[0]`
    (Trinity) and verl's `actor_rollout_ref.model.lora_*` keys are other spellings of these fields."""

    rank: int = 0  # adapter rank; 0: no LoRA (every weight trains)
    alpha: Optional[float] = None  # scale alpha / rank; None: the default of the spelling used (Trinity 32, verl 16)
    target_modules: Union[list[str], str] = "all-linear"  # modules that get adapters: 'all-linear' or names
    exclude_modules: Optional[Union[list[str], str]] = None  # modules never adapted (names or a regex)
    path: Optional[str] = None  # a PEFT adapter folder to continue training (it is also the reference then)
    dropout: float = 0.0  # dropout on the adapters' input (non-zero: step 1 is no longer exactly ln 2)
    save_merged: Literal["final", "every", "never"] = "final"  # also write <checkpoint>/merged, a plain HF model
    load_in_4bit: bool = False  # QLoRA: base weights in 4-bit NF4 (bitsandbytes, CUDA only)


@dataclass
class TrinityLora:
    """One entry of Trinity's `model.lora_configs`."""

    lora_rank: int = 32  # spelling of lora.rank (Trinity's default 32)
    lora_alpha: float = 32  # spelling of lora.alpha (Trinity's default 32)
    target_modules: Union[list[str], str] = "all-linear"  # spelling of lora.target_modules
    exclude_modules: Optional[Union[list[str], str]] = None  # spelling of lora.exclude_modules
    path: Optional[str] = None  # spelling of lora.path

    IGNORED: ClassVar[tuple[str, ...]] = ("name", "base_model_name", "lora_dtype", "is_dummy")  # vLLM rollout only


@dataclass
class ModelConfig:
    """`model`."""

    model_path: str = ""  # local Hugging Face model folder (required)
    custom_chat_template: Optional[str] = None  # Jinja chat template that replaces the tokenizer's
    chat_template_path: Optional[str] = None  # a Jinja file read as custom_chat_template when that is not given
    max_prompt_tokens: Optional[int] = None  # longer prompts keep their end; None: no cut (Trinity's DPO reader)
    max_response_tokens: Optional[int] = None  # longer responses are cut at their end; None: no cut
    max_model_len: Optional[int] = None  # cap on prompt + response tokens; the response is cut to fit
    trust_remote_code: bool = False  # run model code shipped inside the model folder (off: safety)
    enable_thinking: Optional[bool] = None  # handed to the chat template (Qwen3's thinking switch) for SFT rows
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (Trinity's lora_configs and verl's keys fold here)
    lora_configs: Optional[list[TrinityLora]] = None  # Trinity's spelling of `lora`: one adapter at most

    IGNORED: ClassVar[tuple[str, ...]] = ("critic_model_path", "min_response_tokens", "temperature", "top_p", "top_k",
                                          "logprobs", "enable_prompt_truncation",
                                          "repetition_penalty", "fully_sharded_loras",
                                          "max_cpu_loras", "tinker")


@dataclass
class ClusterConfig:
    """`cluster`."""

    node_num: int = 1  # nodes (more than one: start each with torchrun, see docs/gpus_and_nodes.md)
    gpu_per_node: int = 1  # worker processes per node: one per GPU, or CPU processes where the device is cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda where available, else cpu


# --------------------------------------------------------------------------- buffer (data)


@dataclass
class FormatConfig:
    """`buffer.trainer_input.experience_buffer.format`."""

    prompt_type: Literal["plaintext", "messages", "chatpair"] = "plaintext"  # how rows hold the prompt
    prompt_key: str = "prompt"  # column with the prompt (text or messages)
    chosen_key: str = "chosen"  # column with the preferred response (or whole conversation, chatpair)
    rejected_key: str = "rejected"  # column with the dispreferred response (or conversation)
    system_prompt: Optional[str] = None  # system message put before every prompt
    system_prompt_key: Optional[str] = None  # column holding a per-row system message
    messages_key: Optional[str] = None  # Trinity spelling of the prompt column for prompt_type messages
    chat_template: Optional[str] = None  # Trinity spelling of model.custom_chat_template
    response_key: str = "response"  # SFT plaintext: column with the assistant's answer
    tools_key: str = "tools"  # SFT: column with tool definitions handed to the chat template
    completion_key: str = "completion"  # KTO: column with the completion (text, a message or messages)
    label_key: str = "label"  # KTO: column with the completion's label (true: desirable)
    enable_concatenated_multi_turn: bool = False  # SFT: train every assistant turn (off: the last message only)
    enable_thinking: Optional[bool] = None  # handed to the chat template for every row and answered prompt; default model.enable_thinking

    image_key: Optional[str] = None  # multimodal rows: not supported (refused)
    video_key: Optional[str] = None  # multimodal rows: not supported (refused)

    # reply_prefix: Trinity's explorer workflows put it before generation; its SFT/DPO formatters never read it.
    IGNORED: ClassVar[tuple[str, ...]] = ("reward_fn_key", "workflow_key", "reply_prefix")


@dataclass
class StorageConfig:
    """`buffer.trainer_input.experience_buffer`."""

    name: str = "dpo_buffer"  # a label for logs
    storage_type: Literal["file"] = "file"  # offline DPO reads a local file or folder
    path: str = ""  # .json / .jsonl / .parquet file, or a Hugging Face dataset folder (required)
    split: str = "train"  # split of a dataset folder
    subset_name: Optional[str] = None  # config name of a dataset folder with several
    format: FormatConfig = field(default_factory=FormatConfig)  # columns and prompt layout
    on_bad_row: Literal["skip", "error"] = "skip"  # bad rows are counted and skipped, or stop the run

    IGNORED: ClassVar[tuple[str, ...]] = ("schema_type", "max_read_timeout", "use_priority_queue", "enable_progress_bar",
                                          "capacity", "max_retry_times", "max_retry_interval", "index", "kwargs")


@dataclass
class TrainerInputConfig:
    """`buffer.trainer_input`."""

    experience_buffer: StorageConfig = field(default_factory=StorageConfig)  # the preference data
    eval_buffer: StorageConfig = field(  # held-out pairs (path "" = none); format: experience_buffer's, field by field, where not given
        default_factory=lambda: StorageConfig(name="eval_buffer", split="test"))
    eval_fraction: float = 0.0  # without an eval_buffer path: this fraction of the data is held out (by seed)

    IGNORED: ClassVar[tuple[str, ...]] = ("sft_warmup_dataset", "sft_warmup_steps", "auxiliary_buffers")


@dataclass
class BufferConfig:
    """`buffer`."""

    total_epochs: int = 1  # passes over the data (unless a total step count is set)
    train_batch_size: int = 64  # pairs per optimizer step, over all processes
    batch_size: Optional[int] = None  # the document's spelling of train_batch_size
    total_steps: Optional[int] = None  # optimizer steps in place of total_epochs (the data repeats as needed)
    trainer_input: TrainerInputConfig = field(default_factory=TrainerInputConfig)  # data for the trainer
    tokenize_workers: int = 0  # processes that tokenize the data, once per node (0: every core of the node)
    token_cache_dir: Optional[str] = None  # where tokenized data is kept for every run on it (default: cache/tokens)

    IGNORED: ClassVar[tuple[str, ...]] = ("explorer_input", "max_retry_times", "max_retry_interval", "tokenizer_path")


# --------------------------------------------------------------------------- trainer, top level


@dataclass
class TrainerConfig:
    """`trainer`."""

    trainer_type: Literal["verl"] = "verl"  # Trinity key; this tool runs its own trainer with verl's settings
    trainer_config_path: Optional[str] = None  # verl-style trainer file (relative to cwd, else to the config)
    trainer_config: VerlConfig = field(default_factory=VerlConfig)  # the trainer file's content, or inline
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    actor_use_kl_loss: Optional[bool] = None  # the document's flag that goes with actor_kl_loss_coef
    actor_kl_loss_coef: Optional[float] = None  # the document's spelling of the DPO beta
    total_steps: Optional[int] = None  # stop after at most this many optimizer steps (Trinity's cap on the loop)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    actor_grad_clip: Optional[float] = None  # older Trinity spelling of grad_clip (wins over the trainer file's)
    resume_mode: Literal["auto", "disable", "resume_path"] = "auto"  # auto: continue from the newest checkpoint
    resume_from_path: Optional[str] = None  # resume from this checkpoint folder (global_step_<N>)
    max_checkpoints_to_keep: Optional[int] = None  # keep the newest N checkpoints (never the one resumed from); 0: all
    save_hf_checkpoint: Literal["always", "last", "never"] = "always"  # which checkpoints hold the Hugging Face
    # weights: every one, the run's last (at its final step or when stopped; Trinity's default), or none (resuming
    # reads trainer_state/ alone)
    max_actor_ckpt_to_keep: Optional[int] = None  # Trinity spelling of max_checkpoints_to_keep
    max_consecutive_skips: int = 5  # abort after this many optimizer steps in a row with a non-finite loss or norm
    seed: int = 42  # seeds shuffling and any random init
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the device has fast bf16
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # HF checkpoint weights; auto: those the run computes with
    share_prompt: bool = True  # compute each pair's prompt once for chosen and rejected (models on SDPA attention)
    log_interval: int = 10  # steps between plain log lines when output is not a terminal
    eval_interval: int = 0  # steps between held-out evaluations (also before training and at the end); 0: only those
    eval_samples: int = 3  # held-out prompts answered greedily before and after training (0: none)
    eval_max_new_tokens: int = 96  # longest greedy answer for those prompts
    use_dynamic_bsz: Optional[bool] = None  # Trinity spelling of the actor's use_dynamic_bsz
    ppo_max_token_len_per_gpu: Optional[int] = None  # Trinity spelling of the actor's token budget
    max_token_len_per_gpu: Optional[int] = None  # newer Trinity spelling of the same budget
    ulysses_sequence_parallel_size: int = 1  # Ulysses sequence parallelism: only 1 (a sequence stays on one process)
    trainer_strategy: Literal["fsdp", "fsdp2", "megatron"] = "fsdp2"  # fsdp and fsdp2 are FSDP2 here; megatron refused

    IGNORED: ClassVar[tuple[str, ...]] = (
        "sft_warmup_steps", "enable_preview", "max_critic_ckpt_to_keep", "save_strategy", "name", "algorithm_type",
        "fix_actor_microbatch_loss_scale",
    )


@dataclass
class MonitorConfig:
    """`monitor` (Trinity); verl's `trainer.logger` list adds to it."""

    monitor_type: Optional[Literal["console", "tensorboard", "wandb", "mlflow", "swanlab"]] = None  # an extra
    # metrics sink; mlflow and swanlab (Trinity's other two) are refused

    IGNORED: ClassVar[tuple[str, ...]] = ("monitor_args", "enable_ray_timeline", "project", "name")


@dataclass
class Config:
    """A whole run: the Trinity-RFT `dpo.yaml`."""

    project: str = "trinity-dpo"  # run folder is <checkpoint_root_dir>/<project>/<name>
    name: str = "dpo"  # experiment name
    mode: Literal["train"] = "train"  # offline DPO has no explorer: only `train`
    checkpoint_root_dir: str = "./checkpoints"  # where run folders live
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # loss and optimizer
    model: ModelConfig = field(default_factory=ModelConfig)  # model and lengths
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # processes and device
    buffer: BufferConfig = field(default_factory=BufferConfig)  # data and batch size
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # loop, checkpoints, verl settings
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # where metrics go besides metrics.jsonl
    continue_from_checkpoint: Optional[bool] = None  # Trinity's switch: false is trainer.resume_mode: disable
    # `stages:` (several runs in one config) is read by config/stages.py, never into one Config.

    IGNORED: ClassVar[tuple[str, ...]] = ("explorer", "synchronizer", "data_processor", "service", "log",
                                          "ray_namespace", "group")


# Canonical field <- its spellings, in tiers: the first tier with a value wins (a lower tier's different value is
# logged as overridden, following Trinity's precedence), and two different values within a tier are an error.
_VERL = "trainer.trainer_config."
_ACTOR = _VERL + "actor_rollout_ref.actor."
_OPTIM_KEYS = ("lr", "lr_warmup_steps", "lr_warmup_steps_ratio", "min_lr_ratio", "num_cycles", "betas", "eps",
               "weight_decay", "override_optimizer_config")
ALIASES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("buffer.train_batch_size", (("buffer.train_batch_size", "buffer.batch_size"),)),
    ("algorithm.policy_loss_fn_args.gamma", (("algorithm.policy_loss_fn_args.gamma",
                                              "algorithm.policy_loss_fn_args.simpo_gamma"),)),
    # Trinity 0.1 copied dpo.yaml's actor_kl_loss_coef over the trainer file's kl_loss_coef; 0.2+ took the beta
    # from policy_loss_fn_args and no longer read the trainer file's.
    ("algorithm.policy_loss_fn_args.beta", (("algorithm.policy_loss_fn_args.beta", "trainer.actor_kl_loss_coef"),
                                            (_ACTOR + "kl_loss_coef",))),
    # Trinity 0.1-0.3 copied actor_grad_clip over the trainer file's grad_clip; later ones keep the trainer file's
    # grad_clip, and fall back to trainer.grad_clip. verl's FSDP actor clips by actor.grad_clip; optim.clip_grad
    # (its Megatron and newer engines' spelling, which Trinity's trainer files carry too) is taken below it.
    ("trainer.grad_clip", (("trainer.actor_grad_clip",), (_ACTOR + "grad_clip",), (_ACTOR + "optim.clip_grad",),
                           ("trainer.grad_clip", "algorithm.optimizer.clip_grad"))),
    # Trinity copies these trainer-level settings onto the actor only where the trainer file leaves them unset.
    (_ACTOR + "use_dynamic_bsz", ((_ACTOR + "use_dynamic_bsz",), ("trainer.use_dynamic_bsz",))),
    (_ACTOR + "ppo_max_token_len_per_gpu", ((_ACTOR + "ppo_max_token_len_per_gpu",),
                                            ("trainer.max_token_len_per_gpu", "trainer.ppo_max_token_len_per_gpu"))),
    ("trainer.ulysses_sequence_parallel_size", ((_ACTOR + "ulysses_sequence_parallel_size",),
                                                ("trainer.ulysses_sequence_parallel_size",))),
    ("trainer.trainer_strategy", ((_ACTOR + "strategy",), ("trainer.trainer_strategy",))),
    ("trainer.resume_mode", (("trainer.resume_mode", _VERL + "trainer.resume_mode"),)),
    ("trainer.resume_from_path", (("trainer.resume_from_path", _VERL + "trainer.resume_from_path"),)),
    ("trainer.max_checkpoints_to_keep", (("trainer.max_checkpoints_to_keep", "trainer.max_actor_ckpt_to_keep",
                                          _VERL + "trainer.max_actor_ckpt_to_keep"),)),
    ("model.custom_chat_template", (("model.custom_chat_template",
                                     "buffer.trainer_input.experience_buffer.format.chat_template"),)),
    # Trinity's algorithm.optimizer is copied over every field of the trainer file's actor.optim.
    ("algorithm.optimizer.lr_scheduler_type", (("algorithm.optimizer.lr_scheduler_type", "algorithm.optimizer.warmup_style"),
                                               (_ACTOR + "optim.lr_scheduler_type", _ACTOR + "optim.warmup_style"))),
    ("algorithm.optimizer.optimizer_type", (("algorithm.optimizer.optimizer_type", "algorithm.optimizer.optimizer"),
                                            (_ACTOR + "optim.optimizer_type", _ACTOR + "optim.optimizer"))),
    *((f"algorithm.optimizer.{k}", ((f"algorithm.optimizer.{k}",), (f"{_ACTOR}optim.{k}",))) for k in _OPTIM_KEYS),
)
# Step counts that Trinity 0.3+ overwrites with trainer.total_steps: read, logged against the count that applies.
SUPERSEDED_STEPS = (_VERL + "trainer.total_training_steps", _ACTOR + "optim.total_training_steps",
                    "algorithm.optimizer.total_training_steps")
