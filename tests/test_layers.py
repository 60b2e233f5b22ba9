"""The shape of reidkit (DESIGN.md, "Layout"): run/ is the ground, data/ stands on it,
evaluate/ on data/ (rank strips read images), train/ and search/ on those (neither on the
other); no import circle; no import of our modules inside a function (which would only hide
a circle or a layer crossed the wrong way)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'reidkit'
LAYER = {'run': 0, 'data': 1, 'evaluate': 2, 'train': 3, 'search': 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _our_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of reidkit.*."""
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names
                             if alias.name.startswith("reidkit."))
            elif isinstance(child, ast.ImportFrom) and (child.module or '').startswith('reidkit'):
                for alias in child.names:    # `from reidkit.run import errors` names a module
                    candidate = f'{child.module}.{alias.name}'
                    is_module = (PACKAGE.parent / (candidate.replace('.', '/') + '.py')).exists()
                    found.append((candidate if is_module else child.module, child.lineno,
                                  in_function))
            visit(child, nested)
    visit(tree, False)
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {_module_name(path): _our_imports(ast.parse(path.read_text(), str(path)))
            for path in sorted(PACKAGE.rglob('*.py'))}


def _layer(module: str) -> tuple[str, int] | None:
    parts = module.split('.')
    return (parts[1], LAYER[parts[1]]) if len(parts) > 1 and parts[1] in LAYER else None


def test_no_module_of_ours_is_imported_inside_a_function():
    inside = [f'{module}:{line} imports {target}' for module, imports in _graph().items()
              for target, line, in_function in imports if in_function]
    assert inside == []


def test_no_package_imports_a_higher_or_a_sibling_one():
    wrong = []
    for module, imports in _graph().items():
        here = _layer(module)
        for target, line, _ in imports:
            there = _layer(target)
            if here and there and here[0] != there[0] and there[1] >= here[1]:
                wrong.append(f'{module}:{line} ({here[0]}) imports {target} ({there[0]})')
    assert wrong == []


def test_no_import_circle():
    graph = {module: sorted({target for target, _, _ in imports if target != module})
             for module, imports in _graph().items()}
    circles, state = [], {}

    def walk(module: str, path: list[str]):
        state[module] = 'open'
        for target in graph.get(module, []):
            if state.get(target) == 'open':
                circles.append(' -> '.join(path[path.index(target):] + [target]))
            elif target not in state:
                walk(target, path + [target])
        state[module] = 'done'
    for module in graph:
        if module not in state:
            walk(module, [module])
    assert circles == []


def test_the_checker_sees_a_circle_and_a_hidden_import(tmp_path):
    """The checks above can fail: a function-local import is reported with its line."""
    tree = ast.parse('import os\n'
                     'from reidkit.run import errors\n'
                     'def f():\n'
                     '    from reidkit.train.engine import SoftmaxEngine\n')
    assert _our_imports(tree) == [('reidkit.run.errors', 2, False),
                                  ('reidkit.train.engine', 4, True)]
