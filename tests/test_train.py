"""Training f_θ: R_v* and KL on hand examples, metrics, resume equals uninterrupted, learning a toy mapping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from explainprune.compressor import Compressor
from explainprune.labels import LabelConfig, LabelOutput, LabelSample, label
from explainprune.train import (
    TrainConfig,
    batches,
    kl_divergence,
    relevance_target,
    split,
    topk_recall,
    train,
    uniform_scores,
)
from test_labels import FakeVLM


def test_relevance_target_hand_example():
    r = torch.tensor([0.1, 0.4, 0.2, 0.3])
    torch.testing.assert_close(relevance_target(r), torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    # odd length: floor(5/2) = 2 zeroed; negatives count as zero; division, not softmax
    r = torch.tensor([-1.0, 5.0, 1.0, 2.0, 0.5])
    torch.testing.assert_close(relevance_target(r), torch.tensor([0.0, 5 / 8, 1 / 8, 2 / 8, 0.0]))
    torch.testing.assert_close(relevance_target(torch.zeros(4)), torch.full((4,), 0.25))


def test_relevance_target_power_flattens_the_kept_values():
    r = torch.tensor([0.1, 0.4, 0.2, 0.9])  # kept: 0.4, 0.9 -> sqrt: 2/sqrt(10), 3/sqrt(10)
    torch.testing.assert_close(relevance_target(r, power=0.5), torch.tensor([0.0, 0.4, 0.0, 0.6]))
    torch.testing.assert_close(relevance_target(r, power=1.0), relevance_target(r))
    with pytest.raises(ValueError, match="power"):
        relevance_target(r, power=0.0)


def test_kl_hand_example():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0]])
    expect = torch.tensor([math.log(2.0), math.log(2.0)])
    torch.testing.assert_close(kl_divergence(p, q.log()), expect)  # q = 0 where p = 0: no NaN
    assert float(kl_divergence(p[:1], p[:1].clamp(min=1e-30).log())) == 0.0


def test_topk_recall_hand_example():
    true = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.0, 0.3, 0.05, 0.01])
    pred = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0])
    assert topk_recall(pred, true, 0.25) == 0.5  # k = 2: {0, 5} vs {0, 1}
    assert topk_recall(true, true, 0.1) == 1.0
    assert topk_recall(pred, true, 0.5) == 0.5  # k = 4: {0, 5, +2 ties} vs {0, 1, 5, 3}: 0 and 5 certain


def test_uniform_scores_match_registered_pruner():
    grid = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(4), torch.arange(4), indexing="ij"), -1)
    s = uniform_scores(grid.reshape(-1, 3))
    assert s.shape == (16,) and len(set(s.tolist())) == 16


def test_split_and_batches_are_deterministic():
    assert split(10, 0.2, 0) == split(10, 0.2, 0)
    tr, va = split(10, 0.2, 0)
    assert len(va) == 2 and sorted(tr + va) == list(range(10))
    with pytest.raises(ValueError):
        split(10, 1.0, 0)
    lengths = [5, 9, 5, 9, 7, 7, 5]
    b1 = batches(lengths, 2, torch.Generator().manual_seed(1))
    assert b1 == batches(lengths, 2, torch.Generator().manual_seed(1))
    assert sorted(i for b in b1 for i in b) == list(range(7))


class ToyLabeler:
    """A_v^0 random per head; R_v a local function of head 0 (what a conv net can learn)."""

    def __call__(self, vlm, prompt, sample):
        g = torch.Generator().manual_seed(int(sample.id[1:]))
        n = prompt.num_visual
        a = torch.rand(3, n, generator=g) ** 4
        r = torch.nn.functional.conv1d(a[:1, None], torch.tensor([[[0.5, 1.0, 0.5]]]), padding=1)[0, 0]
        return LabelOutput(sample.answer, [1], True, a / n, r)


class ToySource:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        shape = (1, 4 + i % 3, 5)
        return LabelSample(f"s{i}", "q", "a", images=shape, region=[(0, 0, c) for c in range(5)])

    def describe(self):
        return {"task": "toy", "n": self.n}


@pytest.fixture(scope="module")
def toy_labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_labels")
    label(FakeVLM(), ToySource(48), out, LabelConfig(shard_size=16), labeler=ToyLabeler(), progress=False)
    return out


SMALL = dict(batch_size=8, val_fraction=0.25, lr=3e-3, channels=(8, 16, 16, 32, 32))



def test_resume_equals_uninterrupted(toy_labels, tmp_path):
    full = train(toy_labels, tmp_path / "full", TrainConfig(epochs=3, **SMALL), progress=False)
    train(toy_labels, tmp_path / "part", TrainConfig(epochs=1, **SMALL), progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(toy_labels, tmp_path / "part", TrainConfig(epochs=3, **SMALL), progress=False)
    with pytest.raises(ValueError, match="options differ.*lr"):
        train(toy_labels, tmp_path / "part", TrainConfig(epochs=3, **{**SMALL, "lr": 1e-2}), resume=True,
              progress=False)
    # a run saved before an option existed resumes as if it had the option's default
    ptr = json.loads((tmp_path / "part" / "checkpoint.json").read_text())
    state_file = tmp_path / "part" / ptr["dir"] / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["power"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="options differ.*power"):
        train(toy_labels, tmp_path / "part", TrainConfig(epochs=3, **{**SMALL, "power": 0.5}), resume=True,
              progress=False)
    resumed = train(toy_labels, tmp_path / "part", TrainConfig(epochs=3, **SMALL), resume=True, progress=False)
    a = Compressor.from_pretrained(tmp_path / "full" / "compressor").state_dict()
    b = Compressor.from_pretrained(tmp_path / "part" / "compressor").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.metrics == full.metrics
    log_full = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_part = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log_part] == [1, 2, 3]
    assert [x["train_loss"] for x in log_part] == [x["train_loss"] for x in log_full]
    assert len(list((tmp_path / "part" / "checkpoints").iterdir())) == 1


def test_learns_a_toy_mapping_above_baselines(toy_labels, tmp_path):
    res = train(toy_labels, tmp_path / "run", TrainConfig(epochs=25, **SMALL), progress=False)
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert res.val_samples == 12 and res.train_samples == 36
    assert res.metrics["kl"] < first["val_kl"]
    assert res.metrics["kl"] < res.baselines["uniform"]["kl"]
    assert res.metrics["recall@0.25"] > res.baselines["random"]["recall@0.25"] + 0.2
    assert 0.0 <= res.metrics["region_mass"] <= 1.0
    assert "| f_θ (learned) |" in res.to_markdown()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"] == res.metrics
    f = Compressor.from_pretrained(tmp_path / "run" / "compressor")
    assert f.config.fingerprint == FakeVLM().fingerprint() and f.config.in_channels == 3


def test_cli_label_then_train(tmp_path, tiny_dirs, load_tiny, capsys):
    """From a checkpoint and a manifest to a compressor, through the CLI, with the real relevance engine."""
    pytest.importorskip("explainprune.relevance")
    pytest.importorskip("explainprune.tasks.digits")
    from explainprune.cli.main import main
    from explainprune.tasks.digits import DigitsTask

    vlm = load_tiny("qwen2_vl")
    task = DigitsTask(split="train", n=6, grid=2, kinds=("rowcol", "count"))
    task.export(tmp_path / "data")
    lines = []
    for i, line in enumerate((tmp_path / "data" / "manifest.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        s = task.sample(i)
        # the random tiny model is "right" on the even samples only: it answers what it answers
        rec["answer"] = vlm.generate(vlm.prepare(images=s.image, question=s.question), max_new_tokens=2).text
        rec["answer"] = rec["answer"] if i % 2 == 0 else "#wrong#"
        lines.append(json.dumps(rec))
    (tmp_path / "data" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    model = str(tiny_dirs("qwen2_vl"))
    argv = ["label", "--model", model, "--manifest", str(tmp_path / "data" / "manifest.jsonl"), "--out",
            str(tmp_path / "labels"), "--max-new-tokens", "2", "--shard-size", "4", "--json", "--no-progress"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["complete"] and rep["totals"] == {"samples": 6, "labeled": 3, "skipped_wrong": 3, "wrong": 3,
                                                 "skipped_error": 0,
                                                 "by_rule": {"exact": {"judged": 6, "correct": 3}}}
    argv = ["train", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "run"), "--epochs", "2",
            "--val-fraction", "0.34", "--json", "--no-progress"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["epochs"] == 2 and res["train_samples"] == 2 and res["val_samples"] == 1
    assert set(res["baselines"]) == {"uniform", "random", "attention", "target"}
    assert "region_mass" in res["metrics"] and res["baselines"]["target"]["kl"] == 0.0
    f = Compressor.from_pretrained(tmp_path / "run" / "compressor")
    f.check_compatible(vlm)
    assert main(["train", "--labels", str(tmp_path / "nolabels"), "--out", str(tmp_path / "x")]) == 2
    assert "index.json missing" in capsys.readouterr().err


def test_resume_with_other_labels_is_refused(toy_labels, tmp_path):
    other = tmp_path / "other_labels"
    label(FakeVLM(), ToySource(40), other, LabelConfig(shard_size=16), labeler=ToyLabeler(), progress=False)
    train(toy_labels, tmp_path / "run", TrainConfig(epochs=1, **SMALL), progress=False)
    with pytest.raises(ValueError, match="trained on another label set"):
        train(other, tmp_path / "run", TrainConfig(epochs=2, **SMALL), resume=True, progress=False)
    train(toy_labels, tmp_path / "run", TrainConfig(epochs=2, **SMALL), resume=True, progress=False)


def test_damaged_checkpoint_names_the_file(toy_labels, tmp_path):
    train(toy_labels, tmp_path / "run", TrainConfig(epochs=1, **SMALL), progress=False)
    opt = next((tmp_path / "run" / "checkpoints").glob("epoch-*")) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(ValueError, match="optimizer.safetensors: cannot read the optimizer state"):
        train(toy_labels, tmp_path / "run", TrainConfig(epochs=2, **SMALL), resume=True, progress=False)


def cli_config(monkeypatch, args):
    """The TrainConfig `explainprune train ARGS` builds (train itself replaced, so nothing runs)."""
    import explainprune.train as train_module
    from explainprune.cli.main import main

    seen = {}

    def fake_train(labels, out, config, resume=False, progress=True):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(SystemExit):
        main(["train", *args])
    return seen["config"]


# -- the paper's definitions (Section 3.3 / 4.1), checked so that a changed default cannot pass ----------------
def test_training_defaults_are_the_papers(toy_labels, tmp_path, monkeypatch):
    c = TrainConfig()
    assert (c.drop, c.power, c.batch_size, c.lr, c.epochs) == (0.5, 1.0, 128, 1e-3, 100)
    assert c.channels == (32, 64, 128, 256, 512)
    # the CLI's defaults are the library's
    assert cli_config(monkeypatch, ["--labels", str(toy_labels), "--out", str(tmp_path / "cli")]) == TrainConfig()
    # Adam with default settings, as saved with the run
    monkeypatch.undo()
    train(toy_labels, tmp_path / "run", TrainConfig(epochs=1, **SMALL), progress=False)
    ptr = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    group = json.loads((tmp_path / "run" / ptr["dir"] / "state.json").read_text())["param_groups"][0]
    adam = (tuple(group["betas"]), group["eps"], group["weight_decay"], group["amsgrad"])
    assert adam == ((0.9, 0.999), 1e-8, 0, False)


def test_first_logged_loss_is_kl_target_to_prediction(toy_labels, tmp_path):
    """KL(R_v* || f_θ(A_v^0)) (Eq. 3), not the reverse: one batch per epoch, so the first logged loss is the
    loss of the initial model, recomputed here sample by sample from the paper's definition."""
    from explainprune.labels import load_records

    cfg = TrainConfig(epochs=1, **{**SMALL, "batch_size": 1000})
    train(toy_labels, tmp_path / "run", cfg, progress=False)
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["train_loss"]
    records = load_records(toy_labels)
    tr, _ = split(len(records), cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    f = Compressor(cfg.compressor_config(3, {})).eval()
    forward, reverse = [], []
    for i in tr:
        r = records[i].relevance.double()
        p = r.clamp(min=0)
        p[torch.argsort(r)[: len(r) // 2]] = 0  # the bottom 50% zeroed ...
        p = p / p.sum()  # ... then divided by the sum
        with torch.no_grad():
            q = f(records[i].attention).double()
        on = p > 0
        forward.append(float((p[on] * (p[on] / q[on]).log()).sum()))
        reverse.append(float((q * (q / p.clamp(min=1e-300)).log()).sum()))
    assert logged == pytest.approx(sum(forward) / len(forward), rel=1e-4)
    assert abs(sum(reverse) / len(reverse) - logged) > 1.0  # the reverse direction is far off


def test_relevance_target_with_mostly_negative_relevance():
    """clamp=False R_v can be mostly negative: the bottom half (by signed value) is zeroed, negative kept
    values count as 0, the rest is divided by its sum; all kept values negative -> uniform (documented)."""
    r = torch.tensor([-0.5, 3.0, -2.0, -1.0, 1.0, -0.1])  # 4 of 6 negative
    torch.testing.assert_close(relevance_target(r), torch.tensor([0.0, 0.75, 0.0, 0.0, 0.25, 0.0]))
    r = torch.tensor([-3.0, -1.0, -2.0, 2.0, -4.0])  # 4 of 5 negative: -4, -3 dropped; -1, -2 count as 0
    torch.testing.assert_close(relevance_target(r), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    r = torch.tensor([-3.0, -1.0, -2.0, -4.0])  # all negative
    torch.testing.assert_close(relevance_target(r), torch.full((4,), 0.25))
    # the least negative scores are the most relevant for ranking (select keeps the largest)
    assert topk_recall(torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([-3.0, -0.1, -2.0, -4.0]), 0.25) == 1.0


# -- issue 20: the guard (f_θ against its own input), presets ----------------------------------------------------
def test_guard_metrics_hand_example():
    from types import SimpleNamespace

    from explainprune.guard import guard_metrics, kept_mass, region_kept

    rel = torch.tensor([0.5, 0.0, 0.3, -1.0, 0.2, 0.0, 0.0, 0.0])  # R_v+ sums to 1.0
    scores = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert kept_mass(scores, rel, 0.25) == pytest.approx(0.5)  # k = 2: tokens 0, 1
    assert kept_mass(scores, rel, 0.5) == pytest.approx(0.8)  # k = 4: 0..3 (the negative counts as 0)
    assert region_kept(scores, [1, 4], 0.25) == 0.5 and region_kept(scores, [4, 5], 0.5) == 0.0
    recs = [SimpleNamespace(relevance=rel, region=[1, 4]), SimpleNamespace(relevance=rel, region=None)]
    m = guard_metrics([scores, scores], recs, [0.5, 0.25])
    assert m["mass@0.5"] == pytest.approx(0.8) and m["mass@0.25"] == pytest.approx(0.5)
    assert m["region@0.5"] == 0.5 and m["region@0.25"] == 0.5  # the one record with a region
    assert m["rank_score"] == pytest.approx(((0.8 + 0.5) / 2 + 0.5) / 2)


def test_guard_groups_by_kind_and_size_with_paired_margins():
    from types import SimpleNamespace

    from explainprune.guard import compare_groups, group_of, sample_scores

    def rec(kind, n, hot, region=None):
        rel = torch.zeros(n)
        rel[hot] = 1.0
        return SimpleNamespace(kind=kind, attention=torch.ones(2, n), relevance=rel, region=region)

    recs = [rec("rowcol", 8, 0, [0, 7]), rec("rowcol", 8, 7, [7]), rec("video", 16, 2)]
    assert [group_of(r) for r in recs] == ["rowcol/8", "rowcol/8", "video/16"]
    down = [torch.arange(8.0).flip(0), torch.arange(8.0).flip(0), torch.arange(16.0).flip(0)]  # keeps the first
    # k = 2 of 8 keeps tokens 0, 1; k = 4 of 16 keeps 0..3. Record 0: mass 1, region 1/2; record 1: 0, 0
    assert sample_scores(down, recs, [0.25]) == [pytest.approx(0.75), 0.0, 1.0]
    up = [torch.arange(8.0), torch.arange(8.0), torch.arange(16.0)]  # keeps the last
    assert sample_scores(up, recs, [0.25]) == [pytest.approx(0.25), 1.0, 0.0]
    g = compare_groups(sample_scores(up, recs, [0.25]), sample_scores(down, recs, [0.25]), recs)
    assert list(g) == ["rowcol/8", "video/16"]
    row = g["rowcol/8"]  # paired differences -0.5 and +1.0
    assert row["n"] == 2 and row["f_theta"] == pytest.approx(0.625) and row["input"] == pytest.approx(0.375)
    assert row["margin"] == pytest.approx(0.25) and row["se"] == pytest.approx((1.125 / 2) ** 0.5)
    assert g["video/16"] == {"n": 1, "f_theta": 0.0, "input": 1.0, "margin": -1.0, "se": 0.0}


def test_guard_names_only_the_groups_behind_beyond_noise():
    from explainprune.guard import MIN_GROUP, TOLERANCE, Guard, Z, is_behind

    n = MIN_GROUP
    behind = {"n": n, "f_theta": 0.4, "input": 0.5, "margin": -0.1, "se": 0.1 / Z - 1e-3}  # just past Z s.e.
    noisy = {"n": n, "f_theta": 0.4, "input": 0.5, "margin": -0.1, "se": 0.1 / Z + 1e-3}  # within the noise
    small = {"n": n - 1, "f_theta": 0.1, "input": 0.5, "margin": -0.4, "se": 0.0}  # too few samples to judge
    tiny = {"n": n, "f_theta": 0.499, "input": 0.5, "margin": -TOLERANCE + 1e-4, "se": 1e-5}  # sure, but too small
    assert is_behind(behind) and not is_behind(noisy) and not is_behind(small) and not is_behind(tiny)
    assert is_behind({**tiny, "margin": -TOLERANCE - 1e-4})
    guard = Guard(3, [0.25], {"rank_score": 0.6}, {"rank_score": 0.5}, groups={
        "rowcol/64": noisy, "rowcol/256": behind, "video/512": small})
    assert guard.beats_input and guard.behind() == ["rowcol/256"]
    msg = guard.message()
    assert msg.startswith("warning: f_θ beats its input overall but not everywhere")
    assert f"rowcol/256 (0.4000 vs 0.5000, {n} samples)" in msg and "video/512" not in msg and "/64" not in msg
    assert guard.to_json()["behind"] == ["rowcol/256"]
    fine = Guard(3, [0.25], {"rank_score": 0.6}, {"rank_score": 0.5}, groups={"rowcol/64": noisy})
    assert fine.behind() == [] and fine.message().startswith("guard: f_θ beats its input")


class CopyLabeler:
    """R_v = the head mean of A_v^0: nothing to learn beyond the input, so f_θ cannot beat it."""

    def __call__(self, vlm, prompt, sample):
        g = torch.Generator().manual_seed(int(sample.id[1:]))
        a = torch.rand(3, prompt.num_visual, generator=g) ** 4 / prompt.num_visual
        return LabelOutput(sample.answer, [1], True, a, a.mean(0))


class NoRegionSource(ToySource):
    def __getitem__(self, i):
        return LabelSample(f"s{i}", "q", "a", images=(1, 4 + i % 3, 5))


def test_guard_keeps_the_best_epoch_and_compares_with_the_input(toy_labels, tmp_path, capsys):
    res = train(toy_labels, tmp_path / "run", TrainConfig(epochs=12, select="guard", **SMALL), progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda x: x["val_rank_score"])
    # R_v is a smoothed head 0, which the head mean does not rank as well: f_θ learns to beat it
    assert res.guard["beats_input"] and res.guard["epoch"] == best["epoch"]
    assert res.guard["f_theta"]["rank_score"] == best["val_rank_score"] > res.guard["input"]["rank_score"]
    assert res.metrics["kl"] == best["val_kl"]
    # per group (kind and size) of the validation split: the kept epoch's and the input's rank scores
    assert sum(v["n"] for v in res.guard["groups"].values()) == res.val_samples
    assert {g: v["f_theta"] for g, v in res.guard["groups"].items()} == {g: v["f_theta"] for g, v in
                                                                         best["val_groups"].items()}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["guard"]["epoch"] == best["epoch"] and saved["guard"]["beats_input"] is True
    err = capsys.readouterr().err
    assert "guard: f_θ beats its input" in err and "warning" not in err
    # the kept compressor is the best epoch's, not the last one's
    kept = Compressor.from_pretrained(tmp_path / "run" / "compressor")
    again = Compressor.from_pretrained(tmp_path / "run" / "best")
    for k, v in kept.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_selection_key_prefers_epochs_behind_on_no_group():
    from explainprune.guard import MIN_GROUP, selection_key

    ok = {"n": MIN_GROUP, "margin": -0.01, "se": 0.01}  # within noise
    bad = {"n": MIN_GROUP, "margin": -0.05, "se": 0.01}  # behind
    up = {"rank_score": 0.70, "groups": {"a/64": ok, "b/256": bad}}  # pooled better, behind on b/256
    even = {"rank_score": 0.65, "groups": {"a/64": {**ok, "margin": 0.0, "se": 0.0}, "b/256": ok}}
    assert selection_key(up) < selection_key(even)
    assert selection_key(up, "guard") > selection_key(even, "guard")
    assert selection_key(up) == (0.0, 0.70) and selection_key(even) == (1.0, 0.65)


def test_groups_selection_keeps_the_best_epoch_behind_on_no_group(toy_labels, tmp_path):
    from explainprune.guard import MIN_GROUP, compare_groups, input_scores, sample_scores, selection_key
    from explainprune.train import read_labels, split

    config = TrainConfig(epochs=6, **SMALL)
    assert config.select == "groups"  # the default
    res = train(toy_labels, tmp_path / "run", config, progress=False)
    records = read_labels(toy_labels)[0]
    val = [records[i] for i in split(len(records), config.val_fraction, config.seed)[1]]
    inp = sample_scores(input_scores(val), val, config.ratios)
    sizes = compare_groups(inp, inp, val)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    keys = {x["epoch"]: selection_key({"rank_score": x["val_rank_score"], "groups": {
        g: {**v, "n": sizes[g]["n"]} for g, v in x["val_groups"].items()}}) for x in log}
    keys[0] = (1.0, res.guard["input"]["rank_score"])  # epoch 0 ranks as the input (up to ties)
    kept = res.guard["epoch"]
    assert kept == max(keys, key=lambda e: (keys[e], -e)) or (kept == 0 and keys[0] >= max(keys.values()))
    assert all(set(v) == {"f_theta", "margin", "se"} for x in log for v in x["val_groups"].values())
    assert set(res.guard["groups"]) == set(sizes) and all(v["n"] < MIN_GROUP for v in sizes.values())


def test_guard_warns_when_f_theta_does_not_beat_its_input(tmp_path, capsys):
    labels = tmp_path / "labels"
    label(FakeVLM(), NoRegionSource(32), labels, LabelConfig(shard_size=16), labeler=CopyLabeler(), progress=False)
    res = train(labels, tmp_path / "run", TrainConfig(epochs=3, **SMALL), progress=False)
    assert not res.guard["beats_input"]
    assert res.guard["f_theta"]["rank_score"] <= res.guard["input"]["rank_score"]
    # ranking by R_v itself keeps the most R_v mass at every ratio: no epoch can do better than epoch 0 (the input)
    assert res.guard["epoch"] == 0 and res.guard["f_theta"] == res.guard["input"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "f_θ" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: f_θ does not beat its own input")
    # without the skip path nothing ranks as the input at epoch 0: the guard still keeps the best trained epoch
    res = train(labels, tmp_path / "paper", TrainConfig(epochs=2, **{**SMALL, "skip": False}), progress=False)
    assert res.guard["epoch"] in (1, 2) and not res.guard["beats_input"]


def test_paper_preset_from_the_cli(toy_labels, tmp_path, monkeypatch):
    import explainprune.train as train_module

    c = cli_config(monkeypatch, ["--labels", str(toy_labels), "--out", str(tmp_path / "p"), "--preset", "paper"])
    assert (c.average_heads, c.normalize, c.padding, c.skip, c.epochs) == (True, "none", "zeros", False, 100)
    assert (c.batch_size, c.lr, c.channels) == (128, 1e-3, (32, 64, 128, 256, 512))
    f = Compressor(c.compressor_config(4, {}))
    assert f.config == Compressor(train_module.CompressorConfig.paper(in_channels=4)).config
    c = cli_config(monkeypatch, ["--labels", str(toy_labels), "--out", str(tmp_path / "p"), "--preset", "paper",
                                 "--epochs", "7", "--padding", "replicate"])
    assert (c.epochs, c.padding, c.skip) == (7, "replicate", False)
