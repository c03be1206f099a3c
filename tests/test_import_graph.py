"""The package has no import cycle (issue 14: ops/token_logprobs.py and ops/vocab_parallel.py imported
each other, one of them lazily). Read from the source with ast: every ``from . import`` / ``import
flowrl_kernels...`` at any depth (a lazy import inside a function closes a cycle just the same)."""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "flowrl_kernels"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, mods: set) -> set:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:  # the deepest package module the import names
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # importing a parent package is not a cycle
                out.add(t)
    return out


def test_no_import_cycles():
    files = sorted(PKG.rglob("*.py"))
    mods = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, mods) for f in files}
    assert "flowrl_kernels.ops.vocab_parallel" in graph["flowrl_kernels.ops.token_logprobs"]  # the parser sees imports

    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


# The shared plumbing an op file may stand on (issue 25: ops are siblings, none takes another's pieces).
SHARED = {"flowrl_kernels._utils", "flowrl_kernels._triton_compat", "flowrl_kernels.reference",
          "flowrl_kernels.ops._common", "flowrl_kernels.ops.configs"}
# vocab_parallel is not an op of its own: it is token_logprobs's path for a vocabulary sharded across ranks,
# reached only through token_logprobs(process_group=) (and it imports nothing back: it calls the
# registered torch.ops). That one edge is the op's own room, not a sibling's.
# _linear_triton is linear_token_logprobs's Triton path (kernels, launch parameters, custom ops, chunked
# backward), split off so that no file is over ~600 lines (issue 25); it imports no op file either.
PARTS = {"flowrl_kernels.ops.token_logprobs": {"flowrl_kernels.ops.vocab_parallel"},
         "flowrl_kernels.ops.linear_token_logprobs": {"flowrl_kernels.ops._linear_triton"}}


def test_ops_are_siblings():
    files = sorted(PKG.rglob("*.py"))
    mods = {_module_name(f) for f in files}
    ops = sorted(m for m in mods if m.startswith("flowrl_kernels.ops.") and m not in SHARED)
    assert {"flowrl_kernels.ops.flowrl_loss", "flowrl_kernels.ops.sequence"} <= set(ops)
    for shared in sorted(m for m in SHARED & mods if m.startswith("flowrl_kernels.ops.")):  # plumbing imports no op
        imports = _imports(PKG / "ops" / (shared.split(".")[-1] + ".py"), mods)
        assert not imports & set(ops), (shared, sorted(imports & set(ops)))
    for op in ops:
        path = PKG / "ops" / (op.split(".")[-1] + ".py")
        bad = _imports(path, mods) - SHARED - PARTS.get(op, set())
        assert not bad, f"{op} imports {sorted(bad)}: move what several ops share to ops/_common.py"
