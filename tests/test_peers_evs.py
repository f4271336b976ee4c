"""EVS against a literal reading of vLLM's ``compute_retention_mask`` (vllm/multimodal/evs.py), on every family
with video input; the image-only refusal and the n/a rows of a mixed evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explainprune import get_pruner
from explainprune.errors import NotApplicable
from explainprune.pruning.evs import evs_mask, retained_count
from explainprune.testing import random_image

QUESTION = "in frame 2 what digit is in row 1 column 2 ?"
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision")


def reference_keep(features: torch.Tensor, where: dict[tuple[int, int, int], int], n_visual: int,
                   ratio: float) -> list[int]:
    """vLLM's rule, token by token: frame 0 scores 255, a later token 1 - cos with the same (row, col) one
    frame earlier; rank by score (high first), ties by (t, h, w); keep max(H*W, int(T*H*W*(1 - q))), q = 1 - r.
    ``where``: (t, h, w) -> visual index of each on-grid video token; every other visual token is kept."""
    frames = sorted({t for t, _, _ in where})
    places = sorted({(h, w) for _, h, w in where})
    scored = []
    for t in frames:
        for h, w in places:
            i = where[(t, h, w)]
            if t == frames[0]:
                s = 255.0
            else:
                a, b = features[i].double(), features[where[(t - 1, h, w)]].double()
                s = 1.0 - float(a @ b / (a.norm() * b.norm()))
            scored.append((-s, t, h, w, i))
    budget = max(len(places), int(len(scored) * (1 - (1 - ratio))))
    video_kept = {i for *_, i in sorted(scored)[:budget]}
    return sorted(video_kept | (set(range(n_visual)) - set(where.values())))


def grid_map(vlm, p) -> dict[tuple[int, int, int], int]:
    token = getattr(vlm.config, "video_token_id", None) or getattr(vlm.config, "video_token_index", None)
    ids = p.input_ids[0, p.visual_pos]
    return {tuple(p.visual_grid[i].tolist()): i for i in range(p.num_visual)
            if int(ids[i]) == token and int(p.visual_grid[i, 1]) >= 0}


@pytest.mark.parametrize("fam", VIDEO_FAMILIES)
def test_evs_equals_the_literal_rule(load_tiny, frames, fam):
    vlm = load_tiny(fam)
    # frames that repeat in part, so some places barely change and others do
    clip = [frames[0], frames[0], frames[1], frames[1], frames[2], frames[1], frames[3], frames[3]]
    p = vlm.prepare(video=clip, question=QUESTION)
    where = grid_map(vlm, p)
    assert len({t for t, _, _ in where}) >= 2
    feats = p.inputs_embeds[0, p.visual_pos].float()
    for ratio in (0.5, 0.3, 0.1):
        keep = get_pruner("evs").keep(vlm, p, ratio)
        assert keep.tolist() == reference_keep(feats, where, p.num_visual, ratio), ratio
    assert torch.equal(get_pruner("evs").keep(vlm, p, np.float32(0.5)), get_pruner("evs").keep(vlm, p, 0.5))


def test_evs_mask_hand_made():
    # T=3, H=1, W=2: place 0 never changes, place 1 changes every frame
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    video = torch.stack([torch.stack([a, a]), torch.stack([a, b]), torch.stack([a, c])])[:, None]  # [3, 1, 2, 2]
    assert evs_mask(video, 0.5).tolist() == [True, True, False, True, False, False]  # int(6 * .5) = 3
    assert evs_mask(video, 0.1).tolist() == [True, True, False, False, False, False]  # at least one frame
    assert evs_mask(video, 1.0).all()
    assert retained_count(2, 3, 0.5) == 3 and retained_count(10, 10, 0.1) == 10
    assert retained_count(100, 10, 0.3) == int(1000 * (1 - (1 - 0.3)))  # vLLM's float floor: 299, not 300


def test_evs_refuses_images_alone_and_llava(load_tiny, frames):
    vlm = load_tiny("qwen2_vl")
    image = vlm.prepare(images=random_image(0), question=QUESTION)
    with pytest.raises(NotApplicable, match="evs prunes videos only"):
        get_pruner("evs").keep(vlm, image, 0.5)
    with pytest.raises(NotApplicable, match="evs prunes videos only"):
        get_pruner("evs").generate(vlm, image, 0.5, max_new_tokens=2)
    llava = load_tiny("llava")
    with pytest.raises(ValueError, match="evs needs a model with video input"):
        get_pruner("evs").keep(llava, llava.prepare(video=frames, question=QUESTION), 0.5)


def test_evs_keeps_the_images_of_a_mixed_prompt(load_tiny, frames):
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=random_image(1, (56, 56)), video=frames, question=QUESTION)
    is_video = p.input_ids[0, p.visual_pos] == vlm.config.video_token_id
    keep = get_pruner("evs").keep(vlm, p, 0.25)
    images = torch.nonzero(~is_video).flatten()
    assert set(images.tolist()) <= set(keep.tolist())
    n_video = int(is_video.sum())
    assert len(keep) == len(images) + max(n_video // 2, int(n_video * (1 - (1 - 0.25))))  # T = 2 temporal tokens
    out = get_pruner("evs").generate(vlm, p, 0.25, max_new_tokens=3)
    assert out.visual_tokens == len(keep) and out.token_ids == vlm.generate(p, keep=keep, max_new_tokens=3).token_ids
    assert math.isclose(get_pruner("evs").overhead_flops(64, 10, [4]), 3 * 10 * 64)


def test_cli_refuses_evs_on_an_image_alone(tiny_dirs, tmp_path, capsys):
    """Asked alone on an image (``explainprune show --compare evs``): one error line, exit 2, no figure."""
    from explainprune.cli.main import main

    random_image(0).save(tmp_path / "im.png")
    out = tmp_path / "fig.png"
    rc = main(["show", "--model", str(tiny_dirs("qwen2_vl")), "--image", str(tmp_path / "im.png"), "--question",
               QUESTION, "--answer", "x", "--out", str(out), "--compare", "evs"])
    err = capsys.readouterr().err
    assert rc == 2 and "explainprune show: error: evs prunes videos only" in err and "Traceback" not in err
    assert not out.exists()
