"""Package layout rules: no import cycles, models importable without Ray, every module imports.

The cycle check is static (ast), so it also sees imports hidden inside functions, which is the
usual way a cycle gets dodged at run time instead of removed. The import checks run in a
subprocess so that neither the test session's already-imported modules nor its Ray cluster can
mask a missing or unwanted import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict, deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "ray_updown"

# Model-side code must import without Ray, so that it can be used for inference and in tests
# without a cluster. Directories are globbed (new files are covered); the exclusions are files
# or directories relative to the package root.
RAY_FREE_DIRS = ("detector", "features", "metrics", "data")
RAY_FREE_EXCLUDED_DIRS = ("detector/train",)
RAY_FREE_FILES = ("captioning/model.py", "captioning/decoding.py", "vqa/model.py")


# ----------------------------------------------------------------------------- module graph

def module_name(path: Path, root: Path, package: str) -> str:
    """`root/a/b.py` -> `package.a.b`; a package's `__init__.py` is the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package (including each `__init__`), by dotted name."""
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_imports(tree: ast.AST):
    """Import nodes anywhere in the tree (functions and classes included), except those under
    `if TYPE_CHECKING:`, which never run. The `else:` of such an `if` does run, so it is kept."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a package module (None outside the package)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path, package: str) -> tuple[dict[str, dict[str, list[int]]],
                                                    dict[str, Path]]:
    """{importer: {imported: [line, ...]}} over the package's own modules, and the modules."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, list[int]]] = {m: defaultdict(list) for m in modules}
    for mod, path in modules.items():
        is_init = path.name == "__init__.py"
        # Relative imports resolve against the package the module lives in.
        here = mod.split(".") if is_init else mod.split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = here[:len(here) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    # `from pkg import sub` loads pkg.sub when sub is a module, else pkg only.
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                resolved = _known_prefix(target, modules)
                if resolved is not None and resolved != mod:
                    graph[mod][resolved].append(node.lineno)
    return graph, modules


def _shortest_path(graph, start: str, goal: str) -> list[str] | None:
    """Breadth-first path start -> ... -> goal, or None."""
    prev: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while prev[path[-1]] is not None:
                path.append(prev[path[-1]])
            return path[::-1]
        for nxt in sorted(graph[node]):
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return None


def find_cycles(graph) -> list[list[str]]:
    """For every import edge that lies on a cycle, the shortest cycle through it (deduplicated,
    rotated to start at its smallest module). Enumerating all elementary cycles can explode;
    this still shows every offending import at least once."""
    cycles = set()
    for a in graph:
        for b in graph[a]:
            back = _shortest_path(graph, b, a)
            if back is not None:
                cycle = [a, *back[:-1]]
                i = cycle.index(min(cycle))
                cycles.add(tuple(cycle[i:] + cycle[:i]))
    return [list(c) for c in sorted(cycles, key=lambda c: (len(c), c))]


def describe_cycle(cycle: list[str], graph, modules: dict[str, Path], root: Path) -> str:
    """One line per import: `a (a.py:12) -> b`, ending back at the first module."""
    lines = [" -> ".join(cycle + [cycle[0]])]
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        where = ", ".join(f"{modules[a].relative_to(root.parent)}:{n}" for n in graph[a][b])
        lines.append(f"    {a} imports {b} at {where}")
    return "\n".join(lines)


def test_cycle_finder_sees_function_level_imports_and_skips_type_checking(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found, with its
    line; one closed only under `if TYPE_CHECKING:` is not; relative imports resolve."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("thing = 1\n\n\ndef f():\n    from ..sub import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg import d\nelse:\n    import os\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    graph, modules = import_graph(pkg, "pkg")
    assert dict(graph["pkg.sub"]) == {"pkg.sub.a": [1]}
    assert find_cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]
    text = describe_cycle(["pkg.sub.a", "pkg.sub.b"], graph, modules, pkg)
    assert "pkg.sub.b imports pkg.sub.a at " + str(Path("pkg/sub/b.py")) + ":5" in text


def test_no_import_cycles():
    root = REPO / PACKAGE
    graph, modules = import_graph(root, PACKAGE)
    cycles = find_cycles(graph)
    report = "\n".join(describe_cycle(c, graph, modules, root) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE}:\n{report}"


# ----------------------------------------------------------------------------- folder layers

# The package's folders and root modules, low to high: a module imports only from its own
# layer or from below (function-level imports included).
LAYERS = ("errors", "storage", "config", "weights", "devices", "memory", "safe_pickle", "ray_cluster",
          "data", "metrics", "features", "train", "detector", "extraction", "viz",
          "captioning", "vqa", "demo", "job_submission", "cli_output", "cli_handlers",
          "cli_commands", "cli")


def _layer(module: str) -> str:
    """`ray_updown.<folder or root module>[...]` -> its layer name."""
    return module.split(".")[1]


def test_every_import_goes_down_the_layers():
    root = REPO / PACKAGE
    graph, modules = import_graph(root, PACKAGE)
    named = {_layer(m) for m in modules if m != PACKAGE}
    assert named == set(LAYERS), f"place these in LAYERS: {sorted(named - set(LAYERS))}; " \
                                 f"gone: {sorted(set(LAYERS) - named)}"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{src} imports {dst} at {modules[src].relative_to(REPO)}:{lines[0]}"
              for src, targets in graph.items() if src != PACKAGE
              for dst, lines in targets.items()
              if dst != PACKAGE and rank[_layer(dst)] > rank[_layer(src)]]
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


# ----------------------------------------------------------------------------- import checks

# Run in the child: import each module in turn, report failures as JSON on the last line. For
# each failure the innermost package frame is named, which is where the bad import sits.
_IMPORT_ALL = r"""
import importlib, json, sys, traceback
BLOCK_RAY = {block_ray}
if BLOCK_RAY:
    import importlib.abc

    class _NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError(f"ray is blocked for this check (import of {{name!r}})",
                                  name=name)
            return None

    assert "ray" not in sys.modules, "ray was imported before the blocker was installed"
    sys.meta_path.insert(0, _NoRay())
    try:
        import ray  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the ray blocker does not work")
failures = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "/{package}/" in f.filename.replace("\\", "/")]
        last = frames[-1] if frames else None
        where = f"{{last.filename}}:{{last.lineno}}: {{last.line}}" if last else "(outside)"
        failures[name] = {{"error": f"{{type(exc).__name__}}: {{exc}}", "at": where}}
print(json.dumps(failures))
"""


def _import_in_subprocess(modules: list[str], block_ray: bool) -> dict[str, dict[str, str]]:
    code = _IMPORT_ALL.format(block_ray=block_ray, modules=modules, package=PACKAGE)
    env = dict(os.environ, WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"import check crashed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _format_failures(failures: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {name}: {f['error']}\n      at {f['at']}" for name, f in failures.items())


def ray_free_modules() -> list[str]:
    """Model-side modules by globbing RAY_FREE_DIRS and RAY_FREE_FILES, minus the exclusions."""
    root = REPO / PACKAGE
    paths = {p for d in RAY_FREE_DIRS for p in (root / d).rglob("*.py")}
    paths |= {root / f for f in RAY_FREE_FILES}
    paths = {p for p in paths if not any(p.is_relative_to(root / d)
                                         for d in RAY_FREE_EXCLUDED_DIRS)}
    return sorted(module_name(p, root, PACKAGE) for p in paths if "__pycache__" not in p.parts)


def test_model_modules_import_without_ray():
    modules = ray_free_modules()
    # Guards the glob: an empty or shrunken list would make the test pass vacuously.
    assert f"{PACKAGE}.detector.model" in modules and f"{PACKAGE}.vqa.model" in modules
    assert not any(m.startswith(f"{PACKAGE}.detector.train") for m in modules)
    failures = _import_in_subprocess(modules, block_ray=True)
    assert not failures, ("modules that need ray at import time:\n"
                          + _format_failures(failures))


def test_every_module_imports():
    modules = sorted(package_modules(REPO / PACKAGE, PACKAGE))
    failures = _import_in_subprocess(modules, block_ray=False)
    assert not failures, "modules that fail to import:\n" + _format_failures(failures)


def test_every_imported_name_exists():
    """`from ray_updown.x import name` anywhere in the repository, function-level imports
    included (they run only when called, so importing the modules cannot catch them), names
    something that exists: a moved or renamed function breaks this test, not a user's run."""
    import importlib

    files = [p for d in (PACKAGE, "tests", "benchmarks", "jobs") for p in (REPO / d).rglob("*.py")
             if "__pycache__" not in p.parts]
    missing = []
    for path in files:
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and (node.module == PACKAGE or node.module.startswith(PACKAGE + "."))):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:  # a submodule that nothing imported yet
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno}: "
                                   f"{node.module} has no {alias.name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
