"""Request handling behind the lmms-eval model, with no lmms-eval import: visuals as lmms-eval hands them
over -> ``VLM.prepare``; a task's generation kwargs -> ``generate`` options; a batch of requests -> one
ragged batch (each prompt keeps its own count); per sample an ``evaluation.report.SampleRecord`` with the
efficiency numbers ``explainprune eval`` reports, measured the same way (``evaluation.runner.measure``,
``cost.method_account``).

In a batch of B requests the prefill / decode times are the batch's, shared evenly (B = 1 gives exactly
``explainprune eval``'s numbers), and a sample's KV bytes are the batch cache's bytes per cached row times
the rows that sample holds in each layer (padding excluded; B = 1 gives the measured cache bytes).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from explainprune.integrations.lmms_eval.genopts import GenOptions, cut_at, generation_options  # noqa: F401
from explainprune.integrations.lmms_eval.scoring import (
    ForceTokens,
    Scored,
    check_eos,
    continuation_ids,
    score_logits,
)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".flv", ".wmv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Request:
    """One lmms-eval request: the context text, its visuals (as ``doc_to_visual`` returns them), the task's
    generation kwargs (or, for a loglikelihood request, the ``continuation`` to score), and where it came from
    (``task``, ``doc_id``; used in the records)."""

    context: str
    visuals: Any = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    doc_id: Any = None
    continuation: str | None = None  # a loglikelihood request's continuation


@dataclass
class Answer:
    """What the model answers a request: text cut at the first ``until`` string, token counts."""

    text: str
    prompt_tokens: int
    new_tokens: int


def split_visuals(visuals: Any, max_frames: int = 8) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """lmms-eval visuals -> (images, video frames or None).

    Accepts None, one visual or (nested) lists of: PIL images, image files, video files (``max_frames``
    evenly spaced frames, ``explainprune.sources.read_video``), HWC arrays (an image) and THWC arrays
    (a video's frames). At most one video per request (the adapters take one).
    """
    from explainprune.images import open_image, to_rgb
    from explainprune.sources import read_video

    images: list[Image.Image] = []
    videos: list[list[Image.Image]] = []

    def add(v: Any) -> None:
        if v is None:
            return
        if isinstance(v, (list, tuple)):
            for x in v:
                add(x)
        elif isinstance(v, Image.Image):
            images.append(to_rgb(v))
        elif isinstance(v, (str, Path)):
            suffix = Path(v).suffix.lower()
            if suffix in VIDEO_SUFFIXES:
                videos.append(read_video(v, max_frames))
            elif suffix in IMAGE_SUFFIXES:
                images.append(open_image(v))  # EXIF orientation, 16-bit scaled, animations refused
            else:
                raise ValueError(f"visual {str(v)!r}: not an image ({', '.join(IMAGE_SUFFIXES)}) or a video file "
                                 f"({', '.join(VIDEO_SUFFIXES)})")
        elif isinstance(v, (np.ndarray, torch.Tensor)):
            arr = v.cpu().numpy() if isinstance(v, torch.Tensor) else v
            if arr.ndim == 4:
                step = max(1, len(arr) / max_frames)
                videos.append([Image.fromarray(arr[int(k * step)]).convert("RGB")
                               for k in range(min(max_frames, len(arr)))])
            else:
                from explainprune.models.base import to_pil

                images.append(to_pil(arr))
        else:
            raise ValueError(f"unsupported visual of type {type(v).__name__}: give PIL images, image or video "
                             "file paths, or arrays")

    add(visuals)
    if len(videos) > 1:
        raise ValueError(f"a request holds {len(videos)} videos; explainprune's adapters take one video per prompt")
    return images, (videos[0] if videos else None)


def check_ratio(method: str, ratio: float | None) -> float:
    """``ratio`` as a float in (0, 1]; ValueError for a missing one (only vanilla may leave it out), one
    outside (0, 1], or vanilla with a ratio below 1 (it keeps everything: the label would lie)."""
    from explainprune.pruning import select

    if ratio is None:
        if method != "vanilla":
            raise ValueError(f"method {method!r} needs ratio=<share of visual tokens kept, in (0, 1]>")
        ratio = 1.0
    select(torch.ones(1), ratio)  # validates the ratio: a number in (0, 1]
    if method == "vanilla" and float(ratio) != 1.0:
        raise ValueError(f"method 'vanilla' keeps every visual token, so ratio={ratio} would be mislabelled: "
                         "leave ratio out for vanilla, or name a pruning method")
    return float(ratio)


def check_method(method: str, ratio: float | None, **options: Any) -> tuple[Any, float]:
    """(pruner, ratio) for ``method`` with ``options``; ValueError with explainprune's message for an unknown
    method or option, or a bad ratio (``check_ratio``)."""
    from explainprune.pruning import available, get_pruner

    if str(method) not in available():
        get_pruner(str(method))  # the "unknown pruner ... did you mean" error
    ratio = check_ratio(str(method), ratio)
    return get_pruner(str(method), **options), ratio


def _batches_lists(pruner: Any) -> bool:
    """Does this pruner's own ``generate`` take a list of prompts (FastV does)? The base one is batched here."""
    from explainprune.pruning.base import Pruner

    if type(pruner).generate is Pruner.generate:
        return False
    annotation = inspect.signature(pruner.generate).parameters.get("prompt")
    return annotation is not None and "list" in str(annotation.annotation)


class PrunedEngine:
    """Runs lmms-eval requests through ``vlm`` with the pruner ``method`` at ``ratio``.

    ``options`` go to ``explainprune.get_pruner(method, **options)`` (e.g. ``compressor=DIR``, ``layer=4``);
    bad names, options or ratios fail here, before any model work. ``fps``: ``VLM.prepare``'s rate of
    sampled video frames, used for videos that carry none (frames as arrays or images; video files carry
    their own). ``records`` collects one ``SampleRecord`` per request with visual tokens (id
    ``task/doc_id``, kind = task name); ``ignored`` the generation settings not applied.
    """

    def __init__(self, vlm: Any, method: str = "vanilla", ratio: float | None = None, *, max_new_tokens: int = 16,
                 max_frames: int = 8, warmup: bool = True, fps: float | None = None, **options: Any):
        from explainprune.evaluation.flops import LLMShape

        self.pruner, ratio = check_method(method, ratio, **options)
        self.vlm, self.method, self.ratio = vlm, str(method), ratio
        self.options = options
        self.max_new_tokens, self.max_frames = int(max_new_tokens), int(max_frames)
        self.fps = None if fps is None else float(fps)
        self.shape = LLMShape.from_config(vlm.text_config)
        self.records: list[Any] = []
        self.text_only = 0
        self.ignored: set[str] = set()
        self._warm = not warmup

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if k != "compressor")
        return f"{self.method}:{opts}" if opts else self.method

    def prepare(self, request: Request) -> Any:
        images, video = split_visuals(request.visuals, self.max_frames)
        question = request.context.replace("<image>", "").strip()
        fps = self.fps if video is not None and getattr(video, "fps", None) is None else None
        return self.vlm.prepare(images=images or None, video=video, question=question, fps=fps)

    def run(self, requests: Sequence[Request]) -> list[Answer]:
        """Answer a batch of requests sharing generation kwargs (as lmms-eval groups them), as one batch."""
        if not requests:
            return []
        gen = generation_options(requests[0].gen_kwargs, self.max_new_tokens)
        new = [g for g in gen.ignored if g not in self.ignored]
        if new:
            from loguru import logger

            logger.warning(f"explainprune: generation settings not applied: {'; '.join(new)}")
            self.ignored.update(new)
        prompts = [self.prepare(r) for r in requests]
        outs = self._run(requests, prompts, gen)
        return [Answer(cut_at(o.text, gen.until), o.prompt_tokens, len(o.token_ids)) for o in outs]

    def score(self, requests: Sequence[Request]) -> list[Scored]:
        """log p(continuation | context) and is-greedy for a batch of requests (``Request.continuation`` set),
        with the context pruned as for generation (see ``scoring``).

        Requests of one document and context (lmms-eval's multiple-choice options) share that context's
        pruned prefill for their single-token continuations (their log-probabilities are all read from its
        first step); each longer continuation is decoded in its own row."""
        if not requests:
            return []
        targets = []
        for r in requests:
            target = continuation_ids(self.vlm.tokenizer, str(r.continuation))
            check_eos(target, self.vlm.eos_token_ids, str(r.continuation))
            targets.append(target)
        keys = [(r.task, str(r.doc_id), r.context) if r.doc_id is not None else i for i, r in enumerate(requests)]
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        run = [i for idx in groups.values() for i in ([i for i in idx if len(targets[i]) > 1] or idx[:1])]
        outs = self._force([requests[i] for i in run], [self.prepare(requests[i]) for i in run],
                           [targets[i] for i in run])
        logits = dict(zip(run, (o.logits for o in outs)))
        first = {keys[i]: logits[i] for i in reversed(run)}  # any row of a context: its first step
        return [score_logits(logits[i] if i in logits else first[keys[i]], targets[i]) for i in range(len(requests))]

    def _force(self, requests: Sequence[Request], prompts: list[Any], targets: list[list[int]]) -> list[Any]:
        """Generation forced along ``targets`` with the raw logits of every step, batched as ``run`` batches."""
        from transformers import LogitsProcessorList

        def force(rows: list[int]) -> dict[str, Any]:
            forcer = ForceTokens([targets[i] for i in rows], self.vlm.eos_token_ids[0])
            return {"output_logits": True, "logits_processor": LogitsProcessorList([forcer])}

        return self._run(requests, prompts, GenOptions(max(len(t) for t in targets)), force)

    def _run(self, requests: Sequence[Request], prompts: list[Any], gen: GenOptions,
             extra: Callable[[list[int]], dict[str, Any]] | None = None) -> list[Any]:
        """GenerationResults in request order: text-only prompts on the unchanged model, the others pruned
        (one ragged batch, or one by one for a pruner whose ``generate`` takes one prompt). ``extra(rows)``:
        more ``generate`` options for the call that runs those rows."""
        def options(rows: list[int]) -> dict[str, Any]:
            return {**gen.generate, **(extra(rows) if extra else {})}

        outs: list[Any] = [None] * len(requests)
        visual = [i for i, p in enumerate(prompts) if p.num_visual > 0]
        text_only = [i for i, p in enumerate(prompts) if p.num_visual == 0]
        if text_only:  # nothing to prune: the unchanged model
            res = self.vlm.generate([prompts[i] for i in text_only], max_new_tokens=gen.max_new_tokens,
                                    **options(text_only))
            for i, out in zip(text_only, res):
                outs[i] = out
            self.text_only += len(text_only)
        if visual:
            if not self._warm:  # one untimed short run, as `explainprune eval` does
                self.vlm.generate(prompts[visual[0]], max_new_tokens=2)
                self._warm = True
            batched = type(self.pruner).generate is _base_generate() or _batches_lists(self.pruner)
            groups = [visual] if batched else [[i] for i in visual]
            for group in groups:
                res = self._generate([requests[i] for i in group], [prompts[i] for i in group],
                                     gen.max_new_tokens, options(group))
                for i, out in zip(group, res):
                    outs[i] = out
        return outs

    def _generate(self, requests: list[Request], prompts: list[Any], max_new_tokens: int,
                  options: dict[str, Any]) -> list[Any]:
        from explainprune.evaluation.runner import measure

        pruner, ratio, b = self.pruner, self.ratio, len(prompts)
        score_s = [0.0] * b
        with measure(self.vlm.model) as meter:
            t0 = time.perf_counter()
            if type(pruner).generate is _base_generate():
                from explainprune.pruning.base import as_keep

                keeps = []
                for k, p in enumerate(prompts):
                    ts = time.perf_counter()
                    keeps.append(as_keep(pruner.keep(self.vlm, p, ratio), p.num_visual))
                    score_s[k] = time.perf_counter() - ts
                outs = self.vlm.generate(prompts, keep=keeps, max_new_tokens=max_new_tokens, **options)
            else:
                outs = pruner.generate(self.vlm, prompts if b > 1 else prompts[0], ratio,
                                       max_new_tokens=max_new_tokens, **options)
                outs = outs if isinstance(outs, list) else [outs]
            total = time.perf_counter() - t0
        self._record(requests, prompts, outs, meter, total - sum(score_s), score_s)
        return outs

    def _record(self, requests: list[Request], prompts: list[Any], outs: list[Any], meter: Any, batch_s: float,
                score_s: list[float]) -> None:
        from explainprune.cost import method_account
        from explainprune.evaluation.report import SampleRecord

        n_layers, b = self.shape.layers, len(prompts)
        rows = [list(getattr(o, "layer_tokens", None) or [o.prompt_tokens] * n_layers) for o in outs]
        padded = sum(b * max(r[layer] for r in rows) for layer in range(n_layers))
        per_row = meter.kv_bytes / padded if padded else 0.0
        layer = int(getattr(self.pruner, "layer", 0))
        for req, p, o, r, s in zip(requests, prompts, outs, rows, score_s):
            kept = int(o.visual_tokens)
            # the runner's account (``explainprune eval``): the pruner's per-layer tokens and selection cost
            acc = method_account(self.pruner, self.shape, p.num_visual, self.ratio,
                                 measured=getattr(o, "visual_per_layer", None), kept=kept)
            self.records.append(SampleRecord(
                id=f"{req.task}/{req.doc_id}", kind=req.task, method=self.label(), ratio=self.ratio,
                question=p.question, reference="", prediction=o.text, correct=False, n_visual=p.num_visual,
                kept=kept, layer=layer, average_retention=acc.average_retention, flops_llm=acc.llm,
                flops_overhead=acc.attention + acc.conv + acc.selection, prefill_s=meter.prefill_s / b,
                decode_s=meter.decode_s / b, total_s=s + batch_s / b, new_tokens=len(o.token_ids),
                kv_bytes=round(per_row * sum(r)), score_s=s))


def _base_generate() -> Any:
    from explainprune.pruning.base import Pruner

    return Pruner.generate
