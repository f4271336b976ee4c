"""Media read as users' own loaders read them (issue 21, item 6): one helper (``explainprune.images``) behind
every image-reading path (manifests, conversation datasets, ``show``, the lmms-eval task), EXIF orientation
applied as ``transformers.image_utils.load_image`` applies it, 16-bit images scaled (not all white),
animated images refused with a message, extreme aspect ratios refused from the header before any model work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import explainprune.models
import explainprune.visualize
from explainprune.cli.main import main
from explainprune.cli.show import read_frames
from explainprune.conversations import ConversationSource, DatasetConfig
from explainprune.errors import InputError
from explainprune.images import MAX_ASPECT, check_image, open_image
from explainprune.integrations.lmms_eval import task as lmms_task
from explainprune.sources import ManifestSource
from hostile_media import animated_gif, gray16, png_bytes, rotated_jpeg


def _manifest(d: Path, rows: list[dict]) -> Path:
    path = d / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversation(d: Path, images: list, ids: list[str] | None = None) -> Path:
    rows = [{"id": (ids or [f"r{k}" for k in range(len(images))])[k], "image": im,
             "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "9"}]}
            for k, im in enumerate(images)]
    path = d / "data.json"
    path.write_text(json.dumps(rows))
    return path


def test_transformers_load_image_is_what_we_match(tmp_path):
    """The reference: transformers' own loader applies EXIF orientation, then RGB (it is the function named
    in the issue; its source is read, since importing it needs torchvision here)."""
    import inspect

    import transformers.image_utils as iu

    src = inspect.getsource(iu.load_image) if hasattr(iu, "load_image") else ""
    assert "exif_transpose" in src and 'convert("RGB")' in src


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    want = gray16(tmp_path / "g16.png")
    got = np.asarray(open_image(tmp_path / "g16.png"))
    assert got.shape == (*want.shape, 3) and (got == want[..., None]).all()
    assert got.min() == 0 and got.max() == 255 and 120 < got.mean() < 135  # a ramp, not all white
    man = ManifestSource(_manifest(tmp_path, [{"question": "q", "answer": "9", "image": "g16.png"}]))
    assert (np.asarray(man[0].images) == want[..., None]).all()  # before: every pixel 255


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    stored = rotated_jpeg(tmp_path / "phone.jpg", (60, 40))
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).convert("RGB")
    assert stored.size == (60, 40) and upright.size == (40, 60)

    def same(im):
        return im.size == (40, 60) and (np.asarray(im) == np.asarray(upright)).all()

    assert same(open_image(tmp_path / "phone.jpg"))
    assert check_image(tmp_path / "phone.jpg") == (40, 60)  # from the header alone
    assert same(open_image((tmp_path / "phone.jpg").read_bytes()))
    man = ManifestSource(_manifest(tmp_path, [{"question": "q", "answer": "9", "image": "phone.jpg"},
                                              {"question": "q", "answer": "9", "video": ["phone.jpg"] * 2}]))
    assert same(man[0].images) and all(same(f) for f in man[1].video)  # before: 60x40, sideways
    src = ConversationSource(DatasetConfig(str(_conversation(tmp_path, ["phone.jpg"]))))
    src.validate()
    assert same(src[0].images[0])
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0.jpg").write_bytes((tmp_path / "phone.jpg").read_bytes())
    assert all(same(f) for f in read_frames(tmp_path / "frames"))
    doc = {"image": "phone.jpg", "video_file": None}
    assert same(lmms_task.doc_to_visual(doc, tmp_path)[0])


def test_embedded_exif_bytes_in_parquet_are_upright(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rotated_jpeg(tmp_path / "phone.jpg", (60, 40))
    table = pa.table({"id": ["a"], "image": [{"bytes": (tmp_path / "phone.jpg").read_bytes(), "path": "phone.jpg"}],
                      "conversations": [[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "9"}]]})
    pq.write_table(table, tmp_path / "d.parquet")
    src = ConversationSource(DatasetConfig(str(tmp_path / "d.parquet")))
    assert src[0].images[0].size == (40, 60)


def test_animated_gif_as_an_image_is_refused_naming_the_file(tmp_path):
    animated_gif(tmp_path / "clip.gif")
    with pytest.raises(InputError, match=r"clip.gif is an animated GIF \(3 frames\), not one image; pass it as a "
                                         r"video"):
        open_image(tmp_path / "clip.gif")
    with pytest.raises(InputError, match=r"m.jsonl:1: sample g: .*clip.gif is an animated GIF.*pass it as a video"):
        ManifestSource(_manifest(tmp_path, [{"id": "g", "question": "q", "answer": "9", "image": "clip.gif"}]))
    man = ManifestSource(_manifest(tmp_path, [{"question": "q", "answer": "9", "video": "clip.gif"}]))
    assert len(man[0].video) == 3  # as a video: every frame
    with pytest.raises(InputError, match=r"data.json: sample r0: .*clip.gif is an animated GIF"):
        ConversationSource(DatasetConfig(str(_conversation(tmp_path, ["clip.gif"])))).validate()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "still.gif")
    assert open_image(tmp_path / "still.gif").size == (8, 8)  # a one-frame GIF is an image


def test_show_refuses_an_animated_image_before_loading(tmp_path, capsys, monkeypatch):
    animated_gif(tmp_path / "clip.gif")
    monkeypatch.setattr(explainprune.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["show", "--model", "demo", "--image", str(tmp_path / "clip.gif"), "--question", "what?",
                 "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clip.gif is an animated GIF (3 frames), not one image; pass it as a video" in err[0]


def test_show_reads_images_upright(tmp_path, monkeypatch):
    rotated_jpeg(tmp_path / "phone.jpg", (60, 40))
    seen = {}

    class Stop(Exception):
        pass

    def fake_show(vlm, question, images=None, **kw):
        seen["images"] = images
        raise Stop

    monkeypatch.setattr(explainprune.models, "load", lambda *a, **k: object())
    monkeypatch.setattr(explainprune.visualize, "show", fake_show)
    assert main(["show", "--model", "demo", "--image", str(tmp_path / "phone.jpg"), "--question", "what?",
                 "--out", str(tmp_path / "f.png")]) == 1
    assert [im.size for im in seen["images"]] == [(40, 60)]


def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    Image.new("RGB", (402, 2), "red").save(tmp_path / "strip.png")
    Image.new("RGB", (400, 2), "red").save(tmp_path / "ok.png")
    assert check_image(tmp_path / "ok.png") == (400, 2)  # 200: accepted
    with pytest.raises(InputError, match=rf"strip.png is 402x2 pixels: aspect ratio 201, above the {MAX_ASPECT}"):
        check_image(tmp_path / "strip.png")
    rows = [{"question": "q", "answer": "9", "image": "ok.png"}, {"id": "s", "question": "q", "answer": "9",
                                                                  "images": ["ok.png", "strip.png"]}]
    with pytest.raises(InputError, match=r"m.jsonl:2: sample s: .*strip.png is 402x2 pixels"):
        ManifestSource(_manifest(tmp_path, rows))
    man = ManifestSource(_manifest(tmp_path, rows), on_error="skip")
    assert man[0].images.size == (400, 2)
    with pytest.raises(InputError, match=r"m.jsonl:2: sample s: .*aspect ratio 201"):
        man[1]


def test_dataset_undecodable_image_is_an_input_error_that_skip_can_skip(tmp_path):
    from explainprune.labels import LabelConfig, label
    from test_label_errors import ImageVLM, NineLabeler

    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(png_bytes())
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    data = _conversation(tmp_path, ["0.png", "1.png", "2.png"])
    src = ConversationSource(DatasetConfig(str(data)))
    with pytest.raises(InputError, match=r"data.json: sample r1: cannot read .*1.png as an image"):
        src.validate()  # before any model work (before: UnidentifiedImageError when labelled, exit 1)
    with pytest.raises(InputError, match=r"data.json: sample r1: cannot read"):
        src[1]
    src = ConversationSource(DatasetConfig(str(data)))
    src.validate(on_error="skip")
    lab = NineLabeler()
    rep = label(ImageVLM(), src, tmp_path / "out", LabelConfig(shard_size=2), labeler=lab, progress=False,
                on_error="skip")
    assert rep.complete and rep.totals["skipped_error"] == 1 and lab.seen == ["r0", "r2"]
    assert [(e["id"], e["error"][:40]) for e in rep.errors] == [("r1", f"cannot read {tmp_path / '1.png'}"[:40])]


def test_dataset_embedded_bytes_damaged_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = png_bytes()
    table = pa.table({"id": ["a", "b"], "image": [{"bytes": good, "path": None},
                                                  {"bytes": good[: len(good) // 2], "path": None}],
                      "conversations": [[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "9"}]] * 2})
    pq.write_table(table, tmp_path / "d.parquet")
    src = ConversationSource(DatasetConfig(str(tmp_path / "d.parquet")))
    src.validate()  # parquet bytes are left lazy: checked when read
    assert src[0].images[0].size == (16, 16)
    with pytest.raises(InputError, match=r"d.parquet: sample b: cannot read the embedded image of row b as an "
                                         r"image \(UnidentifiedImageError: cannot identify image file\)"):
        src[1]
