"""Imports point one way:

    programs (train.py, eval.py, tools/*)  ->  library (data/, utils/)  ->  model (backbone.py, yolact.py, layers/)

* The model imports only the model and the configuration it is built from, data.config
  (constants and frozen dataclasses; it imports nothing of the project but utils.errors, whose
  ConfigError it raises). The exact bilinear taps the model shares with the evaluation
  preprocessing live in the model (layers/interpolate.py), so the converter, the loader and
  the checkpoint code (utils/weights/) import the model, never the reverse.
* The model holds no platform-speed code: CPU training's oneDNN convolution op
  (utils/training/cpu_ops.py) is swapped in from the training side, and no model file imports it.
* The library imports no program.
* Nothing imports train.py or eval.py: they are parse_args(), main() and wiring. (Tests run
  their main().)

The test reads every import statement of the project's own files, top-level and inside functions.
"""
import ast
import os

from tests.conftest import ROOT

MODEL = ('backbone', 'yolact', 'layers')
MODEL_MAY_ALSO_IMPORT = ('data.config', 'utils.errors')
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


CPU_OPS = 'utils.training.cpu_ops'


def test_no_model_file_imports_the_cpu_training_op():
    graph = _graph()
    model_files = sorted(module for module in graph if _is(module, MODEL))
    assert 'yolact' in model_files and 'backbone' in model_files and 'layers.box_utils' in model_files
    offending = {module: sorted(m for m in graph[module] if _is(m, (CPU_OPS,)) or m.endswith('cpu_ops'))
                 for module in model_files}
    assert not any(offending.values()), offending
    assert not any(name.endswith('cpu_ops') for name in graph if _is(name, MODEL)), 'the op module is in the model'


def test_the_library_imports_no_program_and_nothing_imports_train_or_eval():
    graph = _graph()
    offending = {module: sorted(m for m in imports if _is(m, PROGRAMS))
                 for module, imports in graph.items() if _is(module, LIBRARY)}
    assert not any(offending.values()), offending
    importers = {module: sorted(m for m in imports if m in ('train', 'eval') or m.startswith(('train.', 'eval.')))
                 for module, imports in graph.items()}
    assert not any(importers.values()), importers


def test_the_rule_catches_a_cycle(tmp_path):
    """The reader sees a model file's function-level import of utils.weights.convert (which imports the model)."""
    path = tmp_path / 'backbone.py'
    path.write_text('import math\n\ndef f():\n    from utils.weights.convert import convert_state_dict\n')
    assert _imports(str(path)) == {'utils.weights.convert', 'utils.weights.convert.convert_state_dict'}
