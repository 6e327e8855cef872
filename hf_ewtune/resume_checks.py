"""Refusals of a resume whose checkpoint was accounted for another sampling than this run's.

An accountant history certifies the sampling it was built for (Poisson: the ``accountant`` named; shuffled
fixed-size batches and random allocation: their own bounds). Resuming it under another sampling would publish
one sampling's guarantee for steps drawn another way, so :func:`check_resumed_sampling` refuses it before the
history is loaded, naming ``sampling``/``accountant`` and the fix. (The privacy unit is checked by
:func:`hf_ewtune.user_level.check_resumed_unit`.)

Example:
    >>> from types import SimpleNamespace
    >>> state = SimpleNamespace(accountant="pld", sampling_assumed_by_accounting="poisson")
    >>> check_resumed_sampling(state, accountant_name="pld", sampling="poisson")
    >>> check_resumed_sampling(state, accountant_name="shuffled", sampling="shuffled")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_ewtune.errors.PrivacyStateError: the checkpoint was accounted for 'poisson' sampling ...
"""

from __future__ import annotations

from typing import Any

from hf_ewtune.errors import PrivacyStateError

#: The accountants of the samplings that have their own certified bound (any other name means Poisson).
_OWN_BOUND = ("shuffled", "random_allocation")


def _sampling_of(accountant_name: str | None, recorded: str | None) -> str:
    if accountant_name in _OWN_BOUND:
        return str(accountant_name)
    return recorded or "poisson"


def check_resumed_sampling(state: Any, *, accountant_name: str, sampling: str,
                           accountant_options: dict[str, Any] | None = None) -> None:
    """Raise unless ``state`` (a checkpoint's privacy state) was accounted like this run.

    Args:
        state: The checkpoint's :class:`~hf_ewtune.privacy_state.PrivacyState`.
        accountant_name: This run's accountant name (``DPTrainer.privacy_callback.accountant_name``).
        sampling: This run's sampling mode (:func:`hf_ewtune.arguments.sampling_mode`).
        accountant_options: This run's ``accountant.options()``. For shuffled batches they fix the epoch length
            the WHOLE history is composed with (the saved history keeps only sigma, q and steps), so a checkpoint
            written with other options (another batch size or dataset size) is refused: its epochs would be
            miscounted (e.g. 40 steps of 2-step epochs counted as 2 epochs of 20 steps, an epsilon far too small).

    Raises:
        PrivacyStateError: another sampling, another accountant for the same (Poisson) sampling, or shuffled
            batches of another geometry.
    """
    theirs_name = getattr(state, "accountant", None)
    theirs = _sampling_of(theirs_name, getattr(state, "sampling_assumed_by_accounting", None))
    if getattr(state, "poisson_sampling", None) is False and theirs_name not in _OWN_BOUND:
        raise PrivacyStateError(
            f"the checkpoint used shuffled batches but was accounted as if Poisson-sampled (accountant "
            f"{theirs_name!r}, a state written before shuffled batches had their own bound): its epsilon is not "
            "certified, and continuing it would publish the whole run as certified. Start a new run.")
    if theirs != sampling:
        raise PrivacyStateError(
            f"the checkpoint was accounted for {theirs!r} sampling (accountant {theirs_name!r}) but this run uses "
            f"sampling={sampling!r}: one accountant history cannot certify steps drawn by another sampling. Resume "
            f"with sampling={theirs!r}, or start a new run.")
    if theirs_name is not None and theirs_name != accountant_name:
        raise PrivacyStateError(
            f"the checkpoint was accounted by accountant={theirs_name!r} but this run's is {accountant_name!r}: its "
            f"history can only be continued by the same accountant. Resume with accountant={theirs_name!r}, or start "
            "a new run.")
    theirs_options = (getattr(state, "accountant_state", None) or {}).get("options")
    if (accountant_name == "shuffled" and accountant_options is not None and theirs_options is not None
            and dict(theirs_options) != dict(accountant_options)):
        raise PrivacyStateError(
            f"the checkpoint's shuffled batches had {dict(theirs_options)} but this run's have "
            f"{dict(accountant_options)}: the shuffled-batch bound composes the whole history with ONE epoch length, so "
            "the earlier steps would be counted in the wrong number of epochs (an epsilon too small). Resume with the "
            "same per_device_train_batch_size, gradient_accumulation_steps, number of processes and dataset, or "
            "start a new run.")


__all__ = ["check_resumed_sampling"]
