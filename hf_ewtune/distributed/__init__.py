"""Sharded data-parallel training under DP-SGD (FSDP2: :mod:`hf_ewtune.distributed.fsdp`)."""
