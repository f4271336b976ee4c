"""Image files that users' own loaders read differently from a plain ``Image.open(...).convert("RGB")``
(issue 21, item 6), and damaged ones; shared by the tests of every image-reading path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def gray16(path: Path, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A 16-bit grayscale PNG (PIL mode I;16): a left-to-right ramp over 0..65535. Returns the 8-bit values
    it stands for (value / 257), [H, W]."""
    w, h = size
    ramp = np.tile(np.linspace(0, 65535, w), (h, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    return np.rint(ramp / 257.0).astype(np.uint8)


def rotated_jpeg(path: Path, size: tuple[int, int] = (60, 40)) -> Image.Image:
    """A JPEG stored ``size`` (w, h) with EXIF orientation 6 (shown rotated 90 degrees clockwise, as phones
    write portrait photos): the upright image is h x w. Returns the stored image (before EXIF)."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[: size[1] // 2, :, 0] = 255  # top half red, bottom half blue
    arr[size[1] // 2:, :, 2] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    return im


def animated_gif(path: Path, n: int = 3, size: tuple[int, int] = (32, 32)) -> None:
    """An animated GIF of ``n`` frames of different colours."""
    frames = [Image.new("RGB", size, (60 * k, 255 - 60 * k, 0)) for k in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_bytes(size: tuple[int, int] = (16, 16), colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def truncated_png() -> bytes:
    """A PNG cut in half: its header reads (size known), decoding it fails (``image file is truncated``)."""
    data = png_bytes((64, 64))
    return data[: len(data) // 2]


NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\nnot an image"  # a PNG signature, then nothing PIL can identify
