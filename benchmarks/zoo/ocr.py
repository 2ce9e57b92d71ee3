"""ddddocr's text recognizers, as shipped in its PyPI wheel, on rendered English text lines.

Named ``ocr`` (not ``ddddocr``) so that it never shadows the real package.

The wheel ships three ONNX files (byte-identical in 1.5.6 and 1.6.1):

* ``common_old.onnx``: the default recognizer (``DdddOcr()``), already dynamically quantized by
  ``onnx.quantize 0.1.0`` (ConvInteger, MatMulInteger, DynamicQuantizeLSTM; opset 12 plus
  com.microsoft), charset ``CHARSET_OLD``;
* ``common.onnx``: the ``beta=True`` recognizer, plain fp32 from PyTorch 1.9 (Conv, LSTM, Gemm;
  opset 12), charset ``CHARSET_BETA``;
* ``common_det.onnx``: a YOLOX-style box detector (opset 11, 416x416 RGB); not a recognizer, so
  it has no entry here.

Recognizer contract, read from the package source: the image is resized (LANCZOS) to height 64
with its width scaled by the same factor, turned grey and scaled to [0, 1] (1.6.x; 1.5.x and
earlier then mapped it to [-1, 1], which reads these lines just as well); the input is
``input1`` of shape (1, 1, 64, W). The output (T, 1,
8210) holds per-step class scores, T = ceil(W / 8); the text is the CTC greedy decode: argmax per
step, repeats collapsed, class 0 (the blank, charset entry ``""``) dropped, the rest mapped
through the charset. The models declare their output as shape (1, seqlen), which is wrong:
onnxruntime warns on every run.

The models read captchas, so they never output a space: the sanity check compares the decoded
text with the line's text without its spaces.
"""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _common import (
    ZooEntry,
    extract_member,
    finished,
    mark_finished,
    pip_wheel,
    save_feeds,
)
from PIL import Image
from text_lines import FONT_SIZES, lines, render

WHEEL = "ddddocr==1.6.1"
HEIGHT = 64
CALIB_LINES = 64
EVAL_LINES = 128
WORDS_PER_LINE = 3
# (name, wheel member, charset variable in ddddocr/charsets.py, what it is)
MODELS = (
    ("default", "common_old.onnx", "CHARSET_OLD",
     "DdddOcr() default recognizer; shipped dynamically quantized (onnx.quantize 0.1.0: "
     "ConvInteger, MatMulInteger, DynamicQuantizeLSTM), opset 12 + com.microsoft"),
    ("beta", "common.onnx", "CHARSET_BETA",
     "DdddOcr(beta=True) recognizer; fp32 PyTorch 1.9 export (Conv, LSTM, Gemm), opset 12"),
)  # fmt: skip
KEY = f"{WHEEL} lines={CALIB_LINES}/{EVAL_LINES} words={WORDS_PER_LINE} sizes={FONT_SIZES}"


def session(path: Path) -> ort.InferenceSession:
    """A CPU session that does not log the models' (wrong) declared output shape on every run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def preprocess(image: Image.Image) -> np.ndarray:
    """ddddocr 1.6.1's recognizer input: height 64, width scaled alike, grey, in [0, 1]."""
    width = max(1, int(image.size[0] * (HEIGHT / image.size[1])))
    grey = image.resize((width, HEIGHT), Image.Resampling.LANCZOS).convert("L")
    pixels = np.asarray(grey, dtype=np.float32) / 255.0
    return pixels[None, None]


def ctc_greedy(scores: np.ndarray, charset: list[str]) -> str:
    """Decode (T, 1, C) scores: argmax per step, collapse repeats, drop the blank (class 0)."""
    best = scores.reshape(scores.shape[0], -1).argmax(axis=-1)
    keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    return "".join(charset[int(index)] for index in best[keep])


def read_charsets(wheel: Path) -> dict[str, list[str]]:
    """The charset lists defined in the wheel's ``ddddocr/charsets.py`` (parsed, not run)."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("ddddocr/charsets.py").decode("utf-8")
    found: dict[str, list[str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def char_accuracy(truth: str, read: str) -> float:
    """1 - (Levenshtein distance / len(truth)), floored at 0."""
    previous = list(range(len(read) + 1))
    for i, a in enumerate(truth, 1):
        current = [i]
        for j, b in enumerate(read, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return max(0.0, 1.0 - previous[-1] / max(1, len(truth)))


def text_feeds(texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per text line, the font size cycling through ``FONT_SIZES``."""
    return [
        {"input1": preprocess(render(text, FONT_SIZES[i % len(FONT_SIZES)]))}
        for i, text in enumerate(texts)
    ]


def sanity(model: Path, feeds: list[dict], texts: list[str], charset: list[str]) -> dict:
    """Character accuracy and exact-line rate of the shipped model against the rendered text.

    The truth is the line without its spaces (the models never output one).
    """
    sess = session(model)
    read = [ctc_greedy(sess.run(None, feed)[0], charset) for feed in feeds]
    texts = [text.replace(" ", "") for text in texts]
    scores = [char_accuracy(t, r) for t, r in zip(texts, read, strict=True)]
    return {
        "char_accuracy": round(float(np.mean(scores)), 4),
        "line_exact": round(float(np.mean([t == r for t, r in zip(texts, read, strict=True)])), 4),
        "examples": [[t, r] for t, r in zip(texts[:5], read[:5], strict=True)],
    }


def build_folder(folder: Path, cache: Path) -> dict:
    """Extract the models and charsets, render and save the feeds; return the sanity record."""
    wheel = pip_wheel(WHEEL, cache)
    charsets = read_charsets(wheel)
    texts = {"calib": lines("calib", CALIB_LINES, WORDS_PER_LINE),
             "eval": lines("eval", EVAL_LINES, WORDS_PER_LINE)}  # fmt: skip
    feeds = {split: text_feeds(found) for split, found in texts.items()}
    for split, found in feeds.items():
        save_feeds(folder / split, found)
    (folder / "texts.json").write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n")
    record = {}
    for name, member, charset_name, _ in MODELS:
        model = extract_member(wheel, f"ddddocr/{member}", folder / member)
        charset = charsets[charset_name]
        (folder / f"{charset_name.lower()}.json").write_text(json.dumps(charset) + "\n")
        record[name] = sanity(model, feeds["eval"], texts["eval"], charset)
    return record


def build(cache: Path) -> list[ZooEntry]:
    """The two ddddocr recognizers with rendered calibration / evaluation text lines."""
    folder = cache / "ddddocr"
    record = finished(folder, KEY)
    if record is None:
        folder.mkdir(parents=True, exist_ok=True)
        record = build_folder(folder, cache)
        mark_finished(folder, KEY, record)
    return [entry(name, member, charset, what, record[name])
            for name, member, charset, what in MODELS]  # fmt: skip


def entry(name: str, member: str, charset: str, what: str, checked: dict) -> ZooEntry:
    """The zoo entry of one recognizer."""
    return ZooEntry(
        name=f"ddddocr.{name}",
        model=f"ddddocr/{member}",
        calib="ddddocr/calib",
        eval="ddddocr/eval",
        metric="sequence",
        output="387",
        source=f"PyPI {WHEEL}: ddddocr/{member}",
        split=f"{CALIB_LINES} calib / {EVAL_LINES} eval text lines of {WORDS_PER_LINE} words "
        "from docstrings of disjoint stdlib modules (_common.sentences), rendered in "
        "Pillow's bundled font at sizes " + "/".join(map(str, FONT_SIZES)) + " px",
        notes=f"{what}. Third-party ONNX as shipped. Input input1 (1, 1, 64, W), W varies per "
        "line (feeds are a folder). The declared output shape (1, seqlen) is wrong: the real "
        "output is (T, 1, 8210) per-step scores, T = ceil(W/8).",
        extra={
            "charset": f"ddddocr/{charset.lower()}.json",
            "decode": "ctc_greedy",
            "blank": 0,
            "layout": "TNC",
            "preprocess": "LANCZOS resize to height 64 (width scaled), grey, x/255 (ddddocr 1.6.1)",
            "texts": "ddddocr/texts.json",
            "fp32_char_accuracy": checked["char_accuracy"],
            "fp32_line_exact": checked["line_exact"],
        },
    )
