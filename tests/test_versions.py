"""The transformers version guard: a release outside the declared range stops every model load with one line
naming both versions (before any file is read), also from PYTHONPATH=src without the package installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import explainprune
from explainprune import versions
from explainprune.cli.main import main
from explainprune.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def test_the_range_is_the_one_pyproject_declares():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = [d for d in deps if d.replace(" ", "").startswith("transformers")]
    assert declared == [f"transformers{versions.TRANSFORMERS}"]


@pytest.mark.parametrize("version,ok", [("5.17.0", False), ("5.18.0", True), ("5.24.0", True),
                                        ("5.24.9", True), ("5.25.0", False), ("4.57.1", False)])
def test_check(version, ok, monkeypatch):
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    if ok:
        assert versions.check_transformers(version) == version
        return
    with pytest.raises(InputError) as err:
        versions.check_transformers(version)
    assert f"transformers {version} is installed" in str(err.value)
    assert f"transformers{versions.TRANSFORMERS}" in str(err.value)


def test_override_warns(monkeypatch):
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="transformers 5.17.0 is installed"):
        assert versions.check_transformers("5.17.0") == "5.17.0"


def test_load_stops_before_reading_anything(monkeypatch, tmp_path):
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.17.0")
    with pytest.raises(InputError, match="transformers 5.17.0 is installed"):
        explainprune.load(tmp_path / "no-such-checkpoint")  # not "no config.json": the version comes first
    with pytest.raises(InputError, match="transformers 5.17.0"):
        explainprune.load("demo")


def test_cli_prints_one_line(monkeypatch, capsys):
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.17.0")
    rc = main(["show", "--model", "demo", "--image", str(ROOT / "docs" / "larger_inputs.png"),
               "--question", "what digit is in row 1 , column 1 ?", "--out", os.devnull])
    assert rc != 0
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line or "Traceback" in line]
    assert len(err) == 1 and err[0].startswith("explainprune show: error: transformers 5.17.0 is installed")


def test_older_transformers_on_the_path_without_installing(tmp_path):
    """A transformers of another version first on PYTHONPATH (as on the GPU machine, 5.17) and explainprune
    from src/: loading stops with the line, not with a failure deep inside a model."""
    real = Path(__import__("transformers").__file__).parent
    fake = tmp_path / "transformers"
    fake.mkdir()
    # the real package under another version number: its modules, with __version__ replaced
    (fake / "__init__.py").write_text(textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "transformers", {str(real / "__init__.py")!r}, submodule_search_locations=[{str(real)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules["transformers"] = module
        spec.loader.exec_module(module)
        sys.modules["transformers"].__version__ = "5.17.0"  # the lazy module transformers puts there
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(tmp_path)])}
    env.pop(versions.ALLOW_ENV, None)
    code = "import explainprune, sys; explainprune.load('demo')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "transformers 5.17.0 is installed, but explainprune needs transformers>=5.18,<5.25" in done.stderr


def test_library_version_is_the_declared_one():
    import tomllib

    assert explainprune.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
