"""On an accelerator, the loader thread's ``prepare`` (vision tower) and the labeler's model work (relevance
on a head-chunk budget from the free memory) never run at the same time; reading the media still overlaps."""

from __future__ import annotations

import threading
import time

import torch

from explainprune.labels import LabelConfig, label
from explainprune.prefetch import prepared
from test_labels import FakeVLM
from test_train import ToyLabeler, ToySource


class Timed(FakeVLM):
    """prepare() takes a while and records its interval."""

    def __init__(self, device: str, log: list):
        self._device, self.log = torch.device(device), log

    @property
    def device(self):
        return self._device

    def prepare(self, images=None, video=None, question=""):
        t0 = time.perf_counter()
        time.sleep(0.02)
        out = super().prepare(images, video, question)
        self.log.append(("prepare", t0, time.perf_counter()))
        return out


class TimedLabeler(ToyLabeler):
    def __init__(self, log: list):
        self.log = log

    def __call__(self, vlm, prompt, sample):
        t0 = time.perf_counter()
        time.sleep(0.02)
        out = super().__call__(vlm, prompt, sample)
        self.log.append(("label", t0, time.perf_counter()))
        return out


def overlaps(log: list) -> int:
    prep = [(a, b) for k, a, b in log if k == "prepare"]
    work = [(a, b) for k, a, b in log if k == "label"]
    return sum(1 for a, b in prep for c, d in work if a < d and c < b)


def test_label_on_an_accelerator_never_prepares_during_model_work(tmp_path):
    log: list = []
    label(Timed("meta", log), ToySource(12), tmp_path / "gpu", LabelConfig(shard_size=4),
          labeler=TimedLabeler(log), progress=False, prefetch=2)
    assert len(log) == 24 and overlaps(log) == 0
    cpu: list = []  # on the CPU the loader overlaps as before (host memory, no head-chunk budget at stake)
    label(Timed("cpu", cpu), ToySource(12), tmp_path / "cpu", LabelConfig(shard_size=4),
          labeler=TimedLabeler(cpu), progress=False, prefetch=2)
    assert overlaps(cpu) > 0


def test_prepared_holds_the_lock_around_prepare():
    lock, log = threading.Lock(), []
    vlm = Timed("meta", log)
    out = []
    for loaded in prepared(vlm, ToySource(6), range(6), depth=2, device_lock=lock):
        with lock:
            t0 = time.perf_counter()
            time.sleep(0.02)
            log.append(("label", t0, time.perf_counter()))
        out.append(loaded.result()[0].id)
    assert out == [f"s{i}" for i in range(6)] and overlaps(log) == 0
