"""Build accountants by name or from a saved state_dict."""

from __future__ import annotations

from typing import Any

from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError

from .base import Accountant
from .certified import PLDAccountant, RDPAccountant
from .edgeworth_accountant import EdgeworthAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    "edgeworth": EdgeworthAccountant,
    "pld": PLDAccountant,
    "rdp": RDPAccountant,
}
_ALIASES = {"ew": "edgeworth"}


def make_accountant(name: str = "edgeworth", **options: Any) -> Accountant:
    """Create an accountant by name: ``"edgeworth"`` (default), ``"pld"`` or ``"rdp"``.

    Example:
        >>> make_accountant("pld").name
        'pld'
    """
    if isinstance(name, Accountant):
        return name
    key = str(name).lower().strip()
    key = _ALIASES.get(key, key)
    if key not in ACCOUNTANTS:
        raise PrivacyConfigError(
            f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}."
        )
    try:
        return ACCOUNTANTS[key](**options)
    except TypeError as exc:
        raise PrivacyConfigError(f"invalid options for accountant {key!r}: {exc}") from exc


def accountant_from_state(state_dict: dict[str, Any]) -> Accountant:
    """Rebuild the right accountant class (with its options and history) from ``state_dict()``.

    Example:
        >>> acc = make_accountant("rdp")
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=5)
        >>> accountant_from_state(acc.state_dict()).history
        [(1.0, 0.01, 5)]
    """
    if not isinstance(state_dict, dict) or "accountant" not in state_dict:
        raise PrivacyStateError("accountant state_dict must be a dict with an 'accountant' key.")
    name = state_dict["accountant"]
    if name not in ACCOUNTANTS:
        raise PrivacyStateError(f"unknown accountant {name!r} in state_dict (known: {sorted(ACCOUNTANTS)}).")
    options = dict(state_dict.get("options") or {})
    try:
        acc = ACCOUNTANTS[name](**options)
    except (TypeError, PrivacyConfigError) as exc:
        raise PrivacyStateError(f"invalid options in accountant state_dict: {exc}") from exc
    acc.load_state_dict(state_dict)
    return acc
