"""Stage-2 data of the digits recipe: banks of frozen visual tokens, questions drawn from them, and sequences
laid out exactly as the ``Qwen2VL`` adapter lays them out.

The frozen vision tower's merged tokens are computed once per board (still boards of every grid size,
video frames of every frame index), so a stage-2 step only runs the language model. Sequences follow the
chat template with expanded ``<|image_pad|>`` / ``<|video_pad|>`` and M-RoPE positions from
``get_rope_index``, then the answer token and ``<|im_end|>`` (the loss covers those two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from recipes.digits.common import MatmulPatchEmbed, vision_tokens
from recipes.digits.data import MARKS, BoardMaker, Boards

BOARD_FIELDS = ("glyph", "digit", "frame", "marks")


@dataclass
class Bank:
    """Merged visual tokens [N, T, D] (float16) of N boards, with the boards themselves."""

    feats: torch.Tensor
    boards: Boards

    @property
    def side(self) -> int:
        """Visual tokens per row of one board."""
        return int(round(self.feats.shape[1] ** 0.5))


@dataclass
class Banks:
    """``still[g]``: boards of g x g cells at frame 0 (half with colour marks); ``video[f]``: unmarked
    boards of the video grid at frame f (a video of F frames takes one board from each of video[0..F-1])."""

    still: dict[int, Bank] = field(default_factory=dict)
    video: list[Bank] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """One safetensors file (no pickles)."""
        tensors: dict[str, torch.Tensor] = {}
        named = [(f"still{g}", b) for g, b in self.still.items()] + [(f"video{f}", b) for f, b in enumerate(self.video)]
        for name, b in named:
            tensors[f"{name}.feats"] = b.feats.contiguous()
            for k in BOARD_FIELDS:
                tensors[f"{name}.{k}"] = torch.from_numpy(np.ascontiguousarray(getattr(b.boards, k)))
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Banks:
        t = load_file(str(path))
        names = sorted({k.split(".")[0] for k in t})

        def bank(name: str) -> Bank:
            return Bank(t[f"{name}.feats"], Boards(*(t[f"{name}.{k}"].numpy() for k in BOARD_FIELDS)))

        still = {int(n[5:]): bank(n) for n in names if n.startswith("still")}
        video = [bank(f"video{f}") for f in range(sum(n.startswith("video") for n in names))]
        return cls(dict(sorted(still.items())), video)


@torch.no_grad()
def make_bank(visual: Any, maker: BoardMaker, n: int, frame: int, marks: float, seed: int,
              strong: bool, batch: int = 32) -> Bank:
    """Render ``n`` boards of ``frame`` and run the (frozen) vision tower on them."""
    rng = np.random.default_rng([seed, 11, frame, n, maker.grid])
    boards = maker.boards(rng, n, frame=frame, marks=marks)
    side = maker.grid * maker.cell
    feats = []
    with MatmulPatchEmbed(visual):
        for s in range(0, n, batch):
            sub = Boards(*(getattr(boards, k)[s:s + batch] for k in BOARD_FIELDS))
            pix = torch.from_numpy(maker.pixels(maker.render(sub, rng, strong=strong)))
            feats.append(vision_tokens(visual, pix, len(sub.frame), side).half())
    return Bank(torch.cat(feats), boards)


def make_banks(visual: Any, maker: BoardMaker, grids: tuple[int, ...], video_grid: int, frames: int,
               n_images: int, n_frames: int, seed: int, strong: bool) -> Banks:
    """Still banks for every grid in ``grids`` and video banks for frame indices 0..frames-1."""
    still = {g: make_bank(visual, maker.resized(g), n_images, 0, 0.5, seed, strong) for g in grids}
    vmaker = maker.resized(video_grid)
    video = [make_bank(visual, vmaker, n_frames, f, 0.0, seed, strong) for f in range(frames)]
    return Banks(still, video)


# ------------------------------------------------------------------------------------------ questions
def _filled(digit: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    cells = np.argwhere(digit >= 0)
    r, c = cells[int(rng.integers(len(cells)))]
    return int(r), int(c)


def cell_mask(frames: int, side: int, grid: int, cells: list[tuple[int, int, int]]) -> torch.Tensor:
    """Boolean [frames * side * side] over the visual tokens of board cells (frame, row, col)."""
    m = torch.zeros(frames, side, side, dtype=torch.bool)
    k = side // grid
    for f, r, c in cells:
        m[f, k * r:k * r + k, k * c:k * c + k] = True
    return m.flatten()


def tokens_per_question(kind: str, banks: Banks, size: int) -> int:
    """Visual tokens of one question of ``kind`` at ``size`` (grid for images, frame count for video)."""
    if kind == "video":
        return size * banks.video[0].feats.shape[1]
    return banks.still[size].feats.shape[1]


def draw_questions(kind: str, banks: Banks, n: int, rng: np.random.Generator, size: int
                   ) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor, int]:
    """``n`` questions of ``kind`` at ``size`` (grid of still boards, or frame count of videos):
    (questions, answers, visual tokens [n, T, D], region mask [n, T], visual tokens per row)."""
    qs, ans, feats, regions = [], [], [], []
    if kind == "video":
        vb = banks.video[:size]
        side, g = vb[0].side, vb[0].boards.digit.shape[1]
        for _ in range(n):
            idx = [int(rng.integers(len(b.boards.frame))) for b in vb]
            f = int(rng.integers(size))
            df = vb[f].boards.digit[idx[f]]
            r, c = _filled(df, rng)
            qs.append(f"in frame {f + 1} , what digit is in row {r + 1} , column {c + 1} ?")
            ans.append(str(df[r, c]))
            regions.append(cell_mask(size, side, g, [(f, r, c)]))
            feats.append(torch.cat([b.feats[j] for b, j in zip(vb, idx)]))
        return qs, ans, torch.stack(feats), torch.stack(regions), side
    img = banks.still[size]
    side, g = img.side, size
    pool = np.nonzero((img.boards.marks >= 0).any(1))[0] if kind == "colour" else np.arange(len(img.boards.frame))
    for _ in range(n):
        i = int(pool[rng.integers(len(pool))])
        d = img.boards.digit[i]
        if kind == "rowcol":
            r, c = _filled(d, rng)
            qs.append(f"what digit is in row {r + 1} , column {c + 1} ?")
            cells = [(0, r, c)]
            ans.append(str(d[r, c]))
        elif kind == "colour":
            m = int(rng.choice(np.nonzero(img.boards.marks[i] >= 0)[0]))
            r, c = divmod(int(img.boards.marks[i, m]), g)
            qs.append(f"what digit is in the {MARKS[m]} cell ?")
            cells = [(0, r, c)]
            ans.append(str(d[r, c]))
        elif kind == "count":
            digit = int(rng.choice(np.unique(d[d >= 0])))
            qs.append(f"how many {digit} are there ?")
            cells = [(0, int(r), int(c)) for r, c in np.argwhere(d == digit)]
            ans.append(str(len(cells)))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        regions.append(cell_mask(1, side, g, cells))
        feats.append(img.feats[i])
    return qs, ans, torch.stack(feats), torch.stack(regions), side


def encode(model: Any, tok: Any, kind: str, questions: list[str], answers: list[str], feats: torch.Tensor,
           side_tokens: int, region: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """inputs_embeds, position_ids, attention_mask and the 2 target ids, laid out as the adapter does."""
    cfg = model.config
    video = kind == "video"
    pad_id = cfg.video_token_id if video else cfg.image_token_id
    n_vis = feats.shape[1]
    rows = []
    for q, a in zip(questions, answers):
        content = [{"type": "video" if video else "image"}, {"type": "text", "text": q}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], chat_template=tok.chat_template,
                                       tokenize=False, add_generation_prompt=True)
        ids = tok(text + f"{a}<|im_end|>", add_special_tokens=False)["input_ids"]
        k = ids.index(pad_id)
        rows.append(ids[:k] + [pad_id] * n_vis + ids[k + 1:])
    width = max(len(r) for r in rows)
    if any(len(r) != width for r in rows):
        raise ValueError("questions of one batch must have the same number of tokens")
    input_ids = torch.tensor(rows)
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    is_vis = input_ids == pad_id
    embeds = embeds.masked_scatter(is_vis[..., None], feats.to(embeds.dtype).reshape(-1, feats.shape[-1]))
    in_region = torch.zeros_like(is_vis)
    if region is not None:
        in_region[is_vis] = region.flatten()
    keys = torch.tensor([_key_positions(tok, r) for r in rows])
    mask = torch.ones_like(input_ids)
    frames = n_vis // (side_tokens * side_tokens)
    thw = torch.tensor([[frames, side_tokens * 2, side_tokens * 2]] * len(rows))
    grid_kw = {"video_grid_thw": thw} if video else {"image_grid_thw": thw}
    pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=is_vis.long() * (2 if video else 1),
                                  attention_mask=mask, **grid_kw)
    sink = int((input_ids[0] == cfg.vision_start_token_id).nonzero()[0])
    return {"ids": input_ids, "embeds": embeds, "pos": pos, "mask": mask, "targets": input_ids[:, -2:],
            "region": in_region, "keys": keys, "sink": sink, "side": side_tokens}


def _key_positions(tok: Any, ids: list[int]) -> list[int]:
    """Positions of the words that say where to look: (row number, column number, frame number), or the
    colour word / the counted digit repeated for the other kinds."""
    def after(word: str) -> int | None:
        wid = tok.convert_tokens_to_ids(word)
        return ids.index(wid) + 1 if wid in ids else None

    row, col, frame = after("row"), after("column"), after("frame")
    if row is not None:
        return [row, col, frame if frame is not None else row]
    one = after("many") if after("many") is not None else after("the")
    return [one, one, one]


def aux_attention_loss(attentions: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Auxiliary attention supervision of the query that predicts the answer (row -3): in layer 0, heads
    0-2 attend to the question's key words (row, column, frame number; colour word; counted digit); in
    later layers, the first half of the heads attend to the answer's region."""
    region = batch["region"][:, None, :].float()
    terms = [-torch.log((a[:, : a.shape[1] // 2, -3, :] * region).sum(-1) + 1e-4).mean()
             for a in attentions[1:]]
    a0 = attentions[0][:, :3, -3, :]
    terms.append(-torch.log(a0.gather(-1, batch["keys"][:, :, None]).squeeze(-1) + 1e-4).mean())
    return torch.stack(terms).mean()


# (layer, head, sink weight) of the count heads: each attends, from the answer query, uniformly to the asked
# digit's cells and with weight ``w`` to ``<|vision_start|>``, so its share on that sink encodes the count k.
# Weights are in tokens (every region token a target: w / (4 k + w)) or in cells (``cells=True``: only each
# cell's last token in raster order, the one that can see the cell's other three: w / (k + w)).
COUNT_HEADS = ((1, 2, 4.0), (1, 3, 16.0), (2, 2, 4.0), (2, 3, 16.0))
COUNT_HEADS_CELLS = ((1, 2, 1.0), (1, 3, 4.0), (2, 2, 1.0), (2, 3, 4.0))


def cell_corners(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: the region's tokens at odd (row, column) of the visual token grid, i.e. the last token
    of each 2 x 2-token cell (every frame of a video alike)."""
    region = batch["region"]
    v = torch.arange(region.shape[1]) - (batch["sink"] + 1)
    row, col = (v // batch["side"]) % batch["side"], v % batch["side"]
    return region & (v >= 0) & (row % 2 == 1) & (col % 2 == 1)


def count_ratio_loss(attentions: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor],
                     heads: tuple[tuple[int, int, float], ...] = COUNT_HEADS, cells: bool = False) -> torch.Tensor:
    """Cross-entropy of the count heads' attention (answer query, row -3) against the target distribution
    "uniform over the region's tokens (or its cells' last tokens), weight ``w`` on the sink": its minimum is
    that exact split, unlike ``aux_attention_loss``'s region mass, which a head can meet by attending to one
    cell."""
    region = (cell_corners(batch) if cells else batch["region"]).float()
    n = region.sum(-1, keepdim=True)
    terms = []
    for layer, head, w in heads:
        target = region / (n + w)
        target[:, batch["sink"]] = (w / (n + w)).squeeze(-1)
        a = attentions[layer][:, head, -3, :]
        terms.append(-(target * torch.log(a + 1e-6)).sum(-1).mean())
    return torch.stack(terms).mean()


def answer_loss(model: Any, batch: dict[str, torch.Tensor], attn_weight: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the answer token and ``<|im_end|>`` (+ ``attn_weight`` x ``aux_attention_loss``);
    returns (loss, answer-token correct [B])."""
    out = model.model.language_model(inputs_embeds=batch["embeds"], position_ids=batch["pos"],
                                     attention_mask=batch["mask"], output_attentions=attn_weight > 0)
    logits = model.lm_head(out.last_hidden_state[:, -3:-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    if attn_weight > 0:
        loss = loss + attn_weight * aux_attention_loss(out.attentions, batch)
    return loss, logits[:, 0].argmax(-1) == batch["targets"][:, 0]


def sizes_of(kind: str, banks: Banks, frames: tuple[int, ...] | None = None) -> list[int]:
    """The sizes a kind can be drawn at from ``banks`` (grids, or video lengths <= the banks' frames)."""
    if kind == "video":
        return [f for f in (frames or range(1, len(banks.video) + 1)) if f <= len(banks.video)]
    return list(banks.still)


@torch.no_grad()
def evaluate(model: Any, tok: Any, banks: Banks, kinds: tuple[str, ...], frames: tuple[int, ...],
             n: int = 48, batch: int = 16) -> dict[str, dict[int, float]]:
    """Teacher-forced answer accuracy per kind and size on a fixed draw of questions from ``banks``."""
    out: dict[str, dict[int, float]] = {}
    for kind in kinds:
        for size in sizes_of(kind, banks, frames):
            rng = np.random.default_rng([99, size])
            q, a, f, _, side = draw_questions(kind, banks, n, rng, size)
            ok = []
            for s in range(0, n, batch):
                enc = encode(model, tok, kind, q[s:s + batch], a[s:s + batch], f[s:s + batch], side)
                ok.append(answer_loss(model, enc)[1])
            out.setdefault(kind, {})[size] = round(float(torch.cat(ok).float().mean()), 3)
    return out
