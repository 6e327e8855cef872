"""Privacy model cards: a machine-readable ``privacy:`` metadata block and a readable "Privacy" section.

The statement follows the tensorflow_privacy pattern: privacy unit and adjacency; δ, σ, q, steps, C; the
certified accountant and its version; whether Poisson sampling was actually used; "covers all released
checkpoints". The ε it publishes is always the CERTIFIED one (``PrivacyReport.epsilon``) and names what
certified it; the Edgeworth estimate is shown beside it, labelled as an estimate.

The dataset size N is sensitive under add/remove-one adjacency, and the expected batch size gives it away
(N = B / q), so neither is published unless ``include_dataset_size=True`` (or the privacy state carries
``"publish_dataset_size": true``). For the same reason the sampling rate q is published rounded UP to 3
significant digits (the Trainer's own card lists the batch size B).

Example:
    >>> import tempfile
    >>> from hf_ewtune.accounting import PLDAccountant
    >>> acc = PLDAccountant()
    >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    >>> state = {"accountant": {"name": "pld", "state": acc.state_dict()}, "delta": 1e-5,
    ...          "noise_multiplier": 1.0, "max_grad_norm": 1.0, "clipping": "flat", "sample_rate": 0.01,
    ...          "poisson_sampling": True, "steps": 100, "epochs": 1.0}
    >>> out = tempfile.mkdtemp()
    >>> add_privacy_to_model_card(out, state)
    >>> meta = read_privacy_metadata(out)
    >>> meta["epsilon"] > 0 and meta["privacy_unit"]
    'example'
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
from decimal import ROUND_CEILING, Decimal
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping

from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.json_safe import json_safe
from hf_ewtune.privacy_state import PRIVACY_STATE_NAME as PRIVACY_STATE_FILE
from hf_ewtune.privacy_state import PrivacyState, as_privacy_state

logger = logging.getLogger(__name__)

PRIVACY_TAGS: tuple[str, ...] = ("differential-privacy", "dp-sgd", "hf_ewtune")
BEGIN_MARKER = "<!-- hf_ewtune:privacy-section:begin (generated; edits inside are overwritten) -->"
END_MARKER = "<!-- hf_ewtune:privacy-section:end -->"
MECHANISM = "DP-SGD (Poisson-subsampled Gaussian)"
ADJACENCY = "add-or-remove-one example"
USER_UNIT = "user"
USER_ADJACENCY = "add-or-remove-one user (all of their rows)"
DEFAULT_UNIT = "example"
# Privacy-state values that mean "one training example" (older states wrote the long form).
_EXAMPLE_UNITS = frozenset({"", DEFAULT_UNIT, "one training example (add/remove adjacency)"})
NOT_POISSON = "shuffled fixed-size batches; accounting ASSUMES Poisson"
SHUFFLED = "shuffled fixed-size batches"
SHUFFLED_MECHANISM = "DP-SGD (Gaussian, shuffled fixed-size batches, no amplification)"
ASSUMED_POISSON_MECHANISM = "DP-SGD (Gaussian, shuffled fixed-size batches, accounted as if Poisson-subsampled)"
RANDOM_ALLOCATION = "random allocation (balls-in-bins)"
RANDOM_ALLOCATION_MECHANISM = "DP-SGD (Gaussian, random allocation / balls-in-bins batches)"
CERTIFIED = "certified upper bound"
NOT_CERTIFIED = "NOT certified: computed assuming Poisson sampling, which this run did not use"
EDGEWORTH_LABEL = "estimate (not a guarantee)"
SAMPLING_RATE_NOTE = ("rounded up to 3 significant digits so that the exact dataset size is not revealed; epsilon "
                      "was computed with the exact rate and is at most the value recomputed from the rounded one")
# Keys that reveal the dataset size N (directly, or as N = expected_batch_size / sample_rate).
_DATASET_SIZE_KEYS = frozenset(
    {"dataset_size", "num_examples", "num_train_examples", "train_size", "n", "expected_batch_size"}
)
_TEMPLATE_NAME = "privacy_section.md"
# Calibration-record keys that repeat the top-level statement or are run-time details.
_CALIBRATION_SKIP = frozenset({"seconds", "certified_by", "delta", "sample_rate", "accountant", "target_epsilon"})


# ---------------------------------------------------------------------------------------------- loading
def load_state(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Load the privacy state saved in ``output_dir`` (a training output folder or a checkpoint).

    The state is validated and cross-checked with the folder's ``trainer_state.json``
    (:meth:`hf_ewtune.privacy_state.PrivacyState.load`), so no card or report is built from an edited or
    stale history.

    Raises:
        PrivacyStateError: no, an unreadable, or an inconsistent privacy state in ``output_dir``.
    """
    try:
        return PrivacyState.load(output_dir).to_dict()
    except PrivacyStateError:
        raise
    except (OSError, ValueError) as exc:
        raise PrivacyStateError(f"cannot read the privacy state in {output_dir}: {exc}") from exc


def privacy_report(privacy_state: PrivacyState | Mapping[str, Any]):
    """Validate ``privacy_state``, rebuild its accountant and return its ``PrivacyReport`` at the state's δ.

    Raises:
        PrivacyStateError: the state lacks the accountant or δ, or fails
            :meth:`~hf_ewtune.privacy_state.PrivacyState.from_dict`'s consistency checks.
    """
    state = as_privacy_state(privacy_state)
    if state.delta is None:
        raise PrivacyStateError("privacy state has no 'delta'; it cannot be certified.")
    try:
        key = json.dumps(state.accountant_state, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # not JSON-able options: no caching
        from hf_ewtune.accounting import accountant_from_state

        return accountant_from_state(dict(state.accountant_state)).get_privacy_spent(delta=float(state.delta))
    return copy.deepcopy(_cached_report(key, float(state.delta)))


@functools.lru_cache(maxsize=32)
def _cached_report(accountant_state_json: str, delta: float):
    """PLD at a 1e-4 discretisation plus the Edgeworth bound take ~0.5 s: render, metadata and CLI share one."""
    from hf_ewtune.accounting import accountant_from_state

    return accountant_from_state(json.loads(accountant_state_json)).get_privacy_spent(delta=delta)


# -------------------------------------------------------------------------------------------- metadata
_finite_or_str = json_safe  # strict-JSON-safe number: the Hub stores card metadata as JSON (no inf/nan)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _publish_n(privacy_state: Mapping[str, Any], include_dataset_size: bool) -> bool:
    return bool(include_dataset_size or privacy_state.get("publish_dataset_size") is True)


def _edgeworth_block(report: Any) -> dict[str, Any]:
    bound = dict(getattr(report, "edgeworth_error_bound", None) or {})
    reason = str(bound.get("reason") or "").strip()
    if bound.get("delta_x") is None:
        error_bound: Any = f"not available: {reason or 'not computed'}"
    else:
        error_bound = {
            "delta_x": _finite_or_str(_as_float(bound.get("delta_x"))),
            "delta_y": _finite_or_str(_as_float(bound.get("delta_y"))),
        }
        lower, upper = _as_float(bound.get("epsilon_lower")), _as_float(bound.get("epsilon_upper"))
        if bound.get("certified") and upper is not None and math.isfinite(upper):
            error_bound["epsilon_interval"] = [_finite_or_str(lower), upper]
        else:
            reason = reason or "the bound is not finite"
            if not reason.lower().startswith("not certifiable"):
                reason = f"not certifiable: {reason}"
            error_bound["epsilon_interval"] = reason
            if lower is not None and math.isfinite(lower):
                error_bound["epsilon_lower"] = lower
    return {
        "label": EDGEWORTH_LABEL,
        "order_1": _finite_or_str(_as_float(getattr(report, "edgeworth_epsilon", None))),
        "order_2": _finite_or_str(_as_float(getattr(report, "edgeworth_epsilon_order2", None))),
        "error_bound": error_bound,
    }


def build_privacy_metadata(privacy_state: Mapping[str, Any], *, include_dataset_size: bool = False,
                           report: Any = None) -> dict[str, Any]:
    """The ``privacy:`` block of the model card metadata (strict-JSON-safe: no inf/nan floats).

    Args:
        privacy_state: the dict saved as ``_privacy_state.json`` by ``DPTrainer``.
        include_dataset_size: also publish the dataset size and the expected batch size (which reveals N
            as B / q). Off by default: N is sensitive under add/remove-one adjacency.
        report: a ``PrivacyReport`` already computed from this state (recomputed when None).

    Returns:
        An ordered dict: mechanism, privacy unit, adjacency, the CERTIFIED ``epsilon`` and ``delta``,
        ``certified_by``, the labelled ``edgeworth_estimate``, the DP-SGD parameters, the sampling actually
        used, the accountant and library, and ``covers``.

    Example:
        >>> from hf_ewtune.accounting import PLDAccountant
        >>> acc = PLDAccountant()
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
        >>> meta = build_privacy_metadata({"accountant": {"name": "pld", "state": acc.state_dict()},
        ...                                "delta": 1e-5, "poisson_sampling": True, "steps": 10})
        >>> meta["sampling"], meta["covers"]
        ('Poisson', 'all released checkpoints')
    """
    state = as_privacy_state(privacy_state).to_dict()
    if report is None:
        report = privacy_report(state)
    poisson = state.get("poisson_sampling")
    accountant_name = state["accountant"]
    mode = _sampling_mode(poisson, accountant_name or getattr(report, "accountant", None))
    library_version = state.get("library_version")
    if library_version is None:
        from hf_ewtune import __version__ as library_version
    unit = privacy_unit_of(state)
    if unit == USER_UNIT and not state.get("user_id_column"):
        raise PrivacyStateError(
            "the privacy state declares privacy_unit 'user' but records no user_id_column: its rows were not "
            "grouped by user, so it cannot be published as user-level privacy. Retrain with user_id_column.")
    meta: dict[str, Any] = {
        "mechanism": {"shuffled": SHUFFLED_MECHANISM, "random_allocation": RANDOM_ALLOCATION_MECHANISM,
                      "assumed-poisson": ASSUMED_POISSON_MECHANISM}.get(mode, MECHANISM),
        "privacy_unit": unit,
        "adjacency": f"replace-one {unit}" if mode == "shuffled" else (
            ADJACENCY if unit == DEFAULT_UNIT else (USER_ADJACENCY if unit == USER_UNIT else f"add-or-remove-one {unit}")),
        "epsilon": _finite_or_str(float(report.epsilon)),
        "delta": float(report.delta if getattr(report, "delta", None) is not None else state["delta"]),
        "epsilon_is": NOT_CERTIFIED if mode == "assumed-poisson" else CERTIFIED,
        "certified_by": (f"nothing for the sampling used ({report.certified_by} assumes Poisson sampling)"
                         if mode == "assumed-poisson" else str(report.certified_by)),
        "edgeworth_estimate": _edgeworth_block(report),
        "noise_multiplier": _finite_or_str(_as_float(state.get("noise_multiplier"))),
        "max_grad_norm": _as_float(state.get("max_grad_norm")),
        "clipping": state.get("clipping"),
        "sampling_rate": _public_rate(_as_float(state.get("sample_rate")), _publish_n(state, include_dataset_size)),
        "sampling": {"poisson": "Poisson", "shuffled": SHUFFLED, "random_allocation": RANDOM_ALLOCATION}.get(
            mode, NOT_POISSON),
        "steps": int(state["steps"]) if state.get("steps") is not None else int(getattr(report, "steps", 0)),
        "epochs": _as_float(state.get("epochs")),
        "world_size": state.get("world_size"),
        "accountant": accountant_name or getattr(report, "accountant", None),
        "target_epsilon": _as_float(state.get("target_epsilon")),
        "stopped_early": bool(state.get("stopped_early", False)),
        "library": f"{state.get('library') or 'hf_ewtune'} {library_version}",
        "covers": "all released checkpoints",
    }
    calibration = state.get("calibration")
    if isinstance(calibration, Mapping) and calibration:
        meta["calibration"] = {
            str(k): _finite_or_str(v) for k, v in calibration.items()
            if isinstance(v, (int, float, str, bool)) and str(k) not in _CALIBRATION_SKIP and (
                _publish_n(state, include_dataset_size) or str(k).lower() not in _DATASET_SIZE_KEYS)
        }
    if meta["sampling_rate"] is not None and meta["sampling_rate"] != _as_float(state.get("sample_rate")):
        meta["sampling_rate_note"] = SAMPLING_RATE_NOTE
    if state.get("sensitivity") is not None and _as_float(state.get("sensitivity")) != meta.get("max_grad_norm"):
        meta["sensitivity"] = _as_float(state["sensitivity"])
    rng = state.get("noise_rng") or state.get("randomness")
    if rng:
        meta["noise_rng"] = str(rng)
    if state.get("allow_large_delta") is True:
        from hf_ewtune.large_delta import large_delta_note

        meta["large_delta_allowed"] = True
        meta["delta_note"] = large_delta_note(user_level=unit == USER_UNIT)
    if unit != DEFAULT_UNIT and mode in ("shuffled", "random_allocation"):
        # the bound's text counts "examples": in this run each one is a privacy unit (a user, a block, ...)
        meta["certified_by"] += f" (each 'example' of this bound is one {unit} of this run)"
    if unit == USER_UNIT:
        meta["sampling_over"] = "users (every sampled user's rows, capped per step as stated)"
    meta.update(user_level_metadata(state, exact=_publish_n(state, include_dataset_size)))
    if _publish_n(state, include_dataset_size):
        for key in ("dataset_size", "num_examples", "expected_batch_size"):
            if state.get(key) is not None:
                meta[key] = state[key]
    return {k: v for k, v in meta.items() if v is not None}


def privacy_unit_of(privacy_state: Mapping[str, Any]) -> str:
    """The privacy unit a state declares (``PrivacyArguments.privacy_unit``): ``"example"`` unless the run said
    otherwise (e.g. ``"1024-token block of the concatenated corpus"`` after ``group_texts``).

    Example:
        >>> privacy_unit_of({}), privacy_unit_of({"privacy_unit": "512-token block"})
        ('example', '512-token block')
    """
    unit = privacy_state.get("privacy_unit")
    unit = " ".join(str(unit).split()) if unit is not None else ""
    return DEFAULT_UNIT if unit in _EXAMPLE_UNITS else unit


def user_level_metadata(state: Mapping[str, Any], *, exact: bool = False) -> dict[str, Any]:
    """The user-level entries of the ``privacy:`` block (empty for example-level runs).

    The number of users U is rounded DOWN to 3 significant digits unless ``exact`` (it is as sensitive as the
    dataset size N, and the published q, rounded up to 3 digits, already gives U to that precision).

    Example:
        >>> user_level_metadata({"privacy_unit": "user", "num_users": 12345, "max_examples_per_user": 8})
        {'num_users': 12300, 'num_users_note': 'rounded down to 3 significant digits', 'max_examples_per_user': 8}
    """
    if privacy_unit_of(state) != USER_UNIT:
        return {}
    out: dict[str, Any] = {}
    users = state.get("num_users")
    if users is not None:
        out["num_users"] = int(users) if exact else _round_down_int(int(users), 3)
        if out["num_users"] != int(users):
            out["num_users_note"] = "rounded down to 3 significant digits"
    cap = state.get("max_examples_per_user")
    out["max_examples_per_user"] = int(cap) if cap is not None else "all of a user's rows"
    return out


def _cap_text(cap: Any) -> str:
    return f"at most {cap}" if isinstance(cap, int) else "all of the user's rows"


def _round_down_int(value: int, sig: int) -> int:
    """``value`` rounded DOWN to ``sig`` significant digits (``12345 -> 12300``)."""
    if value <= 0:
        return value
    scale = 10 ** max(len(str(value)) - sig, 0)
    return (value // scale) * scale


def _unit_statement(unit: str, *, replace_one: bool = False) -> str:
    """The prose sentence that names the privacy unit and what it implies for records larger than it.

    ``replace_one``: the guarantee is under replace-one adjacency (shuffled fixed-size batches).
    """
    if replace_one and unit == USER_UNIT:
        return ("The privacy unit is one **user** (user-level privacy), under replace-one-user adjacency: replacing "
                "ALL the\ntraining rows of any single user by another user's rows changes the probability of any "
                "set of outcomes for\nthe released weights by at most a factor e^ε plus δ. Each user's rows were "
                "clipped together, as one gradient\nof norm at most C. The guarantee assumes the user id column is "
                "correct (one person, one id).")
    if replace_one:
        what = "training example" if unit == DEFAULT_UNIT else unit
        return (f"The privacy unit is one training **{unit}**, under replace-one-{'example' if unit == DEFAULT_UNIT else 'unit'} "
                f"adjacency: replacing\nany single {what} by another changes the probability of any set of outcomes "
                "for the released weights by at\nmost a factor e^ε plus δ."
                + ("" if unit == DEFAULT_UNIT else " It is **not** a per-record guarantee: a record spread over k such "
                   "units is protected only as a group of k units."))
    if unit == USER_UNIT:
        return ("The privacy unit is one **user** (user-level privacy): adding or removing ALL the training rows "
                "of any\nsingle user changes the probability of any set of outcomes for the released weights by at "
                "most a factor\ne^ε plus δ. Users were Poisson-sampled at rate q; each sampled user's rows were "
                "clipped together, as one\ngradient of norm at most C. The guarantee assumes the user id column "
                "is correct (one person, one id).")
    if unit == DEFAULT_UNIT:
        return ("The privacy unit is one training **example**, under add-or-remove-one-example adjacency: adding "
                "or removing\nany single training example changes the probability of any set of outcomes for the "
                "released weights by at\nmost a factor e^ε plus δ.")
    return (f"The privacy unit is one **{unit}** (one training row, as declared with `privacy_unit`), under "
            f"add-or-remove-one adjacency of that unit: adding or removing any single {unit} changes the "
            "probability of any set of outcomes for the released weights by at most a factor e^ε plus δ. It is "
            "**not** a per-record guarantee: a record (a document, a conversation, one person's data) spread over "
            "k such units is protected only as a group of k units (group privacy: ε grows to kε and δ to "
            "k·e^((k-1)ε)·δ).")


def _sampling_mode(poisson: Any, accountant_name: str | None) -> str:
    """``"poisson"``; ``"shuffled"`` (shuffled batches, certified by the shuffled-batch accountant); or
    ``"assumed-poisson"`` (shuffled batches accounted as if Poisson-sampled: NOT certified; states written
    before the shuffled-batch accountant existed)."""
    if accountant_name in ("shuffled", "random_allocation"):
        return accountant_name
    return "poisson" if poisson is True else "assumed-poisson"


def _round_up(value: float, sig: int = 3) -> float:
    """``value`` rounded UP to ``sig`` significant digits (as a clean float, never below ``value``)."""
    if not math.isfinite(value) or value <= 0:
        return value
    return float(_ceil_decimal(value, sig))


def _public_rate(rate: float | None, exact: bool) -> float | None:
    """The sampling rate q as published. q = B / N and the Trainer's card lists the batch size B, so the exact
    q gives the dataset size away; unless the user opts in, q is rounded UP to 3 significant digits (an
    epsilon recomputed from the rounded q is then still an upper bound)."""
    if rate is None or exact:
        return rate
    return _round_up(rate, 3)


# ----------------------------------------------------------------------------------- readable section
def _ceil_decimal(value: float, sig: int) -> Decimal:
    """``value`` rounded UP (toward +inf) to ``sig`` significant digits, exactly (decimal arithmetic on the
    shortest repr, so ``float(result) >= value`` always holds and no float noise adds a spurious digit)."""
    d = Decimal(repr(float(value)))
    exponent = d.adjusted() - sig + 1
    return d.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_CEILING)


def _ceil_sig(value: float, sig: int = 3) -> str:
    """Round UP to ``sig`` significant digits: a certified upper bound must never be rounded down."""
    if not math.isfinite(value):
        return "∞"
    if value <= 0:
        return "0"
    return f"{_ceil_decimal(value, sig):f}"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return "∞" if value == "inf" else value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _template() -> Template:
    try:
        text = resources.files("hf_ewtune").joinpath("model_cards", _TEMPLATE_NAME).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):  # source checkout without the package symlink
        text = (Path(__file__).resolve().parent.parent / "model_cards" / _TEMPLATE_NAME).read_text(encoding="utf-8")
    return Template(text)


def _calibration_text(calibration: Mapping[str, Any]) -> str:
    sigma_ew, sigma = calibration.get("sigma_edgeworth"), calibration.get("noise_multiplier")
    if sigma_ew is not None and sigma is not None:
        text = f"Edgeworth first guess σ_EW = {_num(sigma_ew)}, then σ = {_num(sigma)}"
        if calibration.get("epsilon") is not None:
            text += f" certified at ε = {_ceil_sig(float(calibration['epsilon']))}"
        if calibration.get("steps") is not None:
            text += f" for {_num(calibration['steps'])} planned steps"
        return text
    return ", ".join(f"{k} = {_num(v)}" for k, v in calibration.items())


def _fmt_delta(delta: float) -> str:
    return f"{delta:g}".replace("e-0", "e-")


def _edgeworth_bound_text(block: Mapping[str, Any]) -> str:
    bound = block.get("error_bound")
    if isinstance(bound, str):
        return bound
    interval = bound.get("epsilon_interval")
    terms = f"Δ_X = {_num(bound.get('delta_x'), 3)}, Δ_Y = {_num(bound.get('delta_y'), 3)}"
    if isinstance(interval, list):
        return f"{terms}; ε ∈ [{_num(interval[0])}, {_num(interval[1])}]"
    return f"{terms}; {interval}"


def render_privacy_section(privacy_state: Mapping[str, Any], *, include_dataset_size: bool = False,
                           metadata: Mapping[str, Any] | None = None) -> str:
    """The readable "Privacy" Markdown section, wrapped in hf_ewtune's begin/end markers.

    Args:
        privacy_state: the dict saved as ``_privacy_state.json`` by ``DPTrainer``.
        include_dataset_size: also show the dataset size / expected batch size (see module docstring).
        metadata: the output of :func:`build_privacy_metadata` for this state (recomputed when None).

    Example:
        >>> from hf_ewtune.accounting import PLDAccountant
        >>> acc = PLDAccountant()
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
        >>> text = render_privacy_section({"accountant": {"name": "pld", "state": acc.state_dict()},
        ...                                "delta": 1e-5, "poisson_sampling": True, "steps": 10})
        >>> "certified upper bound" in text and "not a guarantee" in text
        True
    """
    meta = dict(metadata) if metadata is not None else build_privacy_metadata(
        privacy_state, include_dataset_size=include_dataset_size)
    eps = meta["epsilon"]
    eps_text = _ceil_sig(float(eps)) if not isinstance(eps, str) else _num(eps)
    poisson = meta["sampling"] == "Poisson"
    certified = meta["epsilon_is"] == CERTIFIED
    unit_word = "example" if (meta.get("privacy_unit") or DEFAULT_UNIT) == DEFAULT_UNIT else str(meta["privacy_unit"])
    over = " of users" if meta.get("sampling_over") else ""
    if poisson:
        caveat = ""
    elif meta["sampling"] == RANDOM_ALLOCATION and certified:
        caveat = (
            f" This run used random allocation (balls-in-bins) batches: every {unit_word} was put in one uniformly "
            "random step of each epoch. ε is certified for exactly that sampling by the random-allocation bound "
            f"(Feldman & Shenfeld 2025), under {meta['adjacency']} adjacency."
        )
    elif certified:
        caveat = (
            f" This run used shuffled fixed-size batches{over}; ε is certified for exactly that sampling by a bound "
            f"without amplification (each {unit_word}'s participations per epoch composed as Gaussian mechanisms), "
            f"under {meta['adjacency']} adjacency."
        )
    else:
        caveat = (
            "\n**Caveat:** this run used shuffled fixed-size batches, but the accounting ASSUMES Poisson "
            "sampling; the stated ε is computed for Poisson sampling and is not formally certified for the "
            "sampling actually used."
        )
    statement = (f"ε is a **certified upper bound** computed by {meta['certified_by']}." if certified else
                 f"ε is **not certified**: {meta['certified_by']}.")
    if meta.get("large_delta_allowed"):
        from hf_ewtune.large_delta import large_delta_caveat

        caveat += "\n\n" + large_delta_caveat(user_level=meta.get("privacy_unit") == USER_UNIT)
    ew = meta["edgeworth_estimate"]
    extra: list[str] = []
    if meta.get("noise_rng"):
        extra.append(f"| noise generator | {meta['noise_rng']} |")
    calibration = meta.get("calibration") or {}
    if calibration:
        extra.append(f"| noise calibration | {_calibration_text(calibration)} |")
    if "num_users" in meta:
        rounded = " (rounded down)" if meta.get("num_users_note") else ""
        extra.append(f"| users U | {_num(meta['num_users'])}{rounded} |")
    if "max_examples_per_user" in meta:
        extra.append(f"| rows per sampled user per step | {_cap_text(meta['max_examples_per_user'])} |")
    for key, label in (("dataset_size", "training examples N"), ("num_examples", "training examples N"),
                       ("expected_batch_size", "expected batch size")):
        if key in meta:
            extra.append(f"| {label} | {_num(meta[key])} |")
    values = {
        "epsilon": eps_text,
        "delta": _fmt_delta(meta["delta"]),
        "library": meta["library"],
        "certified_by": meta["certified_by"],
        "sampling_caveat": caveat,
        "epsilon_statement": statement,
        "epsilon_is": CERTIFIED if certified else "NOT certified",
        "edgeworth": f"{_num(ew.get('order_1'))} / {_num(ew.get('order_2'))}",
        "edgeworth_bound": _edgeworth_bound_text(ew),
        "noise_multiplier": _num(meta.get("noise_multiplier")),
        "max_grad_norm": _num(meta.get("max_grad_norm")),
        "clipping": meta.get("clipping") or "flat",
        "sampling": ("Poisson sampling" if poisson else (
            meta["sampling"] if certified else f"{NOT_POISSON} sampling")) + over,
        "sample_rate": _num(meta.get("sampling_rate")) + (" (rounded up)" if meta.get("sampling_rate_note") else ""),
        "steps": _num(meta.get("steps")),
        "epochs": _num(meta.get("epochs"), 3),
        "world_size": _num(meta.get("world_size")),
        "target_epsilon": _num(meta.get("target_epsilon")) if meta.get("target_epsilon") is not None else "none",
        "stopped_early": _num(bool(meta.get("stopped_early"))),
        "extra_rows": "\n".join(extra) + ("\n" if extra else ""),
        "clip_scope": "per-user" if meta.get("privacy_unit") == USER_UNIT else "per-example",
        "unit_statement": _unit_statement(meta.get("privacy_unit") or DEFAULT_UNIT,
                                          replace_one=str(meta.get("adjacency", "")).startswith("replace-one")),
    }
    body = _template().substitute(values).strip("\n")
    return f"{BEGIN_MARKER}\n{body}\n{END_MARKER}"


def _splice_section(text: str, section: str) -> str:
    """Replace the marked section in ``text``, or insert it before the first ``## `` heading (else append)."""
    begin, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if begin != -1 and end != -1 and end > begin:
        return text[:begin] + section + text[end + len(END_MARKER):]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("## "):
            return "\n".join(lines[:i] + [section, ""] + lines[i:])
    return text.rstrip("\n") + "\n\n" + section + "\n"


# ----------------------------------------------------------------------------------------- the card
def add_privacy_to_model_card(output_dir: str | os.PathLike, privacy_state: Mapping[str, Any], *,
                              include_dataset_size: bool = False) -> None:
    """Add (or refresh) the privacy statement in ``output_dir/README.md``; idempotent.

    Merges the tags ``differential-privacy``, ``dp-sgd``, ``hf_ewtune`` with the existing ones, writes the
    ``privacy:`` metadata block, and inserts or replaces the "Privacy" section between hf_ewtune's markers.
    Works on a card written by ``Trainer.create_model_card`` and on PEFT cards; creates a minimal card if
    there is none. PEFT's ``save_pretrained`` rewrites ``tags`` (keeping the privacy block and section): call
    this again after it, or tag the model first with :func:`add_privacy_tags`.

    Args:
        output_dir: folder holding (or to hold) ``README.md``.
        privacy_state: the dict saved as ``_privacy_state.json`` by ``DPTrainer``.
        include_dataset_size: publish N and the expected batch size (off by default).

    Example:
        >>> import tempfile
        >>> from hf_ewtune.accounting import PLDAccountant
        >>> acc = PLDAccountant()
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
        >>> out = tempfile.mkdtemp()
        >>> add_privacy_to_model_card(out, {"accountant": {"name": "pld", "state": acc.state_dict()},
        ...                                 "delta": 1e-5, "poisson_sampling": True, "steps": 10})
        >>> "differential-privacy" in open(f"{out}/README.md").read()
        True
    """
    from huggingface_hub import ModelCard

    meta = build_privacy_metadata(privacy_state, include_dataset_size=include_dataset_size)
    section = render_privacy_section(privacy_state, include_dataset_size=include_dataset_size, metadata=meta)
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\nlibrary_name: transformers\n---\n\n# {Path(output_dir).resolve().name}\n")
    tags = card.data.tags or []
    if isinstance(tags, str):
        tags = [tags]
    card.data.tags = list(tags) + [t for t in PRIVACY_TAGS if t not in tags]
    card.data["privacy"] = meta
    card.text = _splice_section(card.text, section)
    card.save(path)


def add_privacy_tags(model: Any) -> None:
    """Tag a (PEFT or plain) transformers model with :data:`PRIVACY_TAGS` via ``add_model_tags``.

    ``Trainer.push_to_hub`` and PEFT's card writer read these tags, so they survive PEFT rewriting the card.

    Example:
        >>> from hf_ewtune.testing import tiny_bert
        >>> model = tiny_bert()
        >>> add_privacy_tags(model)
        >>> "dp-sgd" in model.model_tags
        True
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "add_model_tags"):
        base.add_model_tags(list(PRIVACY_TAGS))


def read_privacy_metadata(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse the ``privacy:`` metadata block back from a model card (a ``README.md`` or its folder).

    Only local files are read (never the Hub).

    Raises:
        PrivacyStateError: no card, or a card without a privacy block.
    """
    from huggingface_hub import ModelCard

    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "README.md"
    if not path.is_file():
        raise PrivacyStateError(f"no model card at {path}: run `hf-ewtune card OUTPUT_DIR` to write one.")
    privacy = ModelCard.load(path).data.get("privacy")
    if not isinstance(privacy, dict):
        raise PrivacyStateError(f"the model card {path} has no 'privacy' metadata block.")
    return dict(privacy)


def format_privacy_report(privacy_state: Mapping[str, Any], *, include_dataset_size: bool = False) -> str:
    """A plain-text statement of the guarantee for the terminal (used by ``hf-ewtune report``)."""
    meta = build_privacy_metadata(privacy_state, include_dataset_size=include_dataset_size)
    eps = meta["epsilon"]
    ew = meta["edgeworth_estimate"]
    certified = meta["epsilon_is"] == CERTIFIED
    lines = [
        f"{'Certified guarantee' if certified else 'NOT certified'}: "
        f"({_ceil_sig(float(eps)) if not isinstance(eps, str) else eps}, {_fmt_delta(meta['delta'])})"
        f"-differential privacy (epsilon = {_num(eps, 8)}, {'an upper bound' if certified else meta['epsilon_is']})",
        f"  certified by: {meta['certified_by']}",
        f"  privacy unit: {meta['privacy_unit']}; adjacency: {meta['adjacency']}; covers {meta['covers']}",
        f"  sampling: {meta['sampling']}{' of users' if meta.get('sampling_over') else ''} "
        f"(rate {_num(meta.get('sampling_rate'))}); steps {_num(meta.get('steps'))}, "
        f"epochs {_num(meta.get('epochs'), 3)}; noise multiplier {_num(meta.get('noise_multiplier'))}; "
        f"clipping norm {_num(meta.get('max_grad_norm'))} ({meta.get('clipping') or 'flat'})",
    ]
    if "max_examples_per_user" in meta:
        lines.append(f"  users: {_num(meta.get('num_users'))}{' (rounded down)' if meta.get('num_users_note') else ''}; "
                     f"rows per sampled user per step: {_cap_text(meta['max_examples_per_user'])}")
    if meta.get("target_epsilon") is not None:
        lines.append(f"  target epsilon: {_num(meta['target_epsilon'])}; stopped early: {_num(meta['stopped_early'])}")
    if not certified:
        lines.append("  CAVEAT: the run did not use Poisson sampling; the accounting assumes it.")
    elif meta["sampling"] == RANDOM_ALLOCATION:
        lines.append(f"  {RANDOM_ALLOCATION} batches, certified by the random-allocation bound ({meta['adjacency']} "
                     "adjacency)")
    elif meta["sampling"] != "Poisson":
        lines.append(f"  shuffled fixed-size batches, certified without amplification ({meta['adjacency']} adjacency)")
    if meta.get("delta_note"):
        lines.append(f"  CAVEAT: {meta['delta_note']}")
    lines.append(f"Edgeworth {EDGEWORTH_LABEL}: epsilon ~ {_num(ew.get('order_1'))} (order 1), "
                 f"{_num(ew.get('order_2'))} (order 2)")
    lines.append(f"  Edgeworth error bound: {_edgeworth_bound_text(ew)}")
    return "\n".join(lines)


__all__ = [
    "PRIVACY_TAGS", "BEGIN_MARKER", "END_MARKER", "build_privacy_metadata", "render_privacy_section",
    "add_privacy_to_model_card", "add_privacy_tags", "read_privacy_metadata", "format_privacy_report",
    "load_state", "privacy_report",
]
