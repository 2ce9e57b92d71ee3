"""Config fields declared once: the Python API, the CLI flags and the recipe keys come from them.

A capability's options are a frozen dataclass. Each field's metadata (set with :func:`option`)
holds its help text and, where the command line spells it differently, extra flags; its type
annotation decides how it is parsed:

========================  ==============================================================
annotation                 command line / recipe
========================  ==============================================================
``bool``                   ``--name`` / ``--no-name``; a YAML boolean
``int``, ``float``, ``str`` ``--name VALUE`` (``| None``: optional); a number / string
``Literal["a", "b"]``      ``--name {a,b}``; one of the strings
``tuple[str, ...]``        ``--name A B ...``; a list of strings
``Mapping[str, float]``    ``--name K=V ...``; a mapping
========================  ==============================================================

Fields marked ``cli=False`` are Python-only (programmatic plans such as explicit per-layer
ranks); they are neither flags nor recipe keys, and the registry's meta-test checks that every
other field is both.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from onnxprune.errors import UsageError

__all__ = [
    "FieldSpec",
    "add_config_arguments",
    "config_from_mapping",
    "config_from_namespace",
    "field_specs",
    "option",
]

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Any = _MISSING,
    metavar: str | None = None,
    aliases: Sequence[tuple[str, dict[str, Any]]] = (),
    cli: bool = True,
) -> Any:
    """A config field with its help text.

    Args:
        default: The default value (or ``default_factory`` for mutable ones).
        help: One line for ``--help`` and the generated docs.
        metavar: The value's name in ``--help``.
        aliases: Extra flags writing the same field, as ``(flag, argparse keywords)``, e.g.
            ``("--one-shot", {"action": "store_false"})``; kept for the flags users know.
        cli: False for Python-only fields (neither a flag nor a recipe key).
    """
    metadata = {"help": help, "metavar": metavar, "aliases": tuple(aliases), "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One config field as the CLI and recipes see it."""

    name: str
    kind: Literal["bool", "int", "float", "str", "choice", "names", "mapping"]
    optional: bool
    choices: tuple[str, ...]
    help: str
    metavar: str | None
    aliases: tuple[tuple[str, dict[str, Any]], ...]
    cli: bool
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _classify(annotation: Any) -> tuple[str, bool, tuple[str, ...]]:
    """``(kind, optional, choices)`` of a resolved type annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        kind, _, choices = _classify(rest[0] if len(rest) == 1 else typing.Union[tuple(rest)])  # noqa: UP007
        return kind, True, choices
    if origin is Literal:
        return "choice", False, tuple(str(a) for a in args)
    if annotation is bool:
        return "bool", False, ()
    if annotation in (int, float, str):
        return annotation.__name__, False, ()
    if origin is tuple:
        return "names", False, ()
    if origin in (Mapping, dict) or annotation in (Mapping, dict):
        return "mapping", False, ()
    raise TypeError(f"unsupported config annotation {annotation!r}")


def field_specs(config_cls: type) -> list[FieldSpec]:
    """The fields of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(config_cls)
    specs = []
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        cli = bool(meta.get("cli", True))
        try:
            kind, optional, choices = _classify(hints[field.name])
        except TypeError:
            if cli:
                raise
            kind, optional, choices = "mapping", True, ()
        default = (
            field.default
            if field.default is not _MISSING
            else (field.default_factory() if field.default_factory is not _MISSING else None)
        )
        specs.append(
            FieldSpec(
                name=field.name,
                kind=kind,  # type: ignore[arg-type]
                optional=optional,
                choices=choices,
                help=str(meta.get("help", "")),
                metavar=meta.get("metavar"),
                aliases=tuple(meta.get("aliases", ())),
                cli=cli,
                default=default,
            )
        )
    return specs


def _mapping_item(spec: FieldSpec, item: str) -> tuple[str, float]:
    name, sep, value = item.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not name or not math.isfinite(number):
        form = spec.metavar or "NAME=NUMBER"
        raise UsageError(f"{spec.flag} {item!r}: expected {form}, e.g. conv1=0.3")
    return name, number


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per CLI field of ``config_cls`` (plus its aliases), defaults from the class."""
    for spec in field_specs(config_cls):
        if not spec.cli:
            continue
        kwargs: dict[str, Any] = {"dest": spec.name, "help": spec.help}
        if spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "choice":
            kwargs["choices"] = spec.choices
        elif spec.kind in ("names", "mapping"):
            kwargs["nargs"] = "+"
            kwargs["action"] = "extend"  # repeatable: --exclude a --exclude b
            kwargs["metavar"] = spec.metavar or ("NODE" if spec.kind == "names" else "NODE=V")
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[spec.kind]
            kwargs["metavar"] = spec.metavar or spec.name.upper().split("_")[-1]
        kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(spec.flag, **kwargs)
        for flag, extra in spec.aliases:
            parser.add_argument(flag, dest=spec.name, default=argparse.SUPPRESS, **extra)


def _convert(spec: FieldSpec, value: Any, where: str) -> Any:
    """``value`` (from argparse or a recipe) as the field's type, or a UsageError naming it."""
    if value is None:
        if spec.optional:
            return None
        raise UsageError(f"{where}: a value is required")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if spec.kind in ("int", "float"):
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or (spec.kind == "int" and not float(value).is_integer()):
            raise UsageError(f"{where}: expected {spec.kind}, got {value!r}")
        return int(value) if spec.kind == "int" else float(value)
    if spec.kind in ("str", "choice"):
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise UsageError(f"{where}: {value!r} is not one of {', '.join(spec.choices)}")
        return value
    if spec.kind == "names":
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise UsageError(f"{where}: expected a list of names, got {value!r}")
        return tuple(str(v) for v in value)
    # mapping: a dict (recipe, API) or NAME=V strings (CLI)
    if isinstance(value, Mapping):
        items = [(str(k), _convert_number(v, f"{where}[{k!r}]")) for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = [_mapping_item(spec, str(v)) for v in value]
    else:
        raise UsageError(f"{where}: expected a mapping NAME: NUMBER, got {value!r}")
    return dict(sorted(items))


def _convert_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    return float(value)


def config_from_namespace(config_cls: type, args: argparse.Namespace) -> Any:
    """The config the parsed flags describe (fields not given keep the class defaults)."""
    values = {}
    for spec in field_specs(config_cls):
        if spec.cli and hasattr(args, spec.name):
            values[spec.name] = _convert(spec, getattr(args, spec.name), spec.flag)
    return config_cls(**values)


def config_from_mapping(config_cls: type, options: Mapping[str, Any], where: str) -> Any:
    """The config a recipe step's options describe; an unknown key or bad value is named."""
    specs = {spec.name: spec for spec in field_specs(config_cls) if spec.cli}
    values = {}
    for key, value in options.items():
        if key not in specs:
            raise UsageError(f"{where}: unknown option {key!r}; options: {', '.join(specs)}")
        values[key] = _convert(specs[key], value, f"{where} option {key!r}")
    return config_cls(**values)
