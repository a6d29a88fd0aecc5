"""The package reads like the pipeline: no import circle, no import from a later stage back into an earlier one,
no module much longer than a screenful of screens, and a docstring on every module."""

import ast
import os

import pytest

from tests.helpers.outputs import REPO

PACKAGE = os.path.join(REPO, "llava")
# The stages in the order a run uses them; a module may import its own stage and earlier ones. The modules at the
# top of the package are the commands (`python -m llava.<name>`).
STAGES = ["llava.utils", "llava.data", "llava.model", "llava.training", "llava (commands)", "llava.demo"]
MAX_LINES = 450


def modules() -> dict[str, str]:
    """Dotted name -> path of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def stage(module: str) -> int:
    for index, prefix in enumerate(STAGES):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return STAGES.index("llava (commands)")  # llava.train, llava.evaluate, ... and llava itself


def imports(path: str, known: set[str]) -> set[str]:
    """Modules of the package that `path` imports, anywhere in it (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


GRAPH = {module: imports(path, set(modules())) - {module} for module, path in modules().items()}


def test_the_graph_was_read():
    assert len(GRAPH) > 30 and GRAPH["llava.data.encoder"] >= {"llava.data.chat_template", "llava.data.types"}


def test_no_import_from_a_later_stage():
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
                    if stage(target) > stage(module) and target != "llava")
    assert upward == [], "\n".join(upward)


def test_value_types_are_a_leaf():
    assert GRAPH["llava.data.types"] == set()


def test_no_import_circle():
    visiting, done, cycles = [], set(), []

    def visit(module):
        if module in visiting:
            cycles.append(visiting[visiting.index(module):] + [module])
            return
        if module in done:
            return
        visiting.append(module)
        for target in GRAPH.get(module, ()):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_are_short_and_say_what_they_are_for(module):
    path = modules()[module]
    text = open(path, encoding="utf-8").read()
    assert text.count("\n") <= MAX_LINES, f"{path}: {text.count(chr(10))} lines"
    assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring"
