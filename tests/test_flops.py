"""Appendix-D accounting: exact integers for the paper's setting, its rounded figures, Tables 7-8, the CLI."""

from __future__ import annotations

import json

import pytest

from explainprune.cli.main import main
from explainprune.compressor import Compressor
from explainprune.evaluation.flops import (
    PAPER_COMPRESSOR,
    LLMShape,
    account,
    attention_flops,
    average_retention,
    compressor_channels,
    conv_flops,
    layer_flops,
    visual_tokens_per_layer,
)

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
    assert out["shape"] == {"hidden": 64, "intermediate": 128, "layers": 2, "ffn_matrices": 3}
