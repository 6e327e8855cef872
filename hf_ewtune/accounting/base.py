"""Common base of all accountants: a history of ``(noise_multiplier, sample_rate, num_steps)`` segments."""

from __future__ import annotations

import abc
import copy
import math
from numbers import Integral, Real
from typing import Any, Callable

from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError

from ._validation import MAX_STEPS, check_delta, check_noise_multiplier, check_sample_rate, check_steps
from .report import PrivacyReport

STATE_VERSION = 1
#: Most segments (distinct consecutive (sigma, q) settings) an accountant holds: every query composes each
#: segment separately, so its cost grows with their number. A DPTrainer run has one per (re)start.
MAX_SEGMENTS = 32


def _checked_segment(segment: Any) -> tuple[float, float, int]:
    """One saved ``[sigma, q, steps]`` segment, validated: a step count must be a whole JSON integer."""
    sigma, q, n = segment
    if isinstance(n, bool) or not isinstance(n, Integral) or int(n) < 1:
        raise PrivacyStateError(
            f"corrupt accountant state_dict: segment {list(segment)!r} has step count {n!r}; it must be an integer "
            ">= 1 (boolean or fractional counts are refused, not truncated).")
    for value, label in ((sigma, "noise_multiplier"), (q, "sample_rate")):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise PrivacyStateError(f"corrupt accountant state_dict: segment {list(segment)!r} has {label} {value!r}.")
    try:
        return check_noise_multiplier(sigma), check_sample_rate(q), int(n)
    except PrivacyConfigError as exc:
        raise PrivacyStateError(f"corrupt accountant state_dict: segment {list(segment)!r}: {exc}") from exc


class Accountant(abc.ABC):
    """Privacy accountant for DP-SGD with Poisson sampling and Gaussian noise (add-or-remove-one).

    Subclasses implement :meth:`_certified_epsilon` (a certified upper bound) and :attr:`certified_by`.
    Steps are recorded as segments ``(noise_multiplier, sample_rate, num_steps)``; consecutive steps with
    equal parameters are merged, so the state stays small for any number of steps.

    Example:
        >>> from hf_ewtune.accounting import make_accountant
        >>> acc = make_accountant("pld")
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01)
        >>> acc.history
        [(1.0, 0.01, 11)]
    """

    #: registry name ("edgeworth", "pld", "rdp", or the name given to ``register_accountant``)
    name: str = "base"
    #: whether this accountant is built around the Edgeworth estimate (EW-Tune): ``calibrate(certify=False)``
    #: may then return the noise from that ESTIMATE alone (flagged uncertified), and one-line logs name the
    #: estimate beside the certified epsilon
    edgeworth_based: bool = False

    def __init__(self) -> None:
        self._history: list[tuple[float, float, int]] = []
        self._cache: dict[Any, Any] = {}
        self._merge_next = True

    # ------------------------------------------------------------------ steps
    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` DP-SGD steps with the given noise multiplier and Poisson sampling rate.

        Args:
            noise_multiplier: noise std / clipping norm (>= 0; 0 makes epsilon infinite).
            sample_rate: Poisson sampling rate q in (0, 1].
            num_steps: number of steps (>= 0). Every step counts, empty batches included.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(num_steps, name="num_steps")
        if n == 0:
            return
        if self.steps + n > MAX_STEPS:
            raise PrivacyConfigError(
                f"num_steps={n} would bring the total to {self.steps + n} steps, above the supported maximum of "
                f"{MAX_STEPS:.0e}."
            )
        if self._history and self._history[-1][:2] == (sigma, q) and getattr(self, "_merge_next", True):
            self._history[-1] = (sigma, q, self._history[-1][2] + n)
        else:
            if len(self._history) >= MAX_SEGMENTS:
                raise PrivacyConfigError(
                    f"the accountant already holds {MAX_SEGMENTS} segments (distinct consecutive noise multiplier / "
                    "sample rate settings), the supported maximum; keep sigma and q fixed within a run."
                )
            self._history.append((sigma, q, n))
        self._merge_next = True

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self._history)

    def ensure_room(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Raise :class:`PrivacyConfigError` now if a step with these settings would exceed :data:`MAX_SEGMENTS`
        (DPTrainer calls this before training, so that the accountant never refuses a step mid-run)."""
        last = self._history[-1] if self._history else None
        merges = last is not None and last[:2] == (float(noise_multiplier), float(sample_rate)) and getattr(
            self, "_merge_next", True)
        if not merges and len(self._history) >= MAX_SEGMENTS:
            raise PrivacyConfigError(
                f"the accountant already holds {MAX_SEGMENTS} segments, the supported maximum (each change of noise "
                "multiplier or sample rate, and with shuffled batches each resume, opens one); this run cannot be "
                "accounted further. Start a new run instead of resuming this one again."
            )

    def start_run(self) -> None:
        """Mark the start of a training run or resume (a no-op under Poisson sampling, where steps are iid)."""

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Copy of the segments ``(noise_multiplier, sample_rate, num_steps)``."""
        return list(self._history)

    def options(self) -> dict[str, Any]:
        """Constructor options (stored in :meth:`state_dict`)."""
        return {}

    @property
    def certifier_label(self) -> str:
        """Short name of what certifies :meth:`get_epsilon` (``"PLD"``, ``"RDP"``), for one-line logs."""
        return self.name

    def search_epsilon_fn(self) -> Callable[[tuple, float], float] | None:
        """A cheaper epsilon ``f(history, delta)`` used only to bracket noise/step searches, or ``None``.

        Searches (``calibrate``, ``steps_within_budget``) start from it and always finish with
        :meth:`get_epsilon`, so it is never published; ``None`` (default) searches with :meth:`get_epsilon`.
        """
        return None

    def copy(self) -> "Accountant":
        """Independent copy (same options and history)."""
        return copy.deepcopy(self)

    # -------------------------------------------------------------- epsilons
    @property
    @abc.abstractmethod
    def certified_by(self) -> str:
        """Human-readable description of what certifies :meth:`get_epsilon`."""

    @abc.abstractmethod
    def _certified_epsilon(self, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
        """Certified epsilon for a non-empty history without zero-noise steps."""

    def get_epsilon(self, delta: float = 1e-5) -> float:
        """CERTIFIED epsilon (an upper bound) at ``delta`` for all steps so far.

        Returns 0.0 before any step and ``math.inf`` if any step had ``noise_multiplier == 0``.
        Repeated queries with an unchanged history are answered from a cache.
        """
        delta = check_delta(delta)
        history = tuple(self._history)
        if not history:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in history):
            return math.inf
        key = ("certified", history, delta)
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = float(self._certified_epsilon(history, delta))
        return self._cache[key]

    def _certified_by_for(self, history: tuple, delta: float) -> str:
        """What certified :meth:`get_epsilon` for this history (a fallback is named, see :mod:`.pld_budget`)."""
        # Set by _certified_epsilon together with the epsilon (the cache is only ever cleared as a whole, before
        # a computation), so it describes the epsilon get_epsilon returns for this history.
        return self._cache.get(("label", history, delta)) or self.certified_by

    def get_privacy_spent(self, delta: float = 1e-5) -> PrivacyReport:
        """Full :class:`PrivacyReport`: certified epsilon plus the Edgeworth estimates and error bound."""
        from .edgeworth_report import edgeworth_summary  # the estimate shown beside every certified epsilon

        epsilon = self.get_epsilon(delta)
        history = tuple(self._history)
        key = ("summary", history, delta)
        if key not in self._cache:
            self._cache[key] = edgeworth_summary(history, delta)
        summary = self._cache[key]
        last = history[-1] if history else (None, None, 0)
        return PrivacyReport(
            epsilon=epsilon,
            delta=delta,
            certified_by=self._certified_by_for(history, delta),
            accountant=self.name,
            edgeworth_epsilon=summary["order1"],
            edgeworth_epsilon_order2=summary["order2"],
            edgeworth_error_bound=dict(summary["bound"]),
            steps=self.steps,
            history=list(history),
            noise_multiplier=last[0],
            sample_rate=last[1],
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: accountant name, options and history."""
        return {
            "accountant": self.name,
            "options": self.options(),
            "history": [[sigma, q, n] for sigma, q, n in self._history],
            "version": STATE_VERSION,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history from :meth:`state_dict` (the accountant name must match).

        Raises:
            PrivacyStateError: a missing key, a segment that is not ``[sigma, q, steps]``, a boolean or
                fractional step count (never truncated), or an invalid sigma / q.
        """
        try:
            name = state_dict["accountant"]
            raw = state_dict["history"]
            if not isinstance(raw, list) or len(raw) > MAX_SEGMENTS:
                raise PrivacyStateError(
                    f"the accountant state_dict holds {len(raw) if isinstance(raw, list) else type(raw).__name__} "
                    f"segments; at most {MAX_SEGMENTS} are supported (a DPTrainer run has one per (re)start)."
                )
            history = [_checked_segment(segment) for segment in raw]
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyStateError(f"corrupt accountant state_dict: {exc!r}") from exc
        if name != self.name:
            raise PrivacyStateError(
                f"state_dict is for accountant {name!r}, not {self.name!r}; use accountant_from_state(state_dict)."
            )
        self._history = []
        self._cache.clear()
        self._merge_next = True
        try:
            for sigma, q, n in history:
                self._load_segment(sigma, q, n)
        except PrivacyConfigError as exc:
            raise PrivacyStateError(f"invalid accountant state_dict: {exc}") from exc

    def _load_segment(self, sigma: float, q: float, n: int) -> None:
        """Restore one saved segment (subclasses that keep equal segments apart override this)."""
        self.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts}) with {self.steps} steps in {len(self._history)} segment(s)"
