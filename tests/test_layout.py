"""The package's layout: what a hospital runs (``dpseg``) never imports the experiment tooling
(``dpseg.tools``); only the tooling itself and the CLI do."""

import ast
from pathlib import Path

import dpseg

PACKAGE = Path(dpseg.__file__).parent


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_runtime_modules_never_import_the_tooling():
    runtime = [p for p in PACKAGE.glob("*.py") if p.name != "cli.py"]
    assert len(runtime) > 20 and (PACKAGE / "tools" / "study.py").exists()
    offenders = {p.name: sorted(m for m in _imported(p) if m == "dpseg.tools" or m.startswith("dpseg.tools."))
                 for p in runtime}
    assert not {k: v for k, v in offenders.items() if v}, offenders
