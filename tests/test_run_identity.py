"""A resumed run never mixes two models: label's run.json and eval's records.jsonl record the model's identity
(weights, config, dtype, processor settings, attention), and a rerun that differs is refused before the
model loads, naming what differs (issue 21, items 1-2)."""

from __future__ import annotations

import json
import shutil

import pytest

import explainprune
import explainprune.models
from explainprune.cli.main import main
from explainprune.errors import InputError
from explainprune.identity import config_fingerprint, differences, model_identity, vlm_identity
from explainprune.labels import LabelConfig, ManifestSource, label
from explainprune.testing import image_manifest, tiny_qwen2_vl


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two tiny Qwen2-VL checkpoints of the same shape and config, different weights (seeds 0 and 1)."""
    d = tmp_path_factory.mktemp("twins")
    return tiny_qwen2_vl(d / "a", seed=0), tiny_qwen2_vl(d / "b", seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return image_manifest(d, 2)


def one_error(capsys, cmd):
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if not e.startswith(("Loading weights", "Writing model shards"))]
    assert len(err) == 1 and err[0].startswith(f"explainprune {cmd}: error: "), err
    return err[0]


# -- the identity itself ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"dtype": "bfloat16", "attn_implementation": "eager", "max_pixels": 6272}])
def test_identity_before_loading_equals_the_loaded_models(tiny_dirs, family, options):
    if "max_pixels" in options and not family.startswith("qwen"):
        options = {k: v for k, v in options.items() if k != "max_pixels"}
    path = tiny_dirs(family)
    vlm = explainprune.load(path, **options)
    assert model_identity(path, **options) == vlm_identity(vlm)
    assert config_fingerprint(path) == vlm.fingerprint()


def test_identity_tells_weights_apart_but_not_a_copy(twins, tmp_path):
    a, b = twins
    ia, ib = model_identity(a), model_identity(b)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert differences(ia, ib) == [f"weights ({ia['weights']} recorded, now {ib['weights']})"]
    copy = shutil.copytree(a, tmp_path / "copied")  # another path, new modification times: the same model
    assert model_identity(copy) == ia
    assert differences(ia, model_identity(a, dtype="bfloat16", max_pixels=6272)) == [
        "dtype (float32 recorded, now bfloat16)",
        f"processor.settings ({ia['processor']['settings']} recorded, now "
        f"{model_identity(a, max_pixels=6272)['processor']['settings']})",
        "processor.size.longest_edge (50176 recorded, now 6272)"]


# -- label (item 1) -----------------------------------------------------------------------------------------
def label_argv(model, data, out, *extra):
    return ["label", "--model", str(model), "--manifest", str(data), "--out", str(out), "--keep-wrong",
            "--shard-size", "1", "--max-new-tokens", "2", "--no-progress", *extra]


def test_label_resume_with_other_weights_or_options_is_refused(twins, data, tmp_path, capsys, monkeypatch):
    a, b = twins
    out = tmp_path / "labels"
    assert main(label_argv(a, data, out)) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    run = (out / "run.json").read_bytes()
    real_load = explainprune.load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the run was checked")

    monkeypatch.setattr(explainprune, "load", refuse)
    ident = model_identity(a)
    cases = [((b,), f"model.weights ({ident['weights']} recorded, now {model_identity(b)['weights']})"),
             ((a, "--dtype", "bfloat16"), "model.dtype (float32 recorded, now bfloat16)"),
             ((a, "--max-pixels", "6272"), "model.processor.size.longest_edge (50176 recorded, now 6272)"),
             ((a, "--attn-implementation", "eager"), "model.attn_implementation (sdpa recorded, now eager)")]
    for (model, *extra), needle in cases:
        assert main(label_argv(model, data, out, *extra)) == 2, extra
        err = one_error(capsys, "label")
        assert f"{out}: holds labels of a different run (differs in " in err and needle in err, err
        assert "rerun the command that wrote it" in err
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
    assert (out / "run.json").read_bytes() == run
    # the same command still resumes (every shard reused)
    monkeypatch.setattr(explainprune, "load", real_load)
    assert main(label_argv(a, data, out)) == 0
    assert "this run: 0 shards" in capsys.readouterr().out


def test_label_library_refuses_another_loaded_model(twins, data, tmp_path):
    a, b = twins
    source, config = ManifestSource(data), LabelConfig(shard_size=1, max_new_tokens=2, keep_wrong=True)
    label(explainprune.load(a), source, tmp_path / "l", config, progress=False)
    record = json.loads((tmp_path / "l" / "run.json").read_text())
    assert record["model"] == model_identity(a)
    with pytest.raises(InputError, match=r"different run \(differs in model.weights \("):
        label(explainprune.load(b), source, tmp_path / "l", config, progress=False)


def test_label_folder_of_another_architecture_is_refused_before_loading(no_model, data, tiny_dirs, tmp_path,
                                                                          capsys):
    out = tmp_path / "l"
    out.mkdir()
    model = tiny_dirs("qwen2_vl")
    fp = {**config_fingerprint(model), "num_hidden_layers": 28}
    record = {"format": "explainprune-labels", "version": 1, "source": ManifestSource(data).describe(),
              "samples": 2, "config": LabelConfig(shard_size=1).to_json(), "fingerprint": fp,
              "model": model_identity(model)}
    (out / "run.json").write_text(json.dumps(record))
    assert main(["label", "--model", str(model), "--manifest", str(data), "--out", str(out), "--shard-size", "1"]) == 2
    assert "differs in fingerprint.num_hidden_layers (28 recorded, now 2)" in one_error(capsys, "label")


def test_label_folder_written_before_identities_is_refused_saying_so(no_model, data, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "l"
    out.mkdir()
    model = tiny_dirs("qwen2_vl")
    record = {"format": "explainprune-labels", "version": 1, "source": ManifestSource(data).describe(),
              "samples": 2, "config": LabelConfig(shard_size=1).to_json(), "fingerprint": config_fingerprint(model)}
    (out / "run.json").write_text(json.dumps(record))
    assert main(["label", "--model", str(model), "--manifest", str(data), "--out", str(out), "--shard-size", "1"]) == 2
    assert "differs in model (not recorded, now {" in one_error(capsys, "label")


# -- eval (item 2) ------------------------------------------------------------------------------------------
def eval_argv(model, data, out, *extra):
    return ["eval", "--model", str(model), "--task", str(data), "--methods", "vanilla", "--ratios", "0.5",
            "--max-new-tokens", "2", "--out", str(out), "--no-progress", "--no-plots", *extra]


def test_eval_resume_with_other_loading_options_or_weights_is_refused(twins, data, tmp_path, capsys, monkeypatch):
    a, b = twins
    out = tmp_path / "e"
    assert main(eval_argv(a, data, out, "--max-pixels", "6272")) == 0
    capsys.readouterr()
    records = (out / "records.jsonl").read_bytes()
    header = json.loads(records.splitlines()[0])
    assert header["identity"] == model_identity(a, max_pixels=6272)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the run was checked")

    monkeypatch.setattr(explainprune.models, "load", refuse)
    for model, extra, needle in (
            (a, (), "identity.processor.size.longest_edge (6272 recorded, now 50176)"),
            (b, ("--max-pixels", "6272"), "identity.weights ("),
            (a, ("--max-pixels", "6272", "--dtype", "bfloat16"), "identity.dtype (float32 recorded, now bfloat16)")):
        assert main(eval_argv(model, data, out, *extra)) == 2
        err = one_error(capsys, "eval")
        assert f"{out}: holds the records of another evaluation (differs in " in err and needle in err, err
        assert "--overwrite" in err
    assert (out / "records.jsonl").read_bytes() == records


def test_eval_refuses_a_compressor_of_another_model_before_loading(no_model, data, tiny_dirs, tmp_path, capsys):
    from explainprune.compressor import Compressor

    model = tiny_dirs("qwen2_vl")
    fp = {**config_fingerprint(model), "num_hidden_layers": 28}
    Compressor(in_channels=4, fingerprint=fp).save_pretrained(tmp_path / "comp")
    capsys.readouterr()  # (the checkpoint's writing bar)
    assert main(["eval", "--model", str(model), "--task", str(data), "--methods", "vanilla", "learned",
                 "--compressor", str(tmp_path / "comp"), "--out", str(tmp_path / "e")]) == 2
    assert one_error(capsys, "eval") == (
        "explainprune eval: error: this compressor was trained for another model (num_hidden_layers: trained for "
        "28, given 2); f_θ is specific to one MLLM (Section 3.3): label and train one for this model")
    assert not (tmp_path / "e").exists()
