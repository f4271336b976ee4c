"""Third-party pruners through the entry-point group ``explainprune.pruners``: the shipped example package
(examples/explainprune-plugin-example, installed for real) in get_pruner / available / eval / flops / the
lmms-eval engine and model / the demo's methods, and plug-ins that fail or clash, faked as dist-info folders
on sys.path (the fixture restores sys.path, the imported modules and the plug-in cache)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

from explainprune import plugins
from explainprune.cli.main import main
from explainprune.evaluation import METHODS
from explainprune.plugins import PluginError, PluginWarning
from explainprune.pruning import available, get_pruner
from explainprune.pruning.base import Pruner
from explainprune.testing import random_image

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "explainprune-plugin-example"
Q = "what digit is in row 2 column 3 ?"

GOOD = """
from dataclasses import dataclass
import torch
from explainprune.pruning import Pruner

@dataclass
class Last(Pruner):
    '''Keeps the last visual tokens.'''
    def score(self, vlm, prompt):
        return torch.arange(prompt.num_visual, dtype=torch.float32)
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """``install(dist, entries, modules)`` writes a package (modules + a dist-info folder with its entry points)
    into a folder put first on sys.path; on exit sys.path, sys.modules and the plug-in cache are restored."""
    site = tmp_path / "site"
    site.mkdir()
    before = set(sys.modules)

    def install(dist: str, entries: dict[str, str], modules: dict[str, str]) -> None:
        for name, code in modules.items():
            (site / f"{name}.py").write_text(textwrap.dedent(code))
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
        (info / "entry_points.txt").write_text(f"[{plugins.GROUP}]\n{lines}")
        plugins.reset()

    monkeypatch.syspath_prepend(str(site))
    plugins.reset()
    yield install
    plugins.reset()
    for name in set(sys.modules) - before:
        if name.startswith("fakeplug"):
            del sys.modules[name]


def test_plugin_found_lazily_and_built_like_a_builtin(fake_site):
    fake_site("fake-last", {"last": "fakeplug_last:Last"}, {"fakeplug_last": GOOD})
    get_pruner("random")  # a built-in name reads no plug-in
    assert "fakeplug_last" not in sys.modules
    assert "last" in plugins.names() and "fakeplug_last" not in sys.modules  # metadata only
    p = get_pruner("last")
    assert type(p).__name__ == "Last" and isinstance(p, Pruner)
    assert p.keep(None, _prompt(8), 0.25).tolist() == [6, 7]
    assert "last" in available() and set(available(plugins=False)) == set(METHODS)


def _prompt(n):
    class P:
        num_visual = n
    return P()


def test_import_error_names_the_package_and_spares_the_builtins(fake_site):
    fake_site("broken-pruners", {"broken": "fakeplug_broken:Broken"},
              {"fakeplug_broken": "import not_a_module_anywhere\n"})
    with pytest.warns(PluginWarning, match=r"'broken = fakeplug_broken:Broken' of package broken-pruners 0\.1 "
                                           r"failed to load \(ModuleNotFoundError"):
        names = available()
    assert "broken" not in names and set(METHODS) <= set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert available() == names
        assert get_pruner("random", seed=1).seed == 1
    with pytest.raises(PluginError, match="broken-pruners 0.1 failed to load.*not_a_module_anywhere"):
        get_pruner("broken")


def test_clash_with_a_builtin_keeps_the_builtin_and_names_the_package(fake_site):
    from explainprune.pruning.baselines import Random

    fake_site("clash-pruners", {"random": "fakeplug_clash:Last"}, {"fakeplug_clash": GOOD})
    assert type(get_pruner("random")) is Random
    with pytest.warns(PluginWarning, match=r"'random = fakeplug_clash:Last' of package clash-pruners 0\.1 is not "
                                           "used: 'random' is a built-in method"):
        assert available().count("random") == 1
    assert type(get_pruner("random")) is Random
    assert "fakeplug_clash" not in sys.modules


def test_one_name_in_two_packages_is_refused_naming_both(fake_site):
    fake_site("first-pruners", {"twin": "fakeplug_a:Last"}, {"fakeplug_a": GOOD})
    fake_site("second-pruners", {"twin": "fakeplug_b:Last"}, {"fakeplug_b": GOOD})
    with pytest.raises(PluginError, match="declared by several packages") as err:
        get_pruner("twin")
    assert "first-pruners 0.1" in str(err.value) and "second-pruners 0.1" in str(err.value)
    with pytest.warns(PluginWarning, match="twin"):
        assert "twin" not in available()


def test_not_a_pruner_is_refused(fake_site):
    fake_site("odd-pruners", {"odd": "fakeplug_odd:thing", "empty": "fakeplug_odd:Empty"},
              {"fakeplug_odd": "from explainprune.pruning import Pruner\nthing = 3\nclass Empty(Pruner):\n    pass\n"})
    with pytest.raises(PluginError, match="odd-pruners 0.1 is not a subclass of explainprune.pruning.Pruner"):
        get_pruner("odd")
    with pytest.raises(PluginError, match="implements neither score"):
        get_pruner("empty")


def test_eval_with_a_broken_plugin_installed(fake_site, capsys, tmp_path):
    fake_site("broken-pruners", {"broken": "fakeplug_broken:Broken"}, {"fakeplug_broken": "raise RuntimeError('x')\n"})
    rc = main(["eval", "--methods", "broken", "--limit", "1", "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("explainprune eval: error:") and "broken-pruners 0.1" in err
    assert "Traceback" not in err and not (tmp_path / "e" / "records.jsonl").exists()
    with pytest.warns(PluginWarning, match="broken-pruners 0.1"):  # the list of names is built: it warns once
        rc = main(["eval", "--methods", "brokn", "--limit", "1", "--out", str(tmp_path / "e"), "--no-progress"])
    assert rc != 0 and "did you mean 'broken'" not in capsys.readouterr().err  # a failing plug-in is no suggestion


def test_eval_help_lists_plugins_from_metadata(fake_site):
    fake_site("fake-last", {"last": "fakeplug_last:Last"}, {"fakeplug_last": GOOD})
    from explainprune.cli.main import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    text = " ".join(sub.format_help().split())
    assert "last" in text.split("plug-ins: ")[1].split(";")[0].split()
    assert "fakeplug_last" not in sys.modules


# -- the shipped example package, installed for real ---------------------------------------------------------
@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    """The example package as pip installs it: already in this environment (``make test`` installs it), or
    installed now into a temporary folder (no build isolation: setuptools comes with the environment)."""
    try:
        metadata.distribution("explainprune-plugin-example")
        yield None
        return
    except metadata.PackageNotFoundError:
        pass
    target = tmp_path_factory.mktemp("example_site")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(EXAMPLE)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    sys.path.insert(0, str(target))
    plugins.reset()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("explainprune_plugin_example", None)
    plugins.reset()


def test_example_center_pruner_keeps_the_centre(example_installed, load_tiny):
    assert "center" in available()
    p = get_pruner("center")
    assert type(p).__module__ == "explainprune_plugin_example"
    vlm = load_tiny("qwen2_vl")
    prompt = vlm.prepare(images=random_image(0, (112, 112)), question=Q)  # a 4 x 4 token grid
    assert prompt.grid_shape == (1, 4, 4)
    kept = p.keep(vlm, prompt, 0.25)
    assert sorted(prompt.visual_grid[kept, 1:].tolist()) == [[1, 1], [1, 2], [2, 1], [2, 2]]
    out = p.generate(vlm, prompt, 0.25, max_new_tokens=2)
    assert out.visual_tokens == 4
    wide = vlm.prepare(images=random_image(0, (112, 224)), question=Q)  # 4 x 8 tokens: the option matters
    assert wide.grid_shape == (1, 4, 8)
    ellipse = wide.visual_grid[get_pruner("center").keep(vlm, wide, 0.375), 1:].tolist()  # 12 of 32
    circle = wide.visual_grid[get_pruner("center", aspect=False).keep(vlm, wide, 0.375), 1:].tolist()
    assert sorted(ellipse) == [[r, c] for r in (1, 2) for c in range(1, 7)]
    assert sorted(circle) == sorted([[r, c] for r in (1, 2) for c in range(2, 6)] + [[r, c] for r in (0, 3)
                                                                                     for c in (3, 4)])
    with pytest.raises(ValueError, match="option aspect must be bool"):
        get_pruner("center", aspect="no")


def test_example_in_eval_flops_and_demo_methods(example_installed, capsys, tmp_path):
    rc = main(["eval", "--methods", "vanilla", "center", "--ratios", "0.25", "--limit", "2", "--out",
               str(tmp_path / "e"), "--no-plots", "--no-progress", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {(r["method"], r["ratio"]): r for r in json.loads(out[out.index("{"):])["results"]}
    assert ("center", 0.25) in rows and rows[("center", 0.25)]["n"] == 2
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert any(r["method"] == "center" for r in report["results"])
    rc = main(["flops", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--visual-tokens", "100",
               "--ratio", "0.25", "--method", "center", "--json"])
    acc = json.loads(capsys.readouterr().out)
    assert rc == 0 and acc["selection"] == 8 * 100 and acc["layer"] == 0 and acc["kept"] == 25
    from explainprune.demo import DemoConfig

    assert DemoConfig().methods[-1] == "center"


def test_example_in_the_lmms_eval_engine_and_model(example_installed, tiny_dirs, load_tiny):
    from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request

    vlm = load_tiny("qwen2_vl")
    image = random_image(0, (112, 112))
    engine = PrunedEngine(vlm, "center", 0.25, warmup=False)
    (answer,) = engine.run([Request(Q, [image], {"max_new_tokens": 2})])
    ref = get_pruner("center").generate(vlm, vlm.prepare(images=image, question=Q), 0.25, max_new_tokens=2)
    assert answer.text == ref.text and engine.records[0].kept == 4
    assert engine.records[0].flops_overhead == 8 * 16
    pytest.importorskip("lmms_eval")
    from explainprune.integrations.lmms_eval.model import ExplainPrune

    model = ExplainPrune.create_from_arg_string(f"pretrained={tiny_dirs('qwen2_vl')},method=center,ratio=0.25,"
                                                "warmup=false", {"batch_size": 1, "device": "cpu"})
    assert type(model.engine.pruner).__name__ == "CenterPruner"
    from lmms_eval.api.instance import Instance

    docs = [{"question": Q, "visual": [image]}]
    model.task_dict = {"t": {"test": docs}}
    (res,) = model.generate_until([Instance(
        request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
        arguments=(Q, {"max_new_tokens": 2}, lambda doc: doc["visual"], 0, "t", "test"))])
    assert getattr(res, "text", res) == ref.text
    assert model.engine.records[-1].kept == 4
