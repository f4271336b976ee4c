"""The built-in digits benchmark: grids of real handwritten digits (sklearn ``load_digits``) with questions
whose answer lives in a known region of the visual-token grid.

Layout. An image is a ``grid`` x ``grid`` board of ``cell``-pixel cells (``cell`` a multiple of 28, so
each cell covers (cell/28)^2 merged Qwen tokens). Each cell holds a digit or is blank. Coordinate cues
are drawn into every cell's background: the red level encodes the row, the blue level the column, the
green level the video frame (0 for still images). Content-addressed questions mark a few cells with a
coloured border (red, green, blue). Light Gaussian noise is added.

Question kinds (rows, columns and frames are 1-based in the text):
  rowcol  "what digit is in row R , column C ?"                 region: that cell
  colour  "what digit is in the red cell ?"                     region: the marked cell
  count   "how many D are there ?"  (D is present)              region: every cell holding D
  video   "in frame F , what digit is in row R , column C ?"    region: that cell in frame F

Regions are lists of (frame, row, col) merged-token cells, i.e. indices into the (frames, rows, cols)
token grid whose row-major order is the Qwen visual-token order. A video holds ``frames`` content frames,
each shown for two raw frames (Qwen merges pairs of frames), so content frame f is temporal token f.
Train and test draw from disjoint source images (a fixed seeded 80/20 split of the 1,797 digits).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TOKEN_PX = 28  # merged Qwen2-VL token: patch 14 x merge 2
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
KINDS = ("rowcol", "colour", "count", "video")
DEFAULT_KINDS = ("rowcol", "colour", "video")  # "count" is available, but the demo model fails it (docs/digits.md)
SPLIT_SEED, TEST_FRACTION = 0, 0.2
WORDS = [
    "user", "assistant", "system", "what", "digit", "is", "in", "row", "column", "frame", "the", "how",
    "many", "are", "there", "cell", "red", "green", "blue", "yes", "no", "a", "an", "of", "describe",
    "image", "video", "color", "?", ",", ".", "none", "blank", *[str(i) for i in range(20)],
]


MAX_INDEX = 16  # rows, columns and frames with a distinct cue (indices 0..15)


def cue_level(index: int) -> float:
    """Background level (0..1) of one channel for row / column / frame ``index`` (0-based, 0..15).

    Indices 0-7 use the original levels 0.08 + 0.09 i (0.08 .. 0.71); indices 8-15 fall half-way between
    them (0.125 .. 0.755), so boards of up to 8 x 8 cells and 8 frames render exactly as before.
    """
    index = int(index)
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"cue index {index} out of range: the cues encode 0..{MAX_INDEX - 1}")
    return 0.08 + 0.09 * index if index < 8 else 0.125 + 0.09 * (index - 8)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Source-image indices of ``split`` ("train" or "test"); the two are disjoint and fixed."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; accepted: 'train', 'test'")
    n = len(_digits()[1])
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return np.sort(perm[:n_test] if split == "test" else perm[n_test:])


def digit_glyph(index: int, cell: int, rng: np.random.Generator, scale: float = 0.8,
                shift: float = 0.06) -> np.ndarray:
    """Source digit ``index`` enlarged to a [cell, cell] float alpha map (0..1), lightly jittered."""
    img = _digits()[0][index]
    size = max(8, int(round(cell * scale)))
    glyph = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR))
    out = np.zeros((cell, cell), np.float32)
    room = cell - size
    max_shift = int(round(shift * cell))
    y = int(np.clip(room // 2 + rng.integers(-max_shift, max_shift + 1), 0, room))
    x = int(np.clip(room // 2 + rng.integers(-max_shift, max_shift + 1), 0, room))
    out[y:y + size, x:x + size] = np.clip(glyph, 0, 1)
    return out


def compose(glyphs: Sequence[Sequence[np.ndarray | None]], cell: int, frame: int = 0,
            marks: dict[str, tuple[int, int]] | None = None, noise: float = 0.03,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a board: ``glyphs[r][c]`` alpha maps (None = blank) over the coordinate-cue background.

    Returns a float32 [H, W, 3] array in 0..1.
    """
    rows, cols = len(glyphs), len(glyphs[0])
    img = np.zeros((rows * cell, cols * cell, 3), np.float32)
    border = max(2, cell // 14)
    for r in range(rows):
        for c in range(cols):
            tile = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            tile[:] = (cue_level(r), cue_level(frame), cue_level(c))
            g = glyphs[r][c]
            if g is not None:
                tile[:] = tile * (1 - g[..., None]) + g[..., None]
    for name, (r, c) in (marks or {}).items():
        tile = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        colour = np.asarray(COLOURS[name], np.float32)
        tile[:border], tile[-border:], tile[:, :border], tile[:, -border:] = colour, colour, colour, colour
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        img += rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def to_pil(img: np.ndarray) -> Image.Image:
    """Float [H, W, 3] in 0..1 -> RGB PIL image."""
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def cell_tokens(frame: int, row: int, col: int, cell: int) -> list[tuple[int, int, int]]:
    """The merged-token cells (frame, row, col) covered by board cell (row, col) of ``frame``."""
    k = cell // TOKEN_PX
    return [(frame, row * k + i, col * k + j) for i in range(k) for j in range(k)]


@dataclass
class DigitsSample:
    """One question. ``video`` holds raw frames (each content frame twice); ``image`` is None then.

    ``digits[f][r][c]`` is the digit in a cell (-1 blank); ``region`` the (frame, row, col) token cells
    holding the answer; ``grid_tokens`` the (frames, rows, cols) shape of the visual-token grid.
    """

    id: str
    kind: str
    question: str
    answer: str
    region: list[tuple[int, int, int]]
    grid_tokens: tuple[int, int, int]
    digits: list[list[list[int]]]
    image: Image.Image | None = None
    video: list[Image.Image] | None = None
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)

    def region_mask(self) -> np.ndarray:
        """Boolean [frames, rows, cols] mask of the region (flatten row-major = visual-token order)."""
        mask = np.zeros(self.grid_tokens, bool)
        for f, r, c in self.region:
            mask[f, r, c] = True
        return mask

    def media(self) -> dict[str, Any]:
        """Keyword arguments for ``VLM.prepare``."""
        return {"images": self.image} if self.image is not None else {"video": self.video}


class DigitsTask:
    """Deterministic question set: ``sample(i)`` depends only on (split, seed, i, options).

    Kinds cycle with ``i`` (``kinds[i % len(kinds)]``). ``blank`` is the probability of a blank cell.
    """

    def __init__(self, split: str = "test", seed: int = 0, n: int = 400, grid: int = 4, cell: int = 56,
                 frames: int = 4, kinds: Sequence[str] = DEFAULT_KINDS, blank: float = 0.25,
                 noise: float = 0.03):
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; available: {', '.join(KINDS)}")
        if cell % TOKEN_PX or cell < TOKEN_PX:
            raise ValueError(f"cell must be a positive multiple of {TOKEN_PX} pixels, got {cell}")
        if not 1 <= grid <= MAX_INDEX or not 1 <= frames <= MAX_INDEX:
            raise ValueError(f"grid and frames must be 1..{MAX_INDEX} (the coordinate cues encode "
                             f"{MAX_INDEX} indices), got grid={grid}, frames={frames}")
        self.split, self.seed, self.n, self.grid, self.cell = split, seed, n, grid, cell
        self.frames, self.kinds, self.blank, self.noise = frames, tuple(kinds), blank, noise
        self.pool = split_indices(split)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> DigitsSample:
        return self.sample(i)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(i), 0 if self.split == "train" else 1])

    def _board(self, rng: np.random.Generator, force: Sequence[tuple[int, int]] = ()) -> list[list[int]]:
        """Source-digit indices per cell (-1 blank); cells in ``force`` are never blank."""
        g = self.grid
        idx = rng.choice(self.pool, size=(g, g))
        blank = rng.random((g, g)) < self.blank
        for r, c in force:
            blank[r, c] = False
        if blank.all():
            blank[rng.integers(g), rng.integers(g)] = False
        return np.where(blank, -1, idx).tolist()

    def _draw(self, board: list[list[int]], rng: np.random.Generator, frame: int = 0,
              marks: dict[str, tuple[int, int]] | None = None) -> Image.Image:
        glyphs = [[None if s < 0 else digit_glyph(s, self.cell, rng) for s in row] for row in board]
        return to_pil(compose(glyphs, self.cell, frame, marks, self.noise, rng))

    def _labels(self, board: list[list[int]]) -> list[list[int]]:
        y = _digits()[1]
        return [[-1 if s < 0 else int(y[s]) for s in row] for row in board]

    def sample(self, i: int) -> DigitsSample:
        """Question ``i`` (0 <= i < len(self), though any non-negative i works)."""
        kind = self.kinds[i % len(self.kinds)]
        rng = self._rng(i)
        sid = f"{self.split}-{self.seed}-{i:06d}"
        k = self.cell // TOKEN_PX
        shape = (1, self.grid * k, self.grid * k)
        if kind == "video":
            return self._video(sid, rng, shape)
        marks: dict[str, tuple[int, int]] = {}
        if kind == "colour":
            n_marks = int(rng.integers(1, 4))
            cells = rng.choice(self.grid * self.grid, size=n_marks, replace=False)
            names = rng.permutation(list(COLOURS))[:n_marks]
            marks = {str(nm): (int(c) // self.grid, int(c) % self.grid) for nm, c in zip(names, cells)}
        board = self._board(rng, force=list(marks.values()))
        labels = self._labels(board)
        image = self._draw(board, rng, 0, marks)
        if kind == "rowcol":
            r, c = _pick_filled(labels, rng)
            q, a = f"what digit is in row {r + 1} , column {c + 1} ?", labels[r][c]
            region = cell_tokens(0, r, c, self.cell)
        elif kind == "colour":
            name = str(rng.choice(sorted(marks)))
            r, c = marks[name]
            q, a, region = f"what digit is in the {name} cell ?", labels[r][c], cell_tokens(0, r, c, self.cell)
        else:  # count
            present = sorted({d for row in labels for d in row if d >= 0})
            d = int(rng.choice(present))
            cells = [(r, c) for r in range(self.grid) for c in range(self.grid) if labels[r][c] == d]
            q, a = f"how many {d} are there ?", len(cells)
            region = [t for r, c in cells for t in cell_tokens(0, r, c, self.cell)]
        return DigitsSample(sid, kind, q, str(a), region, shape, [labels], image=image, marks=marks)

    def _video(self, sid: str, rng: np.random.Generator, shape: tuple[int, int, int]) -> DigitsSample:
        boards = [self._board(rng) for _ in range(self.frames)]
        labels = [self._labels(b) for b in boards]
        frames = [self._draw(b, rng, f) for f, b in enumerate(boards)]
        f = int(rng.integers(self.frames))
        r, c = _pick_filled(labels[f], rng)
        q = f"in frame {f + 1} , what digit is in row {r + 1} , column {c + 1} ?"
        raw = [im for im in frames for _ in range(2)]
        return DigitsSample(sid, "video", q, str(labels[f][r][c]), cell_tokens(f, r, c, self.cell),
                            (self.frames, shape[1], shape[2]), labels, video=raw)

    def export(self, directory: str | Path, n: int | None = None) -> Path:
        """Write media (PNG) and ``manifest.jsonl`` (question, answer, region, media paths); returns the path."""
        root = Path(directory)
        (root / "media").mkdir(parents=True, exist_ok=True)
        path = root / "manifest.jsonl"
        with path.open("w") as fh:
            for i in range(self.n if n is None else n):
                fh.write(json.dumps(_record(self.sample(i), root)) + "\n")
        return path


def _pick_filled(labels: list[list[int]], rng: np.random.Generator) -> tuple[int, int]:
    cells = [(r, c) for r, row in enumerate(labels) for c, d in enumerate(row) if d >= 0]
    return cells[int(rng.integers(len(cells)))]


def _record(s: DigitsSample, root: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": s.id, "kind": s.kind, "question": s.question, "answer": s.answer,
                           "region": [list(t) for t in s.region], "grid_tokens": list(s.grid_tokens),
                           "digits": s.digits, "marks": {k: list(v) for k, v in s.marks.items()}}
    if s.image is not None:
        rec["image"] = f"media/{s.id}.png"
        s.image.save(root / rec["image"])
    else:
        rec["video"] = []
        for j, frame in enumerate(s.video or []):
            rel = f"media/{s.id}_f{j:02d}.png"
            if j % 2 == 0:
                frame.save(root / rel)
            else:  # the repeated raw frame points at the same file
                rel = rec["video"][-1]
            rec["video"].append(rel)
    return rec


def load_manifest(path: str | Path) -> list[DigitsSample]:
    """Read an exported manifest (the directory or its ``manifest.jsonl``) back into samples."""
    path = Path(path)
    path = path / "manifest.jsonl" if path.is_dir() else path
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        image = Image.open(path.parent / rec["image"]).convert("RGB") if "image" in rec else None
        video = [Image.open(path.parent / p).convert("RGB") for p in rec["video"]] if "video" in rec else None
        out.append(DigitsSample(rec["id"], rec["kind"], rec["question"], rec["answer"],
                                [tuple(t) for t in rec["region"]], tuple(rec["grid_tokens"]), rec["digits"],
                                image=image, video=video, marks={k: tuple(v) for k, v in rec["marks"].items()}))
    return out


def accuracy(vlm: Any, task: DigitsTask, n: int | None = None, max_new_tokens: int = 4) -> dict[str, Any]:
    """Exact-match accuracy of ``vlm`` (an explainprune VLM) per kind over the first ``n`` samples."""
    hits: dict[str, list[bool]] = {}
    for i in range(task.n if n is None else n):
        s = task.sample(i)
        out = vlm.generate(vlm.prepare(question=s.question, **s.media()), max_new_tokens=max_new_tokens)
        hits.setdefault(s.kind, []).append(out.text.strip() == s.answer)
    per_kind = {k: float(np.mean(v)) for k, v in hits.items()}
    return {"per_kind": per_kind, "n": {k: len(v) for k, v in hits.items()},
            "mean": float(np.mean([x for v in hits.values() for x in v]))}


def main(argv: list[str] | None = None) -> None:
    """``python -m explainprune.tasks.digits {eval,export}``: accuracy of a checkpoint, or a manifest."""
    import argparse

    p = argparse.ArgumentParser(description="digits benchmark: evaluate a checkpoint or export a manifest",
                                allow_abbrev=False)
    p.add_argument("command", choices=["eval", "export"])
    p.add_argument("--model", default="src/explainprune/assets/demo", help="checkpoint directory (eval)")
    p.add_argument("--dir", default="runs/digits_manifest", help="output directory (export)")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS))
    a = p.parse_args(argv)
    task = DigitsTask(a.split, seed=a.seed, n=a.n, grid=a.grid, frames=a.frames, kinds=a.kinds)
    if a.command == "export":
        print(task.export(a.dir))
        return
    from explainprune.models.qwen2_vl import Qwen2VL

    print(json.dumps(accuracy(Qwen2VL.from_pretrained(a.model), task), indent=1))


if __name__ == "__main__":
    main()
