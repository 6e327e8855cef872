"""pytest --doctest-modules: skip this subpackage's modules when the optional ``trl`` extra is not installed."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("trl") is not None else ["*.py"]
