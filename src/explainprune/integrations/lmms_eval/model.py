"""``ExplainPrune``: the lmms-eval model (``--model explainprune``) running any checkpoint ``explainprune.load``
accepts with any registered pruning method.

    python -m lmms_eval --model explainprune \\
      --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,method=learned,ratio=0.25,compressor=DIR,dtype=bfloat16 \\
      --tasks mme --batch_size 8 --output_path results/

model_args (split by name, see ``args.py``): ``pretrained`` (path, hub id or ``demo``), ``method`` (a registry
name, default vanilla), ``ratio`` (share of visual tokens kept), ``compressor`` (a compressor or training run
folder) and any other option of the method (e.g. ``layer=4`` for fastv, ``seed=1`` for random); every option
of ``explainprune.load`` (``dtype``, ``device_map``, ``attn_implementation``, ``revision``,
``trust_remote_code``) and of the family's image processor (``max_pixels``, ``min_pixels``, ...); ``fps``
(``prepare``); ``device``, ``max_new_tokens`` (when a task gives none; 16), ``max_frames`` (frames read from a
video file; 8), ``efficiency_out`` (directory of the efficiency summary; default lmms-eval's
``--output_path``), ``warmup``. A bad argument or output folder stops the run when the model is built, with
one line and a non-zero exit (``SystemExit``: lmms-eval swallows other exceptions and exits 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.model import lmms
from lmms_eval.utils import get_datetime_str, sanitize_model_name
from loguru import logger

from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request

ERROR_PREFIX = "explainprune lmms-eval model: error: "


def _frame_local(name: str, check: Any) -> Any:
    """The nearest caller's local variable ``name`` passing ``check`` (lmms-eval does not hand the model its
    CLI arguments or response cache), else None."""
    frame = sys._getframe()
    while frame is not None:
        found = frame.f_locals.get(name)
        if found is not None and check(found):
            return found
        frame = frame.f_back
    return None


def _cli_args(argv: list[str]) -> argparse.Namespace:
    """lmms-eval's ``--output_path`` and ``--timezone`` (the model is not told them): where and under which
    date its results files go. The arguments of the running evaluation (``simple_evaluate``'s ``cli_args``,
    also with ``--config``) when the model is called from lmms-eval, else those on the command line."""
    found = _frame_local("cli_args", lambda x: isinstance(x, argparse.Namespace) and hasattr(x, "output_path"))
    if found is not None:
        return argparse.Namespace(output_path=found.output_path, use_cache=getattr(found, "use_cache", None),
                                  timezone=getattr(found, "timezone", None) or "Asia/Singapore")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
    parser.add_argument("--use_cache", default=None)
    parser.add_argument("--timezone", default="Asia/Singapore")
    return parser.parse_known_args(argv)[0]


def _distributed() -> tuple[Any, int, int]:
    """(accelerator or None, rank, world size), as lmms-eval's own models split requests across processes."""
    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover - accelerate comes with lmms-eval
        return None, 0, 1
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        return accelerator, accelerator.process_index, accelerator.num_processes
    return None, 0, 1


class ExplainPrune(lmms):
    """lmms-eval model wrapping ``explainprune.load(pretrained)`` and ``explainprune.get_pruner(method)``."""

    is_simple = True

    def __init__(self, pretrained: str = "demo", method: str = "vanilla", ratio: float | None = None,
                 device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_new_tokens: int = 16, max_frames: int = 8, efficiency_out: str | None = None,
                 warmup: bool = True, **options: Any) -> None:
        super().__init__()
        try:
            self._build(pretrained=pretrained, method=method, ratio=ratio, device=device, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, max_frames=max_frames, efficiency_out=efficiency_out,
                        warmup=warmup, **options)
        except (ValueError, OSError, RuntimeError, ImportError) as err:  # InputError is a ValueError
            message = ERROR_PREFIX + (str(err).strip().splitlines() or [type(err).__name__])[0]
            logger.error(message)
            raise SystemExit(message) from None

    def _build(self, **model_args: Any) -> None:
        """Check every argument and output folder (``args.parse``), then load the model and build the engine."""
        from explainprune.integrations.lmms_eval.args import parse
        from explainprune.models import load

        cli = _cli_args(sys.argv[1:])
        args = parse(**model_args, output_path=cli.output_path)
        self.args = args
        self.accelerator, self._rank, self._world_size = _distributed()
        device = args.device
        if "device_map" not in args.load:
            if self.accelerator is not None and torch.cuda.is_available() and device in (None, "cuda"):
                device = f"cuda:{self.accelerator.local_process_index}"
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device)
            self.vlm = load(args.pretrained, device=self._device, **args.load)
        else:
            self.vlm = load(args.pretrained, **args.load)
            self._device = self.vlm.device
        self.pretrained = args.pretrained
        self.engine = PrunedEngine(self.vlm, args.method, args.ratio, max_new_tokens=args.max_new_tokens,
                                   max_frames=args.max_frames, warmup=args.warmup, **args.prepare, **args.pruner)
        compressor = getattr(self.engine.pruner, "compressor", None)
        if compressor is not None and hasattr(compressor, "check_compatible"):
            compressor.check_compatible(self.vlm)  # before any request, not at the first one
        self.batch_size_per_gpu = args.batch_size
        self.efficiency_out = args.efficiency_out
        self.efficiency_path: Any = None
        self._stamp: str | None = None
        logger.info(f"explainprune: {self.pretrained} ({self.vlm.family}, {self.vlm.model.dtype}) with "
                    f"{self.engine.label()} at ratio {self.engine.ratio:g} on {self.device}")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def model(self) -> Any:
        return self.vlm.model

    @property
    def tokenizer(self) -> Any:
        return self.vlm.tokenizer

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, is-greedy) per request, in request order:
        the loss lmms-eval's own models return, which its ``multiple_choice`` scoring minimises. The context
        is pruned as for generation, by every method (see ``scoring``); ``batch_size`` contexts at a time."""
        from tqdm import tqdm

        if _frame_local("response_cache", lambda x: hasattr(x, "get_stats")) is not None:
            logger.warning("explainprune: with --use_cache, lmms-eval 0.7.3 hands CACHED loglikelihood answers back "
                           "as strings, which its multiple-choice scoring cannot read: a rerun that hits the cache "
                           "fails in lmms-eval; run multiple-choice tasks without --use_cache")
        items = [self._request(r, loglikelihood=True) for r in requests]
        groups: dict[Any, list[int]] = {}  # one document's options together: they share its prefill
        for i, item in enumerate(items):
            groups.setdefault((item.task, str(item.doc_id), item.context), []).append(i)
        ordered = sorted(groups.values(), key=lambda idx: -len(items[idx[0]].context))
        scores: list[Any] = [None] * len(items)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="explainprune loglikelihood")
        for start in range(0, len(ordered), self.batch_size):  # batch_size contexts at a time
            chunk = [i for idx in ordered[start:start + self.batch_size] for i in idx]
            for i, scored in zip(chunk, self.engine.score([items[i] for i in chunk])):
                scores[i] = scored
            bar.update(len(chunk))
        bar.close()
        self._after_requests()
        return [_pair(s.loss, s.greedy) for s in scores]

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("explainprune does not run multi-round generation; use generate_until tasks")

    def generate_until(self, requests: list[Any]) -> list[Any]:
        """Answers in request order. Requests are grouped by generation kwargs, longest context first, and
        run ``batch_size`` at a time as ragged batches."""
        from tqdm import tqdm

        items = [self._request(r) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(json.dumps(item.gen_kwargs, sort_keys=True, default=str), []).append(i)
        answers: list[Any] = [None] * len(items)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="explainprune")
        for order in groups.values():
            order = sorted(order, key=lambda i: -len(items[i].context))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, answer in zip(chunk, self.engine.run([items[i] for i in chunk])):
                    answers[i] = answer
                bar.update(len(chunk))
        bar.close()
        self._after_requests()
        return [self._result(a) for a in answers]

    def _request(self, instance: Any, loglikelihood: bool = False) -> Request:
        args = instance.args
        if len(args) < 6:  # ("", continuation): an unconditional request (acc_mutual_info), no visuals
            return Request(context=str(args[0]), continuation=str(args[1]), task=str(instance.task_name),
                           doc_id=instance.doc_id)
        context, second, doc_to_visual, doc_id, task, split = args[:6]
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        if loglikelihood:
            continuation = second(doc) if callable(second) else second  # loglikelihood tasks pass doc_to_target
            return Request(context=context, visuals=visuals, task=str(task), doc_id=doc_id,
                           continuation=str(continuation))
        return Request(context=context, visuals=visuals, gen_kwargs=dict(second or {}), task=str(task), doc_id=doc_id)

    @staticmethod
    def _result(answer: Any) -> Any:
        """lmms-eval's GenerationResult with token counts where it has one (0.7+), else the text."""
        try:
            from lmms_eval.api.instance import GenerationResult, TokenCounts
        except ImportError:
            return answer.text
        return GenerationResult(answer.text, TokenCounts(input_tokens=answer.prompt_tokens,
                                                         output_tokens=answer.new_tokens))

    def _after_requests(self) -> None:
        """After each request type: the summary so far (one process; ``clean`` writes the final one)."""
        if self.world_size == 1:
            self.write_efficiency()

    def clean(self) -> None:
        """lmms-eval calls this once after every request type, on every process (also when all requests came
        from its response cache): the final efficiency summary, then lmms-eval's own clean-up."""
        self.write_efficiency(final=True)
        super().clean()

    def write_efficiency(self, final: bool = False) -> Any:
        """Gather the records of every process (``final`` only: every process calls it); rank 0 writes
        ``{time}_explainprune_efficiency.json`` (+ .md) into ``efficiency_out``, else into lmms-eval's results
        folder (``--output_path``/<model>/). The same file is rewritten as request types finish."""
        from explainprune.integrations.lmms_eval import efficiency

        records, text_only = self.engine.records, self.engine.text_only
        if final and self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, (records, text_only))
            records = [r for part, _ in gathered for r in part]
            text_only = sum(t for _, t in gathered)
        cli = _cli_args(sys.argv[1:])
        cache = _cache_stats(cli)
        if self.rank != 0 or not (records or text_only or cache):
            return None
        summary = efficiency.summarize(records, model=self.pretrained, method=self.engine.label(),
                                       ratio=self.engine.ratio, text_only=text_only, shape=self.engine.shape,
                                       extra=self._identity() | {"use_cache": cache})
        if final:
            logger.info("\n" + efficiency.to_markdown(summary))
        if self._stamp is None:
            try:
                self._stamp = get_datetime_str(timezone=cli.timezone)
            except Exception:  # an unknown timezone: lmms-eval fails on it too
                self._stamp = time.strftime("%Y%m%d_%H%M%S")
        directory = self.efficiency_out
        if directory is None:
            if cli.output_path is None:
                if final:
                    logger.warning("explainprune: no --output_path and no efficiency_out=: efficiency summary not "
                                   "written")
                return None
            directory = Path(cli.output_path) / sanitize_model_name(self.pretrained)
        self.efficiency_path = efficiency.write(summary, directory, self._stamp)
        if final:
            logger.info(f"explainprune efficiency summary: {self.efficiency_path}")
        return self.efficiency_path

    def _identity(self) -> dict[str, Any]:
        """What the numbers were measured on: the model (dtype, revision, load options), the compressor
        (folder and SHA-256 of its weights), the batch and device."""
        from explainprune.compressor_path import weights_sha256

        load = {k: v for k, v in self.args.load.items() if k not in ("dtype", "revision")}
        compressor = self.args.pruner.get("compressor")
        folder = str(Path(compressor).resolve()) if isinstance(compressor, (str, Path)) else None
        return {"dtype": str(self.vlm.model.dtype).replace("torch.", ""),
                "revision": self.args.load.get("revision"), "commit": _commit(self.vlm),
                "load_options": {k: str(v) for k, v in load.items()}, "prepare_options": self.args.prepare,
                "compressor": None if compressor is None else
                {"path": folder, "sha256": weights_sha256(folder) if folder else None},
                "batch_size": self.batch_size, "processes": self.world_size, "device": str(self.device),
                "torch_threads": torch.get_num_threads()}


class _Pair(tuple):
    """(loss, is_greedy); ``strip()`` answers lmms-eval's response cache, which checks a ``GenerationResult``'s
    text that way before storing it (stored as a JSON pair)."""

    def strip(self) -> str:
        return str(tuple(self))


def _pair(loss: float, greedy: bool) -> Any:
    """(loss, is_greedy) as lmms-eval 0.7 keeps it: its evaluator turns any model output that is not a string
    or a ``GenerationResult`` into a string (``unwrap_generation_output``), which breaks its own
    ``multiple_choice`` scoring; a ``GenerationResult`` hands its ``text`` over unchanged. A plain tuple
    where lmms-eval has no ``GenerationResult`` (0.6)."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:
        return (loss, greedy)
    return GenerationResult(text=_Pair((loss, greedy)))  # type: ignore[arg-type]


def _commit(vlm: Any) -> str | None:
    """The hub commit the weights came from (``config._commit_hash``; None for a local folder)."""
    return getattr(vlm.model.config, "_commit_hash", None)


def _cache_stats(cli: argparse.Namespace) -> dict[str, Any] | None:
    """With lmms-eval's ``--use_cache``: what its response cache answered (those requests were not run, so
    the efficiency numbers cover only the recomputed ones); None without a cache."""
    if not getattr(cli, "use_cache", None):
        return None
    cache = _frame_local("response_cache", lambda x: hasattr(x, "get_stats"))
    stats: dict[str, Any] = {"path": str(cli.use_cache)}
    if cache is not None:
        try:
            s = cache.get_stats()
        except Exception:  # a closed cache database
            s = {"hits": getattr(cache, "_hits", None), "misses": getattr(cache, "_misses", None),
                 "skipped_non_deterministic": getattr(cache, "_skipped", None)}
        stats.update(answered_from_cache=s.get("hits"),
                     recomputed=(s.get("misses") or 0) + (s.get("skipped_non_deterministic") or 0))
    stats["note"] = ("requests answered from lmms-eval's response cache were not run: the efficiency numbers "
                     "cover only the recomputed requests")
    return stats
