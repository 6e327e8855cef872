"""Read and write ``_privacy_state.json``: the accountant history and privacy settings of a run.

The file is written into every checkpoint folder (``output_dir/checkpoint-N``) and into ``output_dir`` on
``save_model``. Its content is one typed, versioned record, :class:`PrivacyState`: the accountant's
``state_dict`` (its (q, sigma, steps) segments), delta, the target, sigma, the clipping norm and style,
the sample rate and expected batch size, whether Poisson sampling was really used, steps, epochs, world
size, the calibration record, the accountant name and the library versions. It NEVER holds
random-number-generator state (checkpoints are often published).

Loading validates it (:meth:`PrivacyState.from_dict`): the history must add up to the state's own
``steps``, use only the (sigma, q) settings the run recorded at set-up, cover the ``global_step`` it was
saved at, and hold whole step counts; a folder's ``trainer_state.json`` must agree with it. Anything else
raises :class:`~hf_ewtune.errors.PrivacyStateError` — an edited or stale history would under-report epsilon.

Example:
    >>> import tempfile
    >>> from hf_ewtune.accounting import make_accountant
    >>> acc = make_accountant("pld")
    >>> acc.step(noise_multiplier=1.0, sample_rate=0.25, num_steps=3)
    >>> d = tempfile.mkdtemp()
    >>> _ = save_privacy_state(d, {"accountant": "pld", "accountant_state": acc.state_dict(), "steps": 3,
    ...                            "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.25})
    >>> PrivacyState.load(d).steps
    3
    >>> bad = {"accountant": "pld", "accountant_state": acc.state_dict(), "steps": 2, "delta": 1e-5}
    >>> PrivacyState.from_dict(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_ewtune.errors.PrivacyStateError: the accountant history holds 3 steps but the privacy state says steps: 2...
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError
from hf_ewtune.json_safe import json_safe

PRIVACY_STATE_NAME = "_privacy_state.json"
TRAINER_STATE_NAME = "trainer_state.json"
FORMAT_VERSION = 1
#: Largest privacy-state file read (a DPTrainer state is a few kB): a huge file is corrupt or hostile.
MAX_STATE_BYTES = 4 * 1024 * 1024

_FIX = ("The privacy state was edited, is corrupt, or was copied from another checkpoint; use the "
        "_privacy_state.json that DPTrainer wrote into this folder.")


def _fail(message: str) -> PrivacyStateError:
    return PrivacyStateError(f"{message}. {_FIX}")


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    """An optional whole, non-negative count: booleans and fractional numbers are refused, never truncated."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 0:
        raise _fail(f"privacy state field {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _opt_float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(f"privacy state field {key!r} must be a number, got {value!r}")
    return float(value)


def _opt_bool(data: Mapping[str, Any], key: str, default: bool | None = None) -> bool | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _fail(f"privacy state field {key!r} must be true or false, got {value!r}")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(f"privacy state field {key!r} must be a string, got {value!r}")
    return value


def _opt_mapping(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(f"privacy state field {key!r} must be a JSON object, got {value!r}")
    return dict(value)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


@dataclass
class PrivacyState:
    """The content of ``_privacy_state.json`` (format :data:`FORMAT_VERSION`), typed and validated.

    Attributes:
        accountant: the accountant's registry name (``"edgeworth"``, ``"pld"``, ``"rdp"``).
        accountant_state: the accountant's ``state_dict()`` (its history of (sigma, q, steps) segments).
        steps: optimizer steps accounted (all sessions); always equals the history's total.
        delta: delta of the reported (epsilon, delta).
        noise_multiplier: sigma of the session that wrote the state (set at set-up).
        sample_rate: Poisson rate q of the session that wrote the state (set at set-up).
        sessions: ``[sigma, q]`` of every set-up whose steps are in the history (the last is the writer's);
            each history segment must use one of them.
        global_step: the Trainer's ``global_step`` when the state was written (<= ``steps``).
        epsilon: certified epsilon when the state was written (readers recompute it from the history).
        extra: fields this version does not know (kept on a round trip).
        Other fields are descriptive records of the run (see the source for the full list).
    """

    accountant: str
    accountant_state: dict[str, Any]
    steps: int
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    sessions: list[list[float]] = field(default_factory=list)
    target_epsilon: float | None = None
    budget_steps: int | None = None
    epsilon: float | None = None
    epsilon_certified_by: str | None = None
    epsilon_edgeworth: float | None = None
    stopped_early: bool = False
    global_step: int | None = None
    epochs: float | None = None
    max_grad_norm: float | None = None
    clipping: str | None = None
    sensitivity: float | None = None
    expected_batch_size: float | None = None
    poisson_sampling: bool | None = None
    sampling_assumed_by_accounting: str | None = None
    sampling_note: str | None = None
    world_size: int | None = None
    gradient_accumulation_steps: int | None = None
    per_device_train_batch_size: int | None = None
    planned_steps: int | None = None
    steps_per_epoch: int | None = None
    calibration: dict[str, Any] | None = None
    certify_calibration: bool | None = None
    delta_default: bool | None = None
    randomness: str | None = None
    privacy_unit: str | None = None
    allow_large_delta: bool | None = None
    num_users: int | None = None  # user-level DP: U, the number of users q is relative to (exact; cards round it)
    max_examples_per_user: int | None = None  # user-level DP: per-user, per-step row cap (None: all rows)
    user_id_column: str | None = None  # user-level DP: the column holding each row's user id
    library: str | None = None
    library_version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-safe dict written to ``_privacy_state.json`` (unknown ``extra`` fields included)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrivacyState":
        """Validate and type a privacy state (flat layout, or ``{"accountant": {"name", "state"}}``).

        Raises:
            PrivacyStateError: a missing or malformed accountant state, a history whose step count differs
                from ``steps`` or that covers fewer steps than ``global_step``, a (sigma, q) segment that is
                not among the recorded settings, fractional or boolean counts, or an unknown format version.
        """
        if isinstance(data, PrivacyState):
            return data
        if not isinstance(data, Mapping):
            raise PrivacyStateError(f"a privacy state must be a JSON object, got {type(data).__name__}.")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, Integral) or not 1 <= version <= FORMAT_VERSION:
            raise PrivacyStateError(
                f"privacy state format_version {version!r} is not supported (this hf_ewtune reads versions 1 to "
                f"{FORMAT_VERSION}); upgrade hf_ewtune to read it.")
        name, acc_state = _accountant_entry(data)
        if not isinstance(acc_state, Mapping):
            raise PrivacyStateError(
                "privacy state has no accountant state ('accountant_state', or 'accountant': {'name', 'state'}); "
                "it cannot be certified. Use the _privacy_state.json written by DPTrainer.")
        accountant = _rebuild_accountant(acc_state)
        if name is not None and name != accountant.name:
            raise _fail(f"privacy state names accountant {name!r} but its accountant_state is {accountant.name!r}")
        total = accountant.steps
        steps = _opt_int(data, "steps")
        if steps is not None and steps != total:
            raise _fail(f"the accountant history holds {total} steps but the privacy state says steps: {steps}; "
                        "no epsilon is computed from a history that disagrees with the state")
        global_step = _opt_int(data, "global_step")
        if global_step is not None and global_step > total:
            raise _fail(f"the accountant history holds {total} steps but the state was saved at global_step "
                        f"{global_step}: steps are missing from the history")
        known = {f.name for f in dataclasses.fields(cls)} | {"accountant_state"}
        state = cls(
            accountant=accountant.name,
            accountant_state=accountant.state_dict(),
            steps=total,
            delta=_opt_float(data, "delta"),
            noise_multiplier=_opt_float(data, "noise_multiplier"),
            sample_rate=_opt_float(data, "sample_rate"),
            sessions=_sessions(data),
            target_epsilon=_opt_float(data, "target_epsilon"),
            budget_steps=_opt_int(data, "budget_steps"),
            epsilon=_opt_float(data, "epsilon"),
            epsilon_certified_by=_opt_str(data, "epsilon_certified_by"),
            epsilon_edgeworth=_opt_float(data, "epsilon_edgeworth"),
            stopped_early=bool(_opt_bool(data, "stopped_early", False)),
            global_step=global_step,
            epochs=_opt_float(data, "epochs"),
            max_grad_norm=_opt_float(data, "max_grad_norm"),
            clipping=_opt_str(data, "clipping"),
            sensitivity=_opt_float(data, "sensitivity"),
            expected_batch_size=_opt_float(data, "expected_batch_size"),
            poisson_sampling=_opt_bool(data, "poisson_sampling"),
            sampling_assumed_by_accounting=_opt_str(data, "sampling_assumed_by_accounting"),
            sampling_note=_opt_str(data, "sampling_note"),
            world_size=_opt_int(data, "world_size"),
            gradient_accumulation_steps=_opt_int(data, "gradient_accumulation_steps"),
            per_device_train_batch_size=_opt_int(data, "per_device_train_batch_size"),
            planned_steps=_opt_int(data, "planned_steps"),
            steps_per_epoch=_opt_int(data, "steps_per_epoch"),
            calibration=_opt_mapping(data, "calibration"),
            certify_calibration=_opt_bool(data, "certify_calibration"),
            delta_default=_opt_bool(data, "delta_default"),
            randomness=_opt_str(data, "randomness"),
            privacy_unit=_opt_str(data, "privacy_unit"),
            allow_large_delta=_opt_bool(data, "allow_large_delta"),
            num_users=_opt_int(data, "num_users"),
            max_examples_per_user=_opt_int(data, "max_examples_per_user"),
            user_id_column=_opt_str(data, "user_id_column"),
            library=_opt_str(data, "library"),
            library_version=_opt_str(data, "library_version"),
            versions=_opt_mapping(data, "versions") or {},
            format_version=int(version),
            extra={str(k): v for k, v in data.items() if k not in known},
        )
        if state.expected_batch_size is not None and float(state.expected_batch_size).is_integer():
            state.expected_batch_size = int(state.expected_batch_size)
        state._check_sessions(accountant.history)
        return state

    def _check_sessions(self, history: list[tuple[float, float, int]]) -> None:
        calibration = self.calibration or {}
        for key in ("noise_multiplier", "sample_rate"):
            planned, mine = calibration.get(key), getattr(self, key)
            if (isinstance(planned, Real) and not isinstance(planned, bool) and mine is not None
                    and not _same(float(planned), mine)):
                raise _fail(f"the privacy state records {key}={mine} but its calibration record says {planned}")
        recorded = list(self.sessions)
        if self.noise_multiplier is not None and self.sample_rate is not None:
            mine = [self.noise_multiplier, self.sample_rate]
            if recorded and not (_same(recorded[-1][0], mine[0]) and _same(recorded[-1][1], mine[1])):
                raise _fail(f"the privacy state's sessions end with sigma, q = {recorded[-1]} but it records "
                            f"noise_multiplier={mine[0]}, sample_rate={mine[1]}")
            if not recorded:
                recorded = [mine]
        if not recorded:
            return  # a hand-made state without the set-up record: nothing to cross-check
        for sigma, q, n in history:
            if not any(_same(sigma, s) and _same(q, r) for s, r in recorded):
                raise _fail(f"the accountant history has {n} step(s) at noise_multiplier={sigma}, sample_rate={q}, "
                            f"which the run never used (its set-up recorded sigma, q = {recorded})")
        self.sessions = recorded

    # ---------------------------------------------------------------------------------- files
    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> "PrivacyState":
        """Read, validate and cross-check ``path_dir/_privacy_state.json`` (see :func:`load_privacy_state`)."""
        path_dir = os.fspath(path_dir)
        path = os.path.join(path_dir, PRIVACY_STATE_NAME)
        if not os.path.isfile(path):
            raise PrivacyStateError(
                f"{path_dir!r} has no {PRIVACY_STATE_NAME}: it was not written by a DPTrainer run (or the file was "
                "removed), so the privacy already spent is unknown. Resume from a checkpoint saved by DPTrainer, or "
                "start a new run without resume_from_checkpoint (its epsilon then does NOT cover the earlier training)."
            )
        size = os.path.getsize(path)
        if size > MAX_STATE_BYTES:
            raise PrivacyStateError(
                f"{path!r} is {size} bytes, above the {MAX_STATE_BYTES} bytes a privacy state may have (DPTrainer "
                "writes a few kB): the file is corrupt or not a privacy state; restore it from a backup."
            )
        try:
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PrivacyStateError(f"cannot read {path!r}: {exc}. The file is corrupt; restore it from a backup.") from exc
        try:
            state = cls.from_dict(raw)
        except PrivacyStateError as exc:
            raise PrivacyStateError(f"{path!r}: {exc}") from exc
        state.check_against_folder(path_dir)
        return state

    def check_against_folder(self, path_dir: str | os.PathLike) -> None:
        """Cross-check with the ``trainer_state.json`` saved beside the state (a checkpoint folder has one).

        Raises:
            PrivacyStateError: the folder's ``global_step`` differs from the state's, or exceeds its steps
                (e.g. a state copied from an earlier checkpoint).
        """
        path = os.path.join(os.fspath(path_dir), TRAINER_STATE_NAME)
        if not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8") as fh:
                trainer_step = json.load(fh).get("global_step")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise PrivacyStateError(f"cannot read {path!r} to cross-check the privacy state: {exc}.") from exc
        if isinstance(trainer_step, bool) or not isinstance(trainer_step, int):
            return
        where = os.path.join(os.fspath(path_dir), PRIVACY_STATE_NAME)
        if self.global_step is not None and self.global_step != trainer_step:
            raise _fail(f"{where!r} was saved at global_step {self.global_step} but {TRAINER_STATE_NAME} beside it "
                        f"is at global_step {trainer_step}")
        if trainer_step > self.steps:
            raise _fail(f"{where!r} accounts for {self.steps} steps but {TRAINER_STATE_NAME} beside it is at "
                        f"global_step {trainer_step}: steps are missing from the history")

    def save(self, path_dir: str | os.PathLike) -> str:
        """Write this state to ``path_dir/_privacy_state.json`` atomically; returns the file path."""
        path_dir = os.fspath(path_dir)
        os.makedirs(path_dir, exist_ok=True)
        path = os.path.join(path_dir, PRIVACY_STATE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return path


def _accountant_entry(data: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(name, state_dict) from ``{"accountant": {"name", "state"}}`` or the flat
    ``{"accountant": name, "accountant_state": state_dict}`` layout."""
    entry = data.get("accountant")
    if isinstance(entry, Mapping):
        state = entry.get("state")
        return entry.get("name"), state
    return (entry if isinstance(entry, str) else None), data.get("accountant_state")


def _rebuild_accountant(acc_state: Mapping[str, Any]) -> Any:
    from hf_ewtune.accounting import accountant_from_state

    try:
        return accountant_from_state(dict(acc_state))
    except PrivacyConfigError as exc:  # a segment with an invalid sigma / q / count
        raise _fail(f"invalid accountant history: {exc}") from exc
    except PrivacyStateError as exc:
        raise _fail(str(exc).rstrip(".")) from exc


def _sessions(data: Mapping[str, Any]) -> list[list[float]]:
    value = data.get("sessions")
    if value is None:
        return []
    out = []
    for item in value if isinstance(value, list) else [value]:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or any(isinstance(x, bool) or not isinstance(x, Real) for x in item)):
            raise _fail(f"privacy state field 'sessions' must be a list of [noise_multiplier, sample_rate], got {value!r}")
        out.append([float(item[0]), float(item[1])])
    return out


def as_privacy_state(state: "PrivacyState | Mapping[str, Any]") -> PrivacyState:
    """``state`` itself if it is a :class:`PrivacyState`, else :meth:`PrivacyState.from_dict` of it."""
    return state if isinstance(state, PrivacyState) else PrivacyState.from_dict(state)


def save_privacy_state(path_dir: str, state: "PrivacyState | Mapping[str, Any]") -> str:
    """Validate ``state`` and write it to ``path_dir/_privacy_state.json`` (atomically); return the file path.

    Args:
        path_dir: A checkpoint or output folder (created if missing).
        state: A :class:`PrivacyState` or its dict (non-finite floats are written as strings ``"inf"``).

    Raises:
        PrivacyStateError: ``state`` fails :meth:`PrivacyState.from_dict`'s checks (nothing is written).
    """
    return as_privacy_state(state).save(path_dir)


def load_privacy_state(path_dir: str) -> dict[str, Any]:
    """Read ``path_dir/_privacy_state.json``, validated and cross-checked, as the flat dict (see
    :meth:`PrivacyState.load` for the typed record).

    Raises:
        PrivacyStateError: if the file is missing, unreadable or inconsistent (with itself or with the
            folder's ``trainer_state.json``) — resuming from it would under-report the privacy spent.
    """
    return PrivacyState.load(path_dir).to_dict()


__all__ = [
    "FORMAT_VERSION", "PRIVACY_STATE_NAME", "PrivacyState", "as_privacy_state", "load_privacy_state",
    "save_privacy_state",
]
