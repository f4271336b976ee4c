"""The evaluation runner behind ``explainprune eval``: task x method x retention ratio -> Report.

Methods come from the pruner registry by name (``"fastv"``, or with options ``"fastv:layer=4"``), so any
registered pruner just works. Every sample is prepared once and run by every (method, ratio); vanilla
(all tokens) always runs once, as the preservation baseline. Per run it measures, without changing
generation: prefill and decode time (forward hooks on the model: the first forward of ``generate`` is the
prefill), the KV-cache bytes right after prefill (the actual cache tensors), and accounts the FLOPs of
Appendix D with ``cost.method_account``: the pruner's own per-layer tokens and selection cost (what the
run kept where it differs), plus Eq. 5-6 when the pruner carries a ``compressor``. A pruner's ``score``
runs once per sample and is shared by its ratios (its time is still counted in every record's ``score_s``
and ``total_s``).

With a ``records`` file (``OUT/records.jsonl`` under ``explainprune eval``) every finished sample's records
are appended as they are made; an interrupted evaluation with the same samples, methods and options
resumes from them, and a finished one is rebuilt from them without running the model.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from explainprune.answers import display, is_correct, normalize_answers
from explainprune.cost import LLMShape, method_account
from explainprune.errors import InputError, NotApplicable
from explainprune.evaluation import DEFAULT_METHODS, DEFAULT_RATIOS
from explainprune.evaluation.records import RECORDS_FORMAT, _append, _read_records, _records_header, check_records  # noqa: F401
from explainprune.evaluation.report import VANILLA, Report, SampleRecord
from explainprune.evaluation.tasks import TaskConfig, load_task, sample_kind
from explainprune.prefetch import prefetch as load_ahead
from explainprune.validation import check_ratios, prepare_sample


@dataclass(frozen=True)
class EvalConfig:
    """Options of one evaluation.

    methods:        registry names, optionally with options: "fastv:layer=4", "random:seed=1"
    ratios:         retention ratios (vanilla runs once at 1.0 whatever these are)
    method_options: name -> options given to every spec of that name (e.g. {"learned": {"compressor": p}})
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    max_new_tokens: int = 8
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    warmup: bool = True

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["method_options"] = {k: {a: str(b) for a, b in v.items()} for k, v in self.method_options.items()}
        return d


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """"fastv:layer=4,x=y" -> ("fastv", {"layer": 4, "x": "y"}); values parsed as JSON when they are."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} must be key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return name.strip(), options


def build_pruners(config: EvalConfig) -> list[tuple[str, Any]]:
    """(label, pruner) for vanilla first, then every other spec in order (unknown names fail early)."""
    from explainprune.pruning import get_pruner

    specs = [VANILLA] + [m for m in config.methods if m != VANILLA]
    out = []
    for spec in dict.fromkeys(specs):
        name, options = parse_method(spec)
        out.append((spec, get_pruner(name, **{**config.method_options.get(name, {}), **options})))
    return out


# -- measurement -------------------------------------------------------------------------------------------
def cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache's key and value tensors (DynamicCache ``layers``, legacy lists or tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "layers"):
        tensors = [t for lay in cache.layers for t in (getattr(lay, "keys", None), getattr(lay, "values", None))]
    elif hasattr(cache, "key_cache"):
        tensors = [*cache.key_cache, *cache.value_cache]
    else:
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


@dataclass
class Meter:
    """Forward timings of the LAST generation in a block: ``calls[0]`` is its prefill, the rest decode
    steps; ``kv_bytes`` the cache right after that prefill. Forwards before it (a pruner scoring with the
    model, e.g. the oracle's own generation) are counted in ``earlier_s``."""

    calls: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    earlier_s: float = 0.0

    @property
    def prefill_s(self) -> float:
        return self.calls[0] if self.calls else 0.0

    @property
    def decode_s(self) -> float:
        return float(sum(self.calls[1:]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_tokens(kwargs: dict[str, Any]) -> int:
    for key in ("inputs_embeds", "input_ids"):
        value = kwargs.get(key)
        if torch.is_tensor(value):
            return int(value.shape[1])
    return 0


def output_cache(output: Any) -> Any:
    """The KV cache of a model output: its ``cache`` field (newer transformers 5.x, e.g. 5.24, where reading
    ``past_key_values`` logs a deprecation on every call) or ``past_key_values`` (e.g. 5.18)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return output[name]
    return getattr(output, "past_key_values", None)


@contextmanager
def measure(model: torch.nn.Module) -> Iterator[Meter]:
    """Time every forward of ``model``; a forward over more than one new token starts a new generation
    (its prefill), whose KV cache is measured. Hooks removed on exit."""
    meter = Meter()
    device = next(model.parameters()).device
    start: list[float] = []

    def before(module, args, kwargs):
        _sync(device)
        if _new_tokens(kwargs) > 1:  # a prefill: what came before was not this generation
            meter.earlier_s += sum(meter.calls)
            meter.calls.clear()
        start.append(time.perf_counter())

    def after(module, args, kwargs, output):
        _sync(device)
        meter.calls.append(time.perf_counter() - start.pop())
        if len(meter.calls) == 1:
            meter.kv_bytes = cache_bytes(output_cache(output))

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield meter
    finally:
        for h in handles:
            h.remove()


@dataclass
class ScoreTiming:
    """Seconds ``score`` took on the prompt (once), and how much of it the latest call spent."""

    seconds: float = 0.0
    spent_now: float = 0.0


@contextmanager
def shared_scores(pruner: Any) -> Iterator[ScoreTiming]:
    """Within the block ``pruner.score`` runs once per prompt and is reused for every ratio (scores do not
    depend on the ratio). Wraps the instance, not the class; restored on exit."""
    original = pruner.score
    memo: dict[int, Any] = {}
    timing = ScoreTiming()

    def score(vlm: Any, prompt: Any) -> Any:
        timing.spent_now = 0.0
        if id(prompt) not in memo:
            t0 = time.perf_counter()
            memo[id(prompt)] = (prompt, original(vlm, prompt))  # the prompt is held: its id stays unique
            timing.spent_now = timing.seconds = time.perf_counter() - t0
        return memo[id(prompt)][1]

    object.__setattr__(pruner, "score", score)
    try:
        yield timing
    finally:
        object.__delattr__(pruner, "score")


def run_one(vlm: Any, pruner: Any, label: str, prompt: Any, sample: Any, ratio: float, shape: LLMShape,
            max_new_tokens: int, scores: ScoreTiming | None = None) -> SampleRecord:
    """Generate with ``pruner`` at ``ratio`` and measure it (see the module docstring). With ``scores``
    (from ``shared_scores``) the scoring time is counted in full for every ratio, reused or not."""
    with measure(vlm.model) as meter:
        t0 = time.perf_counter()
        out = pruner.generate(vlm, prompt, ratio, max_new_tokens=max_new_tokens)
        total = time.perf_counter() - t0
    score_s = 0.0
    if scores is not None:
        score_s = scores.seconds
        total += scores.seconds - scores.spent_now
    layer = int(getattr(pruner, "layer", 0))
    answers = normalize_answers(sample.answer, f"sample {sample.id}: answer")
    match = (getattr(sample, "meta", None) or {}).get("match", "exact")  # the sample's matcher, as label
    n_visual, kept = prompt.num_visual, int(out.visual_tokens)
    acc = method_account(pruner, shape, n_visual, ratio, measured=getattr(out, "visual_per_layer", None), kept=kept)
    return SampleRecord(
        id=str(sample.id), kind=sample_kind(sample), method=label, ratio=float(ratio), question=sample.question,
        reference=display(answers), prediction=out.text, correct=is_correct(out.text, answers, match, sample.question),
        n_visual=n_visual, kept=kept, layer=layer, average_retention=acc.average_retention, flops_llm=acc.llm,
        flops_overhead=acc.attention + acc.conv + acc.selection, prefill_s=meter.prefill_s, decode_s=meter.decode_s,
        total_s=total, new_tokens=len(out.token_ids), kv_bytes=meter.kv_bytes, score_s=score_s)


def not_applicable(label: str, prompt: Any, sample: Any, ratio: float, pruner: Any) -> SampleRecord:
    """The record of a method that does not apply to this sample (``NotApplicable``): ``applicable=False``,
    no answer, no cost; the report leaves it out of the method's numbers and shows "n/a"."""
    answers = normalize_answers(sample.answer, f"sample {sample.id}: answer")
    return SampleRecord(
        id=str(sample.id), kind=sample_kind(sample), method=label, ratio=ratio, question=sample.question,
        reference=display(answers), prediction="", correct=False, n_visual=prompt.num_visual, kept=prompt.num_visual,
        layer=int(getattr(pruner, "layer", 0)), average_retention=1.0, flops_llm=0, flops_overhead=0, prefill_s=0.0,
        decode_s=0.0, total_s=0.0, new_tokens=0, kv_bytes=0, applicable=False)


def _prepare(vlm: Any, sample: Any) -> Any:
    return prepare_sample(vlm, sample)  # an InputError (e.g. a prompt too long) names the sample


def check_config(config: EvalConfig) -> list[tuple[str, Any]]:
    """Validate ratios and method specs (building every pruner, e.g. loading a compressor) before any model
    work; returns the pruners."""
    check_ratios(config.ratios)  # in (0, 1], none repeated
    if not config.ratios:
        raise InputError("give at least one retention ratio")
    for r in config.ratios:
        from explainprune.pruning.base import _as_ratio

        r = _as_ratio(r)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise InputError(f"ratios must be in (0, 1] (the share of visual tokens kept); got {r!r}")
    if isinstance(config.max_new_tokens, bool) or not isinstance(config.max_new_tokens, int) or \
            config.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1; got {config.max_new_tokens!r}")
    return build_pruners(config)


def run_eval(vlm: Any, samples: Any, config: EvalConfig | None = None, *, model_name: str = "",
             task_info: dict[str, Any] | None = None, records: str | Path | None = None,
             on_error: str = "stop", prefetch: int = 2, identity: dict[str, Any] | None = None,
             overwrite: bool = False) -> Report:
    """Evaluate ``vlm`` on ``samples`` (indexable LabelSamples) with every method x ratio of ``config``.

    ``records``: a JSONL file the per-sample records are streamed to and resumed from (see the module
    docstring); it must hold this evaluation's records or none (``overwrite``: another evaluation's are
    replaced). ``identity``: the model as loaded (default ``identity.vlm_identity(vlm)``), part of what must
    match for a resume. A sample whose media cannot be read (InputError) stops the run (``on_error="stop"``) or is
    skipped and listed in the report's ``skipped`` ("skip").
    ``prefetch``: samples read (images opened, videos decoded) this many ahead in a background thread
    while the model runs (0: in line). ``vlm.prepare`` stays in this thread, between the timed runs, so
    no work of the next sample lands inside a timed prefill.
    """
    from tqdm.auto import tqdm

    config = config or EvalConfig()
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip'; got {on_error!r}")
    if len(samples) == 0:
        raise ValueError("the task has no samples")
    pruners = check_config(config)
    shape = LLMShape.from_config(vlm.text_config, getattr(vlm.config, "vision_config", None))
    task_info = dict(task_info or {})
    if identity is None:
        from explainprune.identity import vlm_identity

        identity = vlm_identity(vlm)
    header = _records_header(model_name, dict(task_info), config, len(samples), identity)
    done = _read_records(Path(records), header, overwrite) if records else {}
    fh, ahead = None, None
    if records:
        fh = Path(records).open("a" if done else "w")
        if not done:
            _append(fh, header)
    try:
        todo = [i for i in range(len(samples)) if i not in done]
        if config.warmup and todo:  # one untimed short run, so the first timed sample pays no one-off costs
            try:
                vlm.generate(_prepare(vlm, samples[todo[0]]), max_new_tokens=2)
            except InputError:
                pass  # met (and handled) again below
        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="eval", unit="sample",
                   disable=not config.progress)
        ahead = load_ahead(samples.__getitem__, todo, prefetch)  # samples[i], read ahead
        for loaded in ahead:
            i = loaded.key
            try:
                sample = loaded.result()
                prompt = _prepare(vlm, sample)  # a prompt too long for the model: an InputError naming it
            except InputError as err:
                if on_error == "stop":
                    raise
                done[i] = {"sample": i, "error": {"index": i, "line": err.line, "id": err.sample,
                                                  "error": err.message}}
                if fh:
                    _append(fh, done[i])
                bar.update(1)
                continue
            mine: list[SampleRecord] = []
            for label, pruner in pruners:
                with shared_scores(pruner) as scores:
                    for ratio in ((1.0,) if label == VANILLA else config.ratios):
                        try:
                            mine.append(run_one(vlm, pruner, label, prompt, sample, float(ratio), shape,
                                                config.max_new_tokens, scores))
                        except NotApplicable:  # e.g. evs on an image: an n/a row, the run goes on
                            mine.append(not_applicable(label, prompt, sample, float(ratio), pruner))
            done[i] = {"sample": i, "records": [asdict(r) for r in mine]}
            if fh:
                _append(fh, done[i])
            bar.update(1)
            base = [r["correct"] for d in done.values() for r in d.get("records", []) if r["method"] == VANILLA]
            if base:
                bar.set_postfix(vanilla_acc=f"{sum(base) / len(base):.2f}")
        bar.close()
    finally:
        if ahead is not None:
            ahead.close()
        if fh:
            fh.close()
    ordered = [done[i] for i in sorted(done)]
    all_records = [SampleRecord(**r) for d in ordered for r in d.get("records", [])]
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(vlm.device),
                   "machine": platform.machine(), "python": platform.python_version()}
    return Report.from_records(all_records, model=model_name, task=task_info, config=config.to_json(),
                               shape=asdict(shape), environment=environment,
                               skipped=[d["error"] for d in ordered if "error" in d])


EVAL_FILES = ("records.jsonl", "report.json", "report.md", "preservation_vs_retention.png",
              "preservation_vs_flops.png")


def evaluate(model: str, task: TaskConfig | None = None, config: EvalConfig | None = None,
             out: str | None = None, plots: bool = True, vlm: Any = None,
             on_error: str = "stop", load_options: dict[str, Any] | None = None,
             overwrite: bool = False) -> tuple[Report, dict[str, Any]]:
    """Load ``model`` (path, hub id or "demo"; ``load_options`` go to ``explainprune.load``), run ``task``
    and, with ``out``, write the report files there (``out/records.jsonl`` streams the per-sample records:
    an interrupted run resumes). Everything that can be checked (task, methods, ratios, ``out``, and whether
    ``out`` holds this evaluation, another one or another command's output) is checked before the model
    loads; ``overwrite`` replaces another evaluation's files in ``out``."""
    from explainprune.files import check_out_dir
    from explainprune.identity import model_identity, vlm_identity

    task, config = task or TaskConfig(), config or EvalConfig()
    samples = load_task(task, on_error=on_error)  # unreadable image headers: refused now, or skipped later
    compressors = [getattr(p, "compressor", None) for _, p in check_config(config)]
    compressors = [c for c in compressors if hasattr(c, "check_compatible")]
    if compressors:  # one trained for another model is refused now, from config.json, not after loading
        from explainprune.identity import config_fingerprint

        fingerprint = vlm.fingerprint() if vlm is not None else \
            config_fingerprint(model, (load_options or {}).get("revision"))
        for compressor in compressors:
            compressor.check_compatible(fingerprint)
    identity = None
    if out:
        from explainprune.outdir import check_out_kind

        check_out_dir(out)
        check_out_kind(out, "eval")
        identity = vlm_identity(vlm) if vlm is not None else model_identity(model, **(load_options or {}))
        header = _records_header(str(model), samples.describe(), config, len(samples), identity)
        if not check_records(Path(out) / "records.jsonl", header, overwrite):  # not this evaluation's records
            if (Path(out) / "report.json").is_file() and not overwrite:
                raise InputError("holds the report of another evaluation (report.json without its records.jsonl)",
                                 file=out, hint="choose another --out, or pass --overwrite to replace it")
            for name in EVAL_FILES:  # another evaluation's files: none of them may outlive it
                (Path(out) / name).unlink(missing_ok=True)
    if vlm is None:
        from explainprune.models import load

        vlm = load(model, **(load_options or {}))
    report = run_eval(vlm, samples, config, model_name=str(model), task_info=samples.describe(),
                      records=Path(out) / "records.jsonl" if out else None, on_error=on_error, identity=identity,
                      overwrite=overwrite)
    paths = report.save(out) if out else {}
    if out and plots:
        from explainprune.evaluation.plots import save_plots

        paths.update(save_plots(report, out))
    return report, paths
