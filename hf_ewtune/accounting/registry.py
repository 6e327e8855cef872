"""The accountant registry: build accountants by name or from a saved state_dict, and add your own.

Every place that takes an accountant name reads this registry: ``PrivacyArguments.accountant`` (and so
``DPTrainer``), ``calibrate``/``steps_within_budget``, ``accountant_from_state`` (model cards, resumed runs) and
the ``hf-ewtune epsilon|calibrate|train --accountant`` choices. :func:`register_accountant` adds a name.
"""

from __future__ import annotations

from typing import Any

from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError

from .base import Accountant
from .certified import PLDAccountant, RDPAccountant
from .edgeworth_accountant import EdgeworthAccountant
from .saddle_point_accountant import SaddlePointAccountant
from .random_allocation import RandomAllocationAccountant
from .shuffled import ShuffledAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    "edgeworth": EdgeworthAccountant,
    "pld": PLDAccountant,
    "rdp": RDPAccountant,
}
# Accountants for a sampling other than Poisson: DPTrainer picks them itself (never selectable as
# ``accountant=``, whose choices all analyse Poisson sampling), but saved states name them.
_SAMPLING_ACCOUNTANTS: dict[str, type[Accountant]] = {
    "shuffled": ShuffledAccountant, "random_allocation": RandomAllocationAccountant}
_ALIASES = {"ew": "edgeworth", "spa": "saddle_point", "saddle-point": "saddle_point"}
_BUILTIN = frozenset(ACCOUNTANTS)


def accountant_names() -> tuple[str, ...]:
    """The registered accountant names, built-ins first (``("edgeworth", "pld", "rdp", ...)``).

    Example:
        >>> accountant_names()[:3]
        ('edgeworth', 'pld', 'rdp')
    """
    return tuple(ACCOUNTANTS)


def accountant_class(name: str) -> type[Accountant]:
    """The class registered under ``name`` (aliases accepted).

    Raises:
        PrivacyConfigError: no accountant has that name (the message lists the registered ones).
    """
    key = _ALIASES.get(str(name).lower().strip(), str(name).lower().strip())
    if key in _SAMPLING_ACCOUNTANTS:
        return _SAMPLING_ACCOUNTANTS[key]
    if key not in ACCOUNTANTS:
        raise PrivacyConfigError(
            f"accountant must be one of {list(ACCOUNTANTS)}, got {name!r} (add your own with "
            "hf_ewtune.accounting.register_accountant)."
        )
    return ACCOUNTANTS[key]


def check_accountant_name(name: Any, *, argument: str = "accountant") -> str:
    """``name`` if it is exactly a registered accountant name, else :class:`PrivacyConfigError` naming ``argument``."""
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise PrivacyConfigError(
            f"{argument} must be one of {list(ACCOUNTANTS)}, got {name!r} (add your own with "
            "hf_ewtune.accounting.register_accountant)."
        )
    return name


def register_accountant(cls: type[Accountant], *, replace: bool = False) -> type[Accountant]:
    """Register an :class:`Accountant` subclass under its ``name`` (usable as a class decorator).

    The class must certify: :meth:`Accountant._certified_epsilon` is what ``DPTrainer`` enforces and publishes
    as the certified epsilon. It must be constructible from its :meth:`Accountant.options` (``cls(**options)``),
    which is how saved states are rebuilt.

    Args:
        cls: The accountant class; ``cls.name`` (lower case, letters/digits/``_``/``-``) is its registry name.
        replace: Allow replacing a registered name (never a built-in one).

    Raises:
        PrivacyConfigError: not an Accountant subclass, an invalid or taken name.

    Example:
        >>> from hf_ewtune.accounting import RDPAccountant, register_accountant, unregister_accountant
        >>> @register_accountant
        ... class MyRDP(RDPAccountant):
        ...     name = "my_rdp"
        >>> make_accountant("my_rdp").certified_by.startswith("dp-accounting")
        True
        >>> unregister_accountant("my_rdp")
    """
    if not (isinstance(cls, type) and issubclass(cls, Accountant)):
        raise PrivacyConfigError(f"register_accountant needs an Accountant subclass, got {cls!r}.")
    name = getattr(cls, "name", None)
    if (not isinstance(name, str) or not name or name != name.lower() or name == "base"
            or not all(c.isalnum() or c in "_-" for c in name)):
        raise PrivacyConfigError(
            f"{cls.__name__}.name must be a lower-case name of letters, digits, '_' or '-' (not 'base'), got {name!r}."
        )
    if name in _BUILTIN or name in _ALIASES or name in _SAMPLING_ACCOUNTANTS or (name in ACCOUNTANTS and not replace and ACCOUNTANTS[name] is not cls):
        raise PrivacyConfigError(
            f"accountant name {name!r} is already registered ({ACCOUNTANTS.get(name, ACCOUNTANTS.get(_ALIASES.get(name, '')))}); "
            "choose another name" + ("" if name in _BUILTIN else " or pass replace=True") + "."
        )
    ACCOUNTANTS[name] = cls
    return cls


def unregister_accountant(name: str) -> None:
    """Remove an accountant added by :func:`register_accountant` (built-ins cannot be removed)."""
    if name in _BUILTIN:
        raise PrivacyConfigError(f"the built-in accountant {name!r} cannot be unregistered.")
    ACCOUNTANTS.pop(name, None)


register_accountant(SaddlePointAccountant)


def make_accountant(name: str = "edgeworth", **options: Any) -> Accountant:
    """Create an accountant by name: ``"edgeworth"`` (default), ``"pld"``, ``"rdp"``, ``"saddle_point"`` (Poisson sampling) or
    ``"shuffled"`` (shuffled fixed-size batches; needs ``steps_per_epoch=``, see :class:`ShuffledAccountant`) or
    ``"random_allocation"`` (balls-in-bins batches, see :class:`RandomAllocationAccountant`).

    Example:
        >>> make_accountant("pld").name
        'pld'
    """
    if isinstance(name, Accountant):
        return name
    cls = accountant_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise PrivacyConfigError(f"invalid options for accountant {cls.name!r}: {exc}") from exc


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
    known = {**ACCOUNTANTS, **_SAMPLING_ACCOUNTANTS}
    if not isinstance(name, str) or name not in known:
        raise PrivacyStateError(f"unknown accountant {name!r} in state_dict (known: {sorted(known)}).")
    options = dict(state_dict.get("options") or {})
    try:
        acc = known[name](**options)
    except (TypeError, PrivacyConfigError) as exc:
        raise PrivacyStateError(f"invalid options in accountant state_dict: {exc}") from exc
    acc.load_state_dict(state_dict)
    return acc
