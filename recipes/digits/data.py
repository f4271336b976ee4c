"""Fast batched board rendering for training the digits demo model (numpy, no PIL in the loop).

Boards are drawn exactly as ``explainprune.tasks.digits.compose`` draws them (same cue background,
marks and noise), from a bank of pre-augmented glyphs, and patchified exactly as Qwen2-VL's image
processor does (rescale, CLIP mean/std, two identical temporal patches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from explainprune.tasks.digits import COLOURS, TOKEN_PX, _digits, cue_level, split_indices

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MARKS = list(COLOURS)  # mark class = 1 + index (0 = unmarked)


def augment_glyph(img8: np.ndarray, cell: int, rng: np.random.Generator, strong: bool) -> np.ndarray:
    """One [cell, cell] alpha map of an 8x8 digit: task-like jitter, or strong augmentation."""
    if not strong:
        scale, aspect, angle, thick, contrast, shift = 0.8, 1.0, 0.0, 0, 1.0, 0.06
    else:
        scale, aspect = rng.uniform(0.6, 0.95), rng.uniform(0.85, 1.15)
        angle, thick = rng.uniform(-12, 12), int(rng.random() < 0.3) - int(rng.random() < 0.1)
        contrast, shift = rng.uniform(0.55, 1.0), 0.1
    h = max(8, int(round(cell * scale)))
    w = max(8, min(cell, int(round(h * aspect))))
    g = Image.fromarray(img8, mode="F").resize((w, h), Image.BILINEAR)
    if angle:
        g = g.rotate(angle, resample=Image.BILINEAR)
    g = np.clip(np.asarray(g), 0, 1)
    if thick > 0:
        g = _max3(g)
    elif thick < 0:
        g = np.clip(g * 1.3 - 0.3, 0, 1)
    out = np.zeros((cell, cell), np.float32)
    ms = int(round(shift * cell))
    y = int(np.clip((cell - h) // 2 + rng.integers(-ms, ms + 1), 0, cell - h))
    x = int(np.clip((cell - w) // 2 + rng.integers(-ms, ms + 1), 0, cell - w))
    out[y:y + h, x:x + w] = g * contrast
    return out


def _max3(g: np.ndarray) -> np.ndarray:
    p = np.pad(g, 1)
    return np.max([p[i:i + g.shape[0], j:j + g.shape[1]] for i in range(3) for j in range(3)], 0)


@dataclass
class Boards:
    """A batch of boards: glyph index per cell (-1 blank), digit per cell (-1 blank), frame, marks.

    ``marks[b, m]`` is the flat cell index marked with colour ``MARKS[m]`` or -1.
    """

    glyph: np.ndarray  # [B, G, G]
    digit: np.ndarray  # [B, G, G]
    frame: np.ndarray  # [B]
    marks: np.ndarray  # [B, 3]


class BoardMaker:
    """Renders batches of boards from a glyph bank (variant 0 of each source digit is task-like)."""

    def __init__(self, glyphs: np.ndarray, labels: np.ndarray, grid: int, cell: int, frames: int):
        self.glyphs, self.labels, self.grid, self.cell, self.frames = glyphs, labels, grid, cell, frames

    @classmethod
    def for_split(cls, split: str, grid: int, cell: int, frames: int, seed: int = 0,
                  variants: int = 8, strong: bool = True) -> BoardMaker:
        images, targets = _digits()
        rng = np.random.default_rng([seed, 7, 0 if split == "train" else 1])
        glyphs, labels = [], []
        for idx in split_indices(split):
            for v in range(variants if strong else 1):
                glyphs.append(augment_glyph(images[idx], cell, rng, strong and v > 0))
                labels.append(targets[idx])
        return cls(np.stack(glyphs), np.asarray(labels), grid, cell, frames)

    def resized(self, grid: int) -> BoardMaker:
        """The same glyph bank on boards of ``grid`` x ``grid`` cells."""
        return BoardMaker(self.glyphs, self.labels, grid, self.cell, self.frames)

    def boards(self, rng: np.random.Generator, n: int, frame: int | None = 0, marks: float = 0.5,
               blank: float = 0.25) -> Boards:
        """``n`` random boards; ``frame=None`` draws frames at random; ``marks`` = P(board has marks)."""
        g = self.grid
        glyph = rng.integers(0, len(self.glyphs), size=(n, g, g))
        is_blank = rng.random((n, g, g)) < blank
        mk = np.full((n, 3), -1)
        for b in np.nonzero(rng.random(n) < marks)[0]:
            k = int(rng.integers(1, 4))
            colours = rng.permutation(3)[:k]
            mk[b, colours] = rng.choice(g * g, size=k, replace=False)
            is_blank[b].flat[mk[b, colours]] = False
        for b in np.nonzero(is_blank.reshape(n, -1).all(1))[0]:
            is_blank[b, 0, 0] = False
        glyph = np.where(is_blank, -1, glyph)
        digit = np.where(is_blank, -1, self.labels[np.maximum(glyph, 0)])
        fr = rng.integers(0, self.frames, size=n) if frame is None else np.full(n, frame)
        return Boards(glyph, digit, fr, mk)

    def render(self, bd: Boards, rng: np.random.Generator, strong: bool = False) -> np.ndarray:
        """uint8-quantised float images [B, H, W, 3] in 0..1."""
        n, g, c = len(bd.frame), self.grid, self.cell
        alpha = np.where((bd.glyph >= 0)[..., None, None], self.glyphs[np.maximum(bd.glyph, 0)], 0.0)
        alpha = alpha.transpose(0, 1, 3, 2, 4).reshape(n, g * c, g * c)[..., None]
        levels = np.array([cue_level(i) for i in range(max(g, self.frames))], np.float32)
        bg = np.empty((n, g, g, 3), np.float32)
        bg[..., 0] = levels[:g][None, :, None]
        bg[..., 1] = levels[bd.frame][:, None, None]
        bg[..., 2] = levels[:g][None, None, :]
        bg = np.repeat(np.repeat(bg, c, 1), c, 2)
        img = bg * (1 - alpha) + alpha
        border = max(2, c // 14)
        for b, m in zip(*np.nonzero(bd.marks >= 0)):
            r, cc = divmod(int(bd.marks[b, m]), g)
            tile = img[b, r * c:(r + 1) * c, cc * c:(cc + 1) * c]
            colour = np.asarray(COLOURS[MARKS[m]], np.float32)
            tile[:border], tile[-border:], tile[:, :border], tile[:, -border:] = colour, colour, colour, colour
        sigma = rng.uniform(0.01, 0.06, size=(n, 1, 1, 1)).astype(np.float32) if strong else 0.03
        img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
        return np.round(np.clip(img, 0, 1) * 255) / 255

    @staticmethod
    def pixels(imgs: np.ndarray, patch: int = 14, merge: int = 2, temporal: int = 2) -> np.ndarray:
        """Qwen2-VL pixel_values [B * gh * gw, 3 * temporal * patch^2] for same-size images [B, H, W, 3]."""
        x = ((imgs - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)  # B C H W
        n, c, h, w = x.shape
        gh, gw = h // patch, w // patch
        x = np.broadcast_to(x[:, None], (n, temporal, c, h, w))
        x = x.reshape(n, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(n * gh * gw, c * temporal * patch * patch))

    def token_targets(self, bd: Boards) -> dict[str, np.ndarray]:
        """Per merged token (row-major) class targets: digit (10 = blank), row, col, frame, mark."""
        k = self.cell // TOKEN_PX
        n, g = len(bd.frame), self.grid
        cell_of = lambda a: np.repeat(np.repeat(a, k, 1), k, 2).reshape(n, -1)  # noqa: E731
        rows = np.broadcast_to(np.arange(g)[None, :, None], (n, g, g))
        cols = np.broadcast_to(np.arange(g)[None, None, :], (n, g, g))
        mark = np.zeros((n, g * g), np.int64)
        for b, m in zip(*np.nonzero(bd.marks >= 0)):
            mark[b, bd.marks[b, m]] = m + 1
        return {"digit": cell_of(np.where(bd.digit < 0, 10, bd.digit)).astype(np.int64),
                "row": cell_of(rows).astype(np.int64), "col": cell_of(cols).astype(np.int64),
                "frame": np.repeat(bd.frame[:, None], g * g * k * k, 1).astype(np.int64),
                "mark": cell_of(mark.reshape(n, g, g)).astype(np.int64)}
