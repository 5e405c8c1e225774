"""The preloading LocalExecutor's import list and its tolerance of a module that does not import.
(`tests/integration/test_scheduler.py` runs whole DAG runs under it.)"""

from __future__ import annotations

import sys

from lepton_tasks.executor import STAGE_LIBRARIES, preload, preload_modules


def test_the_list_is_the_stage_libraries_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("LEPTON_PRELOAD_MODULES", raising=False)
    assert preload_modules() == STAGE_LIBRARIES and "torch" in STAGE_LIBRARIES
    monkeypatch.setenv("LEPTON_PRELOAD_MODULES", " torch, ,mlflow ")
    assert preload_modules() == ("torch", "mlflow")
    monkeypatch.setenv("LEPTON_PRELOAD_MODULES", "")
    assert preload_modules() == ()


def test_a_module_that_does_not_import_is_skipped_and_logged(caplog):
    seconds = preload(("colorsys", "lepton_no_such_module"))
    assert list(seconds) == ["colorsys"] and "colorsys" in sys.modules
    assert "could not preload lepton_no_such_module" in caplog.text
