"""``PrivacyArguments``: the privacy settings of a :class:`~hf_ewtune.DPTrainer` run.

The dataclass sits beside ``transformers.TrainingArguments`` and is readable by ``HfArgumentParser``
(``--target_epsilon 3 --max_grad_norm 1.0 ...``). Built by hand, its fields are keyword-only.

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

from hf_ewtune.errors import PrivacyConfigError

ACCOUNTANTS = ("edgeworth", "pld", "rdp")
CLIPPING_STYLES = ("flat", "per_layer", "automatic")


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
        max_grad_norm: Per-example clipping norm C (> 0). Replaces ``TrainingArguments.max_grad_norm``,
            which the trainer sets to 0.
        accountant: ``"edgeworth"`` (EW-Tune estimate shown, certified PLD bound enforced), ``"pld"`` or ``"rdp"``.
        clipping: ``"flat"`` (default), ``"per_layer"`` or ``"automatic"``.
        poisson_sampling: Draw every logical batch by Poisson sampling (the accountants assume it). With
            ``False``, shuffled fixed-size batches are used and the privacy state records that the accounting
            then *assumes* Poisson sampling (no tight analysis exists for shuffling).
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's value (not their combination, which the trainer checks with the data)."""
        if self.target_epsilon is not None:
            if isinstance(self.target_epsilon, bool) or not _is_real(self.target_epsilon) or not (
                math.isfinite(self.target_epsilon) and self.target_epsilon > 0
            ):
                raise PrivacyConfigError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}.")
        if self.noise_multiplier is not None:
            if isinstance(self.noise_multiplier, bool) or not _is_real(self.noise_multiplier) or not (
                math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
            ):
                raise PrivacyConfigError(
                    f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}."
                )
        if self.target_delta is not None:
            if not _is_real(self.target_delta) or not 0.0 < self.target_delta < 1.0:
                raise PrivacyConfigError(
                    f"target_delta must be in (0, 1) and below 1/N, got {self.target_delta!r}; "
                    "leave it unset for the default min(1e-5, 1/(10 N)) rounded down to a power of 10."
                )
        if not _is_real(self.max_grad_norm) or not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyConfigError(f"max_grad_norm (per-example clipping norm) must be > 0, got {self.max_grad_norm!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if self.clipping not in CLIPPING_STYLES:
            raise PrivacyConfigError(f"clipping must be one of {CLIPPING_STYLES}, got {self.clipping!r}.")
        if self.noise_seed is not None and (isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)):
            raise PrivacyConfigError(f"noise_seed must be an int or None, got {self.noise_seed!r}.")
        if self.max_physical_batch_size is not None and (
            not isinstance(self.max_physical_batch_size, int) or self.max_physical_batch_size < 1
        ):
            raise PrivacyConfigError(
                f"max_physical_batch_size must be a positive int or None, got {self.max_physical_batch_size!r}."
            )
        if not isinstance(self.privacy_unit, str) or not self.privacy_unit.strip() or len(self.privacy_unit) > 200 or (
            "\n" in self.privacy_unit
        ):
            raise PrivacyConfigError(
                f"privacy_unit must be a one-line description of what one training row is (at most 200 characters), "
                f"e.g. 'example' or '1024-token block of the concatenated corpus'; got {self.privacy_unit!r}."
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the fields (the keyword arguments ``DPTrainer`` accepts in place of ``privacy_args``)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- command line: PrivacyArguments beside TrainingArguments ------------------------------------------
#: On the command line the per-example clipping norm is ``--per_example_max_grad_norm``, because
#: ``TrainingArguments`` already owns ``--max_grad_norm`` (which DPTrainer sets to 0).
CLI_RENAMES = {"max_grad_norm": "per_example_max_grad_norm"}


def privacy_cli_dataclass() -> type:
    """A dataclass with :class:`PrivacyArguments`' fields, renamed per :data:`CLI_RENAMES` so that it can share
    one ``HfArgumentParser`` with ``TrainingArguments`` (whose ``--max_grad_norm`` would otherwise clash)."""
    import typing

    hints = typing.get_type_hints(PrivacyArguments)
    specs = []
    for f in dataclasses.fields(PrivacyArguments):
        specs.append((CLI_RENAMES.get(f.name, f.name), hints[f.name], field(default=f.default, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass("PrivacyCLIArguments", specs, kw_only=True)


def parse_args_with_privacy(*dataclass_types: type, args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line into ``dataclass_types`` (e.g. ``TrainingArguments``) plus a ``PrivacyArguments``.

    The clipping norm is given as ``--per_example_max_grad_norm`` (``--max_grad_norm`` belongs to
    ``TrainingArguments``). ``PrivacyArguments`` alone can also be parsed with a plain
    ``HfArgumentParser(PrivacyArguments)``, where the flag is ``--max_grad_norm``.

    Args:
        *dataclass_types: Other dataclasses to fill (default: ``TrainingArguments``).
        args: Argument list (default: ``sys.argv[1:]``).

    Returns:
        The parsed instances, in order, followed by the :class:`PrivacyArguments`.

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
    cli = parsed[-1]
    inverse = {v: k for k, v in CLI_RENAMES.items()}
    privacy = PrivacyArguments(**{inverse.get(k, k): v for k, v in dataclasses.asdict(cli).items()})
    return (*parsed[:-1], privacy)
