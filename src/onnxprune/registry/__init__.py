"""The transform registry: typed configs, one file driver, generated CLI and recipe steps.

See ``ARCHITECTURE.md`` for how a capability plugs in.
"""

from onnxprune.registry.options import (
    FieldSpec,
    config_from_mapping,
    config_from_namespace,
    field_specs,
    option,
)
from onnxprune.registry.transform import Details, Transform, get, names, register, transforms

__all__ = [
    "Details",
    "FieldSpec",
    "Transform",
    "config_from_mapping",
    "config_from_namespace",
    "field_specs",
    "get",
    "names",
    "option",
    "register",
    "transforms",
]
