"""A fresh run must not write its checkpoints beside another run's (what ``overwrite_output_dir`` guarded).

transformers 5 dropped ``TrainingArguments.overwrite_output_dir``, and its ``Trainer`` silently writes into an
``output_dir`` that already holds ``checkpoint-N`` folders of an earlier run. For a DP run that mixes two
runs' weights and privacy states: ``resume_from_checkpoint=True`` would later pick whichever checkpoint has
the highest step, possibly the other run's, and the folder's card would not cover the other checkpoints.
:func:`refuse_stale_checkpoints` raises instead, before training, unless the run resumes from one of them.

Example:
    >>> import tempfile
    >>> refuse_stale_checkpoints(tempfile.mkdtemp())  # an empty folder is fine
"""

from __future__ import annotations

import os
import re

from hf_ewtune.errors import PrivacyConfigError

_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def existing_checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders directly under ``output_dir`` (sorted by step; empty if it does not exist)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if _CHECKPOINT.match(n) and os.path.isdir(os.path.join(output_dir, n))]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def refuse_stale_checkpoints(output_dir: str, *, resuming_from: str | None = None) -> None:
    """Raise :class:`~hf_ewtune.errors.PrivacyConfigError` if ``output_dir`` holds checkpoints of another run.

    Called by ``DPTrainer.train`` unless it continues its own earlier ``train()`` call. Resuming from a
    checkpoint inside ``output_dir`` continues the run those checkpoints belong to, so nothing is refused;
    resuming from a checkpoint elsewhere into an ``output_dir`` that holds checkpoints would mix two runs.

    Args:
        output_dir: ``TrainingArguments.output_dir``.
        resuming_from: The checkpoint folder ``train()`` resumes from, if any.
    """
    found = existing_checkpoints(output_dir)
    if not found:
        return
    if resuming_from is not None and os.path.realpath(os.path.dirname(os.path.normpath(resuming_from))) == os.path.realpath(output_dir):
        return
    from hf_ewtune.privacy_state import PRIVACY_STATE_NAME

    private = [n for n in found if os.path.isfile(os.path.join(output_dir, n, PRIVACY_STATE_NAME))]
    what = (f"checkpoints of another DP run ({', '.join(private[-3:])} hold {PRIVACY_STATE_NAME})" if private
            else f"checkpoints of another run ({', '.join(found[-3:])})")
    raise PrivacyConfigError(
        f"output_dir={output_dir!r} already holds {what}: a fresh run would mix its checkpoints and privacy states "
        "with them. To continue that run (its spent privacy counts), pass resume_from_checkpoint=True or a checkpoint "
        "path to train() (hf-ewtune train: --resume). To start a new run, choose a new output_dir or delete the "
        "checkpoint-* folders first."
    )
