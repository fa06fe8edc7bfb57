"""The shape of the package, as the developers' guide and issue 12 ask for it, read with `ast`:
no import cycle between ran_bench's modules, no module reaching into another's private names,
imports at module level (function-level only for optional heavy dependencies), no function over
80 lines, no module over 500 lines, and a command line that answers --help without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "ran_bench"
# Third-party packages a function may import when it needs them: optional, heavy, or both.
LAZY_OK = ("nvidia.dali", "matplotlib", "submitit", "tensorboard", "importlib.util", "mlflow", "wandb",
           "huggingface_hub")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, imported module, imported names, at module level) for every import of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, alias.name, [], id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [a.name for a in node.names]
            # `from ran_bench import metrics` imports the module ran_bench.metrics
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(node, t, [], id(node) in top) for t in submodules] or [(node, target, names, id(node) in top)]
    return out


def test_no_import_cycle_between_the_packages_modules():
    graph = {m: {t for _, t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ imports its modules; a module importing from its own package's __init__
    # (ran_bench.data.dali -> ran_bench.data) closes a loop only Python's partial-module rule allows.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    done, path = set(), []

    def visit(m: str) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m in MODULES:
        for node, target, names, _ in _imports(m):
            if not target.startswith("ran_bench") or target == m:
                continue
            bad += [f"{m}:{node.lineno} imports {target}.{n}" for n in names
                    if n.startswith("_") and not n.endswith("__")]
    assert not bad, "\n".join(bad)


def test_imports_are_at_module_level_except_optional_heavy_dependencies():
    bad = []
    for m in MODULES:
        for node, target, _, top in _imports(m):
            if not top and not target.startswith(LAZY_OK) and target != "__future__":
                bad.append(f"{m}:{node.lineno} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_no_function_over_80_lines_and_no_module_over_500():
    long = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long.append(f"{m}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["bench", "--help"],
                                  ["data", "verify", "--help"]], ids=lambda a: " ".join(a))
def test_help_answers_without_importing_torch(argv):
    code = ("import sys\nfrom ran_bench.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", f"ran-bench {' '.join(argv)} imported torch"
