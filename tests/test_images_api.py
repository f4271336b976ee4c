"""16-bit images handed straight to ``prepare`` (the Python API) and to the lmms-eval model are scaled as the
files are (they turned white with a plain ``convert("RGB")``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from explainprune.models.base import to_pil


def ramp16() -> Image.Image:
    im = Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1)))
    assert im.mode.startswith("I;16")
    return im


def test_prepare_input_16_bit_is_scaled():
    rgb = np.asarray(to_pil(ramp16()))
    assert rgb.shape == (8, 64, 3) and rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135


def test_lmms_visuals_16_bit_is_scaled(tmp_path):
    from explainprune.integrations.lmms_eval.engine import split_visuals

    ramp16().save(tmp_path / "r.png")
    images, _ = split_visuals([ramp16(), str(tmp_path / "r.png")], 8)
    for im in images:
        assert 120 < np.asarray(im).mean() < 135  # white (255) before
