"""explainprune.load: hub ids through the hub cache (offline), revisions, chat templates of hub checkpoints,
dtype="auto", device_map, processor options, and fast clear errors for names that are not checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import explainprune
import explainprune.models as models
from explainprune.models.hub import is_hub_id
from explainprune.testing import build_tiny, put_in_hub_cache, random_image

QWEN_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
LLAVA_ID = "llava-hf/llava-1.5-7b-hf"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache under a temporary HF_HOME, offline. huggingface_hub reads HF_HOME and
    HF_HUB_OFFLINE once at import, so its constants are patched too (the env alone: see the subprocess test)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _no_network(monkeypatch):
    """Any name look-up or connection fails the test at once (instead of retrying for ~25 s)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _template_only_in_json(checkpoint: Path, template: str) -> None:
    """Lay out the chat template as Qwen / llava-hf hub repos do: chat_template.json (the processor's),
    while the tokenizer's own template (tokenizer_config.json) is a different, text-only one."""
    (checkpoint / "chat_template.jinja").unlink(missing_ok=True)
    (checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    cfg_file = checkpoint / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = "{% for m in messages %}TEXT ONLY {{ m['content'] }}{% endfor %}"
    cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize(("family", "repo_id"), [
    ("qwen2_5_vl", QWEN_ID), ("llava", LLAVA_ID), ("llava_onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    ("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct"), ("qwen3_vl_moe", "Qwen/Qwen3-VL-30B-A3B-Instruct")])
def test_hub_id_with_dots_loads_from_the_offline_cache(tmp_path, hub_cache, monkeypatch, family, repo_id,
                                                        tiny_dirs, load_tiny):
    put_in_hub_cache(tiny_dirs(family), repo_id, hub_cache)
    _no_network(monkeypatch)
    vlm = explainprune.load(repo_id)
    assert vlm.config.model_type == family
    local = load_tiny(family)
    for name, p in vlm.model.state_dict().items():
        assert torch.equal(p, local.model.state_dict()[name]), name
    prompt = vlm.prepare(images=random_image(0), question="what digit is in row 1 , column 2 ?")
    assert prompt.num_visual > 0


def _own_template(checkpoint: Path) -> str:
    return (checkpoint / "chat_template.jinja").read_text()


def test_chat_template_json_of_a_hub_checkpoint_is_read(tmp_path, hub_cache, monkeypatch):
    ckpt = build_tiny("qwen2_vl", tmp_path / "ckpt")
    original = _own_template(ckpt)
    marked = original.replace("<|im_start|>assistant\n", "<|im_start|>assistant\nthe ")
    assert marked != original
    _template_only_in_json(ckpt, marked)
    put_in_hub_cache(ckpt, "Qwen/Qwen2-VL-2B-Instruct", hub_cache)
    _no_network(monkeypatch)
    vlm = explainprune.load("Qwen/Qwen2-VL-2B-Instruct")
    assert vlm.chat_template == marked
    prompt = vlm.prepare(images=random_image(0), question="what digit is in row 1 , column 2 ?")
    assert vlm.tokenizer.decode(prompt.input_ids[0, -2:]).split()[-1] == "the"
    assert explainprune.load(ckpt).chat_template == marked  # a local folder reads it too


def test_revision_selects_the_snapshot_for_weights_processor_and_template(tmp_path, hub_cache, monkeypatch):
    main = build_tiny("qwen2_vl", tmp_path / "main", layers=2)
    v2 = build_tiny("qwen2_vl", tmp_path / "v2", layers=3, max_pixels=28 * 28 * 4)
    _template_only_in_json(v2, _own_template(v2) + "{# v2 #}")
    put_in_hub_cache(main, "org/tiny-qwen", hub_cache)
    put_in_hub_cache(v2, "org/tiny-qwen", hub_cache, revision="v2")
    _no_network(monkeypatch)
    assert explainprune.load("org/tiny-qwen").text_config.num_hidden_layers == 2
    vlm = explainprune.load("org/tiny-qwen", revision="v2")
    assert vlm.text_config.num_hidden_layers == 3
    assert vlm.image_processor.size["longest_edge"] == 28 * 28 * 4
    assert vlm.chat_template.endswith("{# v2 #}")


def test_hub_cache_through_the_environment_alone(tmp_path, tiny_dirs):
    """What a user does: HF_HOME and HF_HUB_OFFLINE=1 in the environment, a fresh interpreter."""
    home = tmp_path / "hf_home"
    put_in_hub_cache(tiny_dirs("qwen2_5_vl"), QWEN_ID, home / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    code = (f"import explainprune; v = explainprune.load({QWEN_ID!r}); "
            "print(v.config.model_type, v.model.dtype, v.device)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["qwen2_5_vl", "torch.float32", "cpu"]


def test_unreachable_hub_loads_a_cached_id_without_retries(tmp_path, tiny_dirs):
    """No HF_HUB_OFFLINE, the hub unreachable (a loopback port nothing listens on): the cached id loads from
    its snapshot, with one line saying so and none of transformers' retries (each file retried for ~23 s
    before: ~195-230 s in all, measured)."""
    home = tmp_path / "hf_home"
    snapshot = put_in_hub_cache(tiny_dirs("qwen2_5_vl"), QWEN_ID, home / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=os.pathsep.join(sys.path),
               OMP_NUM_THREADS="1")
    code = f"import explainprune; v = explainprune.load({QWEN_ID!r}); print(v.config.model_type)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "qwen2_5_vl"
    assert f"the hub (http://127.0.0.1:9) cannot be reached: loading {QWEN_ID} from the hub cache ({snapshot})" \
        in out.stderr
    assert "Retrying" not in out.stderr and "Connection refused" not in out.stderr
    assert seconds < 150, seconds  # a loaded 2-core machine needs ~45 s for the imports and the load


def test_unreachable_hub_and_uncached_id_fails_at_once(hub_cache, monkeypatch):
    from huggingface_hub import constants

    from explainprune.models.hub import hub_reachable, resolve

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    start = time.perf_counter()
    assert not hub_reachable()
    with pytest.raises(FileNotFoundError, match=r"the hub \(http://127.0.0.1:9\) cannot be reached and "
                                                 r"'org/model' is not in the hub cache"):
        resolve("org/model")
    assert time.perf_counter() - start < 10


def test_hub_reachable_when_something_listens(monkeypatch):
    import socket

    from huggingface_hub import constants

    from explainprune.models.hub import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(key, raising=False)
        assert hub_reachable()


def test_typo_fails_fast_with_did_you_mean(monkeypatch):
    _no_network(monkeypatch)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="did you mean 'demo'"):
        explainprune.load("dmeo")
    assert time.perf_counter() - t < 1.0


def test_uncached_hub_id_offline_names_the_cache_and_a_close_cached_id(hub_cache, monkeypatch, tiny_dirs):
    put_in_hub_cache(tiny_dirs("qwen2_5_vl"), QWEN_ID, hub_cache)
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as err:
        explainprune.load("Qwen/Qwen2.5-VL-7B-Instruc")
    assert f"did you mean {QWEN_ID!r}" in str(err.value)
    assert str(hub_cache) in str(err.value)


@pytest.mark.parametrize("name", ["./no/such/ckpt", "/no/such/ckpt", "runs/a/ckpt", "~/no-such-ckpt", "ckpt/"])
def test_missing_local_path_names_it(name, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint directory at {name}"):
        explainprune.load(name)


def test_hub_id_shape():
    assert is_hub_id(QWEN_ID) and is_hub_id(LLAVA_ID) and is_hub_id("org/name_1")
    for bad in ("demo", "dmeo", "a/b/c", "org/na--me", "org/x..y", "org/.x", "org/x.git", "org/x y", "/x"):
        assert not is_hub_id(bad), bad


def _save_as(checkpoint: Path, dtype: torch.dtype) -> Path:
    from transformers import Qwen2VLForConditionalGeneration

    Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).save_pretrained(checkpoint)
    return checkpoint


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path):
    ckpt = _save_as(build_tiny("qwen2_vl", tmp_path / "bf16"), torch.bfloat16)
    assert explainprune.load(ckpt).model.dtype == torch.bfloat16
    assert explainprune.load(ckpt, dtype="float32").model.dtype == torch.float32
    assert explainprune.load(ckpt, dtype=torch.float16).model.dtype == torch.float16
    assert explainprune.load("demo").model.dtype == torch.float32  # stored as float32


def test_bad_dtype_is_rejected_before_loading():
    with pytest.raises(ValueError, match="accepted: auto, float32, bfloat16, float16"):
        explainprune.load("demo", dtype="fp8")


def test_device_map_places_without_moving(tiny_dirs, monkeypatch):
    pytest.importorskip("accelerate")  # the [gpu] / [test] extra
    moved = []
    original = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        moved.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    vlm = explainprune.load(tiny_dirs("qwen2_vl"), device_map="auto")
    assert "Qwen2VLForConditionalGeneration" not in moved
    assert vlm.device == torch.device("cpu")
    explainprune.load(tiny_dirs("qwen2_vl"), device="cpu")
    assert "Qwen2VLForConditionalGeneration" in moved  # without a device_map the model is moved


def test_device_and_device_map_together_are_rejected():
    with pytest.raises(ValueError, match="not both"):
        explainprune.load("demo", device="cpu", device_map="auto")


def test_device_map_without_accelerate_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "_accelerate_available", lambda: False)
    with pytest.raises(ValueError, match=r"explainprune\[gpu\]"):
        explainprune.load("demo", device_map="auto")


def test_device_is_where_the_input_embeddings_are(tiny_dirs):
    """Sharded by device_map, the first parameter (the vision tower) may sit elsewhere; inputs go to the
    embeddings' device."""
    vlm = explainprune.load(tiny_dirs("qwen2_vl"))
    vlm.model.model.visual.to("meta")
    assert next(vlm.model.parameters()).device.type == "meta"
    assert vlm.device == torch.device("cpu")


def test_processor_options_reach_the_image_processor(tiny_dirs, image):
    full = explainprune.load(tiny_dirs("qwen2_vl"))
    capped = explainprune.load(tiny_dirs("qwen2_vl"), max_pixels=28 * 28 * 4, min_pixels=28 * 28)
    assert capped.image_processor.size["longest_edge"] == 28 * 28 * 4
    assert capped.image_processor.size["shortest_edge"] == 28 * 28
    q = "what digit is in row 1 , column 2 ?"
    assert capped.prepare(images=image, question=q).num_visual <= 4 < full.prepare(images=image, question=q).num_visual


def test_unknown_load_option_lists_the_accepted_ones(tiny_dirs):
    with pytest.raises(ValueError, match="max_pixel.*max_pixels"):
        explainprune.load(tiny_dirs("qwen2_vl"), max_pixel=1000)
    with pytest.raises(ValueError, match="unknown option"):
        explainprune.load(tiny_dirs("llava"), max_pixels=1000)  # not an option of the CLIP processor
