"""The repository's layout: the core (the top-level files) imports no tool, and the README's file map names every
file a newcomer may open."""
import ast

from conftest import ROOT


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):  # imports inside functions too
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_no_tool():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")} - {"__init__"}
    core = sorted(ROOT.glob("*.py"))
    assert {"train", "model", "data", "optim", "settings"} <= {p.stem for p in core}
    for path in core:
        wrong = {name for name in imported_modules(path) if name.split(".")[0] in tools | {"tools"}}
        assert not wrong, f"{path.name} imports {wrong}: the core must not depend on tools/"


def test_the_readme_file_map_names_every_file():
    readme = (ROOT / "README.md").read_text()
    file_map = readme.split("## The files", 1)[1].split("\n## ", 1)[0]
    files = [p.name for p in ROOT.glob("*.py")] + [f"tools/{p.name}" for p in (ROOT / "tools").glob("*.py")
                                                   if p.name != "__init__.py"]
    missing = [name for name in files if f"`{name}`" not in file_map]
    assert not missing, f"the README's file map does not name {missing}"
    assert readme.count("\n") <= 300
