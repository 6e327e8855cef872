"""Publishing a finished run to the Hugging Face Hub, card and all.

The recipes write their model card after training (privacy block, and for pooled heads a "How to load"
section), so they upload the folder as written instead of calling ``Trainer.push_to_hub``, which would
rebuild the card first. What stays local: checkpoints, plus everything in
:data:`hf_ewtune.hub_safety.HUB_IGNORE_PATTERNS` at any folder depth: the accountant state
(``_privacy_state.json``: its exact sampling rate would reveal the dataset size), ``trainer_state.json``,
``*_results.json`` and TensorBoard events (the non-private training loss), ``results.json`` (run settings
and local paths) and ``training_args.bin``. The upload goes through :class:`~hf_ewtune.hub_safety.SafeHubApi`,
which checks the exact file list before sending anything.

Example:
    >>> from hf_ewtune.recipes.hub import UPLOAD_IGNORE
    >>> "_*" in UPLOAD_IGNORE and "checkpoint-*" in UPLOAD_IGNORE and "**/_*" in UPLOAD_IGNORE
    True
"""

from __future__ import annotations

import logging
from pathlib import Path

from hf_ewtune.hub_safety import HUB_IGNORE_PATTERNS

logger = logging.getLogger(__name__)

UPLOAD_IGNORE = ["checkpoint-*", *HUB_IGNORE_PATTERNS]


def publish_run(output_dir: str | Path, *, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the run in ``output_dir`` (model, tokenizer, card, plot).

    Args:
        output_dir: A finished run's folder, with its ``README.md`` card.
        repo_id: ``"user/name"`` on the Hub.
        private: Create the repository as private.
        token: Hub token (default: the logged-in one).

    Returns:
        The URL of the commit.

    Raises:
        FileNotFoundError: If ``output_dir`` has no model card (the guarantee must travel with the model).
    """
    from hf_ewtune.hub_safety import SafeHubApi
    from hf_ewtune.trainer import non_private_logs

    folder = Path(output_dir)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md model card: refusing to publish a model without its guarantee.")
    logs = non_private_logs(str(folder))
    if logs:
        logger.warning("Not uploading %d training-log file(s) under %s: they hold the non-private training loss.",
                       len(logs), folder)
    api = SafeHubApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=list(UPLOAD_IGNORE),
                               commit_message="hf-ewtune: DP fine-tuned model with its privacy card")
    return str(getattr(commit, "commit_url", commit))
