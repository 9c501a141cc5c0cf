"""KiTS19 kidney and kidney-tumour segmentation toolkit: the package every notebook and script calls."""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder


class _JsonschemaWithoutIriGrammar(MetaPathFinder):
    """Keep jsonschema's format checker from compiling its optional IRI grammar at import time.

    ``import monai`` loads every MONAI submodule; ``monai.bundle`` imports jsonschema, whose format
    module imports ``rfc3987_syntax`` when it is installed (Jupyter's packages install it), and that
    module builds a Lark parser as it is imported: about 3 s of every script's, worker's and notebook
    kernel's start on a 2-core machine, for IRI format checks nothing here runs. For jsonschema's
    format module alone, this finder answers as if ``rfc3987_syntax`` were not installed, which
    jsonschema supports (it leaves the ``iri`` formats unchecked); any other import of it works as usual.
    """

    GRAMMAR = "rfc3987_syntax"
    IMPORTER = "jsonschema._format"

    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002 - the finder protocol
        if fullname != self.GRAMMAR:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == self.IMPORTER:
                raise ModuleNotFoundError(f"{self.GRAMMAR} is left out of {self.IMPORTER} (see utils/__init__.py)",
                                          name=self.GRAMMAR)
            frame = frame.f_back
        return None


if not any(isinstance(finder, _JsonschemaWithoutIriGrammar) for finder in sys.meta_path):
    sys.meta_path.insert(0, _JsonschemaWithoutIriGrammar())
