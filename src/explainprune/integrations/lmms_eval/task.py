"""The built-in digits benchmark as lmms-eval tasks, offline: ``explainprune_digits`` (every sample) and its
``explainprune_digits_image`` / ``explainprune_digits_video`` subsets (generated answers, exact match), and
``explainprune_digits_mc``, the same samples as a ``multiple_choice`` task (choices "0".."9", scored by
loglikelihood requests; lmms-eval's ``acc``).

``write_task(DIR)`` (``explainprune lmms-task --out DIR``) exports the digits samples with
``DigitsTask.export`` (``DIR/data/manifest.jsonl`` + PNG media, what ``explainprune eval --task`` reads),
each video also as one lossless file (FFV1 in Matroska: the same pixels), the lmms-eval documents
(``DIR/data/{all,image,video}.jsonl``, read with ``dataset_path: json``), one YAML per task and a
``utils.py`` pointing at the functions below, so ``--include_path DIR`` finds the tasks. Scoring is
``explainprune eval``'s (``answers.is_correct``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS = {"explainprune_digits": "all", "explainprune_digits_image": "image", "explainprune_digits_video": "video"}
MC_TASKS = {"explainprune_digits_mc": "all"}
CHOICES = tuple(str(d) for d in range(10))

YAML = """# Written by `explainprune lmms-task`; the data paths are absolute (rerun the command after moving DIR).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
"""

MC_YAML = """# Written by `explainprune lmms-task`; the data paths are absolute (rerun the command after moving DIR).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
doc_to_choice: {choices}
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
"""

UTILS = '''"""Written by `explainprune lmms-task`: the digits task functions, with media under ./data."""

from pathlib import Path

from explainprune.integrations.lmms_eval import task as _task

ROOT = Path(__file__).resolve().parent / "data"


def doc_to_visual(doc):
    return _task.doc_to_visual(doc, ROOT)


doc_to_text = _task.doc_to_text
process_results = _task.process_results
'''


def doc_to_visual(doc: dict[str, Any], root: str | Path) -> list[Any]:
    """[PIL image] for an image sample (read by ``images.open_image``, as explainprune reads manifests),
    [video file path] for a video sample (as lmms-eval tasks hand them)."""
    from explainprune.images import open_image

    root = Path(root)
    if doc.get("video_file"):
        return [str(root / doc["video_file"])]
    return [open_image(root / doc["image"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question, between the task's optional ``pre_prompt`` / ``post_prompt`` (none by default)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``exact_match``: ``explainprune eval``'s scoring (``answers.is_correct``: the prediction equals the
    reference, or one of a list of them, after normalisation)."""
    from explainprune.answers import is_correct, normalize_answers

    return {"exact_match": float(is_correct(results[0], normalize_answers(doc["answer"], "answer")))}


def write_video(frames: list[Any], path: str | Path, fps: int = 2) -> Path:
    """Frames -> a lossless video file (FFV1, RGB): ``sources.read_video`` gives the same pixels back."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))))
        container.mux(stream.encode())
    return path


def write_task(out: str | Path, n: int = 200, split: str = "test", seed: int = 0,
               max_new_tokens: int = 8, **options: Any) -> dict[str, Any]:
    """Export ``n`` digits samples (``DigitsTask(split, seed, n, **options)``) and the four lmms-eval tasks
    (``TASKS`` and ``MC_TASKS``) into ``out``. Returns {"tasks": {name: yaml path}, "manifest": path,
    "counts": {subset: samples}}."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise ValueError("writing the video files needs PyAV: pip install 'explainprune[video]'") from None
    from explainprune.tasks.digits import DigitsTask

    out = Path(out).resolve()
    data = out / "data"
    task = DigitsTask(split=split, seed=seed, n=n, **options)
    manifest = task.export(data)
    docs: dict[str, list[dict[str, Any]]] = {"all": [], "image": [], "video": []}
    for i, line in enumerate(manifest.read_text().splitlines()):
        rec = json.loads(line)
        doc = {"id": rec["id"], "kind": rec["kind"], "question": rec["question"], "answer": str(rec["answer"]),
               "image": rec.get("image"), "video_file": None}
        if "video" in rec:
            doc["video_file"] = f"media/{rec['id']}.mkv"
            write_video(task.sample(i).video, data / doc["video_file"])
        docs["all"].append(doc)
        docs["video" if doc["video_file"] else "image"].append(doc)
    for subset, rows in docs.items():
        (data / f"{subset}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = json.dumps({"split": split, "seed": seed, "n": n, **options})
    paths = {}
    for name, subset in TASKS.items():
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(YAML.format(task=name, data=json.dumps(str(data / f"{subset}.jsonl")),
                                           max_new_tokens=int(max_new_tokens), source=json.dumps(source)))
    for name, subset in MC_TASKS.items():
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(MC_YAML.format(task=name, data=json.dumps(str(data / f"{subset}.jsonl")),
                                              choices=json.dumps(list(CHOICES)), source=json.dumps(source)))
    (out / "utils.py").write_text(UTILS)
    return {"tasks": paths, "manifest": manifest, "counts": {k: len(v) for k, v in docs.items()}}
