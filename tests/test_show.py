"""Relevance pictures (Figure 2 style) and `explainprune show`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from explainprune.cli.main import main
from explainprune.testing import write_video
from explainprune.visualize import _upsample, frame_pictures, relevance_figure, token_map

pytestmark = pytest.mark.parametrize("family", ["qwen2_vl"])


def test_figure_size_and_whitened_pruned_tokens(vlm, family, tmp_path):
    img = Image.new("RGB", (112, 112), (200, 30, 30))  # square: panels are 2.4 x 2.4 in (+ 0.25 title)
    prompt = vlm.prepare(images=img, question="what is in the picture")
    scores = torch.arange(prompt.num_visual, dtype=torch.float32)
    pic = relevance_figure(prompt, scores, 0.25, tmp_path / "one.png")
    with Image.open(pic.path) as png:
        assert png.size == (pic.width, pic.height) == (480, 315)  # 2 panels x 2.4 in; 2.65 + 0.5 in, 100 dpi
    two = relevance_figure(prompt, scores, 0.5, tmp_path / "two.png", predicted=lambda p: -scores)
    assert (two.width, two.height) == (480, 580)
    with Image.open(two.path) as png:
        px = np.asarray(png.convert("RGB"))
    # kept panel of row 1 keeps the high-index (bottom) tokens: its top half is white, its bottom red
    right = px[60:300, 250:470]
    assert (right[20:60] > 250).all() and (right[-60:-20, :, 1] < 100).mean() > 0.9
    with pytest.raises(ValueError, match="visual tokens"):
        relevance_figure(prompt, scores[:-1], 0.25, tmp_path / "bad.png")


def test_token_map_and_frames(vlm, family, frames):
    prompt = vlm.prepare(video=frames, question="what happens")  # 4 frames -> 2 temporal grid frames
    values = torch.arange(prompt.num_visual, dtype=torch.float32)
    f, rows, cols = prompt.grid_shape
    assert f == 2
    m = token_map(prompt, values, 1)
    assert m.shape == (rows, cols) and m[0, 0] == rows * cols and m[-1, -1] == 2 * rows * cols - 1
    pics = frame_pictures(prompt)
    assert pics[0] is frames[0] and pics[1] is frames[2]
    up = _upsample(np.array([[0, 1], [2, 3]]), 4, 6)
    assert up.tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2


def test_cli_show_image_json(tiny_dirs, family, image, tmp_path, capsys):
    image.save(tmp_path / "im.png")
    out = tmp_path / "fig.png"
    rc = main(["show", "--model", str(tiny_dirs(family)), "--image", str(tmp_path / "im.png"), "--question",
               "what is in the picture", "--answer", "blank system", "--ratio", "0.5", "--out", str(out),
               "--compare", "uniform", "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["answer"] == "blank system" and info["predicted_label"] == "uniform"
    assert len(info["kept"]) == -(-info["visual_tokens"] // 2)
    with Image.open(out) as png:
        assert png.size == (info["width"], info["height"])


def test_cli_show_video_dir_and_compressor(tiny_dirs, load_tiny, family, frames, tmp_path, capsys):
    from explainprune.compressor import Compressor

    for i, f in enumerate(frames):
        f.save(tmp_path / f"frame{i:02d}.png")
    vlm = load_tiny(family)
    comp = Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(4,))
    comp.save_pretrained(tmp_path / "comp")
    out = tmp_path / "video.png"
    rc = main(["show", "--model", str(tiny_dirs(family)), "--video", str(tmp_path), "--question", "what happens",
               "--max-new-tokens", "2", "--compressor", str(tmp_path / "comp"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and out.is_file()
    with Image.open(out) as png:
        assert png.size[0] == 2 * 240  # two temporal frames, one column each


def test_cli_show_errors(tiny_dirs, family, tmp_path, capsys):
    assert main(["show", "--model", str(tiny_dirs(family)), "--question", "q"]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["show", "--model", str(tiny_dirs(family)), "--image", str(tmp_path / "no.png"),
                 "--question", "q"]) == 2


def test_pictures_as_the_model_sees_them(load_tiny, family, vlm):
    from explainprune.testing import random_image
    from explainprune.visualize import as_seen

    wide = random_image(0, (112, 168))  # height 112, width 168
    clip = load_tiny("llava").image_processor  # resize shortest edge to 112, centre crop 112 x 112
    crop = as_seen(wide, clip)
    assert crop.size == (112, 112)
    assert np.array_equal(np.asarray(crop), np.asarray(wide)[:, 28:140])
    assert as_seen(wide, vlm.image_processor) is wide  # Qwen sees the whole (resized) picture


def test_read_frames_from_a_video_file(family, tmp_path):
    pytest.importorskip("av")
    from explainprune.cli.show import read_frames

    path = write_video(tmp_path / "v.mp4", lambda i: np.full((112, 112, 3), i * 20, dtype=np.uint8), 12, 4)
    frames = read_frames(path, 4)  # frames 0, 3, 6, 9 of 12
    assert [f.size for f in frames] == [(112, 112)] * 4
    assert [round(float(np.asarray(f).mean()) / 20) for f in frames] == [0, 3, 6, 9]
