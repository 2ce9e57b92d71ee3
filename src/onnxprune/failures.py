"""Turning failures into the CLI's one-line error messages.

* :func:`one_line` escapes control characters (a newline in a tensor name cannot forge a
  second line of output), used where errors and log records are printed;
* :data:`RUNTIME_ERRORS` and :func:`runtime_failure`: the last resort for an onnxruntime
  error that no up-front check caught (:mod:`onnxprune.io.validate` names most culprits
  first): its message without the C++ source positions, with the node it names.
"""

from __future__ import annotations

import logging
import re
import unicodedata

from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

__all__ = [
    "RUNTIME_ERRORS",
    "EscapingFormatter",
    "one_line",
    "runtime_failure",
    "runtime_reason",
]

#: onnxruntime's exception types (the ones a model or its feeds can cause).
RUNTIME_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_ort_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
    )
    if hasattr(_ort_state, name)
)

_MAX_CHARS = 500

#: Bidirectional-text controls that reorder what a terminal shows.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(char: str) -> str:
    if unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in _BIDI:
        return repr(char)[1:-1]
    return char


def one_line(text: str) -> str:
    """``text`` with control characters (newlines, escapes, bidi overrides) written as escapes."""
    return "".join(_escape(c) for c in text)


def _clean(message: str) -> str:
    text = " ".join(message.split())
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    text = re.sub(r"\S*\.(?:cc|h|cpp):\d+ (?:[\w:<>*&, ]+\([^)]*\) )?", "", text)
    match = re.search(
        r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' "
        r"Status Message: (.*)",
        text,
    )
    if match:
        op, name, detail = match.groups()
        text = f"node {name!r} ({op}) failed: {detail}"
    return text


def runtime_reason(exc: BaseException) -> str:
    """onnxruntime's message for ``exc`` on one line, without C++ source positions."""
    text = _clean(str(exc)) or type(exc).__name__
    if len(text) > _MAX_CHARS:
        text = text[: _MAX_CHARS - 3] + "..."
    return one_line(text)


def runtime_failure(exc: BaseException) -> str:
    """One line describing an onnxruntime error raised while loading or running a model."""
    return f"onnxruntime cannot run the model: {runtime_reason(exc)}"


class EscapingFormatter(logging.Formatter):
    """A log formatter whose records cannot span lines."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))
