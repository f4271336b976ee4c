"""The demo model's training recipe (recipes/digits): renderer vs image processor, pickle-free checkpoints
and banks, questions at every size, the module graph (no cycles, not imported by the library)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from recipes.digits import questions as dq
from recipes.digits.common import TrainConfig, load_state, save_state
from recipes.digits.data import BoardMaker
from recipes.digits.train import parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grid,frame", [(4, 0), (8, 13)])
def test_training_renderer_matches_the_image_processor(grid, frame):
    from transformers import Qwen2VLImageProcessorPil

    from explainprune.tasks.digits import to_pil

    maker = BoardMaker.for_split("test", grid, 56, 16, strong=False)
    rng = np.random.default_rng(0)
    imgs = maker.render(maker.boards(rng, 2, frame=frame), rng)
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1024)
    ref = proc(images=[to_pil(im) for im in imgs], return_tensors="np")["pixel_values"]
    assert np.allclose(maker.pixels(imgs), ref, atol=1e-5)


def test_checkpoint_round_trip_is_safetensors_with_optimizer_state(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "s.safetensors"
    save_state(path, 7, {"net": net, "opt": opt})
    with safe_open(str(path), "pt") as fh:  # a plain safetensors file: no pickle anywhere
        assert fh.metadata()["step"] == "7"
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=5.0)
    assert load_state(path, {"net": net2, "opt": opt2}) == 7
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(s1["state"][0]["exp_avg"], s2["state"][0]["exp_avg"])
    assert load_state(tmp_path / "absent.safetensors", {"net": net2}) == 0
    torch.save({"step": 1, "evil": object()}, tmp_path / "pickled.safetensors")  # needs unpickling: refused
    with pytest.raises(Exception):  # noqa: B017 (safetensors raises its own error type)
        load_state(tmp_path / "pickled.safetensors", {"net": net2})


def _fake_banks(grids=(3, 8), frames=3, n=5) -> dq.Banks:
    maker = BoardMaker.for_split("test", 4, 56, frames, strong=False)
    rng = np.random.default_rng(1)
    still = {}
    for g in grids:
        bd = maker.resized(g).boards(rng, n, frame=0, marks=1.0)
        still[g] = dq.Bank(torch.randn(n, 4 * g * g, 8).half(), bd)
    video = [dq.Bank(torch.randn(n, 64, 8).half(), maker.boards(rng, n, frame=f, marks=0.0)) for f in range(frames)]
    return dq.Banks(still, video)


def test_banks_round_trip(tmp_path):
    banks = _fake_banks()
    banks.save(tmp_path / "b.safetensors")
    back = dq.Banks.load(tmp_path / "b.safetensors")
    assert list(back.still) == [3, 8] and len(back.video) == 3
    assert torch.equal(back.still[8].feats, banks.still[8].feats)
    assert np.array_equal(back.video[2].boards.digit, banks.video[2].boards.digit)
    assert np.array_equal(back.still[3].boards.marks, banks.still[3].boards.marks)


def test_questions_regions_at_every_size():
    banks = _fake_banks()
    rng = np.random.default_rng(0)
    q, a, f, reg, side = dq.draw_questions("rowcol", banks, 4, rng, 8)
    assert side == 16 and f.shape[1] == 256 and reg.shape == (4, 256)
    for text, m in zip(q, reg):
        r, c = (int(w) - 1 for w in text.split() if w.isdigit())
        mask = m.view(16, 16)
        assert mask.sum() == 4 and mask[2 * r:2 * r + 2, 2 * c:2 * c + 2].all()
    q, a, f, reg, side = dq.draw_questions("video", banks, 4, rng, 3)
    assert f.shape[1] == 3 * 64
    for text, m in zip(q, reg):
        frame = int(text.split()[2]) - 1
        assert m.view(3, 8, 8)[frame].sum() == 4 and m.sum() == 4
    q, a, f, reg, side = dq.draw_questions("count", banks, 4, rng, 3)
    assert all(int(ans) * 4 == int(m.sum()) for ans, m in zip(a, reg))
    assert dq.sizes_of("video", banks, (2, 3, 16)) == [2, 3]


def test_cli_parses_tuples_into_the_config():
    cfg, extra = parse(["--grids", "3", "8", "--frames", "2", "16", "--resume", "--kinds", "rowcol"])
    assert cfg.grids == (3, 8) and cfg.frames == (2, 16) and cfg.kinds == ("rowcol",) and extra.resume
    assert TrainConfig(grids=(3, 8), frames=(2, 16)).max_index == 16


def _recipe_imports(path: Path) -> set[str]:
    """Recipe modules a file imports (``from recipes.digits import x`` / ``from recipes.digits.x import``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recipes.digits"):
            tail = node.module.split(".")[2:]
            out |= set(tail) if tail else {a.name for a in node.names}
    return out


def test_recipe_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _recipe_imports(p) for p in (ROOT / "recipes" / "digits").glob("*.py") if p.stem != "__init__"}
    assert set(graph) >= {"common", "data", "stage1", "questions", "ground", "stage2", "train"}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle {path + (m,)}"
        if m not in done:
            for dep in graph[m]:
                visit(dep, path + (m,))
            done.add(m)

    for m in graph:
        visit(m, ())


def test_library_does_not_import_the_recipe():
    src = ROOT / "src" / "explainprune"
    offenders = [p for p in src.rglob("*.py") if "recipes" in p.read_text() and "import recipes" in p.read_text()]
    assert not offenders
    assert importlib.util.find_spec("explainprune.tasks.digits_train") is None


@pytest.mark.parametrize("kind,size", [("rowcol", 3), ("video", 5)])
def test_training_sequences_equal_the_adapters_prompt(kind, size):
    """The ids and M-RoPE positions stage 2 trains on are the ones the Qwen2VL adapter builds at eval."""
    from explainprune.models.qwen2_vl import Qwen2VL
    from explainprune.tasks.digits import DigitsTask

    demo = ROOT / "src" / "explainprune" / "assets" / "demo"
    vlm = Qwen2VL.from_pretrained(demo)
    opts = {"frames": size} if kind == "video" else {"grid": size}
    s = DigitsTask("test", n=1, kinds=(kind,), **opts).sample(0)
    prompt = vlm.prepare(question=s.question, **s.media())
    n_vis = prompt.num_visual
    side = 8 if kind == "video" else 2 * size
    enc = dq.encode(vlm.model, vlm.tokenizer, kind, [s.question], [s.answer], torch.zeros(1, n_vis, 128), side)
    ids = prompt.input_ids[0]
    assert torch.equal(enc["ids"][0, : ids.numel()], ids)  # the prompt, then the answer and <|im_end|>
    assert enc["ids"].shape[1] == ids.numel() + 2 and vlm.tokenizer.decode(enc["targets"][0, 1]) == "<|im_end|>"
    assert torch.equal(enc["pos"][:, 0, : ids.numel()], prompt.position_ids[:, 0])
    assert enc["sink"] == int(prompt.visual_pos[0]) - 1


def test_stage_batches_follow_the_token_budget():
    from recipes.digits.stage1 import batch_size
    from recipes.digits.stage2 import draw_step

    assert batch_size(4, 56, 2048) == 32 and batch_size(8, 56, 2048) == 8 and batch_size(8, 56, 100) == 2
    banks, cfg = _fake_banks(), TrainConfig(s2_tokens=512, s2_max_batch=16, frames=(2, 3))
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(20):
        size, drawn = draw_step("rowcol", banks, cfg, rng)
        seen[size] = len(drawn[0])
        vsize, vdrawn = draw_step("video", banks, cfg, rng)
        assert vsize in (2, 3) and len(vdrawn[0]) == 512 // (64 * vsize)
    assert seen == {3: 14, 8: 2}
