"""Staged training of the shipped digits demo model (a tiny Qwen2-VL from scratch), on CPU.

  stage 1  vision tower + merger alone, with temporary per-token heads that classify the token's cell
           digit (or blank), row, column, frame and colour mark; strong augmentation of the train digits.
  stage 2  vision frozen; its merged tokens are precomputed for a bank of boards (and video frames), and
           the language model learns to answer every question kind in the exact chat format the
           ``Qwen2VL`` adapter renders (answer token then ``<|im_end|>``, loss on those two only).

    python -m explainprune.tasks.digits_train --out src/explainprune/assets/demo [--resume]

Checkpoints go to ``--work`` (default runs/digits); ``--resume`` continues from the latest one.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainprune.models.offline import DEMO_CHAT_TEMPLATE, QWEN_SPECIALS, save_checkpoint_dir, word_tokenizer
from explainprune.tasks import digits_data as dd
from explainprune.tasks.digits import WORDS


@dataclass(frozen=True)
class TrainConfig:
    out: str = "src/explainprune/assets/demo"
    work: str = "runs/digits"
    seed: int = 0
    grid: int = 4
    cell: int = 56
    frames: int = 4
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_width: int = 64
    s1_steps: int = 1500
    s1_batch: int = 32
    s1_lr: float = 2e-3
    bank_images: int = 4000
    bank_frames: int = 1000
    s2_steps: int = 1000
    s2_batch: int = 16
    s2_lr: float = 1e-3
    s2_attn: float = 0.5
    s2_video_batch: int = 8
    s2_video_from: float = 0.3
    s2_count_sink: float = 0.0
    kinds: tuple[str, ...] = ("rowcol", "colour", "count", "video")
    threads: int = 2
    log_every: int = 25
    ckpt_every: int = 250


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """A fresh tiny Qwen2-VL, its word tokenizer and image processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = word_tokenizer(WORDS, special_tokens=QWEN_SPECIALS, chat_template=DEMO_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = cfg.hidden // cfg.heads
    third = head_dim // 2 // 3
    rope = {"rope_type": "default", "rope_theta": 1000.0,
            "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    text = dict(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 3,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters=rope,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=cfg.vision_depth, embed_dim=cfg.vision_width, hidden_size=cfg.hidden, num_heads=4,
                  mlp_ratio=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision)
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.eos_token_id, config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    torch.manual_seed(cfg.seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.model.visual.config._attn_implementation = "eager"  # per-image loop; faster than sdpa on CPU
    model.model.language_model.config._attn_implementation = "eager"  # attention weights for supervision
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1024)
    return model, tok, proc


class MatmulPatchEmbed:
    """Context manager: run the vision Conv3d patch embedding as an equal matmul (faster backward on CPU)."""

    def __init__(self, visual: nn.Module):
        self.pe = visual.patch_embed

    def __enter__(self) -> MatmulPatchEmbed:
        pe = self.pe
        self.prev = pe.__dict__.get("forward")

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = pe.proj.weight
            return x.reshape(-1, w[0].numel()).to(w.dtype) @ w.reshape(w.shape[0], -1).T

        pe.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.prev is None:
            self.pe.__dict__.pop("forward", None)
        else:
            self.pe.forward = self.prev


def vision_tokens(visual: nn.Module, pixels: torch.Tensor, n_images: int, side: int) -> torch.Tensor:
    """Merged visual tokens [n_images, tokens, hidden] of a batch of same-size patchified images."""
    thw = torch.tensor([[1, side // 14, side // 14]] * n_images)
    out = visual(pixels, grid_thw=thw).pooler_output
    return out.reshape(n_images, -1, out.shape[-1])


# -------------------------------------------------------------------------------------------- stage 1
class AuxHeads(nn.Module):
    """Temporary per-token classifiers (digit+blank, row, column, frame, mark) on the merger's output."""

    sizes = {"digit": 11, "row": 8, "col": 8, "frame": 8, "mark": 4}

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in self.sizes.items()})

    def forward(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, acc = tokens.new_zeros(()), {}
        for k, head in self.heads.items():
            logits = head(tokens).flatten(0, 1)
            y = targets[k].flatten()
            loss = loss + F.cross_entropy(logits, y)
            acc[k] = float((logits.argmax(-1) == y).float().mean())
        return loss, acc


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def stage1(model: Any, cfg: TrainConfig, work: Path, gen: dd.BoardMaker, resume: bool) -> None:
    """Train the vision tower + merger with per-token auxiliary heads."""
    visual = model.model.visual
    heads = AuxHeads(cfg.hidden)
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.s1_lr, weight_decay=0.01)
    step = _load(work / "stage1.pt", {"visual": visual, "heads": heads, "opt": opt}) if resume else 0
    rng = np.random.default_rng([cfg.seed, 1, step])
    side = cfg.grid * cfg.cell
    visual.train()
    t0, log = time.time(), []
    batches = _prefetch(lambda: _stage1_batch(gen, rng, cfg.s1_batch))
    with MatmulPatchEmbed(visual):
        while step < cfg.s1_steps:
            boards, pix = next(batches)
            tokens = vision_tokens(visual, pix, cfg.s1_batch, side)
            loss, acc = heads(tokens, {k: torch.from_numpy(v) for k, v in gen.token_targets(boards).items()})
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg.s1_steps, cfg.s1_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            log.append([float(loss.detach()), acc["digit"]])
            if step % cfg.log_every == 0 or step == cfg.s1_steps:
                m = np.mean(log, 0)
                log = []
                test = _stage1_test(visual, heads, cfg, gen) if step % (cfg.log_every * 5) == 0 else {}
                _print(f"stage1 step {step} loss {m[0]:.3f} digit-acc {m[1]:.3f} test {test} "
                       f"{time.time() - t0:.0f}s")
            if step % cfg.ckpt_every == 0 or step == cfg.s1_steps:
                _save(work / "stage1.pt", step, {"visual": visual, "heads": heads, "opt": opt})
    visual.eval()


def _stage1_batch(gen: dd.BoardMaker, rng: np.random.Generator, n: int) -> tuple[dd.Boards, torch.Tensor]:
    boards = gen.boards(rng, n, frame=None, marks=0.5)
    return boards, torch.from_numpy(gen.pixels(gen.render(boards, rng, strong=True)))


def _prefetch(make: Any, depth: int = 2) -> Any:
    """Iterator over ``make()`` results produced ahead in a background thread (numpy releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work() -> None:
        while True:
            q.put(make())

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield q.get()


@torch.no_grad()
def _stage1_test(visual: nn.Module, heads: AuxHeads, cfg: TrainConfig, gen: dd.BoardMaker) -> dict:
    """Per-token accuracy of each aux head on test-split boards (task-like rendering)."""
    test = _test_maker(cfg)
    rng = np.random.default_rng(12345)
    boards = test.boards(rng, 64, frame=None, marks=0.5)
    pix = torch.from_numpy(test.pixels(test.render(boards, rng, strong=False)))
    visual.eval()
    with MatmulPatchEmbed(visual):
        tokens = vision_tokens(visual, pix, 64, cfg.grid * cfg.cell)
    visual.train()
    _, acc = heads(tokens, {k: torch.from_numpy(v) for k, v in test.token_targets(boards).items()})
    return {k: round(v, 3) for k, v in acc.items()}


# -------------------------------------------------------------------------------------------- helpers
_TEST: dict[tuple, dd.BoardMaker] = {}


def _test_maker(cfg: TrainConfig) -> dd.BoardMaker:
    """Task-like (mildly jittered) boards from the TEST digits, for monitoring only."""
    key = (cfg.grid, cfg.cell, cfg.frames)
    if key not in _TEST:
        _TEST[key] = dd.BoardMaker.for_split("test", *key, seed=cfg.seed, strong=False)
    return _TEST[key]


def _save(path: Path, step: int, objs: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, **{k: o.state_dict() for k, o in objs.items()}}, tmp)
    tmp.replace(path)


def _load(path: Path, objs: dict[str, Any]) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    for k, o in objs.items():
        o.load_state_dict(state[k])
    _print(f"resumed {path.name} at step {state['step']}")
    return int(state["step"])


def _print(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train(cfg: TrainConfig, resume: bool = False, stop_after: int = 2) -> Path:
    """Run the stages (skipping finished ones when resuming) and write the checkpoint directory."""
    from explainprune.tasks import digits_llm

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model, tok, proc = build_model(cfg)
    gen = dd.BoardMaker.for_split("train", cfg.grid, cfg.cell, cfg.frames, seed=cfg.seed)
    t0 = time.time()
    stage1(model, cfg, work, gen, resume)
    _print(f"stage 1 done in {time.time() - t0:.0f}s")
    if stop_after >= 2:
        digits_llm.stage2(model, tok, cfg, work, gen, resume)
        _print(f"stage 2 done, total {time.time() - t0:.0f}s")
    out = save_checkpoint_dir(model.eval(), tok, proc, cfg.out)
    _print(f"saved {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name == "kinds":
            p.add_argument("--kinds", nargs="+", default=list(f.default))
        else:
            p.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--stop-after", type=int, default=2, help="last stage to run (1 or 2)")
    args = vars(p.parse_args(argv))
    resume, stop = args.pop("resume"), args.pop("stop_after")
    args["kinds"] = tuple(args["kinds"])
    train(TrainConfig(**args), resume=resume, stop_after=stop)


if __name__ == "__main__":
    main()
