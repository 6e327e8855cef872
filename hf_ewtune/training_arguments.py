"""``DPTrainingArguments``: ``transformers.TrainingArguments`` with the privacy fields, checked while parsing.

Like TRL's ``SFTConfig``, it extends ``TrainingArguments``, so one ``HfArgumentParser`` reads every flag
(``--target_epsilon 3 --max_grad_norm 0.5 --learning_rate 1e-3 ...``), also from a JSON file
(``parse_json_file``) or a dict (``parse_dict``). The privacy fields and their checks are those of
:class:`~hf_ewtune.PrivacyArguments` (one definition).

``max_grad_norm`` here IS the per-example clipping norm C of DP-SGD: clipping each example's gradient is the
only clipping that makes sense under DP. ``DPTrainer`` turns the Trainer's clipping of the batch gradient off
on its own copy of the arguments (``trainer.args.max_grad_norm == 0``); the object you pass is never changed.

Settings that DP-SGD cannot honour (fp16, ``auto_find_batch_size``, ``group_by_length``, a non-random
``train_sampling_strategy``, FSDP1/FSDP CPU offload, DeepSpeed ZeRO-3/offload/fp16/``gradient_clipping``,
``torch_compile``) raise
:class:`~hf_ewtune.errors.PrivacyConfigError` in ``__post_init__``, so a bad command line fails while parsing.

Example:
    >>> from transformers import HfArgumentParser
    >>> from hf_ewtune import DPTrainingArguments
    >>> (args,) = HfArgumentParser(DPTrainingArguments).parse_args_into_dataclasses(
    ...     ["--output_dir", "/tmp/dp-args", "--target_epsilon", "3", "--max_grad_norm", "0.5", "--use_cpu"])
    >>> args.target_epsilon, args.max_grad_norm, args.privacy_args.max_grad_norm
    (3.0, 0.5, 0.5)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from hf_ewtune.arguments import PrivacyArguments, validate_privacy_fields
from hf_ewtune.errors import PrivacyConfigError

#: ``TrainingArguments.max_grad_norm``'s own default (the value of an unset flag).
HF_DEFAULT_MAX_GRAD_NORM = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "max_grad_norm")


@dataclass(kw_only=True)
class DPTrainingArguments(TrainingArguments, PrivacyArguments):
    """``TrainingArguments`` plus the privacy fields of :class:`~hf_ewtune.PrivacyArguments`.

    Every ``TrainingArguments`` field keeps its meaning except ``max_grad_norm``, which is the per-example
    clipping norm C (> 0). The privacy fields (``target_epsilon``, ``noise_multiplier``, ``target_delta``,
    ``accountant``, ``clipping``, ``poisson_sampling``, ``noise_seed``, ``certify_calibration``,
    ``max_physical_batch_size``) are documented on :class:`~hf_ewtune.PrivacyArguments`.

    Raises:
        PrivacyConfigError: a privacy field with a bad value, or a training setting DP-SGD cannot honour.
    """

    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Per-example clipping norm C of DP-SGD (> 0). The batch-gradient clipping of Trainer is off."},
    )

    def __post_init__(self) -> None:
        validate_privacy_fields(self)
        reject_sharded_training(self)  # before TrainingArguments.__post_init__ imports deepspeed
        TrainingArguments.__post_init__(self)
        check_training_arguments(self)

    @property
    def privacy_args(self) -> PrivacyArguments:
        """The privacy fields as a :class:`~hf_ewtune.PrivacyArguments` (a new object)."""
        return PrivacyArguments(**{name: getattr(self, name) for name in PrivacyArguments.field_names()})


def check_training_arguments(args: Any) -> None:
    """Refuse the ``TrainingArguments`` settings that DP-SGD cannot honour (they need no model or data).

    Called by :class:`DPTrainingArguments` while parsing and by ``DPTrainer`` for a plain ``TrainingArguments``.

    Raises:
        PrivacyConfigError: naming the setting, why, and what to use instead.
    """
    reject_sharded_training(args)
    if getattr(args, "fp16", False):
        raise PrivacyConfigError(
            "fp16=True is not supported: the GradScaler would rescale the clipped, noised gradient and change "
            "the effective clipping norm. Use bf16=True (or full precision)."
        )
    if getattr(args, "auto_find_batch_size", False):
        raise PrivacyConfigError(
            "auto_find_batch_size=True is not supported: it changes the batch size, hence the sample rate q, "
            "after the noise was calibrated. Set per_device_train_batch_size, and cap memory with "
            "max_physical_batch_size instead."
        )
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in ("random", None):
        raise PrivacyConfigError(
            f"train_sampling_strategy={strategy!r} is not supported: DPTrainer draws every batch by Poisson "
            "sampling (which the privacy accounting assumes). Leave it at 'random'."
        )
    if getattr(args, "group_by_length", False):
        raise PrivacyConfigError("group_by_length=True is not supported by DPTrainer (it replaces the sampler).")
    if getattr(args, "torch_compile", False):
        raise PrivacyConfigError(
            "torch_compile=True is not supported: Poisson sampling gives every step a different batch size, so the "
            "compiled model recompiles at each new size until torch's recompile limit (slower, not faster). Leave "
            "torch_compile (and torch_compile_backend/torch_compile_mode) unset."
        )


def reject_sharded_training(args: Any, *, plugins: tuple[str, ...] = ()) -> None:
    """Raise for the sharded set-ups DP training does not cover (arguments, accelerate config environment, ``plugins``).

    FSDP2 (``fsdp_config={"version": 2}``, accelerate's ``fsdp_version: 2``) without CPU offload is supported
    (:mod:`hf_ewtune.distributed.fsdp`), and so is DeepSpeed ZeRO-1/2 in fp32 without offload or
    ``gradient_clipping`` (:mod:`hf_ewtune.distributed.deepspeed_zero`). Refused: FSDP1, FSDP CPU offload, FSDP's
    own activation checkpointing, FSDP on XLA, DeepSpeed ZeRO stage 0/3, offload, fp16, bf16 (``bf16=True``,
    ``bf16_full_eval=True``, a ``"bf16"`` config section enabled, accelerate's ``mixed_precision: bf16``),
    ``gradient_clipping`` > 0, tensor parallelism, and Megatron-LM (see docs/distributed.md).
    """
    from hf_ewtune.distributed.deepspeed_zero import zero_config_problems

    used = list(plugins)
    if args is not None and getattr(args, "fsdp", None):
        used.extend(unsupported_fsdp_arguments(args))
    if args is not None and getattr(args, "deepspeed", None):
        used.extend(f"{p} (TrainingArguments.deepspeed)" for p in zero_config_problems(args.deepspeed))
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and not (args is not None and getattr(args, "deepspeed", None)):
        used.extend(unsupported_deepspeed_environment())
    if _env_flag("ACCELERATE_USE_FSDP") and not (args is not None and getattr(args, "fsdp", None)):
        # (with TrainingArguments.fsdp, accelerate sets ACCELERATE_USE_FSDP itself; the arguments decide)
        used.extend(unsupported_fsdp_environment())
    if args is not None and (getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP")) and (
            reentrant_checkpointing(args)):
        used.append("reentrant activation checkpointing with FSDP2 (gradient_checkpointing_kwargs={'use_reentrant': "
                    "True} makes the engine run a full backward, whose raw unclipped gradients FSDP2 reduce-scatters; "
                    "use use_reentrant=False, Hugging Face's default)")
    deepspeed = bool(args is not None and getattr(args, "deepspeed", None)) or _env_flag("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        used.extend(deepspeed_bf16_settings(args))
    if args is not None and (getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED")) and (
            reentrant_checkpointing(args)):
        used.append("reentrant activation checkpointing with DeepSpeed (gradient_checkpointing_kwargs={'use_reentrant'"
                    ": True} makes the engine run a full backward, whose raw unclipped gradients ZeRO's hooks reduce; "
                    "use use_reentrant=False, Hugging Face's default)")
    if _env_flag("ACCELERATE_USE_MEGATRON_LM"):
        used.append("Megatron-LM (accelerate config, ACCELERATE_USE_MEGATRON_LM)")
    if used:
        raise PrivacyConfigError(
            f"DPTrainer does not support this sharded training: {', '.join(dict.fromkeys(used))}. Missing: per-example "
            "clipping across sharded parameters (each example's gradient norm must be summed over all shards "
            "before clipping, and nothing may reduce unclipped gradients; FSDP1 and ZeRO-3 reduce-scatter them "
            "inside backward). Use FSDP2 without CPU offload (TrainingArguments(fsdp=True, fsdp_config={'version': 2}) "
            "or accelerate's `fsdp_version: 2`), DeepSpeed ZeRO stage 1/2 in fp32 without offload or "
            "gradient_clipping, "
            "or DDP: `accelerate launch --multi_gpu --num_processes N ...` with a config without fsdp/deepspeed "
            "(see docs/distributed.md)."
        )


def deepspeed_bf16_settings(args: Any) -> list[str]:
    """The settings that would make a DeepSpeed engine bf16 (refused: see ``deepspeed_zero.BF16_REFUSAL``).

    transformers fills the DeepSpeed config's ``"bf16": {"enabled": "auto"}`` with ``bf16 or bf16_full_eval`` (and
    accelerate adds an enabled ``"bf16"`` section when the config has none), so either flag trains in bf16; so does
    ``accelerate launch --mixed_precision bf16`` (or ``fp8``; ``ACCELERATE_MIXED_PRECISION``).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> deepspeed_bf16_settings(NS(bf16=True, bf16_full_eval=False))[0][:24]
        'bf16=True with DeepSpeed'
    """
    from hf_ewtune.distributed.deepspeed_zero import BF16_REFUSAL

    found = [f"{name}=True with DeepSpeed ({BF16_REFUSAL})" for name in ("bf16", "bf16_full_eval")
             if args is not None and getattr(args, name, False)]
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if mixed in ("bf16", "fp8"):  # accelerate enables DeepSpeed's "bf16" section for both (DeepSpeedPlugin)
        found.append(f"accelerate's mixed_precision {mixed} with DeepSpeed (ACCELERATE_MIXED_PRECISION; {BF16_REFUSAL})")
    return found


def unsupported_deepspeed_environment() -> list[str]:
    """What an ``accelerate launch`` DeepSpeed config exported (``ACCELERATE_DEEPSPEED_*``) that DP training refuses.

    The authoritative check is on the Trainer's DeepSpeed plugin (``DPTrainer.__init__``); this one fails early.
    """
    from hf_ewtune.distributed.deepspeed_zero import zero_config_problems

    found = []
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file and config_file.lower() != "none":
        found.extend(f"{p} (accelerate config, {config_file})" for p in zero_config_problems(config_file))
        return found
    config: dict[str, Any] = {"zero_optimization": {
        "stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)),  # accelerate's own default
        "offload_optimizer": {"device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")},
        "offload_param": {"device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")}}}
    clip = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    config["gradient_clipping"] = clip if clip in ("auto", "none", "") else float(clip)
    if clip in ("none", ""):
        config.pop("gradient_clipping")
    found.extend(f"{p} (accelerate config, ACCELERATE_DEEPSPEED_*)" for p in zero_config_problems(config))
    return found


def reentrant_checkpointing(args: Any) -> bool:
    """Whether ``args`` turn on activation (gradient) checkpointing with ``use_reentrant=True``.

    transformers 5 calls it ``activation_checkpointing`` (``gradient_checkpointing`` is the deprecated alias) and
    defaults to ``use_reentrant=False`` when no kwargs are given.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> reentrant_checkpointing(NS(activation_checkpointing=True, activation_checkpointing_kwargs=None))
        False
        >>> reentrant_checkpointing(NS(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}))
        True
    """
    on = getattr(args, "activation_checkpointing", None)
    on = getattr(args, "gradient_checkpointing", False) if on is None else on
    if not on:
        return False
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        kwargs = getattr(args, name, None)
        if isinstance(kwargs, str) and kwargs.strip().startswith("{"):
            import json

            kwargs = json.loads(kwargs)
        if isinstance(kwargs, dict) and "use_reentrant" in kwargs:
            return _truthy(kwargs["use_reentrant"])
    return False


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def _fsdp_config(args: Any) -> dict[str, Any]:
    """``args.fsdp_config`` as a dict with the ``fsdp_`` prefixes dropped (before or after ``__post_init__``)."""
    cfg = getattr(args, "fsdp_config", None)
    if isinstance(cfg, str):
        import json

        try:
            with open(cfg, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError):  # TrainingArguments reports an unreadable file itself
            cfg = {}
    cfg = dict(cfg or {})
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in cfg.items()}


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def unsupported_fsdp_arguments(args: Any) -> list[str]:
    """The FSDP settings of ``TrainingArguments.fsdp``/``fsdp_config`` that DP training refuses (empty: FSDP2 is fine)."""
    cfg = _fsdp_config(args)
    legacy = args.fsdp if isinstance(args.fsdp, (str, list)) else ""
    legacy = " ".join(legacy) if isinstance(legacy, list) else legacy
    found = []
    if int(cfg.get("version", 2)) != 2:
        found.append(f"FSDP1 (TrainingArguments.fsdp_config version={cfg.get('version')})")
    if _truthy(cfg.get("cpu_offload", False)) or "offload" in legacy.split():
        found.append("FSDP CPU offload (TrainingArguments.fsdp offload / fsdp_config cpu_offload)")
    if _truthy(cfg.get("activation_checkpointing", False)):
        found.append("FSDP activation checkpointing (fsdp_config activation_checkpointing; use "
                     "gradient_checkpointing=True instead)")
    if _truthy(cfg.get("xla", False)):
        found.append("FSDP on XLA (fsdp_config xla)")
    return found


def unsupported_fsdp_environment() -> list[str]:
    """The FSDP settings an ``accelerate launch`` FSDP config exported (``FSDP_*``) that DP training refuses."""
    found = []
    version = os.environ.get("FSDP_VERSION", "1")  # accelerate's own default is FSDP1
    if version.strip() != "2":
        found.append(f"FSDP1 (accelerate config, ACCELERATE_USE_FSDP with FSDP_VERSION={version})")
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        found.append("FSDP CPU offload (accelerate config, FSDP_OFFLOAD_PARAMS)")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        found.append("FSDP activation checkpointing (accelerate config, FSDP_ACTIVATION_CHECKPOINTING; use "
                     "gradient_checkpointing=True instead)")
    return found


def unsupported_fsdp_plugin(plugin: Any) -> list[str]:
    """What an accelerate ``FullyShardedDataParallelPlugin`` enables that DP training refuses (empty: fine)."""
    found = []
    if int(getattr(plugin, "fsdp_version", 1) or 1) != 2:
        found.append(f"FSDP1 (accelerate plugin, fsdp_version={getattr(plugin, 'fsdp_version', None)})")
    offload = getattr(plugin, "cpu_offload", None)
    if type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False) or offload is True:
        found.append("FSDP CPU offload (accelerate plugin, cpu_offload)")
    if getattr(plugin, "activation_checkpointing", False):
        found.append("FSDP activation checkpointing (accelerate plugin; use gradient_checkpointing=True instead)")
    return found


def resolve_privacy_settings(args: Any, privacy_args: PrivacyArguments | None, privacy_kwargs: dict[str, Any]) -> PrivacyArguments:
    """The one :class:`~hf_ewtune.PrivacyArguments` of a ``DPTrainer``, from whichever of the three forms was used.

    Args:
        args: The ``args=`` given to ``DPTrainer`` (a ``DPTrainingArguments``, a ``TrainingArguments`` or ``None``).
        privacy_args: The ``privacy_args=`` given, if any.
        privacy_kwargs: Privacy fields given as keyword arguments.

    Raises:
        PrivacyConfigError: the settings are given in two places, or ``TrainingArguments.max_grad_norm`` was set
            to a value that is not the per-example clipping norm (it would otherwise be silently ignored).
    """
    if privacy_args is not None and privacy_kwargs:
        raise PrivacyConfigError(
            f"pass the privacy settings either as privacy_args= or as keyword arguments, not both "
            f"(got privacy_args and {sorted(privacy_kwargs)})."
        )
    if isinstance(args, DPTrainingArguments):
        if privacy_args is not None or privacy_kwargs:
            given = "privacy_args" if privacy_args is not None else ", ".join(sorted(privacy_kwargs))
            raise PrivacyConfigError(
                f"args is a DPTrainingArguments, which already holds the privacy settings; set them there instead "
                f"of passing {given} to DPTrainer."
            )
        return args.privacy_args
    if privacy_args is None:
        privacy_args = PrivacyArguments(**privacy_kwargs)
    elif not isinstance(privacy_args, PrivacyArguments):
        raise PrivacyConfigError(f"privacy_args must be a PrivacyArguments, got {type(privacy_args).__name__}.")
    else:
        privacy_args.validate()
    batch_norm = getattr(args, "max_grad_norm", None)
    if batch_norm and batch_norm != HF_DEFAULT_MAX_GRAD_NORM and batch_norm != privacy_args.max_grad_norm:
        raise PrivacyConfigError(
            f"TrainingArguments.max_grad_norm={batch_norm:g} is the Trainer's clipping of the batch gradient, which "
            f"DPTrainer turns off; the per-example clipping norm is max_grad_norm={privacy_args.max_grad_norm:g} of the "
            f"privacy settings. If you meant C = {batch_norm:g}, pass max_grad_norm={batch_norm:g} to DPTrainer (or "
            "use DPTrainingArguments, where --max_grad_norm IS the per-example norm); otherwise leave "
            "TrainingArguments.max_grad_norm at its default or 0."
        )
    return privacy_args


def trainer_facing_copy(args: Any) -> Any:
    """A shallow copy of ``args`` with the Trainer's batch-gradient clipping and token averaging turned off.

    ``DPTrainer`` trains with this copy: the caller's object is never changed. ``max_grad_norm=0`` because
    per-example clipping replaces the Trainer's clipping of the batch gradient; ``average_tokens_across_devices
    =False`` because the per-example losses are not token-averaged across ranks.
    """
    if args is None:
        return None
    trainer_args = copy.copy(args)
    trainer_args.max_grad_norm = 0.0
    if getattr(trainer_args, "average_tokens_across_devices", False):
        trainer_args.average_tokens_across_devices = False
    if getattr(trainer_args, "deepspeed", None) and getattr(trainer_args, "hf_deepspeed_config", None) is not None:
        # TrainingArguments filled the DeepSpeed config's "auto" values from the CALLER's arguments, among them
        # gradient_clipping = max_grad_norm (C): rebuild it from this copy, so that DeepSpeed clips nothing.
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        trainer_args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(trainer_args.deepspeed)
        trainer_args.hf_deepspeed_config.trainer_config_process(trainer_args)
        trainer_args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=trainer_args.hf_deepspeed_config)
    return trainer_args
