"""The house as drawn by scripts/house.py from the source (ast; a lazy import inside a function ties two
modules just the same): no import cycle in flowrl_kernels/ or flowrl/ (issue 14: ops/token_logprobs.py and
ops/vocab_parallel.py imported each other; issue 25: tasks.py and code_task.py), no import running back
up through a package's __init__, the ops as siblings on at most two floors, no room over ~600 lines
without a reason at its top. Each finder is also shown a small tree where it must find something."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "flowrl_kernels"
_spec = importlib.util.spec_from_file_location("house", ROOT / "scripts" / "house.py")
house = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house)
_module_name, _imports = house.module_name, house.imports


@pytest.mark.parametrize("package", house.PACKAGES)
def test_no_import_cycles(package):
    graph = house.graph(package)
    if package == "flowrl_kernels":  # the parser sees imports (lazy ones included)
        assert "flowrl_kernels.ops.vocab_parallel" in graph["flowrl_kernels.ops.token_logprobs"]
    else:
        assert "flowrl.code_task" in graph["flowrl.tasks"]  # imported lazily, inside a function
    cycle = house.find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one(tmp_path):
    pkg = tmp_path / "flowrl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from flowrl import b\n")
    (pkg / "b.py").write_text("def f():\n    from flowrl.a import x\n")
    assert house.find_cycle(house.graph("flowrl", tmp_path)) == ["flowrl.a", "flowrl.b", "flowrl.a"]


@pytest.mark.parametrize("package", house.PACKAGES)
def test_no_import_runs_back_up(package):
    assert house.runs_back_up(package) == []


def test_back_up_finder_finds_them(tmp_path):
    pkg = tmp_path / "flowrl_kernels"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .ops.a import f\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("from .. import reference\nfrom flowrl_kernels import f\n")
    (pkg / "ops" / "b.py").write_text("import flowrl_kernels as fk\nimport flowrl.train\n")
    (pkg / "reference.py").write_text("")
    assert sorted(house.runs_back_up("flowrl_kernels", tmp_path)) == [
        "flowrl_kernels.ops.a: from flowrl_kernels import f", "flowrl_kernels.ops.b: import flowrl_kernels",
        "flowrl_kernels.ops.b: imports the trainer (flowrl.train)"]


@pytest.mark.parametrize("package", house.PACKAGES + house.SIZED_ONLY)
def test_no_long_room_without_a_reason(package):
    """Issue 25: no source file of the package or the trainer over ~600 lines without a reason at its top;
    the benchmark suite and the scripts are held to the same length (bench/common.py was 600 lines)."""
    assert house.modules(package), f"{package}/ has no .py file: the check would pass on nothing"
    assert house.long_rooms(package) == [], f"split them, or say at the top: {house.REASON!r}"



def test_long_room_finder_finds_one(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    n = house.LONG_ROOM
    (folder / "at_the_limit.py").write_text("x = 1\n" * n)
    (folder / "too_long.py").write_text("x = 1\n" * (n + 1))
    (folder / "long_with_reason.py").write_text(f'"""{house.REASON} one kernel, its launcher."""\n' + "x = 1\n" * n)
    assert house.long_rooms("bench", tmp_path) == [("bench/too_long.py", n + 1)]

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


def test_ops_on_two_floors():
    """Counting op modules only (the shared plumbing is the ground), no op stands on more than one other."""
    mods = set(house.modules("flowrl_kernels"))
    ops = {m for m in mods if m.startswith("flowrl_kernels.ops.") and m not in SHARED}
    floors = house.floors(house.graph("flowrl_kernels"), among=ops)
    assert max(floors.values()) <= 1, floors
