"""Sharing a compressor: the weights' SHA-256 in config.json, the model card, loading a hub id from the
offline hub cache (revision, fingerprint check, `--compressor org/name` in the CLI), and push_to_hub at the
HfApi boundary (no network)."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import explainprune
from explainprune.cli.main import main
from explainprune.compressor import Compressor
from explainprune.errors import InputError
from explainprune.testing import put_in_hub_cache, random_image
from explainprune.train import TrainConfig, train
from test_load import _no_network, hub_cache  # noqa: F401  (hub_cache is a fixture)

FP = {"model_type": "qwen2_vl", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}


def _small(seed: int = 0, fingerprint=FP, heads: int = 4) -> Compressor:
    torch.manual_seed(seed)
    return Compressor(in_channels=heads, channels=(8, 16), fingerprint=dict(fingerprint)).eval()


def _card(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


# -- checksum (issue 21 item 8) ----------------------------------------------------------------------------
def test_save_writes_the_sha256_of_the_weights(tmp_path):
    d = _small().save_pretrained(tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["weights_sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def test_zeroed_weights_are_refused_naming_the_file(tmp_path):
    """The issue's case: 500 weights zeroed in model.safetensors, config.json untouched."""
    d = _small().save_pretrained(tmp_path / "c")
    state = load_file(str(d / "model.safetensors"))
    name = max(state, key=lambda k: state[k].numel())
    flat = state[name].flatten().clone()
    n = min(500, flat.numel())
    flat[:n] = 0
    state[name] = flat.reshape(state[name].shape)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "explainprune-compressor"})
    with pytest.raises(InputError, match="SHA-256") as err:
        Compressor.from_pretrained(d)
    assert str(d / "model.safetensors") in str(err.value)
    assert "config.json" in str(err.value)


def test_folder_saved_without_a_checksum_still_loads_silently(tmp_path):
    f = _small()
    d = f.save_pretrained(tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["weights_sha256"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "README.md").unlink()  # folders from before the card too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = Compressor.from_pretrained(d)
    for k, v in f.state_dict().items():
        assert torch.equal(v, g.state_dict()[k])


def test_cli_names_the_damaged_weights(tmp_path, capsys):
    d = _small().save_pretrained(tmp_path / "c")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-8:] = bytes(8)  # last float values zeroed
    (d / "model.safetensors").write_bytes(bytes(raw))
    rc = main(["flops", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--visual-tokens", "16",
               "--compressor", str(d)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert err.startswith("explainprune flops: error:") and "model.safetensors" in err and "SHA-256" in err


# -- model card ---------------------------------------------------------------------------------------------
def test_card_metadata_of_a_plain_save(tmp_path):
    d = _small().save_pretrained(tmp_path / "c")
    meta = _card(d)
    assert meta["library_name"] == "explainprune"
    ep = meta["explainprune"]
    assert ep["version"] == explainprune.__version__
    assert ep["fingerprint"] == FP
    assert ep["weights_sha256"] == json.loads((d / "config.json").read_text())["weights_sha256"]
    assert "base_model" not in meta and "metrics" not in ep  # nothing invented


def test_trained_compressor_card_has_labels_metrics_and_command(tmp_path):
    from explainprune.labels import LabelConfig, label
    from test_labels import FakeVLM
    from test_train import SMALL, ToyLabeler, ToySource

    labels = tmp_path / "labels"
    label(FakeVLM(), ToySource(12), labels, LabelConfig(shard_size=6), labeler=ToyLabeler(), progress=False)
    res = train(labels, tmp_path / "run", TrainConfig(epochs=2, **{**SMALL, "seed": 3}), progress=False)
    meta = _card(tmp_path / "run" / "compressor")
    ep = meta["explainprune"]
    assert ep["fingerprint"] == FakeVLM().fingerprint()
    assert ep["labels"]["samples"] == 12 and ep["labels"]["shards"] == 2
    assert ep["labels"]["source"] == {"task": "toy", "n": 12}
    assert ep["metrics"] == pytest.approx(res.metrics)
    assert ep["training"]["command"] == (f"explainprune train --labels {labels} --out {tmp_path / 'run'} --epochs 2 "
                                         "--batch-size 8 --lr 0.003 --val-fraction 0.25 --seed 3")
    assert ep["training"]["config"]["channels"] == list(SMALL["channels"])
    # the card travels with the compressor: loading and saving again writes the same card
    f = Compressor.from_pretrained(tmp_path / "run" / "compressor")
    f.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == (tmp_path / "run" / "compressor" / "README.md").read_text()


def test_card_of_several_label_sets_and_the_paper_preset_gives_the_command_back(tmp_path):
    import shlex

    from explainprune.labels import LabelConfig, label
    from explainprune.train import preset
    from test_labels import FakeVLM
    from test_train import SMALL, ToyLabeler, ToySource

    a, b = tmp_path / "a", tmp_path / "b"
    label(FakeVLM(), ToySource(12), a, LabelConfig(shard_size=6), labeler=ToyLabeler(), progress=False)
    label(FakeVLM(), ToySource(8), b, LabelConfig(shard_size=8), labeler=ToyLabeler(), progress=False)
    config = preset("paper", epochs=2, **SMALL)
    res = train([a, b], tmp_path / "run", config, progress=False)
    ep = _card(tmp_path / "run" / "compressor")["explainprune"]
    assert ep["labels"]["samples"] == 20 and ep["labels"]["shards"] == 3
    assert [x["samples"] for x in ep["labels"]["sets"]] == [12, 8]
    args = shlex.split(ep["training"]["command"])
    assert args[:6] == ["explainprune", "train", "--labels", str(a), str(b), "--out"]
    for flag, value in (("--normalize", "none"), ("--padding", "zeros"), ("--epochs", "2")):
        assert args[args.index(flag) + 1] == value
    assert "--no-skip" in args and "--average-heads" in args
    # the guard's verdict travels with the compressor, in the metadata and the text
    assert ep["guard"]["epoch"] == res.guard["epoch"] and ep["guard"]["message"] == res.guard["message"]
    assert res.guard["message"] in (tmp_path / "run" / "compressor" / "README.md").read_text()


# -- hub ids, offline ---------------------------------------------------------------------------------------
def test_hub_id_loads_offline_from_the_cache_with_revision(tmp_path, hub_cache, monkeypatch):  # noqa: F811
    main_f, v2_f = _small(0), _small(1)
    snap = put_in_hub_cache(main_f.save_pretrained(tmp_path / "main"), "org/tiny-compressor", hub_cache)
    put_in_hub_cache(v2_f.save_pretrained(tmp_path / "v2"), "org/tiny-compressor", hub_cache, revision="v2")
    assert (hub_cache / "models--org--tiny-compressor" / "refs" / "main").read_text() == snap.name
    _no_network(monkeypatch)
    for name, rev, want in (("org/tiny-compressor", None, main_f), ("org/tiny-compressor", "v2", v2_f),
                            ("org/tiny-compressor@v2", None, v2_f), ("org/tiny-compressor@main", None, main_f)):
        got = Compressor.from_pretrained(name, revision=rev)
        for k, v in want.state_dict().items():
            assert torch.equal(v, got.state_dict()[k]), (name, rev, k)
    with pytest.raises(ValueError, match="two revisions"):
        Compressor.from_pretrained("org/tiny-compressor@v2", revision="main")
    got = Compressor.from_pretrained("org/tiny-compressor")
    got.check_compatible(FP)
    with pytest.raises(ValueError, match="num_hidden_layers: trained for 2, given 3"):
        got.check_compatible({**FP, "num_hidden_layers": 3})
    pruner = explainprune.get_pruner("learned", compressor="org/tiny-compressor")
    assert torch.equal(pruner.compressor.head.weight, main_f.head.weight)


def test_unreachable_hub_loads_from_the_cache_at_once(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, but no network either (name resolution fails): the cached snapshot is used."""
    import socket

    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    f = _small(2)
    put_in_hub_cache(f.save_pretrained(tmp_path / "c"), "org/tiny-compressor", cache)

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    t = time.perf_counter()
    got = Compressor.from_pretrained("org/tiny-compressor")
    assert time.perf_counter() - t < 10
    assert torch.equal(got.head.weight, f.head.weight)


def test_hub_blob_changed_in_the_cache_fails_the_checksum(tmp_path, hub_cache, monkeypatch):  # noqa: F811
    snap = put_in_hub_cache(_small().save_pretrained(tmp_path / "c"), "org/tiny-compressor", hub_cache)
    blob = (snap / "model.safetensors").resolve()
    raw = bytearray(blob.read_bytes())
    raw[-4:] = bytes(4)
    blob.write_bytes(bytes(raw))
    _no_network(monkeypatch)
    with pytest.raises(InputError, match="SHA-256"):
        Compressor.from_pretrained("org/tiny-compressor")


def test_uncached_hub_id_offline_says_so(hub_cache, monkeypatch):  # noqa: F811
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        Compressor.from_pretrained("org/not-there")
    with pytest.raises(FileNotFoundError, match="no compressor at"):
        Compressor.from_pretrained("./not-there")
    with pytest.raises(ValueError, match="revision"):
        Compressor.from_pretrained(Path("not-there"), revision="v2")


def test_eval_cli_takes_a_hub_id_offline(tmp_path, hub_cache, monkeypatch, capsys):  # noqa: F811
    demo = explainprune.load("demo")
    heads = demo.text_config.num_attention_heads
    f = _small(fingerprint=demo.fingerprint(), heads=heads)
    put_in_hub_cache(f.save_pretrained(tmp_path / "c"), "org/demo-compressor", hub_cache)
    _no_network(monkeypatch)
    rc = main(["eval", "--model", "demo", "--methods", "learned", "--ratios", "0.5", "--limit", "2",
               "--compressor", "org/demo-compressor", "--out", str(tmp_path / "eval"), "--no-plots",
               "--no-progress", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out[out.index("{"):])["results"]
    assert {(r["method"], r["ratio"]) for r in rows} >= {("learned", 0.5)}
    random_image(0).save(tmp_path / "x.png")
    rc = main(["show", "--model", "demo", "--image", str(tmp_path / "x.png"), "--question",
               "what digit is in row 1 , column 2 ?", "--compressor", "org/demo-compressor", "--out",
               str(tmp_path / "show.png"), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert rc == 0 and (tmp_path / "show.png").is_file() and shown["predicted"]
    rc = main(["flops", "--model", "demo", "--visual-tokens", "64", "--ratio", "0.25", "--compressor",
               "org/demo-compressor", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["conv"] > 0


def test_lmms_eval_model_takes_a_hub_id_offline(tmp_path, hub_cache, monkeypatch, tiny_dirs, load_tiny):  # noqa: F811
    pytest.importorskip("lmms_eval")
    from explainprune.integrations.lmms_eval.model import ExplainPrune

    vlm = load_tiny("qwen2_vl")
    f = _small(fingerprint=vlm.fingerprint(), heads=vlm.text_config.num_attention_heads)
    put_in_hub_cache(f.save_pretrained(tmp_path / "c"), "org/tiny-compressor", hub_cache)
    _no_network(monkeypatch)
    model = ExplainPrune.create_from_arg_string(
        f"pretrained={tiny_dirs('qwen2_vl')},method=learned,ratio=0.25,compressor=org/tiny-compressor,warmup=false",
        {"batch_size": 1, "device": "cpu"})
    assert torch.equal(model.engine.pruner.compressor.head.weight, f.head.weight)


# -- push ---------------------------------------------------------------------------------------------------
def _real_signature(name: str, kwargs: dict) -> None:
    import inspect

    from huggingface_hub import HfApi

    assert set(kwargs) <= set(inspect.signature(getattr(HfApi, name)).parameters), (name, sorted(kwargs))


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls (keywords checked against HfApi's own
    signatures) and the uploaded folder's files."""

    def __init__(self):
        self.calls, self.files = [], {}

    def create_repo(self, repo_id, **kwargs):
        _real_signature("create_repo", kwargs)
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        _real_signature("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs})
        self.calls.append(("upload_folder", repo_id, kwargs))
        root = Path(folder_path)
        self.files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "commit-info"


def test_push_uploads_exactly_the_saved_folder(tmp_path):
    f = _small()
    f.card = {"base_model": "Qwen/Qwen2-VL-2B-Instruct", "metrics": {"kl": 0.25}}
    api = FakeApi()
    assert f.push_to_hub("org/tiny-compressor", api=api, private=True, revision="dev") == "commit-info"
    saved = f.save_pretrained(tmp_path / "saved")
    assert api.files == {p.name: p.read_bytes() for p in saved.iterdir()}
    assert set(api.files) == {"config.json", "model.safetensors", "README.md"}
    meta = yaml.safe_load(api.files["README.md"].decode().split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and meta["explainprune"]["metrics"] == {"kl": 0.25}
    assert api.calls[0] == ("create_repo", "org/tiny-compressor",
                            {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][0] == "upload_folder" and api.calls[1][2]["revision"] == "dev"
    with pytest.raises(ValueError, match="org/name"):
        f.push_to_hub("not an id", api=FakeApi())
