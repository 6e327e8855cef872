"""``DPTrainer``: a ``transformers.Trainer`` that trains with DP-SGD.

Per optimizer step ("logical batch"):

1. one Poisson(q) draw over the training set, identical on all ranks, split into exactly
   ``gradient_accumulation_steps`` micro-batches per rank (some possibly empty) — :mod:`hf_ewtune.sampling`;
2. per micro-batch: :meth:`DPTrainer.compute_per_example_loss` (overridable; default: forward, per-example
   losses from the logits, :mod:`hf_ewtune.losses`, honouring ``label_smoothing_factor`` and
   ``compute_loss_func`` per example; HF's ``num_items_in_batch`` is ignored), one backward through the
   :class:`~hf_ewtune.clipping.ClippingEngine` that adds ``sum_i c_i g_i`` into ``p.grad`` (no DDP gradient
   sync). The engine's hooks belong to this trainer (:mod:`hf_ewtune.engine_lifecycle`, ``remove_hooks()``);
3. at the optimizer step: Gaussian noise ``N(0, (sigma C)^2)`` once (rank 0), all-reduce SUM, division by
   the public expected batch size ``q N`` (:mod:`hf_ewtune.noise`), then the wrapped optimizer's step;
4. the :class:`~hf_ewtune.callbacks.PrivacyCallback` steps the accountant (empty batches included), logs
   ``epsilon`` (certified) and ``epsilon_edgeworth`` (estimate), enforces the budget and writes
   ``_privacy_state.json`` into every checkpoint and into ``output_dir`` on ``save_model``.

``q = per_device_train_batch_size * gradient_accumulation_steps * world_size / N``; an epoch is
``round(1/q)`` steps. Under FSDP2 the clipped sums are reduce-scattered by the engine
(:mod:`hf_ewtune.distributed.fsdp`); under DeepSpeed ZeRO-1/2 (``TrainingArguments(deepspeed=...)``) steps 2-3 hand
them, noised on rank 0 at the accumulation boundary, to ZeRO's own reduction through accelerate's ``backward``
(:mod:`hf_ewtune.distributed.deepspeed_zero`), whose engine then steps.

The trainer works on its own copy of the training arguments (the caller's object is never changed), with ``max_grad_norm=0`` (per-example clipping at C replaces the Trainer's batch clipping) and
``average_tokens_across_devices=False``; the Trainer's pre-step ``grad_norm`` (a statistic of the un-noised
gradient) is not logged. ``train()`` logs the privacy plan (sigma, delta, q, planned steps, target) once at
WARNING level. See docs/configuration.md for the three ways to pass the privacy settings.

Example:
    >>> from transformers import TrainingArguments
    >>> from hf_ewtune import DPTrainer
    >>> from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> args = TrainingArguments(output_dir="/tmp/dp-doc", use_cpu=True, report_to="none", max_steps=2,
    ...                          per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True,
    ...                          logging_strategy="no")
    >>> trainer = DPTrainer(model=tiny_bert(vocab_size=len(tok)), args=args,
    ...                     train_dataset=tiny_classification_dataset(tok, n=32),
    ...                     noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ..., 'epsilon': ..., 'epsilon_edgeworth': ...}
    >>> trainer.get_privacy_spent().steps
    2
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

import accelerate
import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from hf_ewtune.arguments import PrivacyArguments, default_delta, sampling_mode
from hf_ewtune.batch_checks import check_micro_batch, check_training_data
from hf_ewtune.callbacks import PrivacyCallback, require_noisy_optimizer
from hf_ewtune.dp_settings import DPSettings, read_only_setting
from hf_ewtune.engine_lifecycle import require_attached
from hf_ewtune.distributed.fsdp import full_state_dict_resume_problem, max_over_ranks, zero_weight_loss
from hf_ewtune.errors import BudgetExhaustedError, PrivacyConfigError, PrivacyStateError
from hf_ewtune.hub_safety import hub_checkpoint_notice, trainer_uploads_through_safety_net
from hf_ewtune.large_delta import refuse_large_delta
from hf_ewtune.frozen_plan import check_plan_unchanged, snapshot_plan
from hf_ewtune.loss_contract import batch_size_of, check_loss_settings, check_per_example_losses, default_per_example_loss
from hf_ewtune.losses import TASKS
from hf_ewtune.noise import DPOptimizer
from hf_ewtune.privacy_record import setup_record
from hf_ewtune.privacy_state import PrivacyState, save_privacy_state
from hf_ewtune.run_plan import privacy_plan_line
from hf_ewtune.resume_checks import check_resumed_sampling
from hf_ewtune.user_level import UNITS_KEY, check_resumed_unit, whole_unit_chunks
from hf_ewtune.training_arguments import (
    check_training_arguments,
    reject_sharded_training,
    unsupported_fsdp_plugin,
    resolve_privacy_settings,
    trainer_facing_copy,
)
from hf_ewtune.sampling import (
    DUMMY_ROW_KEY,
    EMPTY_BATCH_KEY,
    DPDataLoader,
    EmptyAwareCollator,
    PoissonBatchSampler,
    derive_seed,
    is_empty_batch,
    new_seed,
    steps_per_epoch_for,
)
from hf_ewtune.stale_checkpoints import refuse_stale_checkpoints

logger = logging.getLogger(__name__)

# Logged statistics of the private training batches computed without noise: kept out of the model card.
NON_PRIVATE_LOG_KEYS = ("loss", "train_loss")
WITHHELD_LOSS = "withheld (not private)"


def non_private_logs(output_dir: str) -> list[str]:
    """Training-log files under ``output_dir`` that ``Trainer.push_to_hub`` would upload (TensorBoard events).

    Skips what the Trainer itself does not upload: names starting with ``_`` and ``checkpoint-*`` folders.
    ``DPTrainer.push_to_hub`` and ``publish_run`` leave these files out (:mod:`hf_ewtune.hub_safety`) and warn.
    """
    found = []
    for root, dirs, files in os.walk(output_dir):
        dirs[:] = [d for d in dirs if not d.startswith("_") and not (root == output_dir and d.startswith("checkpoint-"))]
        found += [os.path.join(root, f) for f in files if f.startswith("events.out.tfevents") and not f.startswith("_")]
    return sorted(found)

_NOISE_STREAM = 0
_SAMPLING_STREAM = 1


def _with_trainer_facing_args(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of ``DPTrainer.__init__`` with the training arguments replaced by a trainer-facing copy."""
    if "args" in kwargs:
        return args, {**kwargs, "args": trainer_facing_copy(kwargs["args"])}
    if len(args) > 1:
        return (args[0], trainer_facing_copy(args[1]), *args[2:]), kwargs
    return args, kwargs


class DPTrainer(Trainer):
    """``transformers.Trainer`` with differentially private training (DP-SGD, Poisson sampling).

    Accepts every ``Trainer`` argument plus the privacy settings, in one of three forms: ``args=
    DPTrainingArguments(...)`` (the privacy fields inside the training arguments; ``max_grad_norm`` is C),
    ``privacy_args=PrivacyArguments(...)``, or the same fields as keyword arguments (``target_epsilon=3.0, ...``).
    Everything is validated here, before training: a missing or unsized ``train_dataset``, an expected
    batch larger than the dataset, an invalid rate, neither ``target_epsilon`` nor ``noise_multiplier``,
    a budget that cannot afford one step, DataParallel, custom samplers, unsupported modules (BatchNorm,
    uncovered trainable parameters; all listed in one error), a ``compute_loss`` override without
    ``compute_per_example_loss`` all raise :class:`~hf_ewtune.errors.PrivacyConfigError` (or a subclass).

    Args:
        *args: Positional ``Trainer`` arguments (``model``, ``args``, ...).
        privacy_args: The privacy settings.
        per_example_loss_task: Force the per-example loss (one of :data:`hf_ewtune.losses.TASKS`);
            default: inferred from the model and the shapes of logits and labels.
        **kwargs: ``Trainer`` keyword arguments and/or :class:`PrivacyArguments` fields.

    Example:
        >>> from hf_ewtune import DPTrainer, PrivacyArguments
        >>> DPTrainer.__mro__[1].__name__
        'Trainer'
    """

    def __init__(
        self,
        *args: Any,
        privacy_args: PrivacyArguments | None = None,
        per_example_loss_task: str | None = None,
        **kwargs: Any,
    ) -> None:
        privacy_kwargs = {k: kwargs.pop(k) for k in PrivacyArguments.field_names() if k in kwargs}
        given_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        privacy_args = resolve_privacy_settings(given_args, privacy_args, privacy_kwargs)
        check_training_arguments(given_args)  # before the Trainer is built (its __init__ may act on them)
        args, kwargs = _with_trainer_facing_args(args, kwargs)
        if per_example_loss_task is not None and per_example_loss_task not in TASKS:
            raise PrivacyConfigError(f"per_example_loss_task must be one of {TASKS} or None, got {per_example_loss_task!r}.")
        if kwargs.get("model_init") is not None:
            raise PrivacyConfigError(
                "DPTrainer does not support model_init (hyperparameter search would re-train on the same private "
                "data without accounting for it); pass model= instead."
            )
        self.privacy_args = privacy_args
        self.per_example_loss_task = per_example_loss_task
        self.privacy_callback: PrivacyCallback | None = None
        self._engine = None
        self.user_plan = None  # hf_ewtune.user_level.UserPlan when user_id_column is set
        super().__init__(*args, **kwargs)
        self._reject_sharded_training(self.args)
        if self.model is None:
            raise PrivacyConfigError("DPTrainer needs model=.")
        check_loss_settings(self)
        self._setup_privacy()
        check_training_data(self)  # packed rows, token ids, labels: refused before training (batch_checks.py)
        notice = hub_checkpoint_notice(self.args)
        if notice:
            logger.warning("DPTrainer: %s", notice)

    # ------------------------------------------------------------------------------------- set-up
    def _reject_sharded_training(self, args: Any) -> None:
        """Raise for the sharded set-ups DP training does not cover (arguments, accelerate config or plugins).

        DDP and FSDP2 (accelerate's FSDP plugin with ``fsdp_version=2``, no CPU offload) are supported.
        """
        plugins: list[str] = []
        if getattr(self, "is_fsdp_enabled", False):
            plugin = self.accelerator.state.fsdp_plugin
            plugins += unsupported_fsdp_plugin(plugin)
            problem = full_state_dict_resume_problem(plugin, args)
            if problem:
                logger.warning("DPTrainer: %s", problem)
        elif getattr(args, "fsdp", None) and int(getattr(args, "world_size", 1)) > 1:
            logger.warning(
                "DPTrainer: TrainingArguments.fsdp is set but accelerate did not enable FSDP (accelerate %s shards "
                "only on accelerators, never on CPU processes): training runs as DDP, with the same guarantee.",
                accelerate.__version__)
        if getattr(self, "is_deepspeed_enabled", False):
            from hf_ewtune.distributed.deepspeed_zero import zero_config_problems

            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            plugins += [f"{p} (accelerate DeepSpeed plugin)" for p in zero_config_problems(config)]
        elif getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
                "1", "true", "yes"):
            raise PrivacyConfigError(
                "DeepSpeed was requested (TrainingArguments.deepspeed or ACCELERATE_USE_DEEPSPEED) but accelerate "
                f"{accelerate.__version__} did not enable it (its AcceleratorState drops the DeepSpeed plugin when the "
                "accelerator is forced to CPU: ACCELERATE_USE_CPU=true, `accelerate launch --cpu`), so the run would "
                "silently not be DeepSpeed. Unset ACCELERATE_USE_CPU (TrainingArguments(use_cpu=True) alone keeps "
                "DeepSpeed), drop the DeepSpeed config (DDP: `accelerate launch --multi_gpu`), or use ZeroDP "
                "(hf_ewtune.distributed.deepspeed_zero) in a plain loop (see docs/distributed.md).")
        reject_sharded_training(args, plugins=tuple(plugins))

    @property
    def is_fsdp2(self) -> bool:
        """Whether accelerate shards the model with FSDP2 (``fully_shard``): every rank must then run the same
        forwards and backwards (a rank with an empty Poisson slice runs a zero-weight dummy row)."""
        return bool(getattr(self, "is_fsdp_enabled", False))

    @property
    def is_deepspeed_zero(self) -> bool:
        """Whether accelerate trains through a DeepSpeed ZeRO-1/2 engine: the clipped sums (noised on rank 0 on the
        accumulation boundary) then enter ZeRO's own reduction through a surrogate backward
        (:class:`~hf_ewtune.distributed.deepspeed_zero.ZeroTrainerFeed`); every rank feeds every micro-batch."""
        return bool(getattr(self, "is_deepspeed_enabled", False))

    # One frozen DPSettings feeds the optimizer's noise and the accountant: these are read-only after set-up.
    noise_multiplier = read_only_setting("noise_multiplier", draft_until_frozen=True)
    sample_rate = read_only_setting("sample_rate", draft_until_frozen=True)
    expected_batch_size = read_only_setting("expected_batch_size", draft_until_frozen=True)
    delta = read_only_setting("delta", draft_until_frozen=True)

    def _setup_privacy(self) -> None:
        """Check everything and build the privacy machinery, in named steps (all before training)."""
        self._check_environment()
        n = self._training_set_size()
        units = self._plan_users(n)  # U users (user_id_column set, see user_level.py) or the N rows
        if (self.is_fsdp2 or self.is_deepspeed_zero) and self.user_plan is not None:
            raise PrivacyConfigError(
                f"user_id_column (user-level DP) is not supported with {'FSDP2' if self.is_fsdp2 else 'DeepSpeed'} "
                "yet (not tested); train user-level runs with DDP (`accelerate launch --multi_gpu`) or one process.")
        self._plan_sampling(units)
        self.delta = self._resolve_delta(units)
        self.noise_multiplier, budget_steps, self.calibration = self._resolve_noise_and_budget()
        seed = self.privacy_args.noise_seed
        self._base_noise_seed = derive_seed(seed, _NOISE_STREAM) if seed is not None else None
        self._attach_clipping_engine()
        self._freeze_dp_settings()
        self.privacy_callback = self._build_privacy_callback(budget_steps=budget_steps, calibration=self.calibration)
        self.add_callback(self.privacy_callback)
        self._zero_feed = self._build_zero_feed() if self.is_deepspeed_zero else None
        if self.is_deepspeed_zero:  # ZeRO's hooks on AccumulateGrad would reduce a full backward's raw gradients
            self._engine.raw_gradients_reduced_by = "DeepSpeed ZeRO"
        self._tag_model()
        self._frozen_plan = snapshot_plan(self)  # train() refuses to run after any of it changed (frozen_plan.py)

    def _check_environment(self) -> None:
        """The process layout and the Trainer overrides that DP-SGD cannot honour."""
        if self.args.max_grad_norm:  # args=None: the Trainer built its own arguments (with batch clipping)
            self.args = trainer_facing_copy(self.args)
        check_training_arguments(self.args)
        if self.args.n_gpu > 1:
            raise PrivacyConfigError(
                f"DPTrainer does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one process); launch "
                "one process per GPU with torchrun or accelerate launch instead."
            )
        if type(self)._get_train_sampler is not Trainer._get_train_sampler or (
            type(self).get_train_dataloader is not DPTrainer.get_train_dataloader
        ):
            raise PrivacyConfigError(
                "custom training samplers/dataloaders are rejected: the privacy accounting requires DPTrainer's "
                "Poisson sampler (a custom or weighted sampler silently changes the sampling rate)."
            )
        world = int(self.args.world_size)
        num_processes = getattr(self.accelerator, "num_processes", world)
        if num_processes != world:
            raise PrivacyConfigError(
                f"world size mismatch: TrainingArguments.world_size={world} but accelerate runs {num_processes} processes."
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() != world):
            # e.g. DeepSpeed on CPU processes without use_cpu: deepspeed starts the process group, accelerate then
            # counts 1 process on every rank; q, the sampler's split and the noise would all be wrong.
            raise PrivacyConfigError(
                f"world size mismatch: torch.distributed runs {torch.distributed.get_world_size()} processes but "
                f"TrainingArguments.world_size={world} (accelerate did not set up this launch). Launch with "
                "torchrun/accelerate launch on a set-up accelerate supports (see docs/distributed.md).")

    def _training_set_size(self) -> int:
        """N, the size of the (map-style, non-empty) private training set."""
        ds = self.train_dataset
        if ds is None:
            raise PrivacyConfigError("DPTrainer needs train_dataset= (the private training data).")
        if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
            raise PrivacyConfigError(
                "train_dataset must have a length (a map-style Dataset): Poisson sampling needs the dataset size N."
            )
        n = len(ds)
        if n == 0:
            raise PrivacyConfigError("train_dataset is empty.")
        return n

    def _plan_users(self, n: int) -> int:
        """With ``user_id_column``: read the users (checked before training) and return U; else return ``n``."""
        from hf_ewtune.user_level import setup_users

        self.user_plan = setup_users(self)
        return self.user_plan.num_users if self.user_plan is not None else n

    def _plan_sampling(self, n: int) -> None:
        """Sample rate q, expected batch, steps per epoch and planned steps (set on ``self``)."""
        args = self.args
        world = int(args.world_size)
        ga = int(args.gradient_accumulation_steps)
        per_device = int(args.per_device_train_batch_size)
        if ga < 1 or per_device < 1:
            raise PrivacyConfigError("gradient_accumulation_steps and per_device_train_batch_size must be >= 1.")
        expected = per_device * ga * world
        if expected > n:
            raise PrivacyConfigError(
                f"expected batch size per_device_train_batch_size x gradient_accumulation_steps x world_size = "
                f"{per_device} x {ga} x {world} = {expected} exceeds the dataset size N={n} (sample rate q > 1). "
                "Lower the batch size or gradient_accumulation_steps."
            )
        q = expected / n
        spe = steps_per_epoch_for(q)
        planned = int(args.max_steps) if args.max_steps and args.max_steps > 0 else int(math.ceil(args.num_train_epochs * spe))
        if planned < 1:
            raise PrivacyConfigError(f"the run plans {planned} optimizer steps; set max_steps or num_train_epochs > 0.")
        self.num_train_examples = n
        self.sample_rate = q
        self.expected_batch_size = expected
        self.steps_per_epoch = spe
        self.planned_steps = planned

    def _resolve_delta(self, n: int) -> float:
        """``target_delta`` (refused at or above 1/N unless ``allow_large_delta``), or the default ``min(1e-5, 1/(10 N))``
        rounded down to a power of 10; N is the number of privacy units (the users U of a user-level run)."""
        pa = self.privacy_args
        if pa.target_delta is None:
            return default_delta(n)
        delta = float(pa.target_delta)
        refuse_large_delta(delta, num_examples=n, allow_large_delta=pa.allow_large_delta,
                           user_level=self.user_plan is not None)
        return delta

    def _resolve_noise_and_budget(self) -> tuple[float, int | None, dict[str, Any] | None]:
        """``(sigma, budget_steps, calibration)``: calibrated or fixed noise and the steps the budget allows."""
        pa = self.privacy_args
        if pa.target_epsilon is None and pa.noise_multiplier is None:
            raise PrivacyConfigError(
                "set target_epsilon (the noise is calibrated for the planned run), noise_multiplier (fixed noise), "
                "or both (fixed noise, training stops before exceeding the budget)."
            )
        if pa.noise_multiplier is None:
            return self._calibrate_noise()
        sigma = float(pa.noise_multiplier)
        from hf_ewtune.accounting._validation import check_accountable

        # Every accountant query of this run (logs, budget, card) stays in bounded time and memory.
        check_accountable(noise_multiplier=sigma, sample_rate=self.sample_rate, steps=self.planned_steps,
                          delta=self.delta, target_epsilon=pa.target_epsilon)
        if sigma == 0.0:
            if pa.target_epsilon is not None:
                raise BudgetExhaustedError(
                    f"noise_multiplier=0 cannot meet target_epsilon={pa.target_epsilon:g} (epsilon is infinite after one step)."
                )
            warnings.warn(
                "noise_multiplier=0: NO differential privacy (epsilon = inf). Use only for debugging.",
                UserWarning,
                stacklevel=4,
            )
        budget_steps = self._steps_within_budget(sigma) if pa.target_epsilon is not None else None
        return sigma, budget_steps, None

    def _accounting(self) -> Any:
        """What the run is accounted with: ``privacy_args.accountant`` (a name) under Poisson sampling, or the
        certified bound of the sampling used (:class:`~hf_ewtune.accounting.ShuffledAccountant` for shuffled
        batches, :class:`~hf_ewtune.accounting.random_allocation.RandomAllocationAccountant` for random allocation)."""
        from hf_ewtune.accounting import accountant_for_sampling
        from hf_ewtune.arguments import sampling_mode

        n, q = self.num_train_examples, self.sample_rate
        return accountant_for_sampling(self.privacy_args.accountant, sampling=sampling_mode(self.privacy_args),
                                       num_examples=n, batch_size=max(1, int(round(q * n))),
                                       steps_per_epoch=self.steps_per_epoch)

    def _calibrate_noise(self) -> tuple[float, int | None, dict[str, Any]]:
        """Calibrate sigma to ``target_epsilon`` over the planned steps (certified unless told otherwise)."""
        from hf_ewtune.accounting import calibrate

        pa = self.privacy_args
        result = calibrate(
            target_epsilon=pa.target_epsilon, delta=self.delta, sample_rate=self.sample_rate, steps=self.planned_steps,
            accountant=self._accounting(), certify=pa.certify_calibration,
        )
        sigma = float(result.noise_multiplier)
        budget_steps = self.planned_steps if result.certified else self._steps_within_budget(sigma)
        return sigma, budget_steps, result.to_dict()

    def _steps_within_budget(self, sigma: float) -> int:
        """Steps (at most the planned ones) whose certified epsilon stays within ``target_epsilon``."""
        from hf_ewtune.accounting import steps_within_budget

        pa, q, planned = self.privacy_args, self.sample_rate, self.planned_steps
        budget_steps = steps_within_budget(
            noise_multiplier=sigma, sample_rate=q, target_epsilon=pa.target_epsilon, delta=self.delta,
            accountant=self._accounting(), max_steps=planned,
        )
        if budget_steps == 0:
            raise BudgetExhaustedError(
                f"with noise_multiplier={sigma:g}, sample rate q={q:.4g} and delta={self.delta:.3g}, even one step "
                f"exceeds target_epsilon={pa.target_epsilon:g}. Raise noise_multiplier or target_epsilon, or "
                "leave noise_multiplier unset to calibrate it."
            )
        if budget_steps < planned:
            logger.warning(
                "DPTrainer: the privacy budget target_epsilon=%g allows %d of the %d planned steps with "
                "noise_multiplier=%g; training will stop after step %d.",
                pa.target_epsilon, budget_steps, planned, sigma, budget_steps,
            )
        return budget_steps

    def _attach_clipping_engine(self) -> None:
        """Hook per-example clipping into the model; the hooks belong to this trainer (engine_lifecycle.py).

        Hooks of an earlier DPTrainer still on the model are detached explicitly (with a warning); that trainer
        then refuses to train.
        """
        from hf_ewtune.engine_lifecycle import attach_engine

        pa = self.privacy_args
        self._engine = attach_engine(self, self.model, max_grad_norm=pa.max_grad_norm, clipping=pa.clipping)

    def _freeze_dp_settings(self) -> None:
        """Freeze sigma, q, qN, C and delta into the one :class:`DPSettings` the optimizer and accountant read."""
        self._dp_settings = DPSettings(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            expected_batch_size=self.expected_batch_size, max_grad_norm=self.privacy_args.max_grad_norm,
            sensitivity=self._engine.sensitivity, delta=self.delta,
        )
        self.__dict__.pop("_dp_settings_draft", None)

    def _build_privacy_callback(self, *, budget_steps: int | None, calibration: dict[str, Any] | None) -> PrivacyCallback:
        """The callback that accounts every step, enforces the budget and saves the privacy state."""
        from hf_ewtune.accounting import make_accountant

        pa, args = self.privacy_args, self.args
        accountant = make_accountant(self._accounting())
        record = setup_record(
            pa, accountant=accountant, settings=self._dp_settings, world_size=int(args.world_size),
            gradient_accumulation_steps=int(args.gradient_accumulation_steps),
            per_device_train_batch_size=int(args.per_device_train_batch_size), planned_steps=self.planned_steps,
            steps_per_epoch=self.steps_per_epoch, calibration=calibration, users=self.user_plan,
        )
        return PrivacyCallback(
            accountant=accountant, accountant_name=accountant.name, settings=self._dp_settings,
            target_epsilon=pa.target_epsilon, budget_steps=budget_steps, record=record,
        )

    def _tag_model(self) -> None:
        """Tags that ``Trainer.push_to_hub`` and PEFT's card writer carry over (best effort)."""
        try:
            from hf_ewtune.model_card import add_privacy_tags

            add_privacy_tags(self.model)
        except Exception as exc:  # pragma: no cover - tagging is best effort
            logger.debug("could not tag the model: %s", exc)

    def remove_hooks(self) -> None:
        """Take this trainer's clipping hooks off the model (idempotent); the trainer cannot train afterwards.

        Call it to use the model without per-example clipping (plain inference, a non-private trainer).
        The hooks are also removed when the trainer is garbage-collected, and when a newer ``DPTrainer``
        is built on the same model (it detaches this one's hooks and logs a warning; training with this
        trainer afterwards raises :class:`~hf_ewtune.errors.PrivacyStateError`).
        """
        if self._engine is not None:
            self._engine.remove()

    # ------------------------------------------------------------------------------- training
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        """``Trainer.train`` that restores the privacy accountant when resuming.

        ``resume_from_checkpoint`` must name a checkpoint written by ``DPTrainer`` (it holds
        ``_privacy_state.json``); otherwise :class:`~hf_ewtune.errors.PrivacyStateError` is raised rather than
        restarting the accounting from zero. HF fast-forwards the dataloader past the steps already taken;
        those replayed draws are never accounted (the accountant only steps on real optimizer steps) and,
        the sampler being seeded afresh, the resumed run continues with fresh Poisson draws.

        A fresh run (not resuming, no earlier ``train()`` call on this trainer) whose ``output_dir`` already
        holds ``checkpoint-*`` folders raises :class:`~hf_ewtune.errors.PrivacyConfigError` before training
        (see :mod:`hf_ewtune.stale_checkpoints`): resume that run, or use a new ``output_dir``.
        """
        require_attached(self._engine)
        check_plan_unchanged(self)  # privacy_args, train_dataset, batch/step arguments as planned
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        callback = self.privacy_callback
        assert callback is not None
        if resume_from_checkpoint is not None or callback.steps == 0:  # never mix two runs' checkpoints
            refuse_stale_checkpoints(self.args.output_dir, resuming_from=resume_from_checkpoint)
        getattr(callback.accountant, "start_run", lambda: None)()  # shuffled batches: a (re)start may begin mid-epoch
        if resume_from_checkpoint is not None:
            state = PrivacyState.load(resume_from_checkpoint)  # validated, cross-checked with trainer_state.json
            check_resumed_sampling(state, accountant_name=callback.accountant_name,
                                   sampling=sampling_mode(self.privacy_args),
                                   accountant_options=callback.accountant.options())
            callback.load_state(state)
            self._check_resumed_state(state)
            check_resumed_unit(state, self.user_plan, self.privacy_args.privacy_unit)  # user vs example level
            self._refresh_budget()
            logger.info(
                "DPTrainer: resumed privacy accounting from %s (%d steps already taken).",
                resume_from_checkpoint, callback.steps,
            )
        elif callback.steps > 0:
            # A second train() call on the same trainer trains on the same data again: keep composing.
            self._refresh_budget()
        if hasattr(callback.accountant, "ensure_room"):  # the first step must not be refused mid-run
            callback.accountant.ensure_room(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._announce_privacy()
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _announce_privacy(self) -> None:
        """Print sigma, delta, q, the planned steps and the certified target once, where scripts show it.

        Logged at WARNING level (the level ``transformers``' example scripts show by default) on the main
        process only.
        """
        if self.is_world_process_zero() and self.privacy_callback is not None:
            logger.warning("%s", privacy_plan_line(self))

    def _check_resumed_state(self, state: PrivacyState) -> None:
        for key, mine in (
            ("noise_multiplier", self.noise_multiplier),
            ("sample_rate", self.sample_rate),
            ("max_grad_norm", self._dp_settings.max_grad_norm),
            ("delta", self.delta),
        ):
            theirs = getattr(state, key)
            if theirs is not None and not math.isclose(float(theirs), float(mine), rel_tol=1e-9):
                logger.warning(
                    "DPTrainer: resuming with %s=%s, the checkpoint used %s; the accountant composes both.", key, mine, theirs
                )
        if state.clipping not in (None, self.privacy_args.clipping):
            logger.warning("DPTrainer: resuming with clipping=%s, the checkpoint used %s.", self.privacy_args.clipping, state.clipping)

    def _refresh_budget(self) -> None:
        """Recompute the total steps allowed by ``target_epsilon`` given the accountant history."""
        pa = self.privacy_args
        callback = self.privacy_callback
        if pa.target_epsilon is None or callback is None:
            return
        from hf_ewtune.accounting import steps_within_budget

        remaining_planned = max(self.planned_steps - callback.steps, 0)
        further = steps_within_budget(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, target_epsilon=pa.target_epsilon,
            delta=self.delta, already=callback.accountant, max_steps=max(remaining_planned, 1),
        )
        if further == 0:
            raise BudgetExhaustedError(
                f"the privacy budget target_epsilon={pa.target_epsilon:g} is spent: {callback.steps} steps already "
                f"taken give a certified epsilon of {callback.accountant.get_epsilon(self.delta):.4g}; one more step "
                "would exceed it."
            )
        callback.budget_steps = callback.steps + further

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """A plain DataLoader over :class:`~hf_ewtune.sampling.PoissonBatchSampler` (not accelerate-prepared)."""
        from hf_ewtune.arguments import sampling_mode

        check_plan_unchanged(self)
        dataset = self.train_dataset
        collator = self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler_kwargs = dict(
            num_micro_batches=self.args.gradient_accumulation_steps * self.args.world_size,
            rank=self.args.process_index,
            world_size=self.args.world_size,
            steps_per_epoch=self.steps_per_epoch,
            seed=self._sampling_seed(),
            sampling=sampling_mode(self.privacy_args),
        )
        if self.user_plan is not None:  # Poisson over users, whole users per micro-batch (user_level.py)
            from hf_ewtune.user_level import user_dataloader_parts

            sampler, dataset, collator = user_dataloader_parts(self, dataset, collator, sampler_kwargs)
        else:
            sampler = PoissonBatchSampler(self.num_train_examples, self.sample_rate, **sampler_kwargs)
        params: dict[str, Any] = {
            "batch_sampler": sampler,
            # FSDP2: an empty slice still runs a (zero-weight) forward; it needs a row to run (lockstep)
            "collate_fn": EmptyAwareCollator(collator, dummy_features=[dataset[0]] if self.is_fsdp2 else None),
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory,
        }
        if self.args.dataloader_num_workers > 0:
            params["persistent_workers"] = self.args.dataloader_persistent_workers
            if self.args.dataloader_prefetch_factor is not None:
                params["prefetch_factor"] = self.args.dataloader_prefetch_factor
        return DPDataLoader(dataset, **params)

    def _sampling_seed(self) -> int:
        """Seed shared by all ranks: from ``noise_seed`` and the steps already taken, or OS entropy (rank 0)."""
        steps = self.privacy_callback.steps if self.privacy_callback is not None else 0
        if self.privacy_args.noise_seed is not None:
            return derive_seed(self.privacy_args.noise_seed, _SAMPLING_STREAM, steps)
        seed = new_seed()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            device = self.args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([seed], dtype=torch.int64, device=device)
            torch.distributed.broadcast(t, src=0)
            seed = int(t.item())
        return seed

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, wrapped in :class:`~hf_ewtune.noise.DPOptimizer` (noise once per step)."""
        optimizer = super().create_optimizer(model)
        if self.is_deepspeed_zero:  # the noise enters through ZeRO's gradient path (ZeroTrainerFeed), not here
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, DPOptimizer) or isinstance(inner, DPOptimizer):
            return optimizer
        callback = self.privacy_callback
        engine = self._engine
        self.optimizer = DPOptimizer(
            optimizer,
            settings=self._dp_settings,  # the same frozen object the accountant's callback reads
            noise_seed=self._base_noise_seed,
            step_index_fn=(lambda: callback.steps) if callback is not None else None,
            clipping_norm_fn=lambda: engine.sensitivity,
        )
        return self.optimizer

    def _build_zero_feed(self) -> Any:
        """The DeepSpeed path's noise source, registered with the privacy callback in place of a DPOptimizer."""
        from hf_ewtune.distributed.deepspeed_zero import ZeroTrainerFeed

        callback = self.privacy_callback
        engine = self._engine
        feed = ZeroTrainerFeed(settings=self._dp_settings, noise_seed=self._base_noise_seed,
                               step_index_fn=(lambda: callback.steps) if callback is not None else (lambda: 0),
                               clipping_norm_fn=lambda: engine.sensitivity)
        if callback is not None:
            callback.noise_source = feed
        return feed

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        # The pre-step gradient is the UN-noised clipped sum: its norm is not private, so it is not logged.
        # Called on every optimizer step just before it: check that every micro-batch of the step went through
        # DPTrainer.training_step (per-example clipping), not through a replacement that never calls it.
        ran, self._dp_micro_steps = getattr(self, "_dp_micro_steps", 0), 0
        expected = int(self.args.gradient_accumulation_steps)
        if ran != expected:
            raise PrivacyStateError(
                f"DPTrainer.training_step ran for {ran} of the {expected} micro-batches of this optimizer step: a "
                "training_step replaced on the instance or overridden without calling DPTrainer.training_step "
                "computes gradients without per-example clipping, so the step cannot be accounted. Wrap the "
                "original (call it for every micro-batch) or override compute_per_example_loss instead.")
        return None

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> None:
        # num_items_in_batch is ignored (per-example losses). HF's count would also raise KeyError('labels')
        # when an accumulation mixes non-empty and empty micro-batches (the empty marker has no labels).
        return None

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # An empty micro-batch still joins the token-count gather, so all ranks run the same collectives.
        if is_empty_batch(inputs):
            if self.args.include_num_input_tokens_seen not in ("no", False):
                zero = torch.zeros((), dtype=torch.int64, device=self.args.device)
                self.state.num_input_tokens_seen += self.accelerator.gather(zero).sum().item()
            return
        super()._track_num_input_tokens(inputs)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        """Forward, per-example losses, clipped backward into ``p.grad``; ``num_items_in_batch`` is ignored.

        Returns the detached sum of this micro-batch's losses divided by the expected per-rank logical
        batch (``per_device_train_batch_size x gradient_accumulation_steps``), so that the Trainer's summed
        ``loss`` log estimates the mean example loss. (That logged training loss is computed without noise.)
        """
        model.train()
        if self.is_deepspeed_zero:  # the noise source is the ZeroTrainerFeed (the optimizer is DeepSpeed's)
            if getattr(self, "_zero_feed", None) is None:
                raise PrivacyStateError("DeepSpeed ZeRO training without DPTrainer's noise feed: the step cannot be "
                                        "accounted. Build the trainer with DPTrainer's own set-up (no override of "
                                        "_build_zero_feed).")
        else:
            require_noisy_optimizer(getattr(self, "optimizer", None))  # before any gradient of this step exists
        self._dp_micro_steps = getattr(self, "_dp_micro_steps", 0) + 1  # checked before the optimizer step
        norm = float(self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps)
        empty = is_empty_batch(inputs)
        if self.is_deepspeed_zero:
            return self._zero_training_step(model, inputs, empty=empty, norm=norm)
        if empty and not self.is_fsdp2:
            return torch.zeros((), device=self.args.device)
        require_attached(self._engine)
        if self.is_fsdp2 and hasattr(model, "set_requires_gradient_sync"):
            # FSDP2's own gradient sync never sees a gradient (the engine reduce-scatters clipped sums itself); the
            # Trainer's no_sync for accumulation would only change FSDP2's state machine: keep it as in one step.
            model.set_requires_gradient_sync(True)
        inputs = self._prepare_inputs(inputs)
        inputs = dict(inputs)
        # Forward through the unwrapped module: DDP must neither sync gradients (we all-reduce the noisy
        # sums ourselves) nor broadcast buffers on forwards that some ranks skip (empty micro-batches).
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        total, norm = self._clipped_backward(model, inputs, empty=empty, norm=norm)
        return total / norm

    def _clipped_backward(self, model: torch.nn.Module, inputs: dict[str, Any], *, empty: bool,
                          norm: float) -> tuple[torch.Tensor, float]:
        """Forwards and clipped backwards of one micro-batch (physical chunks; FSDP2 lockstep dummies)."""
        total = torch.zeros((), device=self.args.device)
        chunks: list[Any] = []
        units = None
        batch_size = 0
        if not empty:
            units = inputs.pop(UNITS_KEY, None)  # user-level DP: each row's user (rows of a user clipped as one)
            if (units is None) != (self.user_plan is None):
                raise PrivacyConfigError(
                    "user-level DP (user_id_column) needs every training batch from DPTrainer's user sampler, which "
                    "tags each row with its user; this batch " + ("is untagged." if units is None else "is tagged "
                    "but user_id_column is not set.") + " Train through DPTrainer.get_train_dataloader.")
            if units is not None:
                norm *= self.user_plan.mean_rows_per_step()
            check_micro_batch(inputs, model=self.model, task=self.per_example_loss_task)
            batch_size = self._micro_batch_size(inputs)
            limit = self.privacy_args.max_physical_batch_size or batch_size
            chunks = list(whole_unit_chunks(batch_size, limit, units))
        # FSDP2: every rank runs as many forwards as the busiest one (all-gathers in step). Agreed BEFORE any
        # forward, so that this all-reduce meets the other ranks' all-reduce, not their first all-gather.
        forwards = max_over_ranks(len(chunks), device=self.args.device) if self.is_fsdp2 else len(chunks)
        for sl in chunks:
            chunk = {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size else v)
                     for k, v in inputs.items()}
            rows = len(range(batch_size)[sl]) if isinstance(sl, slice) else len(sl)
            losses = check_per_example_losses(self.compute_per_example_loss(model, chunk), rows)
            self._engine.backward(losses, units=None if units is None else units[sl])
            total = total + losses.detach().sum().to(total.device)
        missing = forwards - len(chunks)
        if missing > 0:
            dummy = inputs.get(DUMMY_ROW_KEY) if empty else {
                k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size else v)
                for k, v in inputs.items()}
            for _ in range(missing):
                self._zero_weight_backward(model, dummy)
        return total, norm

    def _zero_training_step(self, model: Any, inputs: dict[str, Any], *, empty: bool, norm: float) -> torch.Tensor:
        """DeepSpeed ZeRO-1/2: clipped backward through ``engine.module``, then the clipped sums (noised on rank 0 on
        the boundary, scaled by ``W / (q N)``) through accelerate's ``backward`` (ZeRO's reduction; on the boundary
        the engine's step). Every rank runs it for every micro-batch; an empty slice runs no forward."""
        require_attached(self._engine)
        feed = self._zero_feed
        feed.bind(model)
        module = model.module  # never the engine's forward: it hooks the outputs so that their backward is ZeRO's
        inputs = dict(self._prepare_inputs(inputs)) if not empty else inputs
        feed.begin()
        try:
            total, norm = self._clipped_backward(module, inputs, empty=empty, norm=norm)
        except BaseException:
            feed.abort()
            raise
        feed.finish(boundary=bool(self.accelerator.sync_gradients),
                    backward=lambda loss: self.accelerator.backward(loss, scale_wrt_gas=False))
        return total / norm

    def _zero_weight_backward(self, model: torch.nn.Module, dummy: dict[str, Any] | None) -> None:
        """FSDP2 lockstep: the forward and clipped backward of one dummy row whose loss is multiplied by 0.

        ``dummy`` is the empty marker's :data:`~hf_ewtune.sampling.DUMMY_ROW_KEY` row (the first training example,
        collated) or the first row of this rank's micro-batch. Its per-example gradient, hence its clipped
        contribution to every ``p.grad``, is exactly zero.
        """
        if dummy is None:
            raise PrivacyStateError(
                "under FSDP2 an empty micro-batch must carry a dummy row (DPTrainer.get_train_dataloader adds it); "
                "train through DPTrainer's own dataloader.")
        dummy = {k: v for k, v in dict(dummy).items() if k not in (UNITS_KEY, EMPTY_BATCH_KEY, DUMMY_ROW_KEY)}
        losses = check_per_example_losses(self.compute_per_example_loss(model, dummy), 1)
        self._engine.backward(zero_weight_loss(losses))

    def _micro_batch_size(self, inputs: dict[str, Any]) -> int:
        """Number of privacy units in a micro-batch (default: the rows of ``labels``, else of the first batched
        tensor); trainers whose batches hold several rows per unit (DPO's chosen/rejected) override it."""
        return batch_size_of(inputs)

    def compute_per_example_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The loss of every example of ``inputs``, ``Tensor[B]``, example ``i``'s depending on example ``i`` only.

        ``training_step`` calls this on each (physical) micro-batch and clips each example's gradient of it.
        The default runs the forward and computes the loss from the logits and ``labels``
        (:func:`hf_ewtune.losses.per_example_loss`, task from ``per_example_loss_task`` or inferred), honouring
        ``TrainingArguments.label_smoothing_factor`` per example and a ``compute_loss_func=`` (called once per
        example on that example's slice of the outputs). Override it for a custom objective; run the forward
        inside ``self.compute_loss_context_manager()`` as the default does. Mixing examples here (a batch
        mean, a contrastive loss over the batch) voids the privacy guarantee.

        Args:
            model: The (unwrapped) model to run.
            inputs: The micro-batch, ``labels`` included.

        Returns:
            ``Tensor[B]`` of per-example losses that requires grad.
        """
        return default_per_example_loss(self, model, inputs)

    # ------------------------------------------------------------------------------ reporting
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``epsilon`` (certified) and ``epsilon_edgeworth`` (estimate) to every log entry."""
        if self.privacy_callback is not None:
            logs.update(self.privacy_callback.epsilon_logs())
        super().log(logs, start_time)

    def get_privacy_spent(self):
        """``PrivacyReport`` (``.epsilon`` certified, ``.edgeworth_epsilon`` estimate) for the steps taken so far."""
        assert self.privacy_callback is not None
        return self.privacy_callback.accountant.get_privacy_spent(delta=self.delta)

    def privacy_state(self) -> dict[str, Any]:
        """The privacy state written to ``_privacy_state.json`` (no RNG state)."""
        assert self.privacy_callback is not None
        return self.privacy_callback.state_dict(getattr(self, "state", None))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` plus ``_privacy_state.json`` and the privacy block of the card, in the same folder.

        The card (``README.md``) gets the guarantee whatever the model type: a PEFT model's own card is
        completed, a folder without a card gets a minimal one. (The Trainer's internal saves, checkpoints and
        ``push_to_hub``, leave the card to :meth:`create_model_card`.)
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save and self.privacy_callback is not None:
            folder = output_dir if output_dir is not None else self.args.output_dir
            state = self.privacy_state()
            save_privacy_state(folder, state)
            if not _internal_call:
                self._add_privacy_card(state, folder)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Intermediate pushes upload output_dir: refresh its privacy state and card first. Every upload (output_dir,
        # and the checkpoint folder for hub_strategy "checkpoint"/"all_checkpoints") leaves the privacy state and
        # training logs on this machine (hf_ewtune.hub_safety).
        if self.args.push_to_hub and self.is_world_process_zero() and self.privacy_callback is not None:
            state = self.privacy_state()
            save_privacy_state(self.args.output_dir, state)
            self._add_privacy_card(state)
        with trainer_uploads_through_safety_net():
            super()._push_from_checkpoint(checkpoint_folder)

    def _add_privacy_card(self, state: dict[str, Any], folder: str | None = None) -> None:
        try:
            from hf_ewtune.model_card import add_privacy_to_model_card
        except ImportError:  # pragma: no cover - until the model-card module lands
            logger.warning("hf_ewtune.model_card is unavailable: the model card has no privacy section.")
            return
        add_privacy_to_model_card(folder if folder is not None else self.args.output_dir, state)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.push_to_hub`` that never uploads the privacy state or the non-private training logs.

        Whatever their folder depth (``output_dir/final/_privacy_state.json`` after ``save_model(output_dir +
        "/final")`` included), ``_privacy_state.json``, ``trainer_state.json``, ``*_results.json``, TensorBoard
        event files and the other files of :data:`hf_ewtune.hub_safety.HUB_IGNORE_PATTERNS` stay on this machine;
        the exact file list is checked before anything is sent (:class:`~hf_ewtune.hub_safety.SafeHubApi`).
        TensorBoard event files (``report_to="tensorboard"`` writes them under ``output_dir/runs``) carry the
        training loss, computed from the private batches without noise: a warning names the ones left out.
        """
        if self.is_world_process_zero():
            logs = non_private_logs(self.args.output_dir)
            if logs:
                logger.warning(
                    "push_to_hub leaves out %d training-log file(s) under %s (e.g. %s): they hold the training loss "
                    "computed without noise, which the privacy guarantee does not cover.",
                    len(logs), self.args.output_dir, logs[0],
                )
        with trainer_uploads_through_safety_net():
            return super().push_to_hub(*args, **kwargs)

    def create_model_card(self, **kwargs: Any) -> None:
        """``Trainer.create_model_card`` plus the privacy block (YAML metadata and a Privacy section).

        ``push_to_hub`` calls this before uploading ``output_dir``, so pushed cards carry the privacy block.
        The training losses the Trainer logged are computed from the private batches without noise, so
        the card's "Training results" table shows them as withheld (evaluation metrics stay).
        """
        history = self.state.log_history
        self.state.log_history = [
            {k: (WITHHELD_LOSS if k in NON_PRIVATE_LOG_KEYS else v) for k, v in entry.items()} for entry in history
        ]
        try:
            super().create_model_card(**kwargs)
        finally:
            self.state.log_history = history
        if not self.is_world_process_zero():
            return
        self._add_privacy_card(self.privacy_state())
