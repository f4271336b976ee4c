"""Training f_θ on a label set (Section 3.3 "Training Objectives", Section 4.1 "Training f_θ").

Targets R_v* (bottom 50% of R_v zeroed, divided by the sum), loss KL(R_v* || f_θ(A_v^0)) (Eq. 3), Adam
with default settings, batch 128. Checkpoints every epoch (safetensors + JSON, nothing pickled); a
resumed run equals an uninterrupted one (shuffling is seeded per epoch, Adam's state is restored).

``out/``: log.jsonl (one line per epoch), checkpoint.json -> checkpoints/epoch-NNNN/, best/ (the epoch the
guard keeps, ``explainprune.guard``), compressor/ (the kept f_θ, for ``Compressor.from_pretrained`` and
``get_pruner("learned", compressor=...)``) and metrics.json (its validation metrics with the uniform /
random / raw-attention baselines and the guard's numbers).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from explainprune.compressor import Compressor, CompressorConfig
from explainprune.errors import InputError
from explainprune.files import atomic_path, write_json_atomic
from explainprune.guard import Guard, compare_groups, guard_metrics, input_scores, sample_scores, selection_key
from explainprune.labels import LabelRecord, index_digest, load_records, read_index
from explainprune.pruning.base import select

RATIOS = (0.5, 0.25, 0.1)
SELECT = ("groups", "guard", "last")
LEGACY = {"normalize": "mean", "padding": "zeros", "skip": False, "select": "last"}  # runs saved before issue 20


# -- the math ---------------------------------------------------------------------------------------------
def relevance_target(r: Tensor, drop: float = 0.5, power: float = 1.0) -> Tensor:
    """R_v* (Section 3.3): the bottom ``drop`` share of R_v [N_v] set to 0, then divided by the sum.

    Division, not softmax (the paper: softmax of near-equal values is near-uniform). The ``floor(drop*N)``
    smallest entries are zeroed (ties by position); negative values (``clamp=False`` relevance) count as 0.
    An all-zero result falls back to uniform. ``power`` (not in the paper; 1 = the paper) raises the kept
    values to that power before the division: below 1 it flattens a peaked R_v so that the order of the
    smaller kept values carries weight in the KL loss (same ranking, same zeros).
    """
    if not power > 0:
        raise ValueError(f"power must be > 0; got {power}")
    r = r.detach().float().flatten()
    n = r.numel()
    out = r.clamp(min=0)
    if power != 1.0:
        out = out.pow(power)
    k = int(math.floor(drop * n + 1e-9))
    if k:
        out[torch.sort(r, stable=True).indices[:k]] = 0.0
    total = out.sum()
    return out / total if total > 0 else torch.full_like(out, 1.0 / n)


def kl_divergence(target: Tensor, log_pred: Tensor) -> Tensor:
    """KL(p || q) = Σ_i p_i (log p_i − log q_i) over the last dim (Eq. 3), with 0 · log 0 = 0.

    target p [..., N] (zeros on padding), log_pred log q [..., N] (−inf allowed where p = 0) -> [...].
    """
    pos = target > 0
    safe_p = torch.where(pos, target, torch.ones_like(target))
    safe_q = torch.where(pos, log_pred, torch.zeros_like(log_pred))
    return torch.where(pos, target * (safe_p.log() - safe_q), torch.zeros_like(target)).sum(-1)


def topk_recall(pred: Tensor, true: Tensor, ratio: float) -> float:
    """|top-k(pred) ∩ top-k(true)| / k with k = ceil(ratio · N_v), as ``select`` keeps at ``ratio``."""
    a, b = select(pred, ratio), select(true, ratio)
    return len(set(a.tolist()) & set(b.tolist())) / len(a)


def uniform_scores(visual_grid: Tensor) -> Tensor:
    """Scores of the registered ``uniform`` pruner for a prompt with this ``visual_grid`` [N_v, 3]."""
    from types import SimpleNamespace

    from explainprune.pruning import get_pruner

    shim = SimpleNamespace(visual_grid=visual_grid, num_visual=len(visual_grid))
    return get_pruner("uniform").score(None, shim)


# -- data -------------------------------------------------------------------------------------------------
def collate(records: list[LabelRecord], targets: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad a batch: attention [B, H, N], target [B, N] (0 on padding), mask [B, N] (True = real)."""
    n = max(r.attention.shape[-1] for r in records)
    h = records[0].attention.shape[0]
    a = torch.zeros(len(records), h, n)
    t = torch.zeros(len(records), n)
    mask = torch.zeros(len(records), n, dtype=torch.bool)
    for i, (r, y) in enumerate(zip(records, targets, strict=True)):
        m = r.attention.shape[-1]
        a[i, :, :m], t[i, :m], mask[i, :m] = r.attention, y, True
    return a, t, mask


def batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within windows of 16 batches, shuffle batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 16
    out = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        out += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) index split; validation gets round(val_fraction · n), at least 1."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if val_fraction == 0 else min(n - 1, max(1, round(val_fraction * n)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


# -- evaluation -------------------------------------------------------------------------------------------
def _metric_names(ratios: tuple[float, ...]) -> list[str]:
    return [f"recall@{r:g}" for r in ratios]


def score_metrics(scores: list[Tensor], probs: list[Tensor] | None, records: list[LabelRecord],
                  targets: list[Tensor], ratios: tuple[float, ...] = RATIOS) -> dict[str, float]:
    """Mean over samples: top-k recall of ``scores`` vs R_v at each ratio; with ``probs`` also
    KL(R_v* || probs) and the share of predicted mass inside the ground-truth region (where known)."""
    out: dict[str, float] = {}
    for r, name in zip(ratios, _metric_names(ratios), strict=True):
        out[name] = sum(topk_recall(s, rec.relevance, r) for s, rec in zip(scores, records, strict=True)) / len(records)
    if probs is not None:
        kls = [float(kl_divergence(t, p.clamp(min=1e-30).log())) for t, p in zip(targets, probs, strict=True)]
        out["kl"] = sum(kls) / len(kls)
        mass = [float(p[rec.region].sum()) for p, rec in zip(probs, records, strict=True) if rec.region]
        if mass:
            out["region_mass"] = sum(mass) / len(mass)
    return out


@torch.no_grad()
def predict(model: Compressor, records: list[LabelRecord], batch_size: int = 128) -> list[Tensor]:
    """f_θ's probabilities [N_v] for each record (padded batches, on the model's device; returned on CPU)."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for b in range(0, len(records), batch_size):
        chunk = records[b:b + batch_size]
        a, _, mask = collate(chunk, [torch.zeros(r.attention.shape[-1]) for r in chunk])
        p = model(a.to(dev), mask.to(dev)).cpu()
        out += [p[i, :r.attention.shape[-1]].clone() for i, r in enumerate(chunk)]
    return out


def baseline_metrics(records: list[LabelRecord], targets: list[Tensor], ratios: tuple[float, ...] = RATIOS,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """The same metrics for the uniform pruner, a seeded random ranking, raw head-mean A_v^0, and the
    target R_v* itself (its region mass is the ceiling f_θ aims at)."""
    g = torch.Generator().manual_seed(seed)
    uniform_p = [torch.full((len(r.relevance),), 1.0 / len(r.relevance)) for r in records]
    return {
        "uniform": score_metrics([uniform_scores(r.visual_grid) for r in records], uniform_p, records, targets,
                                 ratios),
        "random": score_metrics([torch.rand(len(r.relevance), generator=g) for r in records], None, records,
                                targets, ratios),
        "attention": score_metrics([r.attention.mean(0) for r in records], None, records, targets, ratios),
        "target": score_metrics([r.relevance for r in records], targets, records, targets, ratios),
    }


# -- training ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (paper: Adam defaults, batch 128, ~100 epochs)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    drop: float = 0.5
    power: float = 1.0
    average_heads: bool = False
    normalize: str = "log"
    activation: str = "relu"
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    ratios: tuple[float, ...] = RATIOS
    padding: str = "replicate"
    skip: bool = True
    # the epoch kept: "groups" (the best pooled rank score among the epochs behind the input on no group of the
    # validation split, guard.is_behind), "guard" (the best pooled rank score) or "last"
    select: str = "groups"

    def __post_init__(self) -> None:
        if self.select not in SELECT:
            raise ValueError(f"unknown select {self.select!r}; available: {', '.join(SELECT)}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": list(self.ratios), "channels": list(self.channels)}

    def compressor_config(self, in_channels: int, fingerprint: dict[str, Any]) -> CompressorConfig:
        return CompressorConfig(in_channels=in_channels, channels=self.channels, average_heads=self.average_heads,
                                normalize=self.normalize, activation=self.activation, padding=self.padding,
                                skip=self.skip, fingerprint=fingerprint)


# Named configurations (`explainprune train --preset NAME`); options given explicitly override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Section 4.1 exactly: head-averaged raw A_v^0 as one channel, zero padding, no skip, ~100 epochs
    "paper": {"average_heads": True, "normalize": "none", "padding": "zeros", "skip": False, "epochs": 100},
    # this project's default (docs/compressor.md): per-head log input, replicate padding, skip path
    "default": {"average_heads": False, "normalize": "log", "padding": "replicate", "skip": True, "epochs": 100},
    # the default before issue 20: per-head mean-normalised input, zero padding, no skip
    "v1": {"average_heads": False, "normalize": "mean", "padding": "zeros", "skip": False, "epochs": 30},
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """TrainConfig of the preset ``name`` with ``overrides`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


@dataclass
class TrainResult:
    """Final numbers of a run: validation metrics of f_θ and of the baselines."""

    out: str
    epochs: int
    seconds: float
    train_samples: int
    val_samples: int
    train_loss: float
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    config: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        recalls = sorted((k for k in self.metrics if k.startswith("recall@")), key=lambda k: -float(k[7:]))
        names = recalls + ["kl", "region_mass"]
        order = ["uniform", "random", "attention", "target"]
        rows = [("f_θ (learned)", self.metrics)] + sorted(self.baselines.items(), key=lambda kv: (
            order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
        lines = ["| ranking | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for label, m in rows:
            lines.append(f"| {label} | " + " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in names) + " |")
        return "\n".join(lines)


def _save_checkpoint(out: Path, epoch: int, model: Compressor, opt: torch.optim.Optimizer,
                     config: TrainConfig, seconds: float, labels: str = "") -> None:
    """checkpoints/epoch-NNNN/ (weights + Adam state as safetensors, JSON), then the pointer, atomically."""
    d = out / "checkpoints" / f"epoch-{epoch:04d}"
    model.save_pretrained(d)
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().reshape(-1) if v.dim() == 0 else v.detach().cpu()
               for i, s in sd["state"].items() for k, v in s.items()}
    with atomic_path(d / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(d / "state.json", {"epoch": epoch, "seconds": seconds, "config": config.to_json(),
                                         "param_groups": sd["param_groups"], "labels": labels})
    write_json_atomic(out / "checkpoint.json", {"epoch": epoch, "dir": str(d.relative_to(out))})
    for old in (out / "checkpoints").glob("epoch-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read it ({err})", file=path, hint="the checkpoint is damaged: start again "
                         "in another --out") from None


def _load_checkpoint(out: Path, model: Compressor, opt: torch.optim.Optimizer) -> tuple[int, float]:
    ptr = _read_json(out / "checkpoint.json")
    d = out / ptr["dir"]
    state = _read_json(d / "state.json")
    model.load_state_dict(Compressor.from_pretrained(d).state_dict())
    try:
        flat = load_file(str(d / "optimizer.safetensors"))
    except Exception as err:  # SafetensorError for a truncated file
        raise InputError(f"cannot read the optimizer state ({type(err).__name__}: {err})",
                         file=d / "optimizer.safetensors", hint="the checkpoint is damaged: start again in "
                         "another --out") from None
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    return int(state["epoch"]), float(state["seconds"])


def _check_resume(out: Path, config: TrainConfig, resume: bool, labels: str = "") -> bool:
    """True when a checkpoint is to be resumed; errors for a foreign or unrequested existing run, or one
    trained on another label set (``labels``: its ``index_digest``)."""
    if not (out / "checkpoint.json").is_file():
        return False
    if not resume:
        raise InputError(f"{out} already holds a training run",
                         hint="pass --resume to continue it, or choose another --out")
    ptr = _read_json(out / "checkpoint.json")
    state = _read_json(out / ptr["dir"] / "state.json")
    saved = state["config"]
    mine, defaults = config.to_json(), {**TrainConfig().to_json(), **LEGACY}
    diff = sorted(k for k in mine if k != "epochs" and saved.get(k, defaults[k]) != mine[k])
    if diff:
        raise InputError(f"cannot resume {out}: options differ from the saved run ({', '.join(diff)})")
    if labels and state.get("labels") and state["labels"] != labels:
        raise InputError(f"cannot resume {out}: it was trained on another label set (digest {state['labels']}, "
                         f"--labels has {labels})", hint="give the --labels it started with, or another --out")
    return True


def read_labels(labels: str | Path | Sequence[str | Path]) -> tuple[list[LabelRecord], str, dict[str, Any]]:
    """Records of one label directory or several (concatenated in order; e.g. several board sizes), the
    digest that identifies them, and the model fingerprint (all directories must share it)."""
    dirs = [labels] if isinstance(labels, (str, Path)) else list(labels)
    if not dirs:
        raise ValueError("no label directory given")
    indexes = [read_index(d) for d in dirs]
    fps = {json.dumps(ix.get("fingerprint"), sort_keys=True) for ix in indexes}
    if len(fps) != 1:
        raise ValueError(f"the label directories {', '.join(map(str, dirs))} come from different models")
    records = [r for d in dirs for r in load_records(d)]
    digests = [index_digest(ix) for ix in indexes]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]
    return records, digest, indexes[0]["fingerprint"]


def _evaluate(model: Compressor, val: list[LabelRecord], targets: list[Tensor], config: TrainConfig,
              input_samples: list[float]) -> tuple[dict[str, float], dict[str, Any]]:
    """(validation metrics, guard metrics) of ``model``; the guard's ``groups``: per group of validation samples
    (kind and size) f_θ's rank score and its paired margin over the input (``input_samples``: the input's
    per-sample rank scores), ``guard.compare_groups``."""
    probs = predict(model, val, config.batch_size)
    groups = compare_groups(sample_scores(probs, val, config.ratios), input_samples, val)
    return score_metrics(probs, probs, val, targets, config.ratios), {
        **guard_metrics(probs, val, config.ratios),
        "groups": {g: {k: v[k] for k in ("f_theta", "margin", "se")} for g, v in groups.items()}}


def train(labels: str | Path | Sequence[str | Path], out: str | Path, config: TrainConfig = TrainConfig(),
          resume: bool = False, progress: bool = True, device: str | torch.device = "cpu") -> TrainResult:
    """Train f_θ on the label set(s) ``labels`` into ``out`` on ``device``; returns the kept epoch's
    validation numbers (``config.select``: the guard's best epoch, or the last)."""
    from tqdm.auto import tqdm

    out = Path(out)
    records, digest, fingerprint = read_labels(labels)
    if len(records) < 2:
        raise ValueError(f"{labels} holds {len(records)} labelled samples; training needs at least 2")
    heads = {r.attention.shape[0] for r in records}
    if len(heads) != 1:
        raise ValueError(f"{labels} mixes A_v^0 with {sorted(heads)} heads (several models?)")
    resuming = _check_resume(out, config, resume, digest)
    out.mkdir(parents=True, exist_ok=True)
    targets = [relevance_target(r.relevance, config.drop, config.power) for r in records]
    tr, va = split(len(records), config.val_fraction, config.seed)
    val_ids = va or tr
    val, val_targets = [records[i] for i in val_ids], [targets[i] for i in val_ids]
    torch.manual_seed(config.seed)
    model = Compressor(config.compressor_config(heads.pop(), fingerprint)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    start, spent = (_load_checkpoint(out, model, opt) if resuming else (0, 0.0))
    log_path = out / "log.jsonl"
    kept = [ln for ln in (log_path.read_text().splitlines() if resuming and log_path.is_file() else [])
            if json.loads(ln)["epoch"] <= start]
    log_path.write_text("".join(ln + "\n" for ln in kept))
    baseline_guard = guard_metrics(input_scores(val), val, config.ratios)
    input_samples = sample_scores(input_scores(val), val, config.ratios)
    sizes = compare_groups(input_samples, input_samples, val)  # n and the input's rank score per group
    best = _read_json(out / "best" / "best.json") if resuming and (out / "best" / "best.json").is_file() else None
    if best is None and start == 0 and config.skip:  # epoch 0: the untrained f_θ ranks exactly as its input
        metrics, gm = _evaluate(model, val, val_targets, config, input_samples)
        best = _keep_best(out, model, 0, metrics, gm)
    lengths = [records[i].attention.shape[-1] for i in tr]
    per_epoch = math.ceil(len(tr) / config.batch_size)
    bar = tqdm(total=(config.epochs - start) * per_epoch, unit="batch", disable=not progress, desc="train f_θ")
    t0, loss_avg, metrics = time.perf_counter() - spent, float("nan"), {}
    for epoch in range(start + 1, config.epochs + 1):
        model.train()
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        total, count = 0.0, 0
        for b in batches(lengths, config.batch_size, gen):
            ids = [tr[i] for i in b]
            a, t, mask = (x.to(device) for x in collate([records[i] for i in ids], [targets[i] for i in ids]))
            loss = kl_divergence(t, model.log_probs(a, mask)).mean()  # Eq. 3
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(ids), count + len(ids)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4f}", refresh=False)
        loss_avg = total / count
        metrics, gm = _evaluate(model, val, val_targets, config, input_samples)
        line = {"epoch": epoch, "train_loss": loss_avg, **{f"val_{k}": v for k, v in metrics.items()},
                **{f"val_{k}": v for k, v in gm.items()}, "seconds": round(time.perf_counter() - t0, 3)}
        with log_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        bar.set_postfix(epoch=epoch, loss=f"{loss_avg:.4f}", val_kl=f"{metrics['kl']:.4f}", refresh=False)
        if best is None or config.select == "last" or selection_key(_sized(gm, sizes), config.select) > \
                selection_key(_sized(best["guard"], sizes), config.select):
            best = _keep_best(out, model, epoch, metrics, gm)
        _save_checkpoint(out, epoch, model, opt, config, time.perf_counter() - t0, digest)
    bar.close()
    history = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    if best is None:  # nothing trained and nothing kept (resumed a finished run from before the guard)
        best = _keep_best(out, model, start, *_evaluate(model, val, val_targets, config, input_samples))
    kept_model = Compressor.from_pretrained(out / "best")  # on the CPU: only saved (any device's run alike)
    from explainprune.compressor_hub import training_info

    if history:
        loss_avg = next((h["train_loss"] for h in history if h["epoch"] == best["epoch"]), history[-1]["train_loss"])
    groups = _sized(best["guard"], sizes).pop("groups", {})
    best["guard"].pop("groups", None)
    guard = Guard(best["epoch"], list(config.ratios), best["guard"], baseline_guard,
                  [{"epoch": h["epoch"], "rank_score": h.get("val_rank_score")} for h in history], groups)
    dirs = [labels] if isinstance(labels, (str, Path)) else list(labels)
    indexes = [json.loads((Path(d) / "index.json").read_text()) if (Path(d) / "index.json").is_file() else {}
               for d in dirs]
    card = training_info(indexes, [str(d) for d in dirs], out, config, best["metrics"])
    summary = guard.to_json()
    card["guard"] = {"epoch": guard.epoch, "beats_input": summary["beats_input"], "behind": summary["behind"],
                     "rank_score": guard.f_theta["rank_score"], "input_rank_score": guard.input["rank_score"],
                     "message": summary["message"]}
    kept_model.eval().save_pretrained(out / "compressor", card=card)
    result = TrainResult(str(out), config.epochs, round(time.perf_counter() - t0, 3), len(tr), len(va), loss_avg,
                         best["metrics"], baseline_metrics(val, val_targets, config.ratios, config.seed),
                         config.to_json(), guard.to_json())
    write_json_atomic(out / "metrics.json", result.to_json())
    print(guard.message(), file=sys.stderr, flush=True)
    return result


def _sized(gm: dict[str, Any], sizes: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Guard metrics with each group's ``n`` and ``input`` rank score added (they do not change per epoch, so
    the log and best.json leave them out)."""
    groups = {g: {"n": sizes[g]["n"], "f_theta": v["f_theta"], "input": sizes[g]["input"], "margin": v["margin"],
                  "se": v["se"]} for g, v in gm.get("groups", {}).items() if g in sizes and isinstance(v, dict)}
    return {**gm, "groups": groups}


def _keep_best(out: Path, model: Compressor, epoch: int, metrics: dict[str, float],
               gm: dict[str, float]) -> dict[str, Any]:
    """Save ``model`` as out/best/ with best.json (epoch, validation and guard metrics); returns that record."""
    record = {"epoch": epoch, "metrics": metrics, "guard": gm}
    model.save_pretrained(out / "best")
    write_json_atomic(out / "best" / "best.json", record)
    return record
