"""Stage 2 of the digits demo training: question answering by the language model on frozen visual tokens.

The frozen vision tower's merged tokens are computed once for a bank of boards (plus banks of video frames
with their frame cue), so a step only runs the language model. Sequences are built exactly as the
``Qwen2VL`` adapter builds them (chat template, expanded ``<|image_pad|>`` / ``<|video_pad|>``, M-RoPE
positions from ``get_rope_index``), followed by the answer token and ``<|im_end|>``; the loss covers those two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from explainprune.tasks import digits_data as dd
from explainprune.tasks.digits_data import MARKS, Boards


@dataclass
class Bank:
    """Merged visual tokens [N, T, D] (float16) of N boards, with the boards themselves."""

    feats: torch.Tensor
    boards: Boards


BOARD_FIELDS = ("glyph", "digit", "frame", "marks")


def banks_state(banks: list[Bank]) -> list[dict[str, torch.Tensor]]:
    """Banks as plain tensors (loadable with ``torch.load(..., weights_only=True)``: nothing pickled)."""
    return [{"feats": b.feats, **{k: torch.from_numpy(np.ascontiguousarray(getattr(b.boards, k)))
                                  for k in BOARD_FIELDS}} for b in banks]


def banks_from_state(state: list[dict[str, torch.Tensor]]) -> list[Bank]:
    return [Bank(s["feats"], Boards(*(s[k].numpy() for k in BOARD_FIELDS))) for s in state]


@torch.no_grad()
def make_bank(visual: Any, maker: dd.BoardMaker, n: int, frame: int, marks: float, seed: int,
              strong: bool, batch: int = 64) -> Bank:
    """Render ``n`` boards of ``frame`` and run the (frozen) vision tower on them."""
    from explainprune.tasks.digits_train import MatmulPatchEmbed, vision_tokens

    rng = np.random.default_rng([seed, 11, frame, n])
    boards = maker.boards(rng, n, frame=frame, marks=marks)
    side = maker.grid * maker.cell
    feats = []
    with MatmulPatchEmbed(visual):
        for s in range(0, n, batch):
            sub = Boards(*(getattr(boards, k)[s:s + batch] for k in ("glyph", "digit", "frame", "marks")))
            pix = torch.from_numpy(maker.pixels(maker.render(sub, rng, strong=strong)))
            feats.append(vision_tokens(visual, pix, len(sub.frame), side).half())
    return Bank(torch.cat(feats), boards)


def make_banks(visual: Any, maker: dd.BoardMaker, n_images: int, n_frames: int, seed: int,
               strong: bool) -> list[Bank]:
    """Bank 0: still images (frame 0, half of them with colour marks); bank f: unmarked frames f >= 1."""
    banks = [make_bank(visual, maker, n_images, 0, 0.5, seed, strong)]
    banks += [make_bank(visual, maker, n_frames, f, 0.0, seed, strong) for f in range(1, maker.frames)]
    return banks


# ------------------------------------------------------------------------------------------ questions
def _filled(digit: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    cells = np.argwhere(digit >= 0)
    r, c = cells[int(rng.integers(len(cells)))]
    return int(r), int(c)


def _cell_mask(frames: int, side: int, grid: int, cells: list[tuple[int, int, int]]) -> torch.Tensor:
    """Boolean [frames * side * side] over the visual tokens of board cells (frame, row, col)."""
    m = torch.zeros(frames, side, side, dtype=torch.bool)
    k = side // grid
    for f, r, c in cells:
        m[f, k * r:k * r + k, k * c:k * c + k] = True
    return m.flatten()


def draw_questions(kind: str, banks: list[Bank], n: int, rng: np.random.Generator
                   ) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """``n`` (question, answer, visual tokens [n, T, D], region mask [n, T]) of ``kind`` from the banks."""
    img = banks[0]
    side, g = int(round(img.feats.shape[1] ** 0.5)), img.boards.digit.shape[1]
    qs, ans, feats, regions = [], [], [], []
    if kind == "colour":
        pool = np.nonzero((img.boards.marks >= 0).any(1))[0]
    elif kind == "video":
        pool = np.nonzero((img.boards.marks < 0).all(1))[0]
    else:
        pool = np.arange(len(img.boards.frame))
    for _ in range(n):
        i = int(pool[rng.integers(len(pool))])
        d = img.boards.digit[i]
        if kind == "rowcol":
            r, c = _filled(d, rng)
            qs.append(f"what digit is in row {r + 1} , column {c + 1} ?")
            ans.append(str(d[r, c]))
            regions.append(_cell_mask(1, side, g, [(0, r, c)]))
        elif kind == "colour":
            m = int(rng.choice(np.nonzero(img.boards.marks[i] >= 0)[0]))
            r, c = divmod(int(img.boards.marks[i, m]), d.shape[1])
            qs.append(f"what digit is in the {MARKS[m]} cell ?")
            ans.append(str(d[r, c]))
            regions.append(_cell_mask(1, side, g, [(0, r, c)]))
        elif kind == "count":
            digit = int(rng.choice(np.unique(d[d >= 0])))
            qs.append(f"how many {digit} are there ?")
            ans.append(str(int((d == digit).sum())))
            regions.append(_cell_mask(1, side, g, [(0, int(r), int(c)) for r, c in np.argwhere(d == digit)]))
        if kind != "video":
            feats.append(img.feats[i])
            continue
        idx = [i] + [int(rng.integers(len(b.boards.frame))) for b in banks[1:]]
        f = int(rng.integers(len(banks)))
        df = banks[f].boards.digit[idx[f]]
        r, c = _filled(df, rng)
        qs.append(f"in frame {f + 1} , what digit is in row {r + 1} , column {c + 1} ?")
        ans.append(str(df[r, c]))
        regions.append(_cell_mask(len(banks), side, g, [(f, r, c)]))
        feats.append(torch.cat([b.feats[j] for b, j in zip(banks, idx)]))
    return qs, ans, torch.stack(feats), torch.stack(regions)


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
    return {"embeds": embeds, "pos": pos, "mask": mask, "targets": input_ids[:, -2:], "region": in_region,
            "keys": keys, "sink": sink}


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


def answer_loss(model: Any, batch: dict[str, torch.Tensor], attn_weight: float = 0.0,
                count_sink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the answer token and ``<|im_end|>``; returns (loss, answer-token correct [B]).

    With ``attn_weight`` > 0, adds auxiliary attention supervision of the query that predicts the answer:
    in layer 0, heads 0-2 should attend to the question's key words (row, column, frame number; colour
    word; counted digit); in later layers, the first half of the heads should attend to the region.
    """
    out = model.model.language_model(inputs_embeds=batch["embeds"], position_ids=batch["pos"],
                                     attention_mask=batch["mask"], output_attentions=attn_weight > 0)
    logits = model.lm_head(out.last_hidden_state[:, -3:-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    if attn_weight > 0:
        region = batch["region"][:, None, :].float()
        terms = []
        for a in out.attentions[1:]:
            if count_sink > 0:  # target: uniform on the region plus a sink worth `count_sink` tokens
                target = region.clone()
                target[:, :, batch["sink"]] = count_sink
                target = target / target.sum(-1, keepdim=True)
                terms.append(-(target * torch.log(a[:, : a.shape[1] // 2, -3, :] + 1e-4)).sum(-1).mean())
                continue
            mass = (a[:, : a.shape[1] // 2, -3, :] * region).sum(-1)
            terms.append(-torch.log(mass + 1e-4).mean())
        a0 = out.attentions[0][:, :3, -3, :]  # [B, 3, L]
        gathered = a0.gather(-1, batch["keys"][:, :, None]).squeeze(-1)
        terms.append(-torch.log(gathered + 1e-4).mean())
        loss = loss + attn_weight * torch.stack(terms).mean()
    return loss, logits[:, 0].argmax(-1) == batch["targets"][:, 0]


# ------------------------------------------------------------------------------------------- training
def _bank_cache(visual: Any, cfg: Any, work: Path, gen: dd.BoardMaker, split: str) -> list[Bank]:
    path = work / f"banks_{split}.pt"
    if path.is_file():
        return banks_from_state(torch.load(path, weights_only=True))
    if split == "train":
        banks = make_banks(visual, gen, cfg.bank_images, cfg.bank_frames, cfg.seed, strong=True)
    else:
        from explainprune.tasks.digits_train import _test_maker

        banks = make_banks(visual, _test_maker(cfg), 512, 128, cfg.seed + 1, strong=False)
    torch.save(banks_state(banks), path)
    return banks


@torch.no_grad()
def evaluate(model: Any, tok: Any, banks: list[Bank], kinds: tuple[str, ...], side: int,
             n: int = 192) -> dict[str, float]:
    """Teacher-forced answer accuracy per kind on a fixed draw of questions from ``banks``."""
    out = {}
    for kind in kinds:
        rng = np.random.default_rng(99)
        q, a, f, _ = draw_questions(kind, banks, n, rng)
        _, ok = answer_loss(model, encode(model, tok, kind, q, a, f, side))
        out[kind] = round(float(ok.float().mean()), 3)
    return out


def stage2(model: Any, tok: Any, cfg: Any, work: Path, gen: dd.BoardMaker, resume: bool) -> None:
    """Train the language model (embeddings, decoder, head) on question answering; vision frozen."""
    from explainprune.tasks.digits_train import _load, _lr, _print, _save

    visual = model.model.visual.eval().requires_grad_(False)
    t0 = time.time()
    train_banks = _bank_cache(visual, cfg, work, gen, "train")
    test_banks = _bank_cache(visual, cfg, work, gen, "test")
    _print(f"stage2 banks ready in {time.time() - t0:.0f}s")
    side = cfg.grid * cfg.cell // 28
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    opt = torch.optim.AdamW(params, lr=cfg.s2_lr, weight_decay=0.01)
    objs = {"llm": _LLMState(model), "opt": opt}
    step = _load(work / "stage2.pt", objs) if resume else 0
    rng = np.random.default_rng([cfg.seed, 2, step])
    model.train()
    log: dict[str, list[float]] = {}
    while step < cfg.s2_steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.s2_steps, cfg.s2_lr, warmup=200)
        opt.zero_grad(set_to_none=True)
        kinds = [k for k in cfg.kinds if k != "video" or step >= cfg.s2_video_from * cfg.s2_steps]
        for kind in kinds:
            n = cfg.s2_video_batch if kind == "video" else cfg.s2_batch
            q, a, f, reg = draw_questions(kind, train_banks, n, rng)
            sink = cfg.s2_count_sink if kind == "count" else 0.0
            loss, ok = answer_loss(model, encode(model, tok, kind, q, a, f, side, reg), cfg.s2_attn, sink)
            (loss / len(kinds)).backward()
            log.setdefault(kind, []).append(float(ok.float().mean()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.s2_steps:
            train_acc = {k: round(float(np.mean(v)), 3) for k, v in log.items()}
            log = {}
            model.eval()
            test = evaluate(model, tok, test_banks, cfg.kinds, side) if step % (cfg.log_every * 4) == 0 else {}
            model.train()
            _print(f"stage2 step {step} train {train_acc} test {test} {time.time() - t0:.0f}s")
        if step % cfg.ckpt_every == 0 or step == cfg.s2_steps:
            _save(work / "stage2.pt", step, objs)
    model.eval()


class _LLMState:
    """state_dict / load_state_dict of everything but the vision tower."""

    def __init__(self, model: Any):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("model.visual")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)
