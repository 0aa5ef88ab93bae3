"""The package's shape: one module per idea, each public name defined in one module only."""

import ast
from collections import defaultdict
from pathlib import Path

import qlora_lab

PACKAGE = Path(qlora_lab.__file__).parent
#: Names every command-line module has, and the on/off switches that two modules each keep for their own idea.
SHARED_BY_DESIGN = {"main", "ENV", "active"}


def _public_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def test_each_public_name_has_one_home():
    homes = defaultdict(list)
    for path in sorted(PACKAGE.glob("*.py")):
        for name in _public_names(path):
            homes[name].append(path.stem)
    clashes = {n: m for n, m in homes.items() if len(m) > 1 and n not in SHARED_BY_DESIGN}
    assert not clashes, f"defined in more than one module (import it from one instead): {clashes}"


def test_modules_stay_small_and_say_their_idea():
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 410, f"{path.name} has grown past ~400 lines: split it by idea"
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.strip(), f"{path.name} has no module docstring saying its idea"
