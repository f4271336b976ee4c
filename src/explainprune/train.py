"""Training f_θ on a label set (Section 3.3 "Training Objectives", Section 4.1 "Training f_θ").

Targets R_v* (bottom 50% of R_v zeroed, divided by the sum), loss KL(R_v* || f_θ(A_v^0)) (Eq. 3), Adam
with default settings, batch 128. Checkpoints every epoch (safetensors + JSON, nothing pickled); a
resumed run equals an uninterrupted one (shuffling is seeded per epoch, Adam's state is restored).

``out/``: log.jsonl (one line per epoch), checkpoint.json -> checkpoints/epoch-NNNN/, compressor/ (the
final f_θ, for ``Compressor.from_pretrained`` and ``get_pruner("learned", compressor=...)``) and
metrics.json (final validation metrics with the uniform / random / raw-attention baselines).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from explainprune.compressor import Compressor, CompressorConfig
from explainprune.errors import InputError
from explainprune.files import atomic_path, write_json_atomic
from explainprune.labels import LabelRecord, index_digest, load_records, read_index
from explainprune.pruning.base import select

RATIOS = (0.5, 0.25, 0.1)


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
    normalize: str = "mean"
    activation: str = "relu"
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    ratios: tuple[float, ...] = RATIOS

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": list(self.ratios), "channels": list(self.channels)}


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
    mine, defaults = config.to_json(), TrainConfig().to_json()
    diff = sorted(k for k in mine if k != "epochs" and saved.get(k, defaults[k]) != mine[k])
    if diff:
        raise InputError(f"cannot resume {out}: options differ from the saved run ({', '.join(diff)})")
    if labels and state.get("labels") and state["labels"] != labels:
        raise InputError(f"cannot resume {out}: it was trained on another label set (digest {state['labels']}, "
                         f"--labels has {labels})", hint="give the --labels it started with, or another --out")
    return True


def train(labels: str | Path, out: str | Path, config: TrainConfig = TrainConfig(), resume: bool = False,
          progress: bool = True, device: str | torch.device = "cpu") -> TrainResult:
    """Train f_θ on the label set ``labels`` into ``out`` on ``device``; returns the final validation numbers."""
    from tqdm.auto import tqdm

    out = Path(out)
    index = read_index(labels)
    records = load_records(labels)
    if len(records) < 2:
        raise ValueError(f"{labels} holds {len(records)} labelled samples; training needs at least 2")
    heads = {r.attention.shape[0] for r in records}
    if len(heads) != 1:
        raise ValueError(f"{labels} mixes A_v^0 with {sorted(heads)} heads (several models?)")
    digest = index_digest(index)
    resuming = _check_resume(out, config, resume, digest)
    out.mkdir(parents=True, exist_ok=True)
    targets = [relevance_target(r.relevance, config.drop, config.power) for r in records]
    tr, va = split(len(records), config.val_fraction, config.seed)
    val_ids = va or tr
    torch.manual_seed(config.seed)
    model = Compressor(CompressorConfig(
        in_channels=heads.pop(), channels=config.channels, average_heads=config.average_heads,
        normalize=config.normalize, activation=config.activation, fingerprint=index["fingerprint"])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    start, spent = (_load_checkpoint(out, model, opt) if resuming else (0, 0.0))
    log_path = out / "log.jsonl"
    kept = [ln for ln in (log_path.read_text().splitlines() if resuming and log_path.is_file() else [])
            if json.loads(ln)["epoch"] <= start]
    log_path.write_text("".join(ln + "\n" for ln in kept))
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
        val = [records[i] for i in val_ids]
        probs = predict(model, val, config.batch_size)
        metrics = score_metrics(probs, probs, val, [targets[i] for i in val_ids], config.ratios)
        line = {"epoch": epoch, "train_loss": loss_avg, **{f"val_{k}": v for k, v in metrics.items()},
                "seconds": round(time.perf_counter() - t0, 3)}
        with log_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        bar.set_postfix(epoch=epoch, loss=f"{loss_avg:.4f}", val_kl=f"{metrics['kl']:.4f}", refresh=False)
        _save_checkpoint(out, epoch, model, opt, config, time.perf_counter() - t0, digest)
    bar.close()
    if not metrics:  # nothing left to train (resumed a finished run): evaluate the checkpoint
        val = [records[i] for i in val_ids]
        probs = predict(model, val, config.batch_size)
        metrics = score_metrics(probs, probs, val, [targets[i] for i in val_ids], config.ratios)
        last = [json.loads(ln) for ln in log_path.read_text().splitlines()]
        loss_avg = last[-1]["train_loss"] if last else float("nan")
    from explainprune.compressor_hub import training_info

    model.eval().save_pretrained(out / "compressor", card=training_info(index, labels, out, config, metrics))
    val = [records[i] for i in val_ids]
    result = TrainResult(str(out), config.epochs, round(time.perf_counter() - t0, 3), len(tr), len(va), loss_avg,
                         metrics, baseline_metrics(val, [targets[i] for i in val_ids], config.ratios, config.seed),
                         config.to_json())
    write_json_atomic(out / "metrics.json", result.to_json())
    return result
