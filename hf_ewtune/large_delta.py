"""δ at or above 1/N: refused unless the user opts in, and then stated on the model card.

An (ε, δ) guarantee with δ ≥ 1/N (N training examples) is satisfied by a mechanism that publishes every
training example verbatim, independently with probability δ: it is (0, δ)-DP under add-or-remove-one
adjacency and discloses δN ≥ 1 whole examples in expectation. So such a δ does not protect individual
examples. :func:`refuse_large_delta` refuses it before training unless ``allow_large_delta=True``; with the
opt-in, the model card carries :data:`LARGE_DELTA_NOTE` (YAML ``privacy.delta_note`` and a caveat in the prose).

The card's caveat follows the opt-in, not the comparison with N, so that the card reveals nothing about N.

Example:
    >>> refuse_large_delta(1e-5, num_examples=1000, allow_large_delta=False)
    >>> refuse_large_delta(0.5, num_examples=1000, allow_large_delta=True)
    >>> refuse_large_delta(0.5, num_examples=1000, allow_large_delta=False)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    hf_ewtune.errors.PrivacyConfigError: ...
"""

from __future__ import annotations

from hf_ewtune.errors import PrivacyConfigError

#: What a δ of at least 1/N permits; written into the card (``privacy.delta_note``) of an opted-in run.
LARGE_DELTA_NOTE = (
    "delta was not required to be below 1/N, N being the number of training rows, each one privacy unit "
    "(allow_large_delta=True). A delta of at least 1/N permits releasing whole training rows: publishing each row "
    "verbatim, independently with probability delta, is (0, delta)-differentially private and discloses "
    "delta x N >= 1 rows in expectation. The guarantee then does not rule out such a disclosure."
)

#: The same, as the Markdown caveat of the card's Privacy section.
LARGE_DELTA_CAVEAT = (
    "**Caveat (δ):** δ was not required to be below 1/N, N being the number of training rows, each one privacy "
    "unit (`allow_large_delta=True`). A δ of at least 1/N permits releasing whole training rows: publishing each "
    "row verbatim, independently with probability δ, is (0, δ)-differentially private and discloses δN ≥ 1 rows "
    "in expectation. This guarantee does not rule out such a disclosure."
)


#: The same two texts for user-level runs (``user_id_column``): the units counted are users, not rows.
USER_LARGE_DELTA_NOTE = (
    "delta was not required to be below 1/U, U being the number of users, each one privacy unit "
    "(allow_large_delta=True). A delta of at least 1/U permits releasing all the rows of whole users: publishing "
    "each user's rows verbatim, independently with probability delta, is (0, delta)-differentially private at user "
    "level and discloses delta x U >= 1 users' data in expectation. The guarantee then does not rule out such a "
    "disclosure."
)
USER_LARGE_DELTA_CAVEAT = (
    "**Caveat (δ):** δ was not required to be below 1/U, U being the number of users, each one privacy unit "
    "(`allow_large_delta=True`). A δ of at least 1/U permits releasing all the rows of whole users: publishing each "
    "user's rows verbatim, independently with probability δ, is (0, δ)-differentially private at user level and "
    "discloses δU ≥ 1 users' data in expectation. This guarantee does not rule out such a disclosure."
)


def large_delta_note(*, user_level: bool = False) -> str:
    """:data:`LARGE_DELTA_NOTE`, or :data:`USER_LARGE_DELTA_NOTE` for a user-level run."""
    return USER_LARGE_DELTA_NOTE if user_level else LARGE_DELTA_NOTE


def large_delta_caveat(*, user_level: bool = False) -> str:
    """:data:`LARGE_DELTA_CAVEAT`, or :data:`USER_LARGE_DELTA_CAVEAT` for a user-level run."""
    return USER_LARGE_DELTA_CAVEAT if user_level else LARGE_DELTA_CAVEAT


def refuse_large_delta(delta: float, *, num_examples: int, allow_large_delta: bool, user_level: bool = False) -> None:
    """Raise :class:`~hf_ewtune.errors.PrivacyConfigError` if ``delta >= 1/num_examples`` and not opted in.

    Args:
        delta: The δ of the guarantee (``PrivacyArguments.target_delta``).
        num_examples: N, the size of the training set (U, the number of users, for a user-level run).
        allow_large_delta: The user's explicit opt-in (``PrivacyArguments.allow_large_delta``).
        user_level: The privacy unit is a user (``user_id_column``): ``num_examples`` counts users.
    """
    if delta < 1.0 / num_examples or allow_large_delta:
        return
    n, units, what = ("U", "users", "all the rows of whole users") if user_level else (
        "N", "training examples", "whole training examples")
    raise PrivacyConfigError(
        f"target_delta={delta:g} is not below 1/{n} = {1.0 / num_examples:g} ({n} = {num_examples} {units}): "
        f"such a delta permits releasing {what} (each one verbatim with probability delta). Leave "
        f"target_delta unset for the default min(1e-5, 1/(10 {n})) rounded down to a power of 10, or choose a delta "
        f"well below 1/{n}. To train and publish with this delta anyway, set allow_large_delta=True "
        "(hf-ewtune train: --allow-large-delta); the model card then states what such a delta permits."
    )
