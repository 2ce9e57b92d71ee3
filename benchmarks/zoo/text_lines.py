"""Short text lines cut from ``_common.sentences`` and rendered with Pillow's bundled font.

Used by OCR zoo entries. The font is Pillow's own (``ImageFont.load_default(size=...)``,
Pillow >= 10.1 with FreeType), so no system font is needed. Each line is black text on a white
margin; the font size cycles through a few values so the rendered widths and strokes vary.
"""

from __future__ import annotations

from typing import Literal

from _common import sentences
from PIL import Image, ImageDraw, ImageFont

__all__ = ["chunks", "lines", "render"]

FONT_SIZES = (22, 28, 34, 40)
MARGIN = 6


def chunks(texts: list[str], words: int = 3) -> list[str]:
    """Cut each text into consecutive chunks of ``words`` words (the tail keeps >= 2 words)."""
    found: list[str] = []
    for text in texts:
        parts = text.split()
        for start in range(0, len(parts), words):
            piece = parts[start : start + words]
            if len(piece) >= 2:
                found.append(" ".join(piece))
    return found


def lines(split: Literal["calib", "eval"], count: int, words: int = 3) -> list[str]:
    """The first ``count`` chunks of the split's sentences (disjoint modules per split)."""
    found = chunks(sentences(split), words)
    if len(found) < count:
        raise ValueError(f"{split}: only {len(found)} text chunks, {count} asked")
    return found[:count]


def render(text: str, size: int) -> Image.Image:
    """``text`` in Pillow's bundled font at ``size`` px, black on white, tight with a margin."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow >= 10.1 with FreeType is needed for a sized default font")
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("L", (right - left + 2 * MARGIN, bottom - top + 2 * MARGIN), 255)
    ImageDraw.Draw(image).text((MARGIN - left, MARGIN - top), text, fill=0, font=font)
    return image
