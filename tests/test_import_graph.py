"""The import graph of ``bnas_nni`` has no circles, and the library never imports scripts above it.

Imports are read from the source (module level and function level alike, since a function-local import
that closes a circle is still a circle, only a hidden one), so the test needs no import side effects.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'bnas_nni'


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    """``{module: {bnas_nni modules it imports}}``; ``from . import sub`` counts as importing ``sub`` only."""
    files = {_module_name(p, package): p for p in package.rglob('*.py')}
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        here = name if path.name == '__init__.py' else name.rpartition('.')[0]
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = here.split('.')[:len(here.split('.')) - node.level + 1]
                    base = '.'.join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ''
                submodules = [f'{base}.{alias.name}' for alias in node.names if f'{base}.{alias.name}' in files]
                targets = submodules or [base]
            else:
                continue
            deps.update(t for t in targets if t in files and t != name)
        graph[name] = deps
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_detection_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / 'bnas_nni'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('from . import b\n')
    (pkg / 'a.py').write_text('from .sub.b import thing\n')
    (pkg / 'sub' / 'b.py').write_text('def f():\n    from ..a import other\n')
    (pkg / 'c.py').write_text('import bnas_nni.a\n')
    graph = import_graph(pkg)
    assert graph['bnas_nni.sub'] == {'bnas_nni.sub.b'}
    assert graph['bnas_nni.c'] == {'bnas_nni.a'}
    assert circles(graph) == [['bnas_nni.a', 'bnas_nni.sub.b']]


def test_bnas_nni_has_no_import_circle():
    found = circles(import_graph())
    assert not found, 'import circles: ' + '; '.join(' <-> '.join(c) for c in found)


@pytest.mark.parametrize('above', ['trainers', 'experiments', 'tests', 'bench'])
def test_library_never_imports_scripts_above_it(above):
    offenders = []
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ''] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f'{path.relative_to(PACKAGE.parent)}: {n}' for n in names if n.split('.')[0] == above]
    assert not offenders, offenders


def test_every_package_is_listed_for_a_non_editable_install():
    """pyproject.toml lists its packages by name (search_spaces ships from another folder), so a new
    subpackage left out of that list imports in the editable checkout and is missing from a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / 'pyproject.toml').read_text())['tool']['setuptools']['packages'])
    found = {'.'.join(p.parent.relative_to(root).parts) for p in (root / 'bnas_nni').rglob('__init__.py')}
    assert found - listed == set(), f'add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml'
