"""Loading ahead (explainprune.prefetch) and its use by label and eval: same results in the same order,
loading really overlaps the consumer's work, errors reach the consumer at their turn with the key named."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from explainprune.labels import LabelConfig, LabelOutput, label, read_table
from explainprune.prefetch import prefetch
from explainprune.sources import LabelSample
from explainprune.testing import random_image


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "explainprune-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_keeps_order_and_values(depth):
    rng = random.Random(depth)
    delays = [rng.random() * 0.004 for _ in range(30)]

    def load(k):
        time.sleep(delays[k])
        return k * k

    got = [(item.key, item.result()) for item in prefetch(load, range(30), depth)]
    assert got == [(k, k * k) for k in range(30)]
    assert not _loader_threads()


def test_prefetch_loads_ahead_while_the_consumer_works():
    """The consumer, holding key 0, waits for key 1 to be loaded: only a background loader can do that."""
    loaded_1 = threading.Event()

    def load(k):
        if k == 1:
            loaded_1.set()
        return k

    items = prefetch(load, range(3), depth=1)
    assert next(items).key == 0
    assert loaded_1.wait(5), "key 1 was not loaded while key 0 was being used"
    assert [i.result() for i in items] == [1, 2]
    inline = prefetch(load, range(3), depth=0)
    loaded_1.clear()
    next(inline)
    assert not loaded_1.is_set()  # depth 0: nothing runs ahead


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetch_error_reaches_the_consumer_at_its_turn(depth):
    def load(k):
        if k == 2:
            raise KeyError(f"broken {k}")
        return k

    items = prefetch(load, range(5), depth)
    assert [next(items).result() for _ in range(2)] == [0, 1]
    with pytest.raises(KeyError, match="broken 2") as info:
        next(items).result()
    assert any("'sample' 2" in note or "sample 2" in note for note in getattr(info.value, "__notes__", []))
    assert [i.result() for i in items] == [3, 4]  # one failing key does not stop the others


def test_prefetch_close_stops_the_thread_and_key_errors_propagate():
    started = []

    def load(k):
        started.append(k)
        return k

    items = prefetch(load, range(1000), depth=2)
    next(items)
    items.close()
    assert not _loader_threads() and len(started) < 10

    def keys():
        yield 1
        raise RuntimeError("the key list broke")

    it = prefetch(lambda k: k, keys(), depth=2)
    assert next(it).result() == 1
    with pytest.raises(RuntimeError, match="key list broke"):
        next(it)
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(lambda k: k, [1], depth=-1))


class Samples:
    """A small image source that records when each sample is read."""

    def __init__(self, n: int = 4):
        self.n, self.read = n, {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.setdefault(i, threading.Event()).set()
        return LabelSample(f"s{i}", "what digit is in row 1 , column 2 ?", "7", images=random_image(i, (56, 84)))

    def describe(self):
        return {"task": "custom", "n": self.n}

    def was_read(self, i):
        return self.read.setdefault(i, threading.Event())


def test_label_prepares_the_next_sample_while_labelling(load_tiny, tmp_path, monkeypatch):
    vlm = load_tiny("qwen2_vl")
    source = Samples(3)
    prepared = {}
    original = vlm.prepare

    def prepare(**kwargs):
        prompt = original(**kwargs)
        prepared.setdefault(kwargs["images"].tobytes()[:64], threading.Event()).set()
        return prompt

    monkeypatch.setattr(vlm, "prepare", prepare)

    def labeler(vlm_, prompt, sample):
        nxt = int(sample.id[1:]) + 1
        if nxt < len(source):  # the next sample is read AND prepared while this one is labelled
            assert source.was_read(nxt).wait(5)
            key = random_image(nxt, (56, 84)).tobytes()[:64]
            deadline = time.time() + 5
            while key not in prepared and time.time() < deadline:
                time.sleep(0.01)
            assert key in prepared and prepared[key].wait(5)
        return LabelOutput("x", [1], False)

    rep = label(vlm, source, tmp_path / "a", LabelConfig(shard_size=2), labeler=labeler, progress=False)
    assert rep.complete and rep.skipped_wrong == 3 and not _loader_threads()


def test_label_results_are_the_same_with_and_without_prefetch(load_tiny, tmp_path):
    vlm = load_tiny("qwen2_vl")
    config = LabelConfig(shard_size=2, keep_wrong=True, max_new_tokens=2)
    label(vlm, Samples(3), tmp_path / "ahead", config, progress=False, prefetch=2)
    label(vlm, Samples(3), tmp_path / "inline", config, progress=False, prefetch=0)
    a, b = read_table(tmp_path / "ahead"), read_table(tmp_path / "inline")
    assert a.num_rows == 3 and a.equals(b)


def test_label_error_while_loading_names_the_sample_and_keeps_finished_shards(load_tiny, tmp_path):
    vlm = load_tiny("qwen2_vl")

    class Broken(Samples):
        def __getitem__(self, i):
            if i == 3:
                raise OSError("cannot read image 3.png")
            return super().__getitem__(i)

    with pytest.raises(OSError, match="3.png") as info:
        label(vlm, Broken(4), tmp_path / "b", LabelConfig(shard_size=2, keep_wrong=True, max_new_tokens=1),
              progress=False)
    assert any("sample index 3" in n for n in getattr(info.value, "__notes__", []))
    assert (tmp_path / "b" / "shards" / "00000.parquet").is_file()  # the shard before the error is kept
    assert not _loader_threads()


def test_eval_reads_the_next_sample_during_the_model_runs(load_tiny, monkeypatch):
    from explainprune.evaluation.runner import EvalConfig, run_eval

    vlm = load_tiny("qwen2_vl")
    samples = Samples(2)
    original, calls = vlm.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first timed run of sample 0 (call 1 is the warm-up)
            assert samples.was_read(1).wait(5), "sample 1 was not read while sample 0 ran"
        return original(*args, **kwargs)

    monkeypatch.setattr(vlm, "generate", generate)
    config = EvalConfig(methods=("vanilla", "random"), ratios=(0.5,), max_new_tokens=2, progress=False)
    ahead = run_eval(vlm, samples, config)
    monkeypatch.setattr(vlm, "generate", original)
    inline = run_eval(vlm, Samples(2), config, prefetch=0)
    key = [(r.id, r.method, r.prediction, r.kept) for r in ahead.samples]
    assert key == [(r.id, r.method, r.prediction, r.kept) for r in inline.samples] and len(key) == 4


def test_prepare_ahead_uses_its_own_tokenizer(load_tiny, monkeypatch):
    """A fast tokenizer shared by two threads raises "Already borrowed": the loader encodes with a copy."""
    from explainprune.models.qwen2_vl import Qwen2VL
    from explainprune.prefetch import prepared

    vlm = load_tiny("qwen2_vl")
    used = []
    original = Qwen2VL._tokenize

    def spy(self, text, question):
        used.append(self.tokenizer)
        return original(self, text, question)

    monkeypatch.setattr(Qwen2VL, "_tokenize", spy)
    source = Samples(2)
    ahead = [item.result() for item in prepared(vlm, source, range(2), depth=2)]
    inline = [item.result() for item in prepared(vlm, source, range(2), depth=0)]
    assert used[0] is not vlm.tokenizer and used[0] is used[1] and used[2] is vlm.tokenizer
    for (_, a), (_, b) in zip(ahead, inline):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.inputs_embeds, b.inputs_embeds)
