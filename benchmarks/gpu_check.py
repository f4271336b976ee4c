"""Helpers of benchmarks/gpu_check.sh: ``env`` (the versions it runs with, checked against explainprune's
requirements) and ``summary`` (one table of the steps, the CUDA tests and the real-shape numbers, with the
targets of docs/devices.md).

    python benchmarks/gpu_check.py wheels BUNDLE [--dry-run 0|1]
    python benchmarks/gpu_check.py env [--json FILE]
    python benchmarks/gpu_check.py summary WORKDIR [--dry-run 0|1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "huggingface-hub", "tokenizers", "safetensors", "accelerate", "numpy",
            "pillow", "scikit-learn", "pyarrow", "jinja2", "tqdm", "av", "datasets")
GIB = 2**30
# docs/devices.md: one H100, Qwen2-VL-7B shape, bf16
TARGETS = {"scoring_share": 0.01, "speedup_of_ideal": 0.90, "relevance_s": 1.0, "kv_share": 0.30}


def requirements() -> list[str]:
    """explainprune's declared dependencies (pyproject.toml; works without the package being installed)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def check_requirements(reqs: list[str]) -> list[str]:
    """One line per declared dependency that is missing or outside its range."""
    from packaging.requirements import Requirement

    problems = []
    for text in reqs:
        req = Requirement(text)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (needs {req.specifier or 'any'})")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have}: outside {req.specifier}")
    return problems


def environment() -> dict[str, Any]:
    import torch
    import transformers

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
            "transformers_file": transformers.__file__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else None,
            "requirement_problems": check_requirements(requirements())}


def usable_wheels(bundle: Path) -> tuple[list[Path], list[Path]]:
    """(wheels this interpreter can install, the others) among ``bundle/*.whl`` (by their tags)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    ours = set(sys_tags())
    good, other = [], []
    for wheel in sorted(bundle.glob("*.whl")):
        tags = parse_wheel_filename(wheel.name)[3]
        (good if tags & ours else other).append(wheel)
    return good, other


def cmd_wheels(args: argparse.Namespace) -> int:
    """Print the usable wheels one per line (stdout, for the shell); the others on stderr. Outside a dry run
    a wheel this Python cannot take is an error (the bundle was made for Python 3.12 x86_64)."""
    good, other = usable_wheels(Path(args.bundle))
    for w in good:
        print(w)
    for w in other:
        print(f"gpu_check: {'left out (dry run)' if args.dry_run == '1' else 'error: cannot install'} {w.name}: "
              f"not for Python {sys.version.split()[0]} on {platform.machine()}", file=sys.stderr)
    return 1 if other and args.dry_run != "1" else 0


def cmd_env(args: argparse.Namespace) -> int:
    env = environment()
    print(f"python {env['python']} on {env['platform']}")
    print(f"torch {env['versions']['torch']} (CUDA {env['torch_cuda']}, available: {env['cuda_available']}"
          f"{', ' + env['device'] if env['device'] else ''})")
    print(f"transformers {env['versions']['transformers']} from {env['transformers_file']}")
    print("others: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()
                                 if k not in ("torch", "transformers")))
    for line in env["requirement_problems"]:
        print(f"requirement not met: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(env, indent=1))
    return 1 if env["requirement_problems"] else 0


# -- summary --------------------------------------------------------------------------------------------
def read_steps(work: Path) -> list[dict[str, Any]]:
    path = work / "steps.tsv"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, secs = line.split("\t")
        rows.append({"step": name, "exit": int(rc), "seconds": int(secs)})
    return rows


def read_tests(path: Path) -> dict[str, Any] | None:
    """Counts and failed test names of a pytest junit XML file (None when the step wrote none)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per visual-token count: speedups (learned, FastV) by ratio, their FLOPs-ideal, scoring share, relevance,
    label throughput and the KV cache share at each ratio."""
    out = []
    for row in result.get("results", []):
        pre = row["prefill"]
        van = next(p for p in pre if p["method"] == "vanilla")
        entry: dict[str, Any] = {"visual_tokens": row["visual_tokens"], "prompt_tokens": row["prompt_tokens"],
                                 "scoring_share": row["learned_scoring"]["share_of_prefill"], "ratios": {}}
        for p in pre:
            if p["method"] == "vanilla":
                continue
            key = "learned" if p["method"] == "learned" else "fastv"
            r = entry["ratios"].setdefault(str(p["ratio"]), {})
            r[f"{key}_speedup"] = van["s"] / p["s"]
            if "ideal_speedup" in p:
                r["ideal_speedup"] = p["ideal_speedup"]
            if p.get("kv_bytes") is not None and van.get("kv_bytes"):
                r[f"{key}_kv_share"] = p["kv_bytes"] / van["kv_bytes"]
        if row.get("relevance"):
            entry["relevance_s"] = row["relevance"]["s"]
            entry["relevance_peak_gib"] = row["relevance"]["peak_bytes"] / GIB
        if row.get("label"):
            entry["label_per_min"] = row["label"]["samples_per_min"]
        out.append(entry)
    return out


def targets(runs: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) at the 7B shape's ~1.3K-token row."""
    rows = runs.get("real_scale_7b", {}).get("rows") or []
    row = rows[0] if rows else None
    quarter = (row or {}).get("ratios", {}).get("0.25", {})

    def verdict(value: float | None, ok: bool) -> str:
        return "not measured" if value is None else ("met" if ok else "NOT met")

    out = []
    v = row.get("scoring_share") if row else None
    out.append(("learned scoring <= 1% of the vanilla prefill", "" if v is None else f"{100 * v:.2f}%",
                verdict(v, v is not None and v <= TARGETS["scoring_share"])))
    s, ideal = quarter.get("learned_speedup"), quarter.get("ideal_speedup")
    share = s / ideal if s and ideal else None
    out.append(("prefill at 25% >= 90% of the FLOPs-ideal speedup",
                "" if share is None else f"{s:.2f}x of {ideal:.2f}x ({100 * share:.0f}%)",
                verdict(share, share is not None and share >= TARGETS["speedup_of_ideal"])))
    v = row.get("relevance_s") if row else None
    out.append((f"relevance <= 1 s per sample at ~1.5K visual tokens ({row['visual_tokens'] if row else '?'})",
                "" if v is None else f"{v:.2f} s", verdict(v, v is not None and v <= TARGETS["relevance_s"])))
    v = quarter.get("learned_kv_share")
    out.append(("KV cache at 25% kept <= 30% of vanilla", "" if v is None else f"{100 * v:.1f}%",
                verdict(v, v is not None and v <= TARGETS["kv_share"])))
    return out


def summarize(work: Path, dry_run: bool) -> tuple[str, dict[str, Any]]:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    steps, tests = read_steps(work), read_tests(work / "tests.xml")
    runs = {}
    for path in sorted(work.glob("real_scale_*.json")):
        result = json.loads(path.read_text())
        runs[path.stem] = {"setting": result.get("setting"), "environment": result.get("environment"),
                           "rows": rows_of(result)}
    lines = ["# GPU check" + (" (DRY RUN: tiny shapes on CPU; the targets are not meaningful here)" if dry_run else ""),
             ""]
    if env:
        v = env["versions"]
        lines += [f"python {env['python']}, torch {v['torch']} (CUDA {env['torch_cuda']}), transformers "
                  f"{v['transformers']}, accelerate {v['accelerate']}, huggingface-hub {v['huggingface-hub']}; "
                  f"device: {env['device'] or 'CPU'}"]
        lines += [f"- requirement not met: {p}" for p in env["requirement_problems"]]
        lines.append("")
    lines += ["| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit']}{' (time limit)' if s['exit'] in (124, 137) else ''} | {s['seconds']} |"
              for s in steps]
    lines.append("")
    if tests is None:
        lines.append("CUDA tests: no result (see gpu_check.log)")
    else:
        lines.append(f"CUDA tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped")
        lines += [f"- failed: {name}" for name in tests["failed"]]
    for name, run in runs.items():
        s = run["setting"] or {}
        lines += ["", f"## {name}: {s.get('shape')} shape, {s.get('layers')} layers, {s.get('dtype')} on "
                      f"{(run['environment'] or {}).get('device')}", "",
                  "| visual tokens | learned 50 / 25 / 10% | FLOPs-ideal | FastV 50 / 25 / 10% | scoring | "
                  "relevance (s, peak GiB) | label / min | KV at 25% |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in run["rows"]:
            rs = [row["ratios"].get(k, {}) for k in ("0.5", "0.25", "0.1")]

            def fmt(key: str, rs: list = rs) -> str:
                return " / ".join(f"{r[key]:.2f}x" if key in r else "-" for r in rs)

            rel = (f"{row['relevance_s']:.2f}, {row['relevance_peak_gib']:.2f}" if "relevance_s" in row else "-")
            kv = rs[1].get("learned_kv_share")
            lines.append(f"| {row['visual_tokens']} | {fmt('learned_speedup')} | {fmt('ideal_speedup')} | "
                         f"{fmt('fastv_speedup')} | {100 * row['scoring_share']:.2f}% | {rel} | "
                         f"{row.get('label_per_min', 0):.1f} | {'-' if kv is None else f'{100 * kv:.1f}%'} |")
    checks = targets(runs)
    lines += ["", "| target (7B shape, ~1.3K visual tokens) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in checks]
    data = {"dry_run": dry_run, "environment": env, "steps": steps, "tests": tests, "runs": runs,
            "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks]}
    return "\n".join(lines), data


def cmd_summary(args: argparse.Namespace) -> int:
    text, data = summarize(Path(args.work), args.dry_run == "1")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="the bundle's wheels this interpreter can install")
    w.add_argument("bundle")
    w.add_argument("--dry-run", default="0", choices=["0", "1"])
    e = sub.add_parser("env", help="print the versions and check explainprune's requirements")
    e.add_argument("--json")
    s = sub.add_parser("summary", help="the table of a gpu_check.sh run")
    s.add_argument("work", help="gpu_check.sh's working folder (steps.tsv, tests.xml, real_scale_*.json)")
    s.add_argument("--dry-run", default="0", choices=["0", "1"])
    s.add_argument("--json")
    args = p.parse_args()
    return {"wheels": cmd_wheels, "env": cmd_env, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
