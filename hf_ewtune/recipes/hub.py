"""Publishing a finished run to the Hugging Face Hub, card and all.

The recipes write their model card after training (privacy block, and for pooled heads a "How to load"
section), so they upload the folder as written instead of calling ``Trainer.push_to_hub``, which would
rebuild the card first. What stays local: the accountant state (``_privacy_state.json``: its exact
sampling rate would reveal the dataset size), checkpoints, ``results.json`` (run settings and local
paths) and ``training_args.bin``.

Example:
    >>> from hf_ewtune.recipes.hub import UPLOAD_IGNORE
    >>> "_*" in UPLOAD_IGNORE and "checkpoint-*" in UPLOAD_IGNORE
    True
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

UPLOAD_IGNORE = ["_*", "checkpoint-*", "results.json", "training_args.bin", "runs/*", "**/events.out.tfevents*"]


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
    from huggingface_hub import HfApi

    from hf_ewtune.trainer import non_private_logs

    folder = Path(output_dir)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md model card: refusing to publish a model without its guarantee.")
    logs = non_private_logs(str(folder))
    if logs:
        logger.warning("Not uploading %d training-log file(s) under %s: they hold the non-private training loss.",
                       len(logs), folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=UPLOAD_IGNORE,
                               commit_message="hf-ewtune: DP fine-tuned model with its privacy card")
    return str(getattr(commit, "commit_url", commit))
