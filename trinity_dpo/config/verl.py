"""The optimizer settings and the verl-style trainer file's schema (`trainer.trainer_config_path`, or
`trainer.trainer_config` inline), which `config.Config` holds as `trainer.trainer_config`. Same conventions as
`schema.py`: one line of doc per field; keys verl accepts that do not apply are listed in `IGNORED`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union


# --------------------------------------------------------------------------- optimizer (Trinity and verl)


@dataclass
class OptimizerConfig:
    """AdamW and its schedule (`algorithm.optimizer`, or verl's `actor_rollout_ref.actor.optim`)."""

    lr: float = 1e-6  # peak learning rate
    lr_warmup_steps: int = -1  # warmup steps; -1 derives them from lr_warmup_steps_ratio
    lr_warmup_steps_ratio: float = 0.0  # warmup as a fraction of the total optimizer steps
    min_lr_ratio: float = 0.0  # cosine decays to min_lr_ratio * lr
    lr_scheduler_type: Literal["constant", "cosine"] = "constant"  # schedule after warmup
    warmup_style: Optional[Literal["constant", "cosine"]] = None  # older Trinity/verl spelling of lr_scheduler_type
    num_cycles: float = 0.5  # cosine cycles over the steps after warmup (0.5: one half cosine down to min_lr_ratio)
    optimizer_type: str = "adamw"  # 'adam' or 'adamw': both are AdamW (decoupled decay), as in Trinity and verl
    optimizer: Optional[str] = None  # verl spelling of optimizer_type ('AdamW')
    clip_grad: Optional[float] = None  # newer Trinity spelling of trainer.grad_clip
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    beta1: Optional[float] = None  # verl spelling of betas[0]
    beta2: Optional[float] = None  # verl spelling of betas[1]
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    total_training_steps: Optional[int] = None  # not applied: Trinity 0.3+ overwrites it with trainer.total_steps
    override_optimizer_config: Any = None  # verl's extra AdamW arguments: fused and foreach are honoured, nothing else

    IGNORED: ClassVar[tuple[str, ...]] = ("lr_warmup_init", "lr_decay_steps", "lr_decay_style", "min_lr")



# --------------------------------------------------------------------------- verl trainer file


@dataclass
class VerlData:
    """verl `data`. Trinity's DPO reader never cut or refused rows by these lengths, nor read `truncation`: pairs
    over them are kept whole and counted in the data summary (model.max_prompt_tokens etc. cut)."""

    max_prompt_length: Optional[int] = None  # pairs with a longer prompt are counted, not cut
    max_response_length: Optional[int] = None  # pairs with a longer response are counted, not cut
    truncation: Optional[Literal["error", "left", "right", "middle"]] = None  # SFT rows over max_model_len (None:
    # error, verl's default: the row is refused and counted); DPO pairs are never cut by it (Trinity never read it)

    IGNORED: ClassVar[tuple[str, ...]] = (
        "tokenizer", "train_files", "val_files", "prompt_key", "reward_fn_key", "train_batch_size", "val_batch_size",
        "return_raw_input_ids", "return_raw_chat", "return_full_prompt", "shuffle", "filter_overlong_prompts",
        "filter_overlong_prompts_workers", "image_key", "video_key", "custom_cls", "dataloader_num_workers",
        "validation_shuffle", "trust_remote_code", "use_shm", "seed", "sampler", "datagen", "apply_chat_template_kwargs",
    )


@dataclass
class VerlModel:
    """verl `actor_rollout_ref.model`."""

    enable_gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    gradient_checkpointing_every: int = 1  # with checkpointing on: only every n-th decoder layer recomputes (torchtitan's selective_ac_option); the rest keep activations: faster, more memory
    use_remove_padding: bool = False  # remove pad tokens from the computation (packed micro-batches)
    lora_rank: Optional[int] = None  # verl spelling of model.lora.rank (0: no LoRA)
    lora_alpha: Optional[float] = None  # verl spelling of model.lora.alpha (verl's default: 16)
    target_modules: Optional[Union[list[str], str]] = None  # verl spelling of model.lora.target_modules
    exclude_modules: Optional[Union[list[str], str]] = None  # verl spelling of model.lora.exclude_modules
    lora_adapter_path: Optional[str] = None  # verl spelling of model.lora.path
    external_lib: Optional[str] = None  # a module verl imports to register custom models: not supported (refused)
    override_config: Any = None  # changes to the model's config.json: not supported (refused unless empty)

    IGNORED: ClassVar[tuple[str, ...]] = (
        "path", "use_fused_kernels", "enable_activation_offload", "trust_remote_code", "use_liger", "use_shm",
        "custom_chat_template", "fused_kernel_options", "tokenizer_path",
    )


@dataclass
class VerlActor:
    """verl `actor_rollout_ref.actor`."""

    ppo_micro_batch_size_per_gpu: Optional[int] = None  # pairs per forward/backward; None: the whole batch
    use_dynamic_bsz: bool = False  # micro-batches by token budget instead of pair count
    ppo_max_token_len_per_gpu: int = 16384  # with use_dynamic_bsz: tokens (both sequences of each pair) per micro-batch
    grad_clip: Optional[float] = None  # verl spelling of trainer.grad_clip
    use_kl_loss: Optional[bool] = None  # verl flag that goes with kl_loss_coef
    kl_loss_coef: Optional[float] = None  # verl spelling of the DPO beta
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # verl spelling of algorithm.optimizer
    ulysses_sequence_parallel_size: Optional[int] = None  # verl spelling of trainer.ulysses_sequence_parallel_size
    strategy: Optional[Literal["fsdp", "fsdp2", "megatron"]] = None  # verl spelling of trainer.trainer_strategy

    IGNORED: ClassVar[tuple[str, ...]] = (
        "ppo_mini_batch_size", "ppo_micro_batch_size", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
        "clip_ratio_c", "entropy_coeff", "loss_agg_mode",
        "kl_loss_type", "ppo_epochs", "shuffle", "checkpoint", "fsdp_config",
        "use_torch_compile", "entropy_from_logits_with_chunking", "entropy_checkpointing", "policy_loss",
        "data_loader_seed", "profiler", "tau", "opmd_baseline", "use_uid", "alg_type",
    )


@dataclass
class VerlActorRolloutRef:
    """verl `actor_rollout_ref`."""

    model: VerlModel = field(default_factory=VerlModel)  # model-side switches
    actor: VerlActor = field(default_factory=VerlActor)  # the trained policy
    nccl_timeout: int = 600  # seconds a collective waits for the other processes (NCCL or gloo) before failing

    IGNORED: ClassVar[tuple[str, ...]] = ("hybrid_engine", "rollout", "ref", "synchronizer")


@dataclass
class VerlTrainer:
    """verl `trainer`."""

    total_training_steps: Optional[int] = None  # not applied: Trinity 0.3+ overwrites it with trainer.total_steps
    logger: list[Literal["console", "tensorboard", "wandb"]] = field(default_factory=lambda: ["console"])  # sinks
    resume_mode: Optional[Literal["auto", "disable", "resume_path"]] = None  # verl spelling of trainer.resume_mode
    resume_from_path: Optional[str] = None  # verl spelling of trainer.resume_from_path
    max_actor_ckpt_to_keep: Optional[int] = None  # verl spelling of trainer.max_checkpoints_to_keep

    IGNORED: ClassVar[tuple[str, ...]] = (
        "balance_batch", "total_epochs", "project_name", "experiment_name", "log_val_generations", "nnodes",
        "n_gpus_per_node", "save_freq", "test_freq", "critic_warmup", "default_hdfs_dir",
        "remove_previous_ckpt_in_save", "del_local_ckpt_after_load", "default_local_dir", "val_before_train",
        "val_only", "max_critic_ckpt_to_keep", "ray_wait_register_center_timeout",
        "device", "profile_steps", "rollout_data_dir", "validation_data_dir", "sync_freq", "training_rollout_mode",
        "enable_exp_buffer", "steps_per_epoch", "esi_redundant_time", "log_val_generations_interval", "npu_profile",
        "use_legacy_worker_impl", "hfmodel_save_interval", "val_generations_to_log_to_wandb",
    )


@dataclass
class VerlConfig:
    """The verl-style trainer file (`trainer.trainer_config_path`) or `trainer.trainer_config` inline."""

    data: VerlData = field(default_factory=VerlData)  # lengths and truncation
    actor_rollout_ref: VerlActorRolloutRef = field(default_factory=VerlActorRolloutRef)  # model and actor
    trainer: VerlTrainer = field(default_factory=VerlTrainer)  # run-level switches

    IGNORED: ClassVar[tuple[str, ...]] = (
        "critic", "reward_model", "algorithm", "custom_reward_function", "ray_init", "synchronizer", "buffer",
        "global_profiler", "transfer_queue",
    )
