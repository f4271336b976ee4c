"""``ExplainPrune``: the lmms-eval model (``--model explainprune``) running any checkpoint ``explainprune.load``
accepts with any registered pruning method.

    python -m lmms_eval --model explainprune \\
      --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,method=learned,ratio=0.25,compressor=DIR,dtype=bfloat16 \\
      --tasks mme --batch_size 8 --output_path results/

model_args: ``pretrained`` (path, hub id or ``demo``), ``method`` (a registry name, default vanilla), ``ratio``
(share of visual tokens kept), ``compressor`` and any other option of the method (e.g. ``layer=4`` for
fastv, ``seed=1`` for random), ``dtype``, ``device``, ``attn_implementation``, ``trust_remote_code``,
``max_new_tokens`` (when a task gives none; 16), ``max_frames`` (frames read from a video file; 8),
``efficiency_out`` (directory of the efficiency summary; default lmms-eval's ``--output_path``), ``warmup``.
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

from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request, check_method

LOAD_ARGS = ("dtype", "attn_implementation", "trust_remote_code")


def _cli_args(argv: list[str]) -> argparse.Namespace:
    """lmms-eval's ``--output_path`` and ``--timezone`` (the model is not told them): where and under which
    date its results files go. The arguments of the running evaluation (``simple_evaluate``'s ``cli_args``,
    also with ``--config``) when the model is called from lmms-eval, else those on the command line."""
    frame = sys._getframe()
    while frame is not None:
        found = frame.f_locals.get("cli_args")
        if isinstance(found, argparse.Namespace) and hasattr(found, "output_path"):
            return argparse.Namespace(output_path=found.output_path,
                                      timezone=getattr(found, "timezone", None) or "Asia/Singapore")
        frame = frame.f_back
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
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
        from explainprune.models import load

        load_kwargs = {k: options.pop(k) for k in LOAD_ARGS if k in options}
        check_method(method, ratio, **options)  # the method, its options and the ratio, before any weights load
        self.accelerator, self._rank, self._world_size = _distributed()
        if self.accelerator is not None and torch.cuda.is_available() and device in (None, "cuda"):
            device = f"cuda:{self.accelerator.local_process_index}"
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.pretrained = str(pretrained)
        self.vlm = load(self.pretrained, device=self._device, **load_kwargs)
        self.engine = PrunedEngine(self.vlm, str(method), ratio, max_new_tokens=int(max_new_tokens),
                                   max_frames=int(max_frames), warmup=bool(warmup), **options)
        self.batch_size_per_gpu = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.efficiency_out = efficiency_out
        self.efficiency_path: Any = None

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
        raise NotImplementedError(
            "explainprune does not score loglikelihood requests: pruning methods are evaluated by generation, "
            "so use tasks whose output_type is generate_until")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("explainprune does not run multi-round generation; use generate_until tasks")

    def generate_until(self, requests: list[Any]) -> list[Any]:
        """Answers in request order. Requests are grouped by generation kwargs, longest context first, and
        run ``batch_size`` at a time as ragged batches; the efficiency summary is written at the end."""
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
        self.write_efficiency()
        return [self._result(a) for a in answers]

    def _request(self, instance: Any) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        return Request(context=context, visuals=visuals, gen_kwargs=dict(gen_kwargs or {}), task=str(task),
                       doc_id=doc_id)

    @staticmethod
    def _result(answer: Any) -> Any:
        """lmms-eval's GenerationResult with token counts where it has one (0.7+), else the text."""
        try:
            from lmms_eval.api.instance import GenerationResult, TokenCounts
        except ImportError:
            return answer.text
        return GenerationResult(answer.text, TokenCounts(input_tokens=answer.prompt_tokens,
                                                         output_tokens=answer.new_tokens))

    def write_efficiency(self) -> Any:
        """Gather the records of every process; rank 0 writes ``{time}_explainprune_efficiency.json`` (+ .md)
        into ``efficiency_out``, else into lmms-eval's results folder (``--output_path``/<model>/)."""
        from explainprune.integrations.lmms_eval import efficiency

        records = self.engine.records
        text_only = self.engine.text_only
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, (records, text_only))
            records = [r for part, _ in gathered for r in part]
            text_only = sum(t for _, t in gathered)
        if self.rank != 0 or not (records or text_only):
            return None
        summary = efficiency.summarize(
            records, model=self.pretrained, method=self.engine.label(), ratio=self.engine.ratio, text_only=text_only,
            shape=self.engine.shape, extra={"batch_size": self.batch_size, "processes": self.world_size,
                                            "device": str(self.device), "torch_threads": torch.get_num_threads()})
        logger.info("\n" + efficiency.to_markdown(summary))
        cli = _cli_args(sys.argv[1:])
        try:
            stamp = get_datetime_str(timezone=cli.timezone)
        except Exception:  # an unknown timezone: lmms-eval fails on it too
            stamp = time.strftime("%Y%m%d_%H%M%S")
        directory = self.efficiency_out
        if directory is None:
            if cli.output_path is None:
                logger.warning("explainprune: no --output_path and no efficiency_out=: efficiency summary not written")
                return None
            directory = Path(cli.output_path) / sanitize_model_name(self.pretrained)
        self.efficiency_path = efficiency.write(summary, directory, stamp)
        logger.info(f"explainprune efficiency summary: {self.efficiency_path}")
        return self.efficiency_path
