"""What never leaves the machine when a run goes to the Hugging Face Hub, and the checks that enforce it.

One list, :data:`HUB_IGNORE_PATTERNS`, is applied to EVERY upload hf_ewtune makes or routes:
``DPTrainer.push_to_hub``, the Trainer's pushes during training (every ``hub_strategy``, including the
``last-checkpoint/`` and ``checkpoint-N/`` uploads of ``"checkpoint"``/``"all_checkpoints"``) and
:func:`hf_ewtune.recipes.hub.publish_run`. The patterns match at any folder depth:

* ``_privacy_state.json`` (and every other ``_*`` file or folder): the accountant history and the exact
  sampling rate, which reveals the dataset size N (sensitive under add/remove-one adjacency);
* ``trainer_state.json``, ``*_results.json`` / ``all_results.json`` (``Trainer.save_state`` /
  ``save_metrics``), ``results.json`` (the recipes' run summary) and TensorBoard event files: they hold
  the training loss, computed from the private batches WITHOUT noise, which the guarantee does not cover;
* ``training_args.bin`` (the run settings and local paths) and ``rng_state*.pth`` (random-generator states).

Behind the patterns sits a safety net, :class:`SafeHubApi`: it checks the exact list of repository paths
about to be committed and raises :class:`~hf_ewtune.errors.UnsafeUploadError` (nothing is uploaded) if
any of them matches. Checkpoints pushed with ``hub_strategy="checkpoint"``/``"all_checkpoints"`` therefore
hold weights, optimizer and scheduler but no privacy state: they cannot be resumed from (``DPTrainer``
raises :class:`~hf_ewtune.errors.PrivacyStateError` rather than restarting the accounting); resume from
the local checkpoint, which keeps its ``_privacy_state.json``.

Example:
    >>> is_private_path("final/_privacy_state.json"), is_private_path("last-checkpoint/trainer_state.json")
    (True, True)
    >>> is_private_path("model.safetensors"), is_private_path("last-checkpoint/optimizer.pt")
    (False, False)
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from huggingface_hub import HfApi

from hf_ewtune.errors import UnsafeUploadError

#: Glob patterns (``huggingface_hub`` semantics: ``fnmatch``, ``*`` crosses ``/``) of files that are never
#: uploaded, at any depth. Applied to the folder being uploaded and, by the safety net, to the repo paths.
HUB_IGNORE_PATTERNS: tuple[str, ...] = (
    "_*", "**/_*", "*_privacy_state.json*",
    "trainer_state.json", "**/trainer_state.json",
    "*_results.json", "results.json", "**/results.json",
    "runs/*", "**/runs/*", "events.out.tfevents*", "**/events.out.tfevents*",
    "training_args.bin", "**/training_args.bin",
    "rng_state*.pth", "**/rng_state*.pth",
)


def is_private_path(path: str) -> bool:
    """Whether a (repository or folder-relative) path matches :data:`HUB_IGNORE_PATTERNS`."""
    path = path.replace("\\", "/").lstrip("/")
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in HUB_IGNORE_PATTERNS)


def ignore_patterns_with_private(patterns: str | Iterable[str] | None = None) -> list[str]:
    """``patterns`` (a caller's ``ignore_patterns``) plus :data:`HUB_IGNORE_PATTERNS`, as a new list."""
    if patterns is None:
        given: list[str] = []
    elif isinstance(patterns, str):
        given = [patterns]
    else:
        given = list(patterns)
    return given + [p for p in HUB_IGNORE_PATTERNS if p not in given]


def check_upload_paths(paths: Iterable[str]) -> None:
    """Raise :class:`~hf_ewtune.errors.UnsafeUploadError` if any repository path is a private file.

    Example:
        >>> check_upload_paths(["README.md", "model.safetensors"])
        >>> check_upload_paths(["final/_privacy_state.json"])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        hf_ewtune.errors.UnsafeUploadError: ...
    """
    bad = sorted({p for p in paths if is_private_path(p)})
    if bad:
        raise UnsafeUploadError(
            f"refusing to upload {bad}: the privacy state and the training logs (trainer_state.json, *_results.json, "
            "TensorBoard events) must not leave this machine (the state reveals the dataset size, the logs hold the "
            "training loss computed without noise). Nothing was uploaded. Upload through DPTrainer.push_to_hub or "
            "hf_ewtune.recipes.hub.publish_run, or pass ignore_patterns=list(hf_ewtune.hub_safety.HUB_IGNORE_PATTERNS)."
        )


def planned_upload_paths(folder_path: str | Path, *, path_in_repo: str | None = None,
                         allow_patterns: str | list[str] | None = None,
                         ignore_patterns: str | list[str] | None = None) -> list[str]:
    """The repository paths ``HfApi.upload_folder`` would commit with these arguments (same filtering)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder_path).expanduser().resolve()
    relpaths = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    kept = filter_repo_objects(relpaths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    return [prefix + p for p in kept]


class SafeHubApi(HfApi):
    """``HfApi`` whose uploads never include a private file (see the module docstring).

    ``upload_folder`` adds :data:`HUB_IGNORE_PATTERNS` to the caller's ``ignore_patterns`` and checks the
    resulting file list before anything is sent; the exact operations of every commit (``create_commit``,
    and the folder additions ``upload_folder`` prepares) are checked again, so a private file raises
    :class:`~hf_ewtune.errors.UnsafeUploadError` instead of being uploaded.
    """

    def upload_folder(self, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["ignore_patterns"] = ignore_patterns_with_private(kwargs.get("ignore_patterns"))
        check_upload_paths(planned_upload_paths(
            kwargs["folder_path"], path_in_repo=kwargs.get("path_in_repo"),
            allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=list(kwargs["ignore_patterns"]),
        ))
        return super().upload_folder(**kwargs)

    def _prepare_upload_folder_additions(self, *args: Any, **kwargs: Any) -> list:
        # The exact add operations upload_folder commits (huggingface_hub 1.x/2.x): last check before sending.
        operations = super()._prepare_upload_folder_additions(*args, **kwargs)
        check_upload_paths(op.path_in_repo for op in operations)
        return operations

    def create_commit(self, repo_id: str, operations: Iterable[Any], **kwargs: Any) -> Any:  # type: ignore[override]
        from huggingface_hub import CommitOperationDelete

        operations = list(operations)
        check_upload_paths(op.path_in_repo for op in operations if not isinstance(op, CommitOperationDelete))
        return super().create_commit(repo_id, operations, **kwargs)


_safe_api: SafeHubApi | None = None
_route_lock = threading.Lock()
_route_depth = 0
_route_original: Any = None


def safe_hub_api() -> SafeHubApi:
    """The shared :class:`SafeHubApi` (tagged with hf_ewtune's name and version)."""
    global _safe_api
    if _safe_api is None:
        from hf_ewtune import __version__

        _safe_api = SafeHubApi(library_name="hf_ewtune", library_version=__version__)
    return _safe_api


@contextlib.contextmanager
def trainer_uploads_through_safety_net() -> Iterator[None]:
    """Within the block, ``transformers.Trainer``'s Hub calls (its module's ``hf_api()``) use :func:`safe_hub_api`.

    Raises:
        UnsafeUploadError: if this transformers version no longer routes uploads through ``hf_api()``, so the
            safety net could not be installed (nothing is uploaded).
    """
    global _route_depth, _route_original
    import transformers.trainer as trainer_module

    with _route_lock:
        if _route_depth == 0:
            if not callable(getattr(trainer_module, "hf_api", None)):
                raise UnsafeUploadError(
                    "cannot route transformers.Trainer's Hub uploads through hf_ewtune's safety net (this transformers "
                    "version has no transformers.trainer.hf_api); refusing to push. Use "
                    "hf_ewtune.recipes.hub.publish_run(output_dir, repo_id=...) instead."
                )
            _route_original = trainer_module.hf_api
            trainer_module.hf_api = safe_hub_api
        _route_depth += 1
    try:
        yield
    finally:
        with _route_lock:
            _route_depth -= 1
            if _route_depth == 0:
                trainer_module.hf_api = _route_original
                _route_original = None


def hub_checkpoint_notice(args: Any) -> str | None:
    """For ``hub_strategy="checkpoint"``/``"all_checkpoints"`` with ``push_to_hub``: what the pushed checkpoints
    lack and why (a warning the trainer logs); ``None`` otherwise."""
    if not getattr(args, "push_to_hub", False):
        return None
    strategy = str(getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", "")))
    if strategy not in ("checkpoint", "all_checkpoints"):
        return None
    return (
        f"hub_strategy={strategy!r}: the checkpoints pushed to the Hub omit _privacy_state.json, trainer_state.json, "
        "rng_state*.pth and training_args.bin (the privacy state reveals the dataset size; the trainer state holds the "
        "training loss computed without noise). They cannot be resumed from: resume from the local checkpoint in "
        "output_dir, which keeps its privacy state."
    )
