"""The README as a front door and the docs as a map (issue 25), checked against the tree so they cannot go
stale unnoticed: the two commands first and the page short; every op of ``flowrl_kernels`` findable from
the README alone (its row in the ops table, its file, its spec); the trainer's loop and the config fields
where the README says; every relative link in the docs resolving; docs/layout.md naming every source file
of the two packages and showing the house as scripts/house.py draws it today. Text and ast only: nothing
here imports the trainer."""
import ast
import importlib.util
import pathlib
import re

import pytest

import flowrl_kernels as fk
from flowrl_kernels import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LAYOUT = (ROOT / "docs" / "layout.md").read_text()
PACKAGES = ("flowrl_kernels", "flowrl")

_spec = importlib.util.spec_from_file_location("house", ROOT / "scripts" / "house.py")
house = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house)

# the public ops: what fk exports from flowrl_kernels/ops/ (not the helpers native_available, prefer_impl)
OPS = sorted(n for n in fk.__all__ if getattr(getattr(fk, n), "__module__", "").startswith("flowrl_kernels.ops."))


def _find_it_paragraph() -> str:
    i = README.index("**Find it in a minute.**")
    return README[i:README.index("\n\n", i)]


def test_readme_opens_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 150, f"README.md is {len(lines)} lines: move detail to docs/ (the front door is ~150)"
    block = README[README.index("```"):]
    block = block[block.index("\n") + 1:block.index("```", 3)].splitlines()
    assert [ln.split("#")[0].strip() for ln in block] == ["make train", "make test"], block
    first_fence = next(i for i, ln in enumerate(lines) if ln.startswith("```"))
    assert first_fence <= 3, "the two commands come first, under the title"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_the_ops_list_is_what_fk_exports():
    assert len(OPS) >= 8 and {"token_logprobs", "linear_token_logprobs", "flowrl_loss"} <= set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_found_from_the_readme(op):
    """Its row in the ops table, its file by the README's rule (ops/<op>.py or named in 'Find it in a
    minute'), its spec under the same name in reference.py."""
    rows = [ln for ln in README.splitlines() if ln.startswith("| `")]
    assert any(re.search(rf"`{op}[`(]|, `{op}`", r.split("|")[1]) for r in rows), f"{op} has no row in the ops table"
    path = pathlib.Path(getattr(fk, op).__code__.co_filename).resolve()
    rel = path.relative_to(ROOT / "flowrl_kernels").as_posix()
    if rel != f"ops/{op}.py":
        para = _find_it_paragraph()
        assert f"`{rel}`" in para and f"`{op}`" in para, f"README's 'Find it in a minute' must say {op} is in {rel}"
    assert callable(getattr(reference, op, None)), f"flowrl_kernels/reference.py has no spec named {op}"


def _defs(path: pathlib.Path) -> set:
    return {n.name for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_the_trainer_loop_and_config_fields_are_where_the_readme_says():
    para = _find_it_paragraph()
    for name in ("main", "Trainer", "train_step", "update_policy"):
        assert f"`{name}" in para and name in _defs(ROOT / "flowrl" / "train.py"), name
    # "--rollout.group_size is Rollout.group_size in flowrl/config.py, read as cfg.rollout.group_size"
    tree = ast.parse((ROOT / "flowrl" / "config.py").read_text())
    sections = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    fields = {s.target.id for s in sections["Rollout"].body if isinstance(s, ast.AnnAssign)}
    assert "group_size" in fields
    assert "cfg.rollout.group_size" in (ROOT / "flowrl" / "train.py").read_text() + \
        (ROOT / "flowrl" / "rollout.py").read_text()


def _markdown_pages():
    return [ROOT / "README.md", ROOT / "bench" / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)} links to files that do not exist: {bad}"


@pytest.mark.parametrize("package", PACKAGES)
def test_layout_names_every_source_file(package):
    missing = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / package).rglob("*.py"))
               if p.name != "__init__.py" and "__pycache__" not in p.parts and p.name not in LAYOUT]
    assert not missing, f"docs/layout.md does not name {missing}: add a row for each"


def test_layout_shows_the_house_as_drawn_today():
    drawn = house.draw()
    assert drawn.startswith("flowrl_kernels/")
    assert drawn in LAYOUT, "docs/layout.md's drawing is stale: paste `python scripts/house.py` into it"
