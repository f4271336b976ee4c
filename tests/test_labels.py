"""Label datasets: content, skipping wrong answers, resume after a crash, rank sharding (env and torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from explainprune.labels import (
    LabelConfig,
    LabelOutput,
    answers_match,
    label,
    load_records,
    read_index,
    read_table,
    region_indices,
)
from explainprune.models.base import Prompt
from explainprune.sources import LabelSample, ManifestSource

FP = {"model_type": "fake", "num_hidden_layers": 2, "num_attention_heads": 3, "hidden_size": 8}
TESTS = Path(__file__).resolve().parent


class FakeVLM:
    """Just enough of a VLM for the label loop: prepare() builds a Prompt with a (rows x cols) grid."""

    def fingerprint(self):
        return dict(FP)

    def prepare(self, images=None, video=None, question=""):
        frames, rows, cols = images
        n = frames * rows * cols
        grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols),
                                          indexing="ij"), -1).reshape(-1, 3)
        length = n + 4
        return Prompt(input_ids=torch.zeros(1, length, dtype=torch.long), inputs_embeds=torch.zeros(1, length, 8),
                      position_ids=torch.arange(length)[None], attention_mask=torch.ones(1, length, dtype=torch.long),
                      visual_pos=torch.arange(1, n + 1), visual_grid=grid, instruction=(n + 1, length),
                      question=question)


class SyntheticSource:
    """n samples of varying grid size; every third one is answered wrongly by ``synthetic_labeler``."""

    def __init__(self, n: int = 10):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        shape = (1 + i % 2, 2 + i % 3, 3)
        return LabelSample(f"s{i:03d}", f"question {i}", str(i % 10), images=shape,
                           region=[(0, 1, c) for c in range(3)], meta={"kind": "video" if i % 2 else "image"})

    def describe(self):
        return {"task": "synthetic", "n": self.n}


class synthetic_labeler:  # noqa: N801 - used like a function
    """Deterministic A_v^0 / R_v from the sample id; raises after ``crash_after`` calls when set."""

    def __init__(self, crash_after: int | None = None):
        self.calls, self.crash_after = 0, crash_after

    def __call__(self, vlm, prompt, sample):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        seed = zlib.crc32(sample.id.encode())
        if seed % 3 == 0:
            return LabelOutput("wrong", [7], False)
        g = torch.Generator().manual_seed(seed)
        n = prompt.num_visual
        return LabelOutput(sample.answer, [1, 2], True, torch.rand(3, n, generator=g), torch.rand(n, generator=g))


def _expected_wrong(n):
    return [f"s{i:03d}" for i in range(n) if zlib.crc32(f"s{i:03d}".encode()) % 3 == 0]


def test_answers_match():
    assert answers_match(" Seven. ", "seven") and answers_match("3", ["4", "3"])
    assert not answers_match("13", "3")


def test_label_content_and_skips(tmp_path):
    lab = synthetic_labeler()
    rep = label(FakeVLM(), SyntheticSource(10), tmp_path, LabelConfig(shard_size=3), labeler=lab, progress=False)
    wrong = _expected_wrong(10)
    assert rep.complete and rep.shards_written == 4 and lab.calls == 10
    assert rep.totals == {"samples": 10, "labeled": 10 - len(wrong), "skipped_wrong": len(wrong),
                          "wrong": len(wrong), "skipped_error": 0,
                          "by_rule": {"exact": {"judged": 10, "correct": 10 - len(wrong)}}}
    index = read_index(tmp_path)
    assert index["fingerprint"] == FP and len(index["shards"]) == 4
    t = read_table(tmp_path).to_pydict()
    assert set(t["id"]).isdisjoint(wrong) and len(t["id"]) == 10 - len(wrong)
    assert t["index"] == sorted(t["index"])
    recs = load_records(tmp_path)
    for r, i in zip(recs, t["index"], strict=True):
        s = SyntheticSource(10)[i]
        out = synthetic_labeler()(FakeVLM(), FakeVLM().prepare(s.images), s)
        torch.testing.assert_close(r.attention, out.attention, rtol=0, atol=0)
        torch.testing.assert_close(r.relevance, out.relevance, rtol=0, atol=0)
        assert r.region == [3, 4, 5]  # (0, 1, c) in a row-major 3-column grid
        assert r.kind == s.meta["kind"]
    assert t["grid_shape"][0] == [1, 2, 3] and json.loads(t["model"][0]) == FP
    assert not list(tmp_path.rglob(".*tmp*"))


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    cfg = LabelConfig(shard_size=3)
    ref = tmp_path / "ref"
    label(FakeVLM(), SyntheticSource(10), ref, cfg, labeler=synthetic_labeler(), progress=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        label(FakeVLM(), SyntheticSource(10), out, cfg, labeler=synthetic_labeler(crash_after=7), progress=False)
    assert not (out / "index.json").exists()
    (out / "shards" / ".00002.parquet.tmp-999").write_bytes(b"half a file")  # killed while writing
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    again = synthetic_labeler()
    rep = label(FakeVLM(), SyntheticSource(10), out, cfg, labeler=again, progress=False)
    assert again.calls == 4 and rep.shards_reused == 2 and rep.complete  # only the unfinished shards
    assert read_table(out).equals(read_table(ref))
    assert read_index(out) == read_index(ref)
    assert not list(out.rglob(".*tmp*"))
    for p in (ref / "shards").glob("*.parquet"):
        assert p.read_bytes() == (out / "shards" / p.name).read_bytes()
    # a finished dataset: rerunning does nothing
    idle = synthetic_labeler()
    label(FakeVLM(), SyntheticSource(10), out, cfg, labeler=idle, progress=False)
    assert idle.calls == 0


def test_other_run_in_same_dir_is_refused(tmp_path):
    label(FakeVLM(), SyntheticSource(4), tmp_path, labeler=synthetic_labeler(), progress=False)
    with pytest.raises(ValueError, match="different run.*samples"):
        label(FakeVLM(), SyntheticSource(5), tmp_path, labeler=synthetic_labeler(), progress=False)


def test_env_ranks_merge_to_single_process(tmp_path, monkeypatch):
    cfg = LabelConfig(shard_size=2)
    label(FakeVLM(), SyntheticSource(11), tmp_path / "one", cfg, labeler=synthetic_labeler(), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    calls = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        lab = synthetic_labeler()
        rep = label(FakeVLM(), SyntheticSource(11), tmp_path / "two", cfg, labeler=lab, progress=False)
        calls.append(lab.calls)
        assert rep.complete == (rank == 0)  # the last rank to finish writes the index
    assert calls == [5, 6]  # rank 1: shards 1, 3, 5 (2+2+1 samples); rank 0: shards 0, 2, 4
    assert read_table(tmp_path / "two").equals(read_table(tmp_path / "one"))


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_labels import FakeVLM, SyntheticSource, synthetic_labeler
from explainprune.labels import LabelConfig, label
rep = label(FakeVLM(), SyntheticSource(11), sys.argv[1], LabelConfig(shard_size=2), labeler=synthetic_labeler(),
            progress=False)
with open(f"{{sys.argv[2]}}-{{rep.rank}}.txt", "w") as fh:  # not stdout: the ranks' prints interleave
    fh.write(f"{{rep.rank}} {{rep.world_size}} {{rep.shards_written}} {{rep.complete}}")
"""


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    script = tmp_path / "run_label.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "two"),
                           str(tmp_path / "report")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [(tmp_path / f"report-{r}.txt").read_text().split() for r in (0, 1)]
    assert reports == [["0", "2", "3", "True"], ["1", "2", "3", "True"]]
    label(FakeVLM(), SyntheticSource(11), tmp_path / "one", LabelConfig(shard_size=2), labeler=synthetic_labeler(),
          progress=False)
    assert read_table(tmp_path / "two").equals(read_table(tmp_path / "one"))
    assert read_index(tmp_path / "two") == read_index(tmp_path / "one")


def test_region_indices():
    grid = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [0, -1, -1]])
    assert region_indices([(1, 0, 1), (0, 0, 0)], grid) == [0, 3]
    assert region_indices(None, grid) is None


def test_digits_regions_on_a_real_prompt(tmp_path, load_tiny):
    pytest.importorskip("explainprune.tasks.digits")
    from explainprune.sources import DigitsSource

    vlm = load_tiny("qwen2_vl")
    src = DigitsSource(split="train", n=4, seed=3, grid=2, kinds=("rowcol", "video"), frames=2)
    for i in range(2):
        s = src[i]
        prompt = vlm.prepare(images=s.images, video=s.video, question=s.question)
        idx = region_indices(s.region, prompt.visual_grid)
        assert len(idx) == len(s.region) > 0
        assert {tuple(c) for c in prompt.visual_grid[idx].tolist()} == set(s.region)
    # manifest export of the same task reads back as the same samples
    src.task.export(tmp_path, n=2)
    man = ManifestSource(tmp_path / "manifest.jsonl")
    for i in range(2):
        a, b = src[i], man[i]
        assert (a.id, a.question, a.answer, a.region, a.meta) == (b.id, b.question, b.answer, b.region, b.meta)


def test_default_labeler_on_a_tiny_model(tmp_path, load_tiny, image):
    pytest.importorskip("explainprune.relevance")
    pytest.importorskip("explainprune.attention")
    from explainprune.labels import default_labeler

    vlm = load_tiny("qwen2_vl")
    prompt = vlm.prepare(images=image, question="what digit is in row 1 , column 2 ?")
    text = vlm.generate(prompt, max_new_tokens=3).text

    class One:
        def __len__(self):
            return 2

        def __getitem__(self, i):  # sample 0 is answered as the model does, sample 1 never
            return LabelSample(f"x{i}", prompt.question, text if i == 0 else "#never#", images=image)

        def describe(self):
            return {"task": "one"}

    lab = default_labeler(max_new_tokens=3)
    rep = label(vlm, One(), tmp_path, LabelConfig(max_new_tokens=3), labeler=lab, progress=False)
    assert rep.totals["labeled"] + rep.totals["skipped_wrong"] == 2 and rep.totals["skipped_wrong"] >= 1
    # --keep-wrong stores the wrongly answered sample too (R_v of the model's own answer), flagged
    rep = label(vlm, One(), tmp_path / "all", LabelConfig(max_new_tokens=3, keep_wrong=True), progress=False)
    assert rep.totals["labeled"] == 2 and rep.totals["skipped_wrong"] == 0 and rep.totals["wrong"] >= 1
    assert read_table(tmp_path / "all").column("correct").to_pylist()[1] is False
    if rep.totals["labeled"]:
        r = load_records(tmp_path)[0]
        assert r.attention.shape == (vlm.text_config.num_attention_heads, prompt.num_visual)
        assert r.relevance.shape == (prompt.num_visual,)


def test_head_chunked_labels_equal_default(tmp_path, load_tiny, image):
    vlm = load_tiny("qwen2_vl")
    prompt = vlm.prepare(images=image, question="what digit is in row 1 , column 2 ?")

    class Two:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return LabelSample(f"x{i}", prompt.question, "#never#", images=image)

        def describe(self):
            return {"task": "two"}

    base = label(vlm, Two(), tmp_path / "a", LabelConfig(max_new_tokens=2, keep_wrong=True), progress=False)
    chunked = label(vlm, Two(), tmp_path / "b", LabelConfig(max_new_tokens=2, keep_wrong=True, head_chunk=1),
                    progress=False)
    assert base.totals["labeled"] == chunked.totals["labeled"] == 2
    for ra, rb in zip(load_records(tmp_path / "a"), load_records(tmp_path / "b"), strict=True):
        torch.testing.assert_close(rb.relevance, ra.relevance, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rb.attention, ra.attention, rtol=0, atol=0)
    assert "head_chunk" not in json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["head_chunk"] == 1
