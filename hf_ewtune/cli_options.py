"""Command-line options generated from dataclass fields (one definition of each setting, no hand-written list).

Each field becomes ``--kebab-case-name`` (with an optional prefix), its help and argparse settings taken from the
field's ``metadata``: ``help`` and an optional ``cli`` dict with ``flag`` (another name), ``type`` (an argparse
type that raises ``argparse.ArgumentTypeError``), ``default`` (a command-line default other than the field's),
``choices``, ``metavar``, ``negate`` (for a bool that defaults to True: the flag that turns it off, e.g.
``"no-lora"``), ``convert`` (parsed value -> field value) and ``skip`` (no option). A bool that defaults to
False is a switch.

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Demo:
    ...     rate: float = field(default=0.5, metadata={"help": "a rate"})
    ...     fast: bool = field(default=False, metadata={"help": "go fast"})
    ...     tags: list | None = field(default=None, metadata={"cli": {"flag": "tag-list", "type": str,
    ...                                                            "convert": lambda s: s.split(",")}})
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_options(parser, Demo, prefix="demo-")
    >>> ns = parser.parse_args(["--demo-rate", "0.1", "--demo-fast", "--demo-tag-list", "a,b"])
    >>> dataclass_from_options(Demo, ns, prefix="demo-")
    Demo(rate=0.1, fast=True, tags=['a', 'b'])
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterable


def checked(check: Callable[[Any], Any], kind: type = float) -> Callable[[str], Any]:
    """An argparse type: parse the text as ``kind``, then run ``check`` (its error becomes argparse's message)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
            check(value)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    parse.__name__ = getattr(check, "__name__", kind.__name__)
    return parse


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _base_type(hint: Any) -> Any:
    """``X`` for ``X``, ``Optional[X]`` or ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _fields(cls: type, exclude: Iterable[str]) -> list[tuple[dataclasses.Field, Any, dict[str, Any]]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        cli = dict(f.metadata.get("cli", {}))
        if f.name in exclude or cli.get("skip") or not f.init:
            continue
        out.append((f, hints[f.name], cli))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                          exclude: Iterable[str] = (), defaults: Any = None) -> None:
    """Add one option per field of the dataclass ``cls`` to ``parser`` (see the module docstring).

    ``defaults`` (an instance of ``cls``) gives the defaults where they differ from the fields' own, e.g. the
    ``LoraSettings`` a recipe config starts from.
    """
    exclude = tuple(exclude)
    for f, hint, cli in _fields(cls, exclude):
        flag = "--" + prefix + cli.get("flag", f.name.replace("_", "-"))
        dest = _dest(prefix, f.name)
        help_text = f.metadata.get("help")
        default = cli["default"] if "default" in cli else (
            getattr(defaults, f.name) if defaults is not None else _default(f))
        if _base_type(hint) is bool and "type" not in cli:
            if default:
                flag = "--" + prefix + cli.get("negate", "no-" + f.name.replace("_", "-"))
                parser.add_argument(flag, dest=dest, action="store_false", help=help_text)
            else:
                parser.add_argument(flag, dest=dest, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": help_text,
                                  "type": cli.get("type", _base_type(hint))}
        for key in ("choices", "metavar"):
            if key in cli:
                kwargs[key] = cli[key]
        parser.add_argument(flag, **kwargs)


def dataclass_from_options(cls: type, namespace: argparse.Namespace, *, prefix: str = "",
                           exclude: Iterable[str] = (), **extra: Any) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_options` added (``extra`` fills the excluded fields)."""
    values: dict[str, Any] = {}
    for f, _, cli in _fields(cls, tuple(exclude) + tuple(extra)):
        value = getattr(namespace, _dest(prefix, f.name))
        if "convert" in cli and value is not None:
            value = cli["convert"](value)
        values[f.name] = value
    return cls(**values, **extra)
