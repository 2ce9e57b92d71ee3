"""The transform registry: each capability is a typed config plus an in-memory ``apply``.

A :class:`Transform` names a capability (``onnxprune <name>``), its frozen config dataclass
(:mod:`onnxprune.registry.options` turns the fields into flags and recipe keys) and how it
runs:

- ``apply(model, config, data) -> details``: rewrites an in-memory ``ir.Model`` in place and
  returns the capability's own typed report (``to_dict()``, ``summary()``). The generic file
  driver (:mod:`onnxprune.registry.driver`) does everything around it: load, validation,
  data split, measurement, atomic save, sizes/params/MACs.
- or ``run_file(model_path, output_path, config, calib=, eval_data=, dims=)``: a capability
  whose file-level flow is still its own (prune and quantize, which hold several models and
  benchmark candidates) plugs in here until it is moved onto the driver.

Adding a capability = a config dataclass, an apply function and one :func:`register` call in
:mod:`onnxprune.transforms`; the CLI subcommand, the recipe step and the public function come
from that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

__all__ = ["Details", "Transform", "get", "names", "register", "transforms"]


class Details(Protocol):
    """What a transform reports about its own work."""

    def to_dict(self) -> dict[str, Any]: ...

    def summary(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Transform:
    """One registered capability.

    Attributes:
        name: The command and recipe step name.
        help: One line for ``onnxprune --help``.
        description: The subcommand's ``--help`` text.
        config: The frozen config dataclass.
        apply: In-memory rewrite ``(model, config, data: DataSplit) -> Details``.
        run_file: File-level entry point of a capability not yet on the driver.
        fidelity: ``exact`` (outputs must equal the input's, checked before writing) or
            ``lossy`` (fidelity measured on held-out data and reported).
        data: Whether ``--calib`` is offered (``none``: never).
        validate: ``(model, config, has_calib) -> None``, raising UsageError on bad options.
        from_cli: Completes a config parsed from flags (e.g. a flag implying another field).
        command: ``generated`` (the subcommand comes from the config) or ``own`` (a
            hand-written module in :mod:`onnxprune.commands`, until it is moved over).
    """

    name: str
    help: str
    description: str
    config: type
    apply: Callable[..., Details] | None = None
    run_file: Callable[..., Any] | None = None
    fidelity: Literal["exact", "lossy"] = "lossy"
    data: Literal["none", "calib"] = "calib"
    validate: Callable[..., None] | None = None
    from_cli: Callable[[Any], Any] | None = None
    command: Literal["generated", "own"] = "generated"

    def __post_init__(self) -> None:
        if (self.apply is None) == (self.run_file is None):
            raise TypeError(f"transform {self.name!r}: give exactly one of apply and run_file")


_REGISTRY: dict[str, Transform] = {}


def register(transform: Transform) -> Transform:
    """Add ``transform`` (a name may be registered once)."""
    if transform.name in _REGISTRY:
        raise ValueError(f"transform {transform.name!r} is already registered")
    _REGISTRY[transform.name] = transform
    return transform


def _load_builtins() -> None:
    import onnxprune.transforms  # noqa: F401 - registers the built-in transforms


def get(name: str) -> Transform:
    """The transform registered as ``name`` (KeyError if none)."""
    _load_builtins()
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(_REGISTRY)


def transforms() -> Iterator[Transform]:
    _load_builtins()
    yield from _REGISTRY.values()
