"""``PrivacyArguments``: the privacy settings of a :class:`~hf_ewtune.DPTrainer` run.

It is the single definition of the privacy fields and their checks. ``DPTrainingArguments`` (in
:mod:`hf_ewtune.training_arguments`) extends ``transformers.TrainingArguments`` with these same fields; that is
the class to give ``HfArgumentParser`` next to other dataclasses (see docs/configuration.md).
``HfArgumentParser(PrivacyArguments)`` alone also works (``--target_epsilon 3 --max_grad_norm 1.0 ...``).
Built by hand, its fields are keyword-only.

Example:
    >>> from hf_ewtune import PrivacyArguments
    >>> p = PrivacyArguments(target_epsilon=3.0, max_grad_norm=1.0)
    >>> p.accountant, p.clipping, p.poisson_sampling
    ('edgeworth', 'flat', True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hf_ewtune.checks import (
    CLIPPING_STYLES,
    check_bool,
    check_choice,
    check_delta,
    check_max_grad_norm,
    check_noise_multiplier,
    check_optional_int,
    check_privacy_unit,
    check_target_epsilon,
    check_user_arguments,
)
from hf_ewtune.errors import PrivacyConfigError



def default_delta(num_examples: int) -> float:
    """The default ``target_delta`` for ``num_examples`` records: ``min(1e-5, 1/(10 N)) rounded down to a power of 10`` rounded DOWN to a power of 10.

    It is always strictly below ``1/N`` (a delta of ``1/N`` allows releasing one record outright). The
    rounding keeps the published delta from revealing the dataset size N (sensitive under add/remove DP).

    Example:
        >>> default_delta(1000)
        1e-05
        >>> default_delta(11_476)
        1e-06
        >>> default_delta(1_000_000)
        1e-07
    """
    if num_examples <= 0:
        raise PrivacyConfigError(f"the training set must be non-empty to choose a default delta, got N={num_examples}.")
    raw = min(1e-5, 1.0 / (10.0 * num_examples))
    return float(f"1e{math.floor(math.log10(raw) + 1e-12)}")


@dataclass(kw_only=True)
class PrivacyArguments:
    """Privacy settings for differentially private training (DP-SGD with Poisson sampling).

    Exactly how the noise is chosen depends on which of ``target_epsilon`` and ``noise_multiplier`` are set:

    * ``target_epsilon`` only: the noise multiplier is calibrated so that the *planned* run (its steps
      derived from ``num_train_epochs``/``max_steps`` and the sample rate) ends within the target.
    * ``noise_multiplier`` only: fixed noise; epsilon is reported but not enforced.
    * both: fixed noise, and training stops before the step that would exceed ``target_epsilon``.
    * neither: :class:`~hf_ewtune.errors.PrivacyConfigError` when the trainer is built.

    Every enforced or reported epsilon is a certified upper bound (PLD accountant of ``dp-accounting``
    unless ``accountant="rdp"``); the Edgeworth value is an estimate, shown beside it.

    Args:
        target_epsilon: Privacy budget epsilon (> 0).
        noise_multiplier: Noise standard deviation divided by the clipping sensitivity (>= 0; 0 disables
            privacy and is reported as epsilon = inf, for debugging only).
        target_delta: Delta of the (epsilon, delta) guarantee. Default ``None`` means
            ``min(1e-5, 1/(10 N)) rounded down to a power of 10`` for a training set of N examples (always below 1/N).
        max_grad_norm: Per-example clipping norm C (> 0). Replaces ``TrainingArguments.max_grad_norm``: the
            trainer turns the batch-gradient clipping off on its own copy of the training arguments.
        accountant: ``"edgeworth"`` (EW-Tune estimate shown, certified PLD bound enforced), ``"pld"`` or ``"rdp"``.
        clipping: ``"flat"`` (default), ``"per_layer"`` or ``"automatic"``.
        poisson_sampling: Draw every logical batch by Poisson sampling (what ``accountant`` analyses). With
            ``False``, shuffled fixed-size batches are used and certified by their own, looser bound (no
            amplification, replace-one adjacency: :class:`~hf_ewtune.accounting.ShuffledAccountant`).
        sampling: How logical batches are drawn, overriding ``poisson_sampling``: ``"poisson"``, ``"shuffled"``
            or ``"random_allocation"`` (balls-in-bins: every example in one uniformly random step of each epoch
            of ``round(1/q)`` steps, so it is seen exactly once per epoch and batch sizes vary; certified by
            :class:`~hf_ewtune.accounting.random_allocation.RandomAllocationAccountant`, add-or-remove-one
            adjacency; example-level only). ``None`` (default): from ``poisson_sampling``. Shuffled and random
            allocation are accounted by their own bounds, whatever ``accountant`` says.
        noise_seed: Seed for the noise and the Poisson sampling. ``None`` (default, recommended) seeds them
            from ``secrets`` (OS entropy: unpredictable but not a CSPRNG). A fixed seed makes runs
            reproducible — for tests only, since a known seed lets anyone remove the noise.
        certify_calibration: When calibrating from ``target_epsilon``, verify the chosen noise with the
            certified accountant (recommended; ``False`` trusts the Edgeworth estimate alone and is recorded).
        max_physical_batch_size: Optional cap on the examples in one forward/backward pass; larger Poisson
            micro-batches are processed in chunks (no effect on privacy).
        privacy_unit: What one row of ``train_dataset`` is, i.e. the unit the guarantee protects, as written
            into the privacy state and the model card. ``"example"`` (default) when each row is one record;
            a description such as ``"1024-token block of the concatenated corpus"`` when rows were built by
            ``group_texts``-style grouping, so that the card does not claim record-level protection (see
            docs/privacy_unit.md). It changes no computation.
        allow_large_delta: Accept a ``target_delta`` at or above 1/N (refused by default: such a delta
            permits releasing whole training examples). The model card then says what it permits
            (see :mod:`hf_ewtune.large_delta`).
        user_id_column: Name of the ``train_dataset`` column holding each row's user id. Set, the privacy unit
            is a **user** (all of their rows): Poisson sampling over users at q = expected users per step / U
            (``per_device_train_batch_size`` then counts users), each user's summed gradient clipped to C as
            one unit. ``None`` (default): example-level privacy. See docs/user_level.md.
        max_examples_per_user: With ``user_id_column``: at most this many rows of a sampled user per step (a
            uniformly random subset, drawn afresh each step); ``None`` (default) uses all of a user's rows.
    """

    target_epsilon: Optional[float] = field(default=None, metadata={"help": "Privacy budget epsilon (certified)."})
    noise_multiplier: Optional[float] = field(
        default=None, metadata={"help": "Noise multiplier sigma (fixed noise). Leave unset to calibrate from target_epsilon."}
    )
    target_delta: Optional[float] = field(
        default=None, metadata={"help": "Delta; default min(1e-5, 1/(10 N)) rounded down to a power of 10 for N training examples."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Per-example clipping norm C."})
    accountant: str = field(
        default="edgeworth", metadata={"help": "edgeworth | pld | rdp (the enforced epsilon is always certified)."}
    )
    clipping: str = field(default="flat", metadata={"help": "flat | per_layer | automatic."})
    poisson_sampling: bool = field(default=True, metadata={"help": "Poisson-sample each logical batch."})
    sampling: Optional[str] = field(
        default=None,
        metadata={"help": "poisson | shuffled | random_allocation (balls-in-bins: each example in one random step "
                          "per epoch). Default: from poisson_sampling."},
    )
    noise_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed for noise and sampling (default: OS entropy). Tests only."}
    )
    certify_calibration: bool = field(
        default=True, metadata={"help": "Certify the calibrated noise with the PLD accountant."}
    )
    max_physical_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Process larger micro-batches in chunks of at most this many examples."}
    )
    privacy_unit: str = field(
        default="example",
        metadata={"help": "What one training row is (the protected unit), e.g. '1024-token block of the "
                          "concatenated corpus' after group_texts. Written into the privacy state and the model card."},
    )
    allow_large_delta: bool = field(
        default=False, metadata={"help": "Accept target_delta >= 1/N (it permits releasing whole examples; the card says so)."}
    )
    user_id_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column of train_dataset with each row's user id: user-level privacy (the unit is a user; "
                          "the batch size counts users). Default: example-level."},
    )
    max_examples_per_user: Optional[int] = field(
        default=None,
        metadata={"help": "User-level privacy: at most this many rows of a sampled user per step (random subset); "
                          "default: all of them."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's value (not their combination, which the trainer checks with the data).

        The checks are those of :mod:`hf_ewtune.checks`, which the accountants, calibration and the clipping
        engine also use.
        """
        validate_privacy_fields(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the fields (the keyword arguments ``DPTrainer`` accepts in place of ``privacy_args``)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def sampling_mode(settings: Any) -> str:
    """The run's sampling: ``"poisson"``, ``"shuffled"`` or ``"random_allocation"`` (``sampling``, else from
    ``poisson_sampling``).

    Example:
        >>> sampling_mode(PrivacyArguments(noise_multiplier=1.0, sampling="random_allocation"))
        'random_allocation'
    """
    from hf_ewtune.sampling import resolve_sampling

    return resolve_sampling(getattr(settings, "sampling", None), poisson=settings.poisson_sampling)


def validate_privacy_fields(settings: Any) -> None:
    """Check the privacy fields of ``settings`` (a ``PrivacyArguments`` or ``DPTrainingArguments``).

    Raises:
        PrivacyConfigError: naming the first field with a bad value.
    """
    if settings.target_epsilon is not None:
        check_target_epsilon(settings.target_epsilon)
    if settings.noise_multiplier is not None:
        check_noise_multiplier(settings.noise_multiplier)
    if settings.target_delta is not None:
        check_delta(settings.target_delta, name="target_delta")
    check_max_grad_norm(settings.max_grad_norm)
    from hf_ewtune.accounting.registry import check_accountant_name  # the registry is the one list of names

    check_accountant_name(settings.accountant)
    check_choice(settings.clipping, CLIPPING_STYLES, name="clipping")
    check_bool(settings.poisson_sampling, name="poisson_sampling")
    from hf_ewtune.sampling import resolve_sampling

    mode = resolve_sampling(getattr(settings, "sampling", None), poisson=settings.poisson_sampling)
    if mode == "random_allocation" and settings.user_id_column is not None:
        raise PrivacyConfigError(
            "sampling='random_allocation' is not supported with user_id_column (user-level privacy): its certified "
            "bound is for example-level add-or-remove adjacency only. Use the default Poisson sampling for "
            "user-level runs, or drop user_id_column.")
    check_bool(settings.certify_calibration, name="certify_calibration")
    check_optional_int(settings.noise_seed, name="noise_seed")
    check_optional_int(settings.max_physical_batch_size, name="max_physical_batch_size", minimum=1)
    check_privacy_unit(settings.privacy_unit)
    check_bool(settings.allow_large_delta, name="allow_large_delta")
    check_user_arguments(settings.user_id_column, settings.max_examples_per_user, settings.privacy_unit)


# ---- command line: PrivacyArguments beside TrainingArguments ------------------------------------------
#: On the command line the per-example clipping norm is ``--per_example_max_grad_norm``, because
#: ``TrainingArguments`` already owns ``--max_grad_norm`` (which DPTrainer sets to 0).
CLI_RENAMES = {"max_grad_norm": "per_example_max_grad_norm"}


def privacy_cli_dataclass() -> type:
    """A dataclass with :class:`PrivacyArguments`' fields, renamed per :data:`CLI_RENAMES` so that it can share
    one ``HfArgumentParser`` with ``TrainingArguments`` (whose ``--max_grad_norm`` would otherwise clash).

    ``--per_example_max_grad_norm`` defaults to ``None`` here (meaning C = 1.0) so that an unset flag can be told
    apart from an explicit one."""
    import typing

    hints = typing.get_type_hints(PrivacyArguments)
    specs = []
    for f in dataclasses.fields(PrivacyArguments):
        name, kind, default = CLI_RENAMES.get(f.name, f.name), hints[f.name], f.default
        if f.name in CLI_RENAMES:
            kind, default = Optional[kind], None
        specs.append((name, kind, field(default=default, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass("PrivacyCLIArguments", specs, kw_only=True)


def parse_args_with_privacy(*dataclass_types: type, args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line into ``dataclass_types`` (e.g. ``TrainingArguments``) plus a ``PrivacyArguments``.

    Prefer ``HfArgumentParser(DPTrainingArguments)`` (see docs/configuration.md), where ``--max_grad_norm`` is
    the per-example clipping norm and JSON configs work; this function is kept for existing scripts.

    The clipping norm is given as ``--per_example_max_grad_norm`` (``--max_grad_norm`` belongs to
    ``TrainingArguments``). ``PrivacyArguments`` alone can also be parsed with a plain
    ``HfArgumentParser(PrivacyArguments)``, where the flag is ``--max_grad_norm``.

    Args:
        *dataclass_types: Other dataclasses to fill (default: ``TrainingArguments``).
        args: Argument list (default: ``sys.argv[1:]``).

    Returns:
        The parsed instances, in order, followed by the :class:`PrivacyArguments`.

    Raises:
        PrivacyConfigError: ``--max_grad_norm`` was set without ``--per_example_max_grad_norm`` (it would be
            silently ignored: DPTrainer turns the Trainer's batch clipping off).

    Example:
        >>> from transformers import TrainingArguments
        >>> targs, pargs = parse_args_with_privacy(
        ...     TrainingArguments, args=["--output_dir", "/tmp/o", "--target_epsilon", "3",
        ...                              "--per_example_max_grad_norm", "0.5"])
        >>> pargs.max_grad_norm, pargs.target_epsilon
        (0.5, 3.0)
    """
    from transformers import HfArgumentParser, TrainingArguments

    types = tuple(dataclass_types) or (TrainingArguments,)
    parsed = HfArgumentParser((*types, privacy_cli_dataclass())).parse_args_into_dataclasses(args=args)
    values = dataclasses.asdict(parsed[-1])
    if values["per_example_max_grad_norm"] is None:
        batch_norm = [getattr(p, "max_grad_norm", None) for p in parsed[:-1]]
        set_norms = [v for v in batch_norm if v not in (None, 0, 0.0, 1.0)]
        if set_norms:
            raise PrivacyConfigError(
                f"--max_grad_norm {set_norms[0]:g} sets the Trainer's clipping of the batch gradient, which DPTrainer "
                f"turns off; the per-example clipping norm would silently stay at 1.0. Pass --per_example_max_grad_norm "
                f"{set_norms[0]:g} instead (or parse with HfArgumentParser(DPTrainingArguments), where --max_grad_norm "
                "IS the per-example norm)."
            )
        values["per_example_max_grad_norm"] = 1.0
    inverse = {v: k for k, v in CLI_RENAMES.items()}
    privacy = PrivacyArguments(**{inverse.get(k, k): v for k, v in values.items()})
    return (*parsed[:-1], privacy)
