"""The layout contract (docs/architecture.md, "Layout and dependency rules"), checked on every run.

* ``lint-imports`` (import-linter, configured in pyproject.toml): packages are layered, only the proxy
  edge imports mitmproxy, the running proxy does not import the demo's dependencies;
* here, what import-linter does not check: no module imports another module's private name, no
  import cycle between modules (not even inside one package), few modules at the package's top level.

Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpiguard"
TOP_LEVEL_ALLOWED = {"__init__.py", "config.py", "services.py", "metrics.py", "ids.py", "times.py", "signing.py",
                     "i18n.py"}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]):
    """(importer, imported module, imported name or None, line) for every import of a dpiguard module."""
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("dpiguard"):
                        yield name, alias.name, None, node.lineno
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("dpiguard"):
                    continue
                for alias in node.names:
                    if f"{target}.{alias.name}" in mods:
                        yield name, f"{target}.{alias.name}", None, node.lineno
                    else:
                        yield name, target, alias.name, node.lineno


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def private_imports(mods: dict[str, Path]) -> list[str]:
    return [f"{importer}:{line} imports {module}.{name}"
            for importer, module, name, line in _imports(mods)
            if name and name.startswith("_") and not name.startswith("__") and module != importer]


def import_cycles(mods: dict[str, Path]) -> list[list[str]]:
    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for importer, module, _, _ in _imports(mods):
        target = owner(module)
        # A package's __init__ re-exporting its own modules is not a cycle worth forbidding.
        if target and target != importer and not target.startswith(importer + "."):
            graph[importer].add(target)
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_module_imports_a_private_name_of_another():
    assert private_imports(_modules()) == []


def test_no_import_cycle_between_modules():
    cycles = import_cycles(_modules())
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_top_level_holds_only_the_shared_modules():
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL_ALLOWED, sorted(top - TOP_LEVEL_ALLOWED)


def test_the_checks_see_a_violation(tmp_path):
    """The two checks above can fail: on a package with a private import and a cycle (also through
    an import inside a function), they report both."""
    pkg = tmp_path / "dpiguard"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from dpiguard.sub.b import _hidden\n")
    (pkg / "sub" / "b.py").write_text("def _hidden():\n    from dpiguard.sub import a\n")
    mods = _modules(pkg)
    assert private_imports(mods) == ["dpiguard.sub.a:1 imports dpiguard.sub.b._hidden"]
    assert import_cycles(mods) == [["dpiguard.sub.a", "dpiguard.sub.b", "dpiguard.sub.a"]]
