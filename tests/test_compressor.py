"""f_θ: architecture as the paper, masking of padded batches, save/load, fingerprint check."""

from __future__ import annotations

import json

import pytest
import torch

from explainprune.compressor import Compressor, CompressorConfig

FP = {"model_type": "qwen2_vl", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}


def _attn(h: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, n, generator=g) / n


def test_architecture_matches_paper():
    torch.manual_seed(0)
    f = Compressor(in_channels=4)
    assert len(f.layers) == 5
    assert [layer.pointwise.out_channels for layer in f.layers] == [32, 64, 128, 256, 512]
    for layer, c_in in zip(f.layers, [4, 32, 64, 128, 256], strict=True):
        assert layer.depthwise.kernel_size == (3,) and layer.depthwise.groups == c_in
        assert layer.pointwise.kernel_size == (1,)
    assert f.head.out_channels == 1 and f.head.kernel_size == (1,)


@pytest.mark.parametrize("n", [1, 7, 50])
def test_output_is_a_distribution(n):
    torch.manual_seed(0)
    f = Compressor(in_channels=4)
    p = f(_attn(4, n, 0))
    assert p.shape == (n,)
    assert torch.all(p >= 0) and abs(float(p.detach().sum()) - 1) < 1e-5


def test_padded_batch_equals_alone():
    torch.manual_seed(0)
    f = Compressor(in_channels=4).eval()
    lengths = [5, 13, 9]
    alone = [f(_attn(4, n, i)) for i, n in enumerate(lengths)]
    batch = torch.full((3, 4, 13), 7.0)  # garbage in the padding must not leak
    mask = torch.zeros(3, 13, dtype=torch.bool)
    for i, n in enumerate(lengths):
        batch[i, :, :n] = _attn(4, n, i)
        mask[i, :n] = True
    out = f(batch, mask)
    assert out.shape == (3, 13)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n], alone[i], rtol=1e-5, atol=1e-7)
        assert torch.all(out[i, n:] == 0)


def test_average_heads_accepts_any_head_count_and_equals_mean():
    torch.manual_seed(0)
    f = Compressor(in_channels=4, average_heads=True)
    a = _attn(6, 20, 1)
    torch.testing.assert_close(f(a), f(a.mean(0, keepdim=True)))


def test_wrong_head_count_is_a_clear_error():
    f = Compressor(in_channels=4, fingerprint=FP)
    with pytest.raises(ValueError, match="4 heads; got 3"):
        f(_attn(3, 10, 0))
    with pytest.raises(ValueError, match=r"\[H, N_v\]"):
        f(torch.rand(10))


def test_mean_normalisation_makes_it_scale_free():
    torch.manual_seed(0)
    f = Compressor(in_channels=2)
    a = _attn(2, 30, 3)
    torch.testing.assert_close(f(a), f(a * 123.0))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    f = Compressor(CompressorConfig(in_channels=4, fingerprint=FP, activation="gelu"))
    f.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["fingerprint"] == FP and cfg["channels"] == [32, 64, 128, 256, 512]
    g = Compressor.from_pretrained(tmp_path / "c")
    assert g.config == f.config
    a = _attn(4, 40, 2)
    torch.testing.assert_close(g(a), f(a), rtol=0, atol=0)
    assert not list((tmp_path / "c").glob(".*tmp*"))


def test_load_never_unpickles(tmp_path, monkeypatch):
    f = Compressor(in_channels=2)
    f.save_pretrained(tmp_path)
    import pickle

    def boom(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    Compressor.from_pretrained(tmp_path)


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compressor"):
        Compressor.from_pretrained(tmp_path / "nope")


def test_fingerprint_mismatch_raises():
    f = Compressor(in_channels=4, fingerprint=FP)
    f.check_compatible(dict(FP))
    with pytest.raises(ValueError, match="num_hidden_layers: trained for 2, given 8"):
        f.check_compatible({**FP, "num_hidden_layers": 8})

    class Fake:
        def fingerprint(self):
            return {**FP, "model_type": "llava"}

    with pytest.raises(ValueError, match="model_type"):
        f.check_compatible(Fake())


def test_fingerprint_of_a_real_tiny_model(load_tiny):
    vlm = load_tiny("qwen2_vl")
    f = Compressor(in_channels=vlm.text_config.num_attention_heads, fingerprint=vlm.fingerprint())
    f.check_compatible(vlm)


def test_bad_options():
    with pytest.raises(ValueError, match="normalize"):
        CompressorConfig(normalize="zscore")
    with pytest.raises(ValueError, match="activation"):
        CompressorConfig(activation="tanhh")


# -- issue 20: options beyond the paper (skip path, log input, edge padding) ------------------------------------
def test_paper_config_is_section_4_1():
    c = CompressorConfig.paper(in_channels=4)
    assert (c.average_heads, c.normalize, c.padding, c.skip, c.kernel_size) == (True, "none", "zeros", False, 3)
    assert c.channels == (32, 64, 128, 256, 512) and c.input_channels == 1
    assert not hasattr(Compressor(c), "skip_gain")


def test_untrained_skip_compressor_is_its_input():
    """With the skip path the untrained f_θ is exactly the head-mean A_v^0 distribution (it ranks as layer0)."""
    torch.manual_seed(0)
    for normalize in ("log", "mean", "none"):
        f = Compressor(in_channels=4, skip=True, normalize=normalize, padding="replicate")
        a = _attn(4, 37, 5)
        mean = a.mean(0)
        torch.testing.assert_close(f(a), mean / mean.sum(), rtol=1e-5, atol=1e-7)
        assert torch.equal(torch.argsort(f(a), descending=True), torch.argsort(mean, descending=True))


def test_skip_gain_is_learned_and_saved(tmp_path):
    torch.manual_seed(0)
    f = Compressor(in_channels=4, skip=True, normalize="log", padding="reflect")
    with torch.no_grad():
        f.skip_gain.fill_(2.0)
        f.head.weight.normal_()
    f.save_pretrained(tmp_path / "f")
    g = Compressor.from_pretrained(tmp_path / "f")
    assert (g.config.skip, g.config.padding, g.config.normalize) == (True, "reflect", "log")
    a = _attn(4, 20, 1)
    torch.testing.assert_close(f(a), g(a))
    assert g.skip_gain.tolist() == [2.0]


def test_edge_index_hand_example():
    from explainprune.compressor import edge_index

    lengths = torch.tensor([4, 2])
    # positions -1 .. 4 of a 4-long row (one pad each side); the 2-long row treats 2.. as beyond its end
    assert edge_index(lengths, 4, 1, "replicate").tolist() == [[0, 0, 1, 2, 3, 3], [0, 0, 1, 1, 1, 1]]
    assert edge_index(lengths, 4, 1, "reflect").tolist() == [[1, 0, 1, 2, 3, 2], [1, 0, 1, 0, 0, 0]]


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_edge_padding_has_no_position_prior(padding):
    """A constant input gives a uniform output: the sequence ends look like the middle (zero padding does
    not: its ends see zeros, an absolute position prior that moves with the input size)."""
    torch.manual_seed(0)
    const = torch.full((4, 24), 1 / 24)
    for pad in (padding, "zeros"):
        torch.manual_seed(0)
        f = Compressor(in_channels=4, padding=pad, normalize="log")
        p = f(const)
        if pad == "zeros":
            assert float(p.max() - p.min()) > 1e-4
        else:
            torch.testing.assert_close(p, torch.full((24,), 1 / 24))


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_edge_padding_padded_batch_equals_alone(padding):
    torch.manual_seed(0)
    f = Compressor(in_channels=4, padding=padding, skip=True, normalize="log").eval()
    with torch.no_grad():
        f.head.weight.normal_()
    lengths = [5, 13, 1, 2]
    alone = [f(_attn(4, n, i)) for i, n in enumerate(lengths)]
    batch = torch.full((4, 4, 13), 7.0)
    mask = torch.zeros(4, 13, dtype=torch.bool)
    for i, n in enumerate(lengths):
        batch[i, :, :n] = _attn(4, n, i)
        mask[i, :n] = True
    out = f(batch, mask)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n], alone[i], rtol=1e-5, atol=1e-7)
        assert torch.all(out[i, n:] == 0)
    with pytest.raises(ValueError, match="prefix"):
        f(batch, mask.flip(-1))


def test_log_normalisation_is_scale_free():
    torch.manual_seed(0)
    f = Compressor(in_channels=2, normalize="log", padding="replicate")
    a = _attn(2, 30, 3)
    torch.testing.assert_close(f(a), f(a * 123.0))
