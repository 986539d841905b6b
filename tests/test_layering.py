"""Imports point one way:

    programs (train.py, eval.py, tools/*)  ->  library (data/, utils/)  ->  model (backbone.py, yolact.py, layers/)

* The model imports only the model and four leaf modules that import no project code but
  each other: data.config, utils.augmentations, utils.compat (the Paddle version shims),
  utils.errors. So the converter, the loader and the checkpoint code (utils/convert.py, utils/model_loader.py, utils/checkpoint.py) import the
  model, never the reverse.
* The library imports no program.
* Nothing imports train.py or eval.py: they are parse_args(), main() and wiring. (Tests run
  their main().)

The test reads every import statement of the project's own files, top-level and inside functions.
"""
import ast
import os

from tests.conftest import ROOT

MODEL = ('backbone', 'yolact', 'layers')
MODEL_MAY_ALSO_IMPORT = ('data.config', 'utils.augmentations', 'utils.compat', 'utils.errors')
LIBRARY = ('data', 'utils')
PROGRAMS = ('train', 'eval', 'tools')
PROJECT = MODEL + LIBRARY + PROGRAMS


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-len('.py')]
    parts = rel.split(os.sep)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _project_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', '__pycache__', 'notebooks')]
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(folder, name)


def _imports(path):
    """The project modules a file imports (``from a.b import c`` counts as a.b and a.b.c)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return {n for n in names if n.split('.')[0] in PROJECT}


def _is(module, group):
    return any(module == g or module.startswith(g + '.') for g in group)


def _graph():
    return {_module_name(path): _imports(path) for path in _project_files()}


def test_the_model_imports_only_the_model_and_leaf_modules():
    graph = _graph()
    for leaf in MODEL_MAY_ALSO_IMPORT:
        assert all(_is(m, MODEL_MAY_ALSO_IMPORT) for m in graph[leaf]), (leaf, graph[leaf])
    offending = {module: sorted(m for m in imports if not _is(m, MODEL + MODEL_MAY_ALSO_IMPORT))
                 for module, imports in graph.items() if _is(module, MODEL)}
    assert not any(offending.values()), offending


def test_the_library_imports_no_program_and_nothing_imports_train_or_eval():
    graph = _graph()
    offending = {module: sorted(m for m in imports if _is(m, PROGRAMS))
                 for module, imports in graph.items() if _is(module, LIBRARY)}
    assert not any(offending.values()), offending
    importers = {module: sorted(m for m in imports if m in ('train', 'eval') or m.startswith(('train.', 'eval.')))
                 for module, imports in graph.items()}
    assert not any(importers.values()), importers


def test_the_rule_catches_a_cycle(tmp_path):
    """The reader sees the import the old backbone.py had (utils.convert, which imports the model)."""
    path = tmp_path / 'backbone.py'
    path.write_text('import math\n\ndef f():\n    from utils.convert import convert_state_dict\n')
    assert _imports(str(path)) == {'utils.convert', 'utils.convert.convert_state_dict'}
