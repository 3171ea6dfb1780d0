"""The package's import graph has no cycles, the evaluation package never imports the command layer (``dinov2.run``),
every ``dinov2`` module imports in a fresh interpreter, and the evaluation files stay small."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

from conftest import ROOT

PKG = ROOT / "dinov2"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_script_entry(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` -- runs only when the file is executed as a script (module ``__main__``),
    so it is no edge of the package's import graph."""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators))


def _imports(tree: ast.Module, name: str, is_pkg: bool, modules: Set[str], script_entries: bool = False) -> Set[str]:
    """Every dinov2 module imported anywhere in ``tree`` (also inside functions); in script entries too only with
    ``script_entries``."""
    def resolve(mod: str) -> str:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        return mod

    out: Set[str] = set()
    stack: List[ast.AST] = [n for n in tree.body if script_entries or not _is_script_entry(n)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            out.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == "dinov2")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "dinov2":
                out.update(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else resolve(mod) for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    out.discard(name)
    out.discard("")
    return out


def import_graph(script_entries: bool = False) -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    return {name: _imports(ast.parse(p.read_text(), str(p)), name, p.name == "__init__.py", modules, script_entries)
            for name, p in files.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_detector_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (module groups importing each other):\n" + "\n".join(map(str, found))


def test_eval_never_imports_the_command_layer():
    graph = import_graph(script_entries=True)  # not even when a file runs as a script
    bad = {m: sorted(d for d in deps if d.startswith("dinov2.run")) for m, deps in graph.items()
           if m.startswith("dinov2.eval")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(import_graph())
    code = ("import importlib, sys, traceback\nbad = []\nfor n in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(n)\n    except Exception:\n"
            "        bad.append(n + ': ' + traceback.format_exc(limit=3))\nprint('\\n'.join(bad))\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_evaluation_files_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in (PKG / "eval").glob("*.py")
            if (n := len(p.read_text().splitlines())) >= 400}
    assert not long, f"files of 400 lines or more: {long}"
