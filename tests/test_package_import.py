"""Importing the package: MONAI comes in without jsonschema's optional IRI grammar, which stays importable."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.test_training_engine import REPO

PROBE = """
import json, sys
import utils.networks.models  # imports MONAI, and through monai.bundle jsonschema's format module
loaded = {name: name in sys.modules for name in ("monai", "jsonschema._format", "rfc3987_syntax")}
import jsonschema
checker = jsonschema.FormatChecker()
result = {"loaded": loaded, "iri_checked": "iri" in checker.checkers}
import rfc3987_syntax  # anyone else's import of it still works
result["explicit_import"] = rfc3987_syntax.is_valid_syntax("iri", "https://kits19.grand-challenge.org/data")
print(json.dumps(result))
"""


MISSING = [name for name in ("jsonschema", "rfc3987_syntax") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason="jsonschema or rfc3987_syntax is not installed (the minimal requirements)")
def test_monai_is_imported_without_the_iri_grammar_which_stays_importable():
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["loaded"] == {"monai": True, "jsonschema._format": True, "rfc3987_syntax": False}
    assert not result["iri_checked"]  # jsonschema behaves as without the package: IRI formats unchecked
    assert result["explicit_import"] is True


def test_importing_the_package_alone_imports_neither_monai_nor_torch():
    code = "import sys, utils; print(sorted({'monai', 'torch'} & set(sys.modules)))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == "[]"
