"""The package's structure, as DESIGN.md states it: layers that point down, no import cycle, and
function-local imports only for optional or slow dependencies, each with its reason."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mechvis"
# Imports that may stay inside functions: optional extras, and dependencies that take seconds to
# import (so that `import mechvis` and `mechvis serve` start fast). Each such line says why.
LOCAL_IMPORTS = {"ray", "uvicorn", "fastapi", "captum", "playwright", "sklearn", "psutil", "resource", "pandas", "mechvis.serve"}


def test_the_layer_contract_holds():
    """import-linter's contracts in pyproject.toml ([tool.importlinter]): the layers and pure analyses."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 2


def test_the_import_graph_has_no_cycle():
    """No cycle among mechvis's modules, counting imports inside functions (grimp reads them all)."""
    graph = grimp.build_graph("mechvis", include_external_packages=False)
    modules = sorted(graph.modules)
    index = {name: i for i, name in enumerate(modules)}
    rows, cols = [], []
    for name in modules:
        for imported in graph.find_modules_directly_imported_by(name):
            if imported != name and not name.startswith(imported + "."):  # a submodule importing its package's names is no cycle of modules
                rows.append(index[name])
                cols.append(index[imported])
    adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(modules), len(modules)))
    n_components, labels = connected_components(adjacency, directed=True, connection="strong")
    cycles = [sorted(modules[i] for i in np.flatnonzero(labels == label)) for label in range(n_components)
              if (labels == label).sum() > 1]
    assert not cycles, f"import cycles: {cycles}"


def _function_local_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for function in ast.walk(ast.parse(source)):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        yield path.relative_to(ROOT), node.lineno, module or "", lines[node.lineno - 1]


def test_function_local_imports_are_optional_or_slow_dependencies_with_a_reason():
    found = list(_function_local_imports())
    assert found, "the check found no function-local import at all: is it reading the package?"
    wrong = [f"{path}:{line}: {text.strip()}" for path, line, module, text in found
             if not any(module == allowed or module.startswith(allowed + ".") for allowed in LOCAL_IMPORTS)]
    assert not wrong, "function-local imports of modules that belong at the top:\n" + "\n".join(wrong)
    unexplained = [f"{path}:{line}: {text.strip()}" for path, line, module, text in found if "#" not in text]
    assert not unexplained, "function-local imports without a one-line reason:\n" + "\n".join(unexplained)


def test_importing_mechvis_sets_nothing_but_the_openmp_defaults():
    """A fresh process: `import mechvis` and its analysis, generation and viz packages leave the
    matplotlib backend and the environment as they were, except OMP_WAIT_POLICY/GOMP_SPINCOUNT."""
    code = (
        "import os, matplotlib; before = dict(os.environ); backend = matplotlib.get_backend();"
        "import mechvis, mechvis.analysis, mechvis.generation, mechvis.studies, mechvis.viz.figures, mechvis.viz.views;"
        "changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k));"
        "print(changed); print(matplotlib.get_backend() == backend)"
    )
    env = {key: value for key, value in __import__("os").environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MPLBACKEND")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    changed, same_backend = result.stdout.strip().splitlines()[-2:]
    assert set(eval(changed)) <= {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}, changed
    assert same_backend == "True", "importing mechvis changed matplotlib's backend"
