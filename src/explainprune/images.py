"""Reading an image file the way users' own loaders read it: one helper for every image-reading path.

``open_image`` does what ``transformers.image_utils.load_image`` does (``PIL.ImageOps.exif_transpose``,
then RGB), so a phone photo is seen upright, as the model's own pipeline sees it, plus two cases where
that conversion is silently wrong:

  high bit depth   a 16-bit grayscale PNG / TIFF (PIL mode ``I;16``, ``I``) is scaled to 8 bits (value / 257)
                   instead of clipped (``convert("RGB")`` makes it all white; a 32-bit ``I`` image whose values
                   stay within 0-255 is kept as is); a float image (``F``) in [0, 1]
                   is scaled by 255, otherwise clipped to [0, 255]
  animation        an animated GIF, PNG (APNG) or WebP is refused (``InputError``: pass it as a video); a
                   multi-picture JPEG (MPO, from cameras) or a multi-page TIFF is read at its first picture,
                   as PIL and transformers read it

``check_image`` reads only the header (size, EXIF orientation, frame count): it refuses an animated file
and an image whose aspect ratio Qwen's processors refuse (> ``MAX_ASPECT``), before any model work.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from explainprune.errors import InputError

MAX_ASPECT = 200  # Qwen2-VL / Qwen3-VL's smart_resize raises for max(h, w) / min(h, w) > 200
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _name(source: Any, name: str | None) -> str:
    if name:
        return name
    return str(source) if isinstance(source, (str, Path)) else "the image"


def _open(source: Any) -> Any:
    """A lazily opened PIL image (header read, pixels not decoded) of a path, bytes, file object or image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


def _check_header(im: Any, what: str) -> tuple[int, int]:
    """(width, height) as shown (EXIF orientation applied), after refusing animation and extreme shapes."""
    if getattr(im, "is_animated", False) and (im.format or "").upper() in ANIMATED_FORMATS:
        raise InputError(f"{what} is an animated {im.format} ({getattr(im, 'n_frames', '?')} frames), not one "
                         "image", hint="pass it as a video (\"video\": in a manifest, --video in show), or "
                         "save the frame you mean as a PNG")
    w, h = im.size
    orientation = None
    if "exif" in im.info or (im.format or "").upper() in ("JPEG", "MPO", "TIFF", "WEBP"):
        try:  # (a PNG's getexif decodes the whole image to look past IDAT: only when a header chunk has it)
            orientation = im.getexif().get(0x0112)
        except Exception:  # a damaged EXIF block: PIL's exif_transpose ignores it too
            orientation = None
    if orientation in _ROTATED:
        w, h = h, w
    if min(w, h) < 1:
        raise InputError(f"{what} has no pixels ({w}x{h})", hint="fix or replace the file")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"{what} is {w}x{h} pixels: aspect ratio {max(w, h) / min(w, h):.0f}, above the "
                         f"{MAX_ASPECT} the image processors accept", hint="crop or pad it, or remove the sample")
    return w, h


def _open_checked(source: Any, what: str) -> Any:
    try:
        return _open(source)
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError (an OSError) and others
        detail = str(err) if isinstance(source, (str, Path)) else str(err).split(" <_io.")[0]
        raise InputError(f"cannot read {what} as an image ({type(err).__name__}: {detail})",
                         hint="fix or replace the file") from None


def check_image(source: Any, name: str | None = None) -> tuple[int, int]:
    """(width, height) of the upright image ``source`` (a path, bytes or a PIL image) from its header alone;
    InputError naming ``name`` (default the path) for an undecodable header, an animated file or an aspect
    ratio above ``MAX_ASPECT``."""
    what = _name(source, name)
    im = _open_checked(source, what)
    try:
        return _check_header(im, what)
    finally:
        if im is not source:
            im.close()


def to_rgb(im: Any) -> Any:
    """An RGB PIL image of ``im`` with high-bit-depth modes scaled to 8 bits (see the module docstring)."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = arr / 257.0 if im.mode != "I" or (arr.size and arr.max() > 255) else arr
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        im = Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def open_image(source: Any, name: str | None = None) -> Any:
    """The RGB PIL image of ``source`` (a path, bytes, a file object or a PIL image), read as transformers'
    ``load_image`` reads it: EXIF orientation applied, then RGB; 16-bit and float images scaled to 8 bits;
    an animated GIF / APNG / WebP refused (InputError naming ``name``, default the path)."""
    from PIL import ImageOps

    what = _name(source, name)
    im = _open_checked(source, what)
    try:
        _check_header(im, what)
        upright = ImageOps.exif_transpose(im)
        out = to_rgb(upright if upright is not None else im)
        out.load()
        return out
    finally:
        if im is not source:
            im.close()
