"""Which accountant certifies a sampling mode: the name given (Poisson), or the sampling's own certified bound."""

from __future__ import annotations

from hf_ewtune.errors import PrivacyConfigError

from .base import Accountant
from .random_allocation import RandomAllocationAccountant
from .shuffled import ShuffledAccountant


def accountant_for_sampling(
    accountant: str, *, poisson: bool = True, num_examples: int, batch_size: int, steps_per_epoch: int,
    sampling: str | None = None,
) -> str | Accountant:
    """What DPTrainer accounts with: ``accountant`` (a name) for Poisson sampling, a :class:`ShuffledAccountant`
    for shuffled batches, a :class:`~hf_ewtune.accounting.random_allocation.RandomAllocationAccountant` for
    random allocation. ``sampling`` (``"poisson"``, ``"shuffled"``, ``"random_allocation"``) overrides ``poisson``.

    Example:
        >>> accountant_for_sampling("edgeworth", poisson=True, num_examples=100, batch_size=10, steps_per_epoch=10)
        'edgeworth'
        >>> accountant_for_sampling("pld", poisson=False, num_examples=100, batch_size=10, steps_per_epoch=10).name
        'shuffled'
        >>> accountant_for_sampling("pld", sampling="random_allocation", num_examples=100, batch_size=10,
        ...                         steps_per_epoch=10).name
        'random_allocation'
    """
    mode = sampling if sampling is not None else ("poisson" if poisson else "shuffled")
    if mode == "poisson":
        return accountant
    if mode == "random_allocation":
        return RandomAllocationAccountant()
    if mode != "shuffled":
        raise PrivacyConfigError(f"sampling must be 'poisson', 'shuffled' or 'random_allocation', got {mode!r}.")
    return ShuffledAccountant.for_sampler(num_examples=num_examples, batch_size=batch_size,
                                          steps_per_epoch=steps_per_epoch)
