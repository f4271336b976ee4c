"""Load ahead in a background thread: media decoding and preprocessing overlap with model work.

``prefetch(load, keys, depth)`` runs ``load(key)`` for the keys in order in one background thread, at
most ``depth`` results ahead of the consumer, and yields one ``Loaded`` per key in the same order. A
failing key does not stop the others: its ``Loaded.result()`` re-raises the original exception (same
object, with a note naming the key) in the consumer, at that key's turn, so a loop written for
sequential loading keeps its behaviour. ``depth=0`` loads in the consumer's thread (no thread at all).

``prepared(vlm, source, indices, depth)`` is what ``label`` uses: each sample read from its source and
turned into a Prompt (``vlm.prepare``) while the model works on the samples before it.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from explainprune.validation import prepare_sample

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class Loaded(Generic[K, V]):
    """The outcome of ``load(key)``: ``result()`` returns its value or re-raises its exception."""

    key: K
    value: V | None = None
    error: BaseException | None = None

    def result(self) -> V:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@dataclass
class _KeysFailed:
    error: BaseException


def _load(load: Callable[[K], V], key: K, what: str) -> Loaded[K, V]:
    try:
        return Loaded(key, load(key))
    except Exception as err:  # handed to the consumer, who re-raises it at this key's turn
        if hasattr(err, "add_note"):
            err.add_note(f"(while loading {what} {key!r} ahead of the model)")
        return Loaded(key, error=err)


def prefetch(load: Callable[[K], V], keys: Iterable[K], depth: int = 2, *,
             what: str = "sample") -> Iterator[Loaded[K, V]]:
    """``Loaded`` for every key, in order, computed up to ``depth`` keys ahead in a background thread.

    Closing the iterator early (``break``, an exception in the consumer) stops the thread after the key
    it is loading. ``what`` names the keys in the note added to an exception ("sample", "shard", ...).
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0; got {depth}")
    if depth == 0:
        for key in keys:
            yield _load(load, key, what)
        return
    done = object()
    stop = threading.Event()
    results: queue.Queue = queue.Queue(maxsize=depth)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for key in keys:
                if stop.is_set() or not put(_load(load, key, what)):
                    return
        except BaseException as err:  # iterating the keys failed: the consumer sees it after the others
            put(_KeysFailed(err))
            return
        put(done)

    thread = threading.Thread(target=work, name="explainprune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is done:
                return
            if isinstance(item, _KeysFailed):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue, then let it finish its key
            try:
                results.get(timeout=0.1)
            except queue.Empty:
                pass


def prepared(vlm: Any, source: Any, indices: Iterable[int], depth: int = 2,
             device_lock: threading.Lock | None = None) -> Iterator[Loaded[int, tuple]]:
    """``Loaded[(sample, prompt)]`` for ``source[i]``, i in ``indices``: the sample read (images opened,
    video decoded) and prepared by ``vlm.prepare`` (processor resizing, vision tower) ahead of the model.
    An error names the sample's id when the sample itself could be read.

    With a loader thread, ``prepare`` runs on a shallow copy of ``vlm`` with its own copy of the
    tokenizer (same model, same processor): a fast tokenizer used from two threads at once raises
    "Already borrowed" (huggingface/tokenizers#537), and the model's thread decodes while this one encodes.

    ``device_lock``: held around ``prepare`` (whose vision tower allocates on the model's device) and, by the
    consumer, around its own model work; reading and decoding the media still overlap. ``label`` passes one
    when the model is on an accelerator, so the vision tower of the next sample never allocates while the
    relevance engine runs on a head-chunk budget computed from the free memory without it.
    """
    loader = vlm
    if depth > 0 and getattr(vlm, "tokenizer", None) is not None:
        loader = copy.copy(vlm)
        loader.tokenizer = copy.deepcopy(vlm.tokenizer)

    def load(i: int) -> tuple[Any, Any]:
        sample = source[i]
        try:
            with device_lock or contextlib.nullcontext():
                return sample, prepare_sample(loader, sample, source, i)  # an InputError names the sample
        except Exception as err:
            if hasattr(err, "add_note"):
                err.add_note(f"(preparing sample {sample.id!r}, index {i})")
            raise

    return prefetch(load, indices, depth, what="sample index")
