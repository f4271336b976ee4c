"""Appendix-D accounting: exact integers for the paper's setting, its rounded figures, Tables 7-8, the CLI."""

from __future__ import annotations

import json

import pytest

from explainprune.cli.main import main
from explainprune.compressor import Compressor
from explainprune.cost import (
    PAPER_COMPRESSOR,
    LLMShape,
    account,
    attention_flops,
    average_retention,
    compressor_channels,
    conv_flops,
    layer_flops,
    llm_flops,
    visual_tokens_per_layer,
)
from explainprune.pruning import available

N, D, M, L = 1568, 3584, 18944, 28
QWEN7B = LLMShape(D, M, L)


def test_paper_setting_exact_integers():
    per_layer = 4 * N * D**2 + 2 * N**2 * D + 3 * N * D * M  # Eq. 4 with the l*n*d*m FFN term
    assert per_layer == 80_564_191_232 + 17_623_416_832 + 319_379_472_384
    assert layer_flops(N, D, M, 3) == per_layer
    llm = account(QWEN7B, N).vanilla
    assert llm == 28 * per_layer == 11_691_878_252_544
    assert attention_flops(N, D) == N * D * D + N * D == 20_146_667_520
    # Eq. 6: (C_in k + C_in C_out) over 1->32->64->128->256->512 with k=3, plus the 512->1 pointwise
    per_token = (3 + 32) + (96 + 2048) + (192 + 8192) + (384 + 32768) + (768 + 131072) + 512
    assert conv_flops(N, **PAPER_COMPRESSOR) == N * per_token == 276_073_056


def test_paper_rounded_figures():
    acc = account(QWEN7B, N, 0.25, compressor=PAPER_COMPRESSOR)
    assert round(acc.vanilla / 1e12, 2) == 11.69
    assert round(acc.attention / 1e12, 2) == 0.02
    assert round(acc.conv / 1e12, 4) == 0.0003
    assert round(100 * acc.attention / acc.vanilla, 2) == 0.17
    # the paper's 0.0026% is its rounded 0.0003 T over 11.69 T (exactly: 0.0024%)
    assert round(100 * round(acc.conv / 1e12, 4) / round(acc.vanilla / 1e12, 2), 4) == 0.0026
    assert round(100 * acc.conv / acc.vanilla, 4) == 0.0024
    # f_θ reading all H heads of A_v^0 (e.g. 28) changes nothing at this precision
    assert round(conv_flops(N, in_channels=28) / 1e12, 4) == 0.0003


@pytest.mark.parametrize("n,shape,vanilla,fastv,ours", [
    (1728, QWEN7B, 12.9, 4.2, 3.1),             # Table 7, LLaVA-OneVision, 384x512 image
    (1302, QWEN7B, 9.6, 3.1, 2.4),              # Table 7, Qwen2-VL
    (5824, QWEN7B, 48.4, 14.9, 10.9),           # Table 8, Qwen2-VL, 32 frames
    (6272, QWEN7B, 52.7, 16.1, None),           # Table 8, LLaVA-OneVision (Ours 11.7: LLM part only)
    (3136, LLMShape(4096, 14336, 32), 27.0, 8.2, 6.3),  # Table 8, VILA1.5-8B (Llama-3-8B)
])
def test_tables_7_8(n, shape, vanilla, fastv, ours):
    """The paper's "FastV at the 4-th layer" is K=3 here (layers 0..2 full); "Ours" includes Eq. 5 + 6."""
    assert round(account(shape, n).vanilla / 1e12, 1) == vanilla
    assert round(account(shape, n, 0.25, layer=3).llm / 1e12, 1) == fastv
    if ours is not None:
        assert round(account(shape, n, 0.25, compressor=PAPER_COMPRESSOR).total / 1e12, 1) == ours
    assert round(account(QWEN7B, 1728, 0.25, layer=1).llm / 1e12, 1) == 3.5  # Table 7 FastV at the 2nd layer


def test_retention_over_layers():
    assert visual_tokens_per_layer(100, 25, 2, 4) == [100, 100, 25, 25]
    assert average_retention([100, 100, 25, 25], 100) == pytest.approx((2 + 2 * 0.25) / 4)
    acc = account(LLMShape(64, 128, 28), 1000, 0.5, layer=4)
    assert acc.average_retention == pytest.approx((4 + 24 * 0.5) / 28)
    assert account(LLMShape(64, 128, 28), 1000, 0.1).average_retention == pytest.approx(0.1)
    assert account(LLMShape(64, 128, 28), 7, 0.5).kept == 4  # ceil, as select does
    with pytest.raises(ValueError, match="0..28"):
        visual_tokens_per_layer(10, 5, 29, 28)


def test_compressor_channels_from_module():
    comp = Compressor(in_channels=4, channels=(8, 16))
    assert compressor_channels(comp) == dict(in_channels=4, channels=(8, 16), kernel_size=3)
    assert conv_flops(10, 4, (8, 16), 3) == 10 * ((12 + 32) + (24 + 128) + 16)
    assert compressor_channels(object()) is None


def test_flops_cli_json_and_table(capsys):
    args = ["flops", "--hidden", str(D), "--intermediate", str(M), "--layers", str(L), "--visual-tokens",
            str(N), "--ratio", "0.25", "--method", "learned"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vanilla"] == 11_691_878_252_544 and out["attention"] == 20_146_667_520
    assert out["conv"] == 276_073_056 and out["kept"] == 392 and out["average_retention"] == 0.25
    assert round(out["attention_share"], 2) == 0.17
    assert main(["flops", "--hidden", "64", "--intermediate", "128", "--layers", "4", "--visual-tokens", "100",
                 "--ratio", "0.5", "--method", "fastv", "--fastv-layer", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_per_layer"] == [100, 100, 50, 50] and out["attention"] == 0
    assert main(args) == 0
    assert "FLOPs_attn (Eq. 5)" in capsys.readouterr().out
    assert main(["flops", "--visual-tokens", "10"]) == 2
    assert "missing --hidden" in capsys.readouterr().err
    assert main([*args[:-2], "--ratio", "0", "--json"]) == 2


def test_flops_cli_reads_a_checkpoint_config(tiny_dirs, capsys):
    assert main(["flops", "--model", str(tiny_dirs("qwen2_vl")), "--visual-tokens", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == {"hidden": 64, "intermediate": 128, "layers": 2, "ffn_matrices": 3, "vision_head_dim": 16}


# -- one cost model: `explainprune flops` counts every registered method as the runner does ---------------
def _spec_and_runner_pruner(name: str, vlm, tmp_path):
    """(the --method spec, the pruner the runner uses): 'learned' with a saved compressor of the model's
    heads (the CLI then reads its channels from the directory)."""
    from explainprune.pruning import get_pruner

    if name == "learned":
        comp = Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(8, 16))
        comp.save_pretrained(tmp_path / "f")
        return f"learned:compressor={tmp_path / 'f'}", get_pruner("learned", compressor=str(tmp_path / "f"))
    return name, get_pruner(name)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", available())
def test_flops_cli_agrees_with_the_runner(name, ratio, deep, deep_dirs, tmp_path, capsys):
    """Same per-layer visual tokens (those the generation kept) and the same FLOPs, for every method. The
    input is a short video: every method serves videos (some, e.g. temporal ones, only videos)."""
    from explainprune.evaluation.runner import run_one
    from explainprune.testing import random_image

    vlm = deep("qwen2_vl")[0]
    frames = [random_image(20 + i, (112, 112)) for i in range(4)]
    p = vlm.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?")
    sample = type("S", (), {"id": "a", "question": p.question, "answer": "7", "video": frames, "meta": {}})()
    spec, pruner = _spec_and_runner_pruner(name, vlm, tmp_path)
    runs = []
    generate = pruner.generate
    pruner.generate = lambda *a, **k: runs.append(generate(*a, **k)) or runs[-1]  # see what the run kept
    shape = LLMShape.from_config(vlm.text_config, vlm.config.vision_config)
    rec = run_one(vlm, pruner, spec, p, sample, ratio, shape, 2)
    assert main(["flops", "--model", str(deep_dirs("qwen2_vl")), "--visual-tokens", str(p.num_visual),
                 "--ratio", str(ratio), "--method", spec, "--json",
                 "--text-tokens", str(p.instruction[1] - p.instruction[0])]) == 0
    cli = json.loads(capsys.readouterr().out)
    out = runs[0]
    kept_per_layer = list(getattr(out, "visual_per_layer", None) or [out.visual_tokens] * shape.layers)
    assert cli["nominal"] == pruner.count_from_media
    if cli["nominal"]:  # evs, downsample: the count follows the media's frames / grids, which flops cannot see
        assert cli["tokens_per_layer"] == pruner.tokens_per_layer(p.num_visual, ratio, shape.layers)
        return
    assert cli["tokens_per_layer"] == kept_per_layer
    assert cli["llm"] == rec.flops_llm and cli["attention"] + cli["conv"] + cli["selection"] == rec.flops_overhead
    assert cli["average_retention"] == pytest.approx(rec.average_retention)
    if name != "vanilla":
        assert 0 < cli["llm"] < cli["vanilla"]  # it pruned: the comparison is not between two unpruned runs


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_visionzip_key_dim_from_the_config_is_the_measured_one(family, load_tiny, tiny_dirs):
    from explainprune.pruning import get_pruner
    from explainprune.testing import random_image

    vlm = load_tiny(family)
    pruner = get_pruner("visionzip")
    p = vlm.prepare(images=random_image(1), question="how many 7 are there ?")
    pruner.keep(vlm, p, 0.5)
    shape = LLMShape.from_config(json.loads((tiny_dirs(family) / "config.json").read_text())["text_config"],
                                 json.loads((tiny_dirs(family) / "config.json").read_text())["vision_config"])
    assert shape.vision_head_dim == pruner._key_dim > 1
    fresh = get_pruner("visionzip")  # never run: the key dim comes from the shape alone
    assert fresh.selection_flops(shape, 40, [20] * 2) == pruner.selection_flops(shape, 40, [20] * 2) == \
        (40 - 20) * round(20 * 10 / 64) * shape.vision_head_dim + 40 * shape.hidden


SHAPE_ARGS = ["--hidden", "64", "--intermediate", "128", "--layers", "8", "--visual-tokens", "100"]


def test_flops_cli_takes_method_specs_and_refuses_unknown_names(capsys):
    assert main(["flops", *SHAPE_ARGS, "--ratio", "0.25", "--method", "fastv:layer=3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_per_layer"] == [100] * 3 + [25] * 5 and out["method"] == "fastv:layer=3"
    assert main(["flops", *SHAPE_ARGS, "--ratio", "0.25", "--method", "fastv:layer=3"]) == 0
    assert "| visual tokens per layer | 100 x 3, 25 x 5 |" in capsys.readouterr().out
    from explainprune.pruning import get_pruner

    seen = []
    for spec, options in (("pdrop:lam=0.5", {"lam": 0.5}), ("pdrop", {})):  # the options reach the pruner
        assert main(["flops", *SHAPE_ARGS, "--ratio", "0.25", "--method", spec, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        pruner = get_pruner("pdrop", **options)
        assert out["tokens_per_layer"] == pruner.tokens_per_layer(100, 0.25, 8)
        assert out["selection"] == pruner.selection_flops(LLMShape(64, 128, 8), 100, out["tokens_per_layer"]) > 0
        seen.append(out["tokens_per_layer"])
    assert seen[0] != seen[1]
    for method, message in (("nosuchmethod", "unknown pruner 'nosuchmethod'. available: "),
                            ("fastv2", "unknown pruner 'fastv2'. did you mean 'fastv'?"),
                            ("fastv:layer=8", "fastv prunes at layer 8: it must be in 1..7 for a 8-layer LLM"),
                            ("pdrop:lam=2", "pdrop lam must be in [0, 1]")):
        assert main(["flops", *SHAPE_ARGS, "--method", method]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("explainprune flops: error: ")
        assert message in lines[0], lines[0]
    assert main(["flops", *SHAPE_ARGS, "--method", "dart", "--fastv-layer", "3"]) == 2
    assert "--fastv-layer is for --method fastv" in capsys.readouterr().err


def test_method_account_defaults_and_what_a_run_kept():
    from explainprune.cost import method_account
    from explainprune.pruning import get_pruner

    shape = LLMShape(64, 128, 4)

    class Outside:  # a pruner from outside the registry, with none of the cost methods
        layer = 0

    assert method_account(Outside(), shape, 100, 0.5).tokens_per_layer == [50] * 4
    assert method_account(Outside(), shape, 100, 0.5, kept=10).tokens_per_layer == [10] * 4  # what it kept
    fastv = get_pruner("fastv", layer=1)
    assert fastv.tokens_per_layer(100, 0.3, 4) == [100, 30, 30, 30]
    assert method_account(fastv, shape, 100, 0.3, kept=20).tokens_per_layer == [100, 20, 20, 20]
    assert method_account(fastv, shape, 100, 0.3, measured=[100, 100, 7, 7]).llm == llm_flops([100, 100, 7, 7], shape)
    assert get_pruner("vanilla").tokens_per_layer(100, 0.1, 4) == [100] * 4
    assert get_pruner("random").tokens_per_layer(7, 0.5, 3) == [4] * 3  # ceil, as select keeps
