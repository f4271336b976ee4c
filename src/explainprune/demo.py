"""The end-to-end demo (what ``make demo`` runs): label -> train f_θ -> evaluate -> pictures.

On the shipped demo model: labels (A_v^0, R_v) on the digits train split, the compressor trained on
them, vanilla / oracle / learned / layer0 (raw A_v^0), the training-free baselines (FastV, PyramidDrop,
DART, DivPrune, VisionZip, random, uniform) and peers (CDPruner, EVS on the videos -- n/a on the images --,
downsample) at the retention ratios on the test split (images and videos),
the report files, a few relevance pictures, and the table printed at the end.

Two learned rows: ``learned`` is the f_θ this run trains (800 labels of 4 x 4 boards and 4-frame videos, 10
epochs: the recipe, small enough for a few minutes), ``learned:compressor=demo`` the f_θ shipped next to the
demo model (``assets/demo_compressor``: the same recipe on ~2,700 labels of six board sizes and frame counts,
more than the demo can label in its time; docs/compressor.md, issue 20).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("vanilla", "oracle", "learned", "layer0", "fastv", "pdrop", "dart", "divprune", "visionzip", "cdpruner",
           "evs", "downsample", "random", "uniform")


SHIPPED = "demo"  # the compressor shipped with the demo model (explainprune.compressor_path.DEMO_COMPRESSOR)


def default_methods() -> tuple[str, ...]:
    """METHODS, then the pruners of installed plug-ins (entry-point group ``explainprune.pruners``) that load."""
    from explainprune.pruning import available

    return METHODS + tuple(n for n in available() if n not in available(plugins=False) and n not in METHODS)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``quick()`` gives the `--quick` variant."""

    model: str = "demo"
    model_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of explainprune.load
    out: str = "runs/demo"
    label_samples: int = 800
    epochs: int = 10  # of 30 epochs on these labels the guard keeps epoch 5: 10 give the same f_θ, 3x faster
    eval_samples: int = 200
    pictures: int = 4
    ratios: tuple[float, ...] = (0.5, 0.25, 0.1)
    methods: tuple[str, ...] = field(default_factory=default_methods)
    fastv_layer: int = 2
    shipped: str | None = SHIPPED  # also evaluate this compressor ("demo": the shipped one) next to "learned"
    seed: int = 0
    threads: int = 1  # the demo model's matrices are small: one thread is fastest, and robust on a busy machine
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        return cls(**{"label_samples": 240, "epochs": 20, "eval_samples": 60, "pictures": 2, **overrides})


@dataclass
class DemoResult:
    """What the demo wrote and measured."""

    report: Any
    files: dict[str, Path]
    seconds: dict[str, float]
    train: Any
    labels: Any

    def to_json(self) -> dict[str, Any]:
        return {"files": {k: str(v) for k, v in self.files.items()}, "seconds": self.seconds,
                "train": self.train.to_json(), "labels": self.labels.to_json(),
                "report": self.report.to_json()}


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    """Run the whole pipeline; resumes where an earlier run with the same ``out`` stopped."""
    import torch

    import explainprune
    from explainprune.evaluation.runner import EvalConfig, evaluate
    from explainprune.evaluation.tasks import TaskConfig
    from explainprune.labels import DigitsSource, LabelConfig, label
    from explainprune.train import TrainConfig, train

    torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    vlm = explainprune.load(config.model, **config.model_options)
    _say(f"loaded {config.model} ({vlm.config.model_type}, {vlm.text_config.num_hidden_layers} LLM layers)")

    _say(f"1/4 labels: A_v^0 and R_v (Eq. 1) on {config.label_samples} digits train samples -> {out / 'labels'}")
    t = time.perf_counter()
    source = DigitsSource(split="train", seed=config.seed, n=config.label_samples)
    labels = label(vlm, source, out / "labels", LabelConfig(), progress=config.progress)
    seconds["labels"] = time.perf_counter() - t
    totals = labels.totals or {}
    _say(f"   {totals.get('labeled')} labelled, {totals.get('skipped_wrong')} skipped (answered wrongly)")

    _say(f"2/4 training the compressor f_θ for {config.epochs} epochs (skip path from the log head-mean A_v^0, "
         f"replicate padding; the epoch that ranks best on validation is kept) -> {out / 'compressor' / 'compressor'}")
    t = time.perf_counter()
    resume = (out / "compressor" / "checkpoint.json").is_file()
    trained = train(out / "labels", out / "compressor", TrainConfig(epochs=config.epochs, seed=config.seed),
                    resume=resume, progress=config.progress)
    seconds["train"] = time.perf_counter() - t
    _say("   validation:\n" + trained.to_markdown())
    _say(f"   {trained.guard['message']}")

    methods = with_shipped(config, vlm)
    _say(f"3/4 evaluating {', '.join(methods)} at {config.ratios} on {config.eval_samples} test samples")
    if len(methods) > len(config.methods):
        _say(f"   learned: the f_θ trained above; {shipped_spec(config)}: the f_θ shipped with the demo model "
             "(trained on ~2,700 labels of six board sizes and frame counts; docs/compressor.md)")
    t = time.perf_counter()
    compressor = out / "compressor" / "compressor"
    eval_config = EvalConfig(methods=methods, ratios=config.ratios, progress=config.progress,
                             method_options={"learned": {"compressor": str(compressor)},
                                             "fastv": {"layer": config.fastv_layer}})
    task = TaskConfig(name="digits", split="test", seed=config.seed, limit=config.eval_samples)
    report, files = evaluate(config.model, task, eval_config, out=str(out / "eval"), vlm=vlm)
    seconds["eval"] = time.perf_counter() - t

    _say(f"4/4 relevance pictures -> {out / 'pictures'}")
    t = time.perf_counter()
    files = {**files, **_pictures(vlm, config, compressor, out / "pictures")}
    seconds["pictures"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return DemoResult(report=report, files=dict(files), seconds=seconds, train=trained, labels=labels)


def shipped_spec(config: DemoConfig) -> str:
    """The method spec of the shipped compressor's row: ``learned:compressor=demo``."""
    return f"learned:compressor={config.shipped}"


def with_shipped(config: DemoConfig, vlm: Any) -> tuple[str, ...]:
    """``config.methods`` with the shipped compressor's row after ``learned`` when there is one for ``vlm`` (the
    demo model; another model's f_θ is not the demo's, so that row is left out)."""
    if not config.shipped or "learned" not in config.methods:
        return tuple(config.methods)
    from explainprune.compressor import Compressor

    try:
        Compressor.from_pretrained(config.shipped).check_compatible(vlm)
    except ValueError:
        return tuple(config.methods)
    i = list(config.methods).index("learned") + 1
    return (*config.methods[:i], shipped_spec(config), *config.methods[i:])


def _pictures(vlm: Any, config: DemoConfig, compressor: Path, folder: Path) -> dict[str, Path]:
    """Figure-2 style pictures (R_v and f_θ's prediction, kept tokens at 25%) for a few test samples."""
    from explainprune.compressor import Compressor
    from explainprune.labels import DigitsSource
    from explainprune.pruning import get_pruner
    from explainprune.relevance import relevance
    from explainprune.visualize import relevance_figure

    folder.mkdir(parents=True, exist_ok=True)
    learned = get_pruner("learned", compressor=Compressor.from_pretrained(compressor))
    source = DigitsSource(split="test", seed=config.seed + 1, n=max(config.pictures, 1))
    written = {}
    for i in range(config.pictures):
        sample = source[i]
        prompt = vlm.prepare(images=sample.images, video=sample.video, question=sample.question)
        rel = relevance(vlm, prompt)
        path = folder / f"sample{i}_{(sample.meta or {}).get('kind', 'image')}.png"
        relevance_figure(prompt, rel.scores, ratio=0.25, out=path, predicted=learned.score(vlm, prompt),
                         labels=("R_v (Eq. 1)", "f_θ(A_v^0)"),
                         title=f"{sample.question}  answer: {rel.answer} (reference {sample.answer})")
        written[f"picture{i}"] = path
    return written


def summary(result: DemoResult) -> str:
    """The table and the files, as printed at the end of the demo."""
    lines = [result.report.to_markdown(), "", "time (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result.seconds.items()), "", "files written:"]
    lines += [f"  {path}" for path in result.files.values()]
    return "\n".join(lines)


def config_json(config: DemoConfig) -> dict[str, Any]:
    return {**asdict(config), "ratios": list(config.ratios), "methods": list(config.methods)}
