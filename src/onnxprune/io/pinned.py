"""External tensors read through the file that was validated, never through a path again.

:func:`onnxprune.io.load` validates every external-data reference, opens each data file
once without following symbolic links (:class:`DataFile`) and replaces the IR's external
tensors by :class:`PinnedTensor`, which memory-maps that descriptor. Nothing afterwards
resolves a ``location`` string, so neither the current folder nor a file swapped in after
validation can change the weights.

Two things would otherwise lose that binding:

* a proto round trip (``serialize_model`` then ``deserialize_model``) gives plain external
  tensors with no base folder, read relative to the current folder: copy models with
  :func:`copy_model` (or re-bind with :func:`rebind_external`);
* a proto handed to onnxruntime as bytes resolves its external data against the current
  folder: serialize with :func:`inline_proto` (tensor data inlined).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import weakref
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "DataFile",
    "PinnedTensor",
    "UnboundExternalDataError",
    "bind_external",
    "copy_model",
    "external_initializers",
    "in_memory",
    "inline_proto",
    "inlined",
    "rebind_external",
    "refuse_external",
]

_CHUNK = 64 << 20
_SUB_BYTE = {2, 4, 6}


class UnboundExternalDataError(ValueError):
    """An external tensor is not bound to a validated file (an internal error)."""


class DataFile:
    """An open, validated external data file; every read goes through its descriptor."""

    def __init__(self, fd: int, location: str) -> None:
        self.fd = fd
        self.location = location
        info = os.fstat(fd)
        self.size = info.st_size
        self.identity = (info.st_dev, info.st_ino)
        self._sha1: str | None = None
        self._finalizer = weakref.finalize(self, os.close, fd)

    def map(self) -> mmap.mmap:
        """A new read-only memory map of the whole file (the caller closes it)."""
        return mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, through the descriptor (short files raise OSError)."""
        if length <= 0:
            return b""
        with self.map() as view:
            data = view[offset : offset + length]
        if len(data) != length:
            raise OSError(f"external data file {self.location!r} ended early")
        return data

    def sha1(self) -> str:
        """Hex SHA-1 digest of the whole file (computed once)."""
        if self._sha1 is None:
            digest = hashlib.sha1(usedforsecurity=False)
            for start in range(0, self.size, _CHUNK):
                digest.update(self.read(start, min(_CHUNK, self.size - start)))
            self._sha1 = digest.hexdigest()
        return self._sha1

    def close(self) -> None:
        """Close the descriptor now (also done when the object is collected)."""
        self._finalizer()


class PinnedTensor(ir.ExternalTensor):  # pylint: disable=too-many-ancestors
    """An external tensor read through an open :class:`DataFile` instead of its path.

    ``location`` and ``base_dir`` keep describing where the data came from (reports,
    overwrite protection); the bytes always come from the validated descriptor.
    """

    __slots__ = ("_file",)

    def __init__(self, tensor: ir.ExternalTensor, file: DataFile, base_dir: str) -> None:
        super().__init__(
            tensor.location,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=str(tensor.name),
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
            base_dir=base_dir,
        )
        self._file = file

    def _check_path_containment(self) -> None:
        """Nothing to check: the file was validated and is read through its descriptor."""

    def _load(self) -> None:
        self._check_validity()
        shape = self.shape.numpy()
        if self.size == 0:
            self._array = np.empty(shape, dtype=self.dtype.numpy())
            return
        self.raw = self._file.map()
        offset = self.offset or 0
        if self.dtype.bitwidth in _SUB_BYTE:
            proto = onnx.TensorProto(dims=shape, data_type=int(self.dtype))
            proto.raw_data = self.raw[offset : offset + self.nbytes]
            self._array = ir.serde.deserialize_tensor(proto).numpy()
            return
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        array = np.frombuffer(self.raw, dtype=dtype, offset=offset, count=self.size)
        self._array = array.reshape(shape)

    def tofile(self, file) -> None:
        """Write the tensor's bytes to ``file``, read in chunks through the descriptor."""
        self._check_validity()
        start = self.offset or 0
        end = start + (self.length if self.length is not None else self.nbytes)
        for position in range(start, end, _CHUNK):
            file.write(self._file.read(position, min(_CHUNK, end - position)))


def _function_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    yield from _function_nodes(model)


def external_initializers(model: ir.Model) -> Iterator[ir.Value]:
    """Initializers (main graph and subgraphs) whose data lives in an external file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value


def _external_tensor(value: ir.Value) -> ir.ExternalTensor:
    """The tensor of a value that :func:`external_initializers` yielded."""
    tensor = value.const_value
    assert isinstance(tensor, ir.ExternalTensor)
    return tensor


def _copy_to_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    array = np.array(tensor.numpy(), copy=True)
    return ir.Tensor(array, dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)


def _inline_attribute_tensors(node: ir.Node, pin: dict[str, DataFile], base_dir: str) -> None:
    """Constant values and other tensor attributes stored externally: read them now.

    They are small in practice, and a tensor kept in memory is saved inline wherever the
    model is written instead of carrying the input's ``location`` along.
    """
    for name, attr in list(node.attributes.items()):
        if attr.is_ref() or attr.value is None:
            continue
        if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
            pinned = PinnedTensor(attr.value, pin[str(attr.value.location)], base_dir)
            node.attributes[name] = ir.AttrTensor(name, _copy_to_memory(pinned))
        elif attr.type == ir.AttributeType.TENSORS and any(
            isinstance(t, ir.ExternalTensor) for t in attr.value
        ):
            tensors = [
                _copy_to_memory(PinnedTensor(t, pin[str(t.location)], base_dir))
                if isinstance(t, ir.ExternalTensor)
                else t
                for t in attr.value
            ]
            node.attributes[name] = ir.AttrTensors(name, tensors)


def bind_external(model: ir.Model, files: dict[str, DataFile], base_dir: str) -> None:
    """Bind every external tensor of a freshly deserialized model to its validated file.

    Args:
        model: The model; its external initializers become :class:`PinnedTensor`, external
            tensor attributes (``Constant`` values, also inside model-local functions) are
            read into memory.
        files: The open data file of each ``location`` string the model uses.
        base_dir: The model's folder (recorded, never used to read).
    """
    for value in external_initializers(model):
        tensor = value.const_value
        assert isinstance(tensor, ir.ExternalTensor)
        value.const_value = PinnedTensor(tensor, files[str(tensor.location)], base_dir)
    for node in _all_nodes(model):
        _inline_attribute_tensors(node, files, base_dir)


def _region(tensor: ir.ExternalTensor) -> tuple[str, int, int]:
    length = tensor.length if tensor.length is not None else tensor.nbytes
    return (os.path.normpath(os.fspath(tensor.location)), tensor.offset or 0, length)


def rebind_external(copy: ir.Model, original: ir.Model) -> ir.Model:
    """Give ``copy``'s unbound external initializers the bound tensors of ``original``.

    A tensor is matched by its file region (location, offset, length): the same region
    holds the same bytes. Returns ``copy``.
    """
    bound = {
        _region(_external_tensor(v)): v.const_value
        for v in external_initializers(original)
        if not _is_unbound(v.const_value)
    }
    for value in external_initializers(copy):
        tensor = _external_tensor(value)
        if _is_unbound(tensor):
            match = bound.get(_region(tensor))
            if match is not None:
                value.const_value = match
    return copy


def copy_model(model: ir.Model) -> ir.Model:
    """A copy of the graph (``ir.Model.clone``): new nodes and values, the same tensors.

    Tensors are immutable here (rewrites assign a new ``const_value``, never write into an
    array), so sharing them is safe and external tensors stay bound to the validated files.
    """
    return model.clone(deep_copy=True)


def _is_unbound(tensor: object) -> bool:
    return (
        isinstance(tensor, ir.ExternalTensor)
        and not isinstance(tensor, PinnedTensor)
        and not tensor.base_dir
    )


def in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """``tensor``, or for an external one an in-memory view of its (validated) data.

    Raises:
        UnboundExternalDataError: an external tensor without a base folder, which would be
            read relative to the current folder.
    """
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    if _is_unbound(tensor):
        raise UnboundExternalDataError(
            f"tensor {tensor.name!r}: external data {os.fspath(tensor.location)!r} is not bound "
            "to the model's folder (internal error: copy models with onnxprune.io.pinned"
            ".copy_model)"
        )
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


@contextlib.contextmanager
def inlined(model: ir.Model) -> Iterator[ir.Model]:
    """Temporarily replace external initializers by in-memory views (restored after)."""
    saved = [(value, _external_tensor(value)) for value in external_initializers(model)]
    try:
        for value, tensor in saved:
            value.const_value = in_memory(tensor)
        yield model
    finally:
        for value, tensor in saved:
            value.const_value = tensor


def inline_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with every tensor's data inline (nothing resolved by path).

    Raises:
        UnboundExternalDataError: a tensor outside the initializers (an attribute) is still
            external; :func:`onnxprune.io.load` reads those into memory.
    """
    with inlined(model):
        proto = ir.serde.serialize_model(model)
    refuse_external(proto)
    return proto


def refuse_external(proto: onnx.ModelProto) -> None:
    """Raise UnboundExternalDataError if any tensor of ``proto`` is stored externally.

    onnxruntime resolves the external data of a proto given as bytes against the current
    folder, so such a proto must never reach it.
    """
    from onnxprune.io.external import iter_tensor_protos

    for name, tensor in iter_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise UnboundExternalDataError(
                f"tensor {name!r}: in-memory model still references external data "
                "(internal error: serialize with onnxprune.io.pinned.inline_proto)"
            )
