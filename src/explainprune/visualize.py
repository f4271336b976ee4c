"""Relevance pictures like the paper's Figure 2: the relevance heatmap over each image / video frame and
the pruning it implies (pruned tokens whitened). matplotlib is imported only inside ``relevance_figure``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from explainprune.files import atomic_path
from explainprune.models.base import Prompt
from explainprune.pruning.base import select

TITLE_INCHES = 0.5


@dataclass(frozen=True)
class Picture:
    """A written figure: its path and pixel size."""

    path: Path
    width: int
    height: int


def _size(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def as_seen(picture: Any, processor: Any = None) -> Any:
    """The part of ``picture`` the model sees: the centre crop when the processor crops (CLIP/LLaVA-1.5)."""
    if picture is None or not getattr(processor, "do_center_crop", False) or not hasattr(picture, "crop"):
        return picture
    size, crop = processor.size, processor.crop_size
    w, h = picture.size
    short = _size(size, "shortest_edge")
    if short:
        sx = sy = short / min(w, h)
    elif _size(size, "height") and _size(size, "width"):
        sx, sy = _size(size, "width") / w, _size(size, "height") / h
    else:
        return picture
    keep_w, keep_h = min(w, _size(crop, "width") / sx), min(h, _size(crop, "height") / sy)
    left, top = (w - keep_w) / 2, (h - keep_h) / 2
    return picture.crop((round(left), round(top), round(left + keep_w), round(top + keep_h)))


def frame_pictures(prompt: Prompt, processor: Any = None) -> list[Any]:
    """The image shown under each grid frame of ``prompt.visual_grid`` (None where it cannot be told).

    Images come first in the sequence, then the video; an image may span several grid frames (views), a
    video's grid frames are spread evenly over its frames (Qwen's temporal patches pair frames). With
    the model's image ``processor``, a centre-cropping processor's crop is applied (``as_seen``).
    """
    return [as_seen(p, processor) for p in _frame_pictures(prompt)]


def _frame_pictures(prompt: Prompt) -> list[Any]:
    frames_total = int(prompt.visual_grid[:, 0].max()) + 1 if prompt.num_visual else 0
    images = [m for m in prompt.media if not isinstance(m, (list, tuple))]
    video = [f for m in prompt.media if isinstance(m, (list, tuple)) for f in m]
    if not video and images and frames_total % len(images) == 0:
        per = frames_total // len(images)
        return [images[f // per] for f in range(frames_total)]
    video_frames = frames_total - len(images)
    if video and video_frames >= 1:
        return images + [video[j * len(video) // video_frames] for j in range(video_frames)]
    return [None] * frames_total


def token_map(prompt: Prompt, values: Tensor, frame: int) -> np.ndarray:
    """values Tensor[N_v] laid on frame ``frame``'s token grid: ndarray[rows, cols] (NaN where no token)."""
    g = prompt.visual_grid
    on = (g[:, 0] == frame) & (g[:, 1] >= 0)
    rows, cols = int(g[on, 1].max()) + 1, int(g[on, 2].max()) + 1
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    out[g[on, 1].numpy(), g[on, 2].numpy()] = values[on].float().numpy()
    return out


def _rgb(picture: Any) -> np.ndarray | None:
    if picture is None:
        return None
    from PIL import Image

    if not isinstance(picture, Image.Image):
        arr = np.asarray(picture)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        picture = Image.fromarray(arr.astype(np.uint8).squeeze())
    return np.asarray(picture.convert("RGB"))


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour map of a token grid onto an image of height x width pixels."""
    r = np.minimum(np.arange(height) * grid.shape[0] // height, grid.shape[0] - 1)
    c = np.minimum(np.arange(width) * grid.shape[1] // width, grid.shape[1] - 1)
    return grid[r][:, c]


def relevance_figure(prompt: Prompt, scores: Tensor, ratio: float = 0.25, out: str | Path = "relevance.png", *,
                     predicted: Tensor | Callable[[Prompt], Tensor] | None = None,
                     labels: tuple[str, str] = ("R_v (Eq. 1)", "predicted"), title: str = "",
                     max_frames: int = 8, panel: float = 2.4, dpi: int = 100, processor: Any = None) -> Picture:
    """Write a PNG: per score row, the heatmap over each image/frame and the kept tokens at ``ratio``.

    scores: Tensor[N_v] (e.g. ``relevance(...).scores``). predicted: an optional second row, Tensor[N_v]
    or a callable ``prompt -> Tensor[N_v]`` (a compressor's or any pruner's scores). Pruned tokens are
    whitened, as in Figure 2. Layout: one image -> a row of [heatmap, kept] per score row; several
    frames -> a heatmap row and a kept row per score row, one column per frame (at most ``max_frames``).
    processor: the model's image processor, to show what a centre-cropping one keeps (LLaVA-1.5).
    """
    from matplotlib.figure import Figure

    n = prompt.num_visual
    rows_of_scores = [(labels[0], torch.as_tensor(scores).detach().float().cpu().flatten())]
    if predicted is not None:
        p = predicted(prompt) if callable(predicted) else predicted
        rows_of_scores.append((labels[1], torch.as_tensor(p).detach().float().cpu().flatten()))
    for label, s in rows_of_scores:
        if s.numel() != n:
            raise ValueError(f"{label} has {s.numel()} scores but the prompt has {n} visual tokens")
    pictures = frame_pictures(prompt, processor)
    frames = list(range(len(pictures)))
    if len(frames) > max_frames:
        frames = [frames[i * len(frames) // max_frames] for i in range(max_frames)]
    single = len(frames) == 1
    n_rows = len(rows_of_scores) * (1 if single else 2)
    n_cols = 2 if single else len(frames)
    first = _rgb(pictures[frames[0]])
    aspect = first.shape[0] / first.shape[1] if first is not None else np.divide(*token_map(
        prompt, torch.zeros(n), frames[0]).shape)
    panel_h = panel * float(np.clip(aspect, 0.5, 2.0)) + 0.25  # + the panel's title
    height = n_rows * panel_h + TITLE_INCHES
    fig = Figure(figsize=(n_cols * panel, height), dpi=dpi)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - TITLE_INCHES / height,
                        wspace=0.04, hspace=0.25 / (panel_h - 0.25))
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, (label, s) in enumerate(rows_of_scores):
        keep = select(s, ratio, n)
        kept = torch.zeros(n)
        kept[keep] = 1.0
        lo, hi = float(s.min()), float(s.max())
        norm = (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)
        for j, f in enumerate(frames):
            heat_ax, kept_ax = (axes[r, 0], axes[r, 1]) if single else (axes[2 * r, j], axes[2 * r + 1, j])
            _draw(heat_ax, kept_ax, _rgb(pictures[f]), token_map(prompt, norm, f), token_map(prompt, kept, f))
            suffix = "" if single else f" · frame {f}"
            heat_ax.set_title(f"{label}{suffix}", fontsize=8)
            kept_ax.set_title(f"kept {len(keep)}/{n} ({ratio:.0%}){suffix}", fontsize=8)
    width_chars = int(n_cols * panel * 12)  # ~ characters of a 9 pt line across the figure
    lines = [ln if len(ln) <= width_chars else ln[: width_chars - 1] + "…"
             for ln in (title or repr(prompt.question)).splitlines()[:2]]
    fig.suptitle("\n".join(lines), fontsize=9, y=1 - 0.1 * TITLE_INCHES / height)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        fmt = "png"  # written to exactly ``out`` (matplotlib would append ".png" and report another name)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    width, height = fig.canvas.get_width_height()
    return Picture(path=path, width=int(width), height=int(height))


def _draw(heat_ax: Any, kept_ax: Any, img: np.ndarray | None, heat: np.ndarray, kept: np.ndarray) -> None:
    """Heatmap over the picture on ``heat_ax``; the picture with pruned tokens whitened on ``kept_ax``."""
    if img is None:  # no picture to show: the token grids alone
        heat_ax.imshow(heat, cmap="jet", vmin=0, vmax=1, interpolation="nearest")
        kept_ax.imshow(np.nan_to_num(kept), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        h, w = img.shape[:2]
        heat_ax.imshow(img)
        heat_ax.imshow(_upsample(heat, h, w), cmap="jet", vmin=0, vmax=1, alpha=0.5)
        mask = _upsample(np.nan_to_num(kept), h, w) > 0.5
        whitened = np.where(mask[..., None], img, 255).astype(np.uint8)
        kept_ax.imshow(whitened)
    for ax in (heat_ax, kept_ax):
        ax.set_xticks([])
        ax.set_yticks([])


@dataclass
class ShowResult:
    """What ``show`` computed: the picture, the relevance, the kept tokens and the optional second row."""

    picture: Picture
    relevance: Any  # RelevanceResult
    keep: Tensor
    predicted: Tensor | None = None
    predicted_label: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.picture.path), "width": self.picture.width, "height": self.picture.height,
                "answer": self.relevance.answer, "answer_ids": list(self.relevance.answer_ids),
                "rule": self.relevance.rule, "clamp": self.relevance.clamp, "visual_tokens": len(self.relevance.scores),
                "kept": self.keep.tolist(), "scores": self.relevance.scores.tolist(),
                "predicted": None if self.predicted is None else self.predicted.tolist(),
                "predicted_label": self.predicted_label}


def show(vlm: Any, question: str, images: Any = None, video: Any = None, *, answer: Any = None,
         ratio: float = 0.25, out: str | Path = "relevance.png", rule: str = "grad", clamp: bool = True,
         compressor: Any = None, compare: str | None = None, max_new_tokens: int = 16,
         progress: bool = False) -> ShowResult:
    """Explain ``vlm``'s answer to ``question`` about ``images`` / ``video`` (frames) and draw it.

    vlm: a loaded VLM or a name/path for ``explainprune.load``. The second row, when asked, is a
    compressor's prediction f_θ(A_v^0) (Eq. 2; ``compressor`` = a Compressor or its directory) or the
    scores of the registered pruner named ``compare``.
    """
    from explainprune.attention import first_layer_attention
    from explainprune.relevance import relevance

    if isinstance(vlm, (str, Path)):
        from explainprune.models import load

        vlm = load(vlm)
    prompt = vlm.prepare(images=images, video=video, question=question)
    if prompt.num_visual == 0:
        raise ValueError("give an image or a video to explain")
    res = relevance(vlm, prompt, answer, rule=rule, clamp=clamp, max_new_tokens=max_new_tokens,
                    progress=progress)
    predicted, label = None, ""
    if compressor is not None:
        if isinstance(compressor, (str, Path)):
            from explainprune.compressor import Compressor

            compressor = Compressor.from_pretrained(compressor)
        if hasattr(compressor, "check_compatible"):
            compressor.check_compatible(vlm)
        with torch.no_grad():
            predicted = torch.as_tensor(compressor(first_layer_attention(vlm, prompt))).float().flatten()
        label = "f_θ(A_v^0) (Eq. 2)"
    elif compare:
        from explainprune.pruning import get_pruner

        predicted, label = get_pruner(compare).score(vlm, prompt).float().flatten(), compare
    title = f"Q: {question}\nA: {res.answer}"
    picture = relevance_figure(prompt, res.scores, ratio, out, predicted=predicted,
                               labels=(f"R_v (Eq. 1, {rule})", label), title=title,
                               processor=getattr(vlm, "image_processor", None))
    return ShowResult(picture=picture, relevance=res, keep=select(res.scores, ratio, prompt.num_visual),
                      predicted=predicted, predicted_label=label)
