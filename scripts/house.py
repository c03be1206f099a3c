"""Draw the house: the import graph of flowrl_kernels/ and flowrl/, read from the source with ast.

    python scripts/house.py            # floors of each package, imports that run back up, long rooms
                                       # (and long rooms in bench/ and scripts/)

A module's floor is 0 when it imports nothing of its own package and 1 + the highest floor it imports
otherwise (the longest import chain under it). Every import counts, at any depth: a lazy import inside
a function ties two modules just the same. tests/test_import_graph.py asserts on what this draws (no
cycle, the ops on at most two floors, no import running back up, no room over LONG_ROOM lines without
a reason at its top); docs/layout.md shows its output.
"""
from __future__ import annotations

import ast
import pathlib
import sys
from typing import Dict, List, Optional, Set, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("flowrl_kernels", "flowrl")
# Folders that are not drawn (nothing imports them but their own scripts and tests) whose rooms are held
# to the same length: the benchmark suite and the scripts a newcomer runs.
SIZED_ONLY = ("bench", "scripts")
# A source file longer than this must say at its top why (a line containing REASON in its first
# REASON_WITHIN lines); 600 lines is what a newcomer reads in one sitting (issue 25).
LONG_ROOM = 600
REASON = "Why this file is long:"
REASON_WITHIN = 40
# ops/ modules that are shared plumbing, not ops (tests/test_import_graph.py::SHARED holds the same list)
OPS_PLUMBING = ("_common", "configs")


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str, root: pathlib.Path = ROOT) -> Dict[str, pathlib.Path]:
    return {module_name(f, root): f for f in sorted((root / package).rglob("*.py"))}


def _targets(path: pathlib.Path, name: str) -> List[Tuple[str, Optional[str]]]:
    """(module, imported name or None) for every import statement in the file, absolute names."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                keep = len(package.split(".")) - node.level + 1
                base = ".".join(package.split(".")[:keep] + ([base] if base else []))
            out += [(base, a.name) for a in node.names]
    return out


def imports(path: pathlib.Path, mods: Set[str], name: Optional[str] = None) -> Set[str]:
    """The modules of ``mods`` that the file imports (the deepest one each import names). Importing a
    package above oneself only to reach a submodule (``from .. import reference``) counts as importing
    that submodule; the package itself is not an edge (it is not a cycle: Python runs it first)."""
    name = name or module_name(path)
    out = set()
    for base, attr in _targets(path, name):
        for t in ([f"{base}.{attr}"] if attr else []) + [base]:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t:
                break
        if t and t != name and not name.startswith(t + "."):
            out.add(t)
    return out


def graph(package: str, root: pathlib.Path = ROOT, extra: Set[str] = frozenset()) -> Dict[str, Set[str]]:
    """module -> the modules of ``package`` (and of ``extra``) it imports."""
    mods = set(modules(package, root)) | set(extra)
    return {m: imports(p, mods, m) for m, p in modules(package, root).items()}


def find_cycle(g: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, str] = {}
    stack: List[str] = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def floors(g: Dict[str, Set[str]], among: Optional[Set[str]] = None) -> Dict[str, int]:
    """Longest import chain under each module, counting only modules in ``among`` (default: all)."""
    among = set(g) if among is None else among
    memo: Dict[str, int] = {}

    def floor(m):
        if m not in memo:
            memo[m] = 1 + max((floor(n) for n in g.get(m, ()) if n in among), default=-1)
        return memo[m]

    return {m: floor(m) for m in sorted(among)}


def runs_back_up(package: str, root: pathlib.Path = ROOT) -> List[str]:
    """Imports that run back up: a module taking a name (not a submodule) from a package above itself
    or the package itself (``from flowrl_kernels import token_logprobs`` or ``import flowrl_kernels``
    inside flowrl_kernels/integrations/x.py goes through the root __init__: no cycle today, one the day
    the root imports the importer), and any import of the trainer from the kernels."""
    mods = set(modules(package, root))
    bad = []
    for name, path in modules(package, root).items():
        for base, attr in _targets(path, name):
            above = base in mods and name.startswith(base + ".")
            if above and attr and f"{base}.{attr}" not in mods:
                bad.append(f"{name}: from {base} import {attr}")
            if above and attr is None:  # `import flowrl_kernels as fk`, then fk.x: the same trip through the root
                bad.append(f"{name}: import {base}")
            if package == "flowrl_kernels" and base.split(".")[0] == "flowrl":
                bad.append(f"{name}: imports the trainer ({base})")
    return bad


def long_rooms(package: str, root: pathlib.Path = ROOT) -> List[Tuple[str, int]]:
    """(path, lines) of every source file over LONG_ROOM lines whose top does not say why."""
    out = []
    for path in modules(package, root).values():
        lines = path.read_text().splitlines()
        if len(lines) > LONG_ROOM and not any(REASON in line for line in lines[:REASON_WITHIN]):
            out.append((str(path.relative_to(root)), len(lines)))
    return out


def draw(root: pathlib.Path = ROOT) -> str:
    text = []
    for package in PACKAGES:
        g = graph(package, root)
        fl = floors(g)
        cycle = find_cycle(g)
        text.append(f"{package}/  ({len(g)} modules, cycle: {' -> '.join(cycle) if cycle else 'none'})")
        for level in sorted(set(fl.values()), reverse=True):
            names = [m.split(".", 1)[1] if "." in m else "__init__" for m, f in fl.items() if f == level]
            text.append(f"  floor {level}: " + ", ".join(names))
        if package == "flowrl_kernels":  # the ops alone, standing on the shared plumbing (ops/_common.py etc.)
            ops = {m for m in g if m.startswith("flowrl_kernels.ops.") and m.split(".")[-1] not in OPS_PLUMBING}
            op_floors = floors(g, among=ops)
            for level in sorted(set(op_floors.values()), reverse=True):
                names = [m.split(".")[-1] for m, f in op_floors.items() if f == level]
                text.append(f"  ops alone, floor {level}: " + ", ".join(names))
        up = runs_back_up(package, root)
        text.append("  imports running back up: " + ("; ".join(up) if up else "none"))
        long = long_rooms(package, root)
        text.append(f"  rooms over {LONG_ROOM} lines without a reason: "
                    + (", ".join(f"{p} ({n})" for p, n in long) if long else "none"))
    for folder in SIZED_ONLY:
        long = long_rooms(folder, root)
        text.append(f"{folder}/  rooms over {LONG_ROOM} lines without a reason: "
                    + (", ".join(f"{p} ({n})" for p, n in long) if long else "none"))
    return "\n".join(text)


if __name__ == "__main__":
    print(draw(pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
