"""Sub-commands of ``hf-ewtune``; each module exposes ``register(subparsers)`` (see ``hf_ewtune.cli``)."""
