"""The one line a script user sees at the start of ``DPTrainer.train()``: the noise, delta, q, steps and target.

Example:
    >>> from types import SimpleNamespace
    >>> from hf_ewtune import PrivacyArguments
    >>> from hf_ewtune.accounting import PLDAccountant
    >>> trainer = SimpleNamespace(
    ...     privacy_args=PrivacyArguments(target_epsilon=3.0), noise_multiplier=1.1234, delta=1e-5, sample_rate=0.01,
    ...     planned_steps=300, expected_batch_size=64, calibration={"certified": True},
    ...     privacy_callback=SimpleNamespace(budget_steps=300, steps=0))
    >>> print(privacy_plan_line(trainer))  # doctest: +NORMALIZE_WHITESPACE
    DPTrainer: DP-SGD with noise_multiplier sigma = 1.123 (calibrated to the target, certified), delta = 1e-05
    (default: below 1/N, N = the number of training rows), Poisson sampling, sample rate q = 0.01 (expected batch
    64), 300 planned steps, per-example clipping norm C = 1 (flat); target epsilon = 3 (certified upper bound, PLD;
    Edgeworth estimate shown beside it).
"""

from __future__ import annotations

from typing import Any


def privacy_plan_line(trainer: Any) -> str:
    """The privacy plan of ``trainer`` (a built ``DPTrainer``) in one line, for the start of ``train()``."""
    pa = trainer.privacy_args
    callback = trainer.privacy_callback
    calibration = getattr(trainer, "calibration", None)
    if pa.noise_multiplier is None:
        certified = bool((calibration or {}).get("certified", pa.certify_calibration))
        origin = "calibrated to the target, " + ("certified" if certified else "Edgeworth estimate only, NOT certified")
    else:
        origin = "fixed"
    delta_origin = "set" if pa.target_delta is not None else _default_delta_text(trainer)
    from hf_ewtune.accounting import make_accountant

    accountant = getattr(callback, "accountant", None) or make_accountant(pa.accountant)
    certifier = accountant.certifier_label
    if pa.target_epsilon is None:
        target = f"no target epsilon: the certified epsilon ({certifier}) is logged as it grows"
    else:
        target = f"target epsilon = {pa.target_epsilon:g} (certified upper bound, {certifier}"
        target += "; Edgeworth estimate shown beside it)" if accountant.edgeworth_based else ")"
    budget = callback.budget_steps
    stop = (f"; the budget stops training after step {budget}"
            if budget is not None and budget < trainer.planned_steps else "")
    resumed = f"; {callback.steps} steps already taken (resumed)" if callback.steps else ""
    noise = "sigma = 0: NO privacy" if trainer.noise_multiplier == 0 else f"sigma = {trainer.noise_multiplier:.4g} ({origin})"
    settings = getattr(trainer, "_dp_settings", None)  # the frozen C the clipping engine uses
    clip = settings.max_grad_norm if settings is not None else pa.max_grad_norm
    return (
        f"DPTrainer: DP-SGD with noise_multiplier {noise}, delta = {trainer.delta:.3g} ({delta_origin}), "
        f"{_sampling_text(trainer)}, sample rate q = {trainer.sample_rate:.4g} ({_batch_text(trainer)}), "
        f"{trainer.planned_steps} planned steps, {'per-user' if getattr(trainer, 'user_plan', None) is not None else 'per-example'} clipping norm C = {clip:g} ({pa.clipping}); "
        f"{target}{stop}{resumed}."
    )


#: How each sampling mode (``PrivacyArguments.sampling``) is named in the plan line.
SAMPLING_WORDS = {"poisson": "Poisson sampling", "shuffled": "shuffled fixed-size batches",
                  "random_allocation": "random allocation (balls-in-bins) batches"}


def _sampling_text(trainer: Any) -> str:
    """The sampling the run really uses (Poisson, shuffled or random allocation), over users at user level."""
    from hf_ewtune.arguments import sampling_mode

    text = SAMPLING_WORDS[sampling_mode(trainer.privacy_args)]
    return text + (" of users" if getattr(trainer, "user_plan", None) is not None else "")


def _batch_text(trainer: Any) -> str:
    """``expected batch B``, or for user-level DP the expected users, U and the per-user cap."""
    plan = getattr(trainer, "user_plan", None)
    if plan is None:
        return f"expected batch {trainer.expected_batch_size}"
    cap = plan.max_examples_per_user
    rows = f"at most {cap} rows" if cap is not None else "all rows"
    return (f"privacy unit: user; expected {trainer.expected_batch_size:g} of {plan.num_users} users per step, "
            f"{rows} of each, clipped together")


def _default_delta_text(trainer: Any) -> str:
    """Where the default delta comes from: below 1/N for N rows, or below 1/U for U users (user-level DP)."""
    if getattr(trainer, "user_plan", None) is not None:
        return "default: below 1/U, U = the number of users"
    return "default: below 1/N, N = the number of training rows"
