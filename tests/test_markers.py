"""Markers (conftest.FILE_MARKERS): every test file is classified, the slow list names real tests, the markers are
registered, and a test reading the notebooks or Chromium never counts as a unit test (`make test-fast`)."""
from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest
from conftest import FILE_MARKERS, FIXTURE_MARKERS, SLOW, markers_of

TESTS = Path(__file__).parent


def test_every_test_file_is_classified_and_every_entry_is_a_file():
    files = {p.name for p in TESTS.glob("test_*.py")}
    assert files - set(FILE_MARKERS) == set(), "classify these in conftest.FILE_MARKERS"
    assert set(FILE_MARKERS) - files == set(), "conftest.FILE_MARKERS names files that are gone"


def test_slow_tests_exist_and_markers_are_registered(pytestconfig):
    for entry in SLOW:
        name, _, function = entry.partition("::")
        tree = ast.parse((TESTS / name).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"SLOW names no test {entry}"
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}      # pyproject.toml's
    used = {m for ms in FILE_MARKERS.values() for m in ms} | set(FIXTURE_MARKERS.values()) | conftest.NOT_UNIT
    assert used | {"unit"} <= registered


def item(file: str, *fixtures: str, name: str = "test_x"):
    return SimpleNamespace(path=TESTS / file, fixturenames=list(fixtures), originalname=name, name=name + "[a]")


def test_tests_of_notebooks_browser_gpu_or_slow_are_not_unit(monkeypatch):
    assert markers_of(item("test_api.py")) == {"unit"}
    assert markers_of(item("test_api.py", "tmp_path", "smoke_run")) == {"notebooks"}     # by fixture, any file
    assert markers_of(item("test_index_page.py", "browser")) == {"browser"}
    assert markers_of(item("test_lab.py")) == {"notebooks", "browser"}                   # by file
    assert markers_of(item("test_gpu.py")) == {"gpu"}
    monkeypatch.setattr(conftest, "SLOW", {"test_api.py::test_x"})
    assert markers_of(item("test_api.py")) == {"slow"}          # every parametrisation of a listed function
    with pytest.raises(pytest.UsageError, match="test_new.py has no marker classification"):
        markers_of(item("test_new.py"))
