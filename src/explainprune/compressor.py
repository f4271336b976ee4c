"""f_θ: the explainability-based compressor (paper Section 3.3, Eq. 2), the only learned module.

A fully convolutional 1-D network maps the first-layer instruction->visual attention A_v^0 [H, N_v] to a
probability distribution over the N_v visual tokens (R̃_v = f_θ(A_v^0), Eq. 2). As in Section 4.1: five
depthwise-separable layers (depthwise conv, kernel 3, then pointwise conv) with 32, 64, 128, 256, 512
channels, an activation after each, a final pointwise conv to one channel and a softmax over the tokens.

Options beyond the paper (each off in ``CompressorConfig.paper()``, measured in docs/compressor.md):
``normalize="log"`` (log of the mean-normalised input), ``padding="replicate"|"reflect"`` (no zeros at the
sequence ends, so no absolute position prior that breaks on other sizes) and ``skip=True``: the logits are
``gain * log(mean-normalised head-mean A_v^0) + g(x)`` with ``gain`` a learned scalar (initialised to 1) and
the conv stack's last layer initialised to zero, so an untrained f_θ ranks exactly as its input (the
``layer0`` pruner) and training learns a residual.

Padded batches: ``mask`` [B, N] (True = real token, a prefix: right padding). With zero padding the
padding is zeroed before every convolution, so a real token sees exactly the zeros it would see at the
sequence end alone; with replicate / reflect padding each sample is padded from its own last real tokens.
Padding gets zero probability. A sample gives the same output alone or inside a padded batch.

Saved as ``config.json`` (options + the fingerprint of the model it was trained for) and
``model.safetensors``; loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from explainprune.errors import InputError
from explainprune.files import atomic_path, write_json_atomic  # write_json_atomic: also imported from here

FORMAT = "explainprune-compressor"
FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "hidden_size")
NORMALIZERS = ("mean", "log", "none")
PADDINGS = ("zeros", "replicate", "reflect")
EPS = 1e-6  # floor of the mean-normalised input under log (A_v^0 is a softmax: > 0 on real tokens)
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class CompressorConfig:
    """Options of f_θ.

    in_channels:   heads H of A_v^0 (ignored when ``average_heads``: then one channel)
    average_heads: average A_v^0 over heads first (input [1, N_v], works for any H)
    normalize:     "mean" divides each channel by its mean over the real tokens (scale-free input, so
                   longer inputs, whose attention values are smaller, look alike); "log": the log of that
                   (floored at 1e-6); "none" feeds it raw (the paper)
    padding:       how each conv pads the sequence ends: "zeros" (the paper), "replicate" or "reflect"
    skip:          add gain * log(mean-normalised head-mean A_v^0) to the logits (gain learned, init 1; the
                   last layer starts at zero, so the untrained f_θ ranks as its input)
    fingerprint:   the model it was trained for (``VLM.fingerprint()``), or empty for "any"
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    kernel_size: int = 3
    activation: str = "relu"
    average_heads: bool = False
    normalize: str = "mean"
    padding: str = "zeros"
    skip: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def paper(cls, **overrides: Any) -> CompressorConfig:
        """Section 4.1 exactly: head-averaged A_v^0 as one raw channel, zero padding, no skip path."""
        return cls(**{"average_heads": True, "normalize": "none", "padding": "zeros", "skip": False, **overrides})

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-length output); got {self.kernel_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; available: {', '.join(ACTIVATIONS)}")
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"unknown normalize {self.normalize!r}; available: {', '.join(NORMALIZERS)}")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; available: {', '.join(PADDINGS)}")
        if self.in_channels < 1 or not self.channels:
            raise ValueError("in_channels must be >= 1 and channels non-empty")

    @property
    def input_channels(self) -> int:
        return 1 if self.average_heads else self.in_channels

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


def edge_index(lengths: Tensor, n: int, pad: int, mode: str) -> Tensor:
    """[B, n + 2 pad] source positions of each sample padded by ``pad`` at both ends of its own length.

    ``mode`` "replicate" repeats the end tokens, "reflect" mirrors around them (as ``torch.nn.functional.pad``);
    positions past a sample's length (batch padding) are treated as beyond its end.
    """
    j = torch.arange(-pad, n + pad, device=lengths.device).unsqueeze(0)  # [1, n + 2p]
    last = (lengths - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
    if mode == "reflect":
        j = torch.where(j < 0, -j, j)
        j = torch.where(j > last, 2 * last - j, j)
    return torch.minimum(j.clamp(min=0), last)


class SeparableConv1d(nn.Module):
    """Depthwise conv (kernel k, 'same' length) then pointwise conv: [B, C_in, N] -> [B, C_out, N].

    ``padding`` "zeros" pads with zeros (the caller zeroes batch padding first); "replicate" / "reflect"
    pad each sample from its own real tokens (``lengths`` [B] needed).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: str = "zeros"):
        super().__init__()
        self.padding = padding
        self.depthwise = nn.Conv1d(c_in, c_in, kernel_size, padding=kernel_size // 2 if padding == "zeros" else 0,
                                   groups=c_in)
        self.pointwise = nn.Conv1d(c_in, c_out, 1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.padding != "zeros":
            b, c, n = x.shape
            if lengths is None:
                lengths = torch.full((b,), n, dtype=torch.long, device=x.device)
            idx = edge_index(lengths, n, self.depthwise.kernel_size[0] // 2, self.padding)
            x = torch.gather(x, 2, idx.unsqueeze(1).expand(b, c, idx.shape[1]))
        return self.pointwise(self.depthwise(x))


class Compressor(nn.Module):
    """f_θ (Eq. 2): ``f(A)``, A [H, N_v] -> probs [N_v], or A [B, H, N_v] (+ mask [B, N_v]) -> [B, N_v]."""

    def __init__(self, config: CompressorConfig | None = None, **options: Any):
        super().__init__()
        self.config = config if config is not None else CompressorConfig(**options)
        c = self.config
        act = ACTIVATIONS[c.activation]
        widths = (c.input_channels, *c.channels)
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.layers = nn.ModuleList(SeparableConv1d(a, b, c.kernel_size, c.padding) for a, b in pairs)
        self.act = act()
        self.head = nn.Conv1d(widths[-1], 1, 1)
        if c.skip:  # the untrained f_θ is its input's distribution: residual starts at exactly zero
            self.skip_gain = nn.Parameter(torch.ones(1))
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # -- forward ---------------------------------------------------------------------------------------
    def _prepare(self, attention: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Checks shapes; returns x [B, C, N] (float, normalised, padding zeroed), mask [B, N], the skip
        logits [B, N] (log of the mean-normalised head mean; None without ``skip``) and ``single``."""
        a = torch.as_tensor(attention)
        single = a.dim() == 2
        if single:
            a = a.unsqueeze(0)
        if a.dim() != 3:
            raise ValueError(f"attention must be [H, N_v] or [B, H, N_v]; got shape {tuple(a.shape)}")
        p = next(self.parameters())
        a = a.to(device=p.device, dtype=p.dtype)
        b, h, n = a.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=a.device)
        else:
            mask = torch.as_tensor(mask, device=a.device).bool()
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            if mask.shape != (b, n):
                raise ValueError(f"mask must be [B, N_v] = {(b, n)}; got {tuple(mask.shape)}")
            if self.config.padding != "zeros" and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError("mask must mark a prefix of each row (right padding) with "
                                 f"padding={self.config.padding!r}")
        if n == 0:
            raise ValueError("attention has no visual tokens (N_v = 0)")
        if not self.config.average_heads and h != self.config.in_channels:
            raise ValueError(
                f"this compressor takes A_v^0 with {self.config.in_channels} heads; got {h}. It was trained "
                f"for another model (fingerprint {self.config.fingerprint or 'unset'})")
        m = mask.unsqueeze(1).to(a.dtype)
        count = m.sum(-1, keepdim=True).clamp(min=1)
        skip = None
        if self.config.skip:
            mean = a.mean(1, keepdim=True) * m
            skip = (mean / (mean.sum(-1, keepdim=True) / count).clamp(min=1e-12)).clamp(min=EPS).log().squeeze(1)
        if self.config.average_heads:
            a = a.mean(1, keepdim=True)
        a = a * m
        if self.config.normalize in ("mean", "log"):
            a = a / (a.sum(-1, keepdim=True) / count).clamp(min=1e-12)
        if self.config.normalize == "log":
            a = a.clamp(min=EPS).log() * m
        return a, mask, skip, single

    def logits(self, attention: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unnormalised scores [B, N_v] (padding = -inf); same leading shape rules as ``forward``."""
        x, mask, skip, single = self._prepare(attention, mask)
        m = mask.unsqueeze(1).to(x.dtype)
        lengths = mask.sum(-1)
        for layer in self.layers:
            x = self.act(layer(x * m, lengths)) * m  # padding zeroed before each depthwise conv
        z = self.head(x).squeeze(1)
        if skip is not None:
            z = z + self.skip_gain * skip
        z = z.masked_fill(~mask, float("-inf"))
        return z.squeeze(0) if single else z

    def log_probs(self, attention: Tensor, mask: Tensor | None = None) -> Tensor:
        """log f_θ(A): log-softmax over the visual tokens (padding = -inf)."""
        return torch.log_softmax(self.logits(attention, mask), dim=-1)

    def forward(self, attention: Tensor, mask: Tensor | None = None) -> Tensor:
        """R̃_v = f_θ(A_v^0) (Eq. 2): probabilities over the visual tokens, 0 on padding."""
        return torch.softmax(self.logits(attention, mask), dim=-1)

    # -- compatibility ---------------------------------------------------------------------------------
    def check_compatible(self, vlm_or_fingerprint: Any) -> None:
        """Raise ValueError if this compressor was trained for another model than ``vlm`` (or fingerprint)."""
        fp = vlm_or_fingerprint
        if hasattr(fp, "fingerprint") and callable(fp.fingerprint):
            fp = fp.fingerprint()
        mine = self.config.fingerprint
        if not mine:
            return
        diff = {k: (mine.get(k), fp.get(k)) for k in FINGERPRINT_KEYS if mine.get(k) != fp.get(k)}
        if diff:
            detail = ", ".join(f"{k}: trained for {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"this compressor was trained for another model ({detail}); f_θ is specific "
                             "to one MLLM (Section 3.3): label and train one for this model")

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (with the weights' SHA-256) and ``README.md`` (the model
        card; ``card``: its ``base_model`` / ``labels`` / ``metrics`` / ``training``, default ``self.card``) to
        ``directory``, atomically file by file."""
        from explainprune.compressor_hub import CARD, CHECKSUM_KEY, CONFIG, WEIGHTS, card_text
        from explainprune.files import file_sha256, write_text_atomic

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(d / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            digest = file_sha256(tmp)
        config = {"format": FORMAT, "version": 1, **self.config.to_json(), CHECKSUM_KEY: digest}
        write_json_atomic(d / CONFIG, config)
        info = card if card is not None else getattr(self, "card", None)
        write_text_atomic(d / CARD, card_text(config, info))
        return d

    def push_to_hub(self, repo_id: str, *, card: dict[str, Any] | None = None, api: Any = None,
                    token: str | None = None, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, create_pr: bool = False) -> Any:
        """Save (as ``save_pretrained``) into a temporary folder and upload exactly that folder to the hub model
        repo ``repo_id`` (created if missing); returns the commit info. ``api``: an ``huggingface_hub.HfApi``."""
        import tempfile

        from explainprune.compressor_hub import push_folder

        with tempfile.TemporaryDirectory(prefix="explainprune-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "compressor", card=card)
            return push_folder(folder, repo_id, api=api, token=token, private=private, revision=revision,
                               commit_message=commit_message, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        revision: str | None = None) -> Compressor:
        """Load a compressor written by ``save_pretrained`` (JSON + safetensors; nothing is unpickled) from a
        folder, or from a hub id ``org/name`` at ``revision``, found as checkpoints are (the hub cache offline).
        The weights are checked against the SHA-256 in config.json (folders saved before it had none)."""
        from explainprune.compressor_hub import CHECKSUM_KEY, locate, read_card
        from explainprune.files import file_sha256

        cfg_file, weights, card_file = locate(directory, revision)
        d = weights.parent
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"not valid JSON ({err})", file=cfg_file,
                             hint="the compressor folder is damaged: train it again or copy it anew") from None
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise InputError("is not an explainprune compressor config", file=cfg_file)
        raw.pop("version", None)
        expected = raw.pop(CHECKSUM_KEY, None)
        known = CompressorConfig.__dataclass_fields__
        try:
            model = cls(CompressorConfig(**{k: v for k, v in raw.items() if k in known}))
        except (TypeError, ValueError) as err:
            raise InputError(f"invalid compressor options ({err})", file=cfg_file) from None
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as err:  # safetensors raises its own SafetensorError (truncated / damaged file)
            raise InputError(f"cannot read the weights ({type(err).__name__}: {err})", file=weights,
                             hint="the compressor folder is damaged: train it again or copy it anew") from None
        if expected is not None:  # folders saved before the checksum existed have none
            found = file_sha256(weights)
            if not isinstance(expected, str) or found != expected.lower():
                raise InputError(f"does not match the SHA-256 in {cfg_file.name} (expected {str(expected)[:16]}..., "
                                 f"found {found[:16]}...): the weights changed after they were saved",
                                 file=weights, hint="the compressor folder is damaged: train it again or copy it anew")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            missing = sorted(set(model.state_dict()) - set(state))
            detail = f"missing tensors {missing[:4]}" if missing else str(err).splitlines()[0]
            shapes = [f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)} in the file"
                      for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
            if shapes and not missing:
                detail = "tensor shapes do not match config.json: " + "; ".join(shapes[:2])
            raise InputError(f"the weights do not match its config.json ({detail})", file=d,
                             hint="config.json and model.safetensors must come from the same save") from None
        model.card = read_card(card_file)
        return model.to(map_location).eval()
