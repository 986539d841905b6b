"""Shared test helpers: the reference fixtures in ../shared/reference.

``YOLACT_REFERENCE_DIR`` overrides the location. When the folder is absent,
the tests marked ``needs_reference``:

* in CI (the ``CI`` environment variable set, as CI services do): stop the run
  before any test with one line naming the folder, as CI always has it and
  passing without those tests would pass without the parity checks;
* elsewhere: are skipped, with one line naming the folder in pytest's header
  and in each skip reason: a clone of the project alone has no ../shared, and
  the rest of the suite still tests it.
"""
import importlib.util
import os
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Predictor and eval.py export CPU models on first use into a cache: the tests' own one, not the user's.
os.environ.setdefault('YOLACT_CACHE', tempfile.mkdtemp(prefix='yolact-test-cache-'))
# The MKL kernels the programs use (utils.runtime.select_device), chosen before anything computes.
from utils.runtime import use_mkl_avx2_on_amd  # noqa: E402

use_mkl_avx2_on_amd()

REFERENCE_DIR = os.environ.get(
    'YOLACT_REFERENCE_DIR', os.path.join(os.path.dirname(ROOT), 'shared', 'reference'))


def _load_make_weights():
    spec = importlib.util.spec_from_file_location(
        'make_weights', os.path.join(REFERENCE_DIR, 'make_weights.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MISSING_REFERENCE = (f'reference fixtures not found at {REFERENCE_DIR} '
                     '(set YOLACT_REFERENCE_DIR to the folder holding make_weights.py and the *.npz)')

# Marks a test that reads the reference fixtures (see the module docstring for a missing folder).
needs_reference = pytest.mark.needs_reference


def pytest_configure(config):
    config.addinivalue_line('markers', 'needs_reference: the test reads the fixtures in ../shared/reference')


def pytest_report_header(config):
    if not os.path.isdir(REFERENCE_DIR):
        return MISSING_REFERENCE
    return None


@pytest.hookimpl(trylast=True)          # after -k / -m deselection: only the tests that will run
def pytest_collection_modifyitems(config, items):
    if os.path.isdir(REFERENCE_DIR):
        return
    needing = [item for item in items if item.get_closest_marker('needs_reference')]
    if not needing:
        return
    if os.environ.get('CI'):
        raise pytest.UsageError(f'{len(needing)} selected tests need the {MISSING_REFERENCE}')
    for item in needing:
        item.add_marker(pytest.mark.skip(reason=MISSING_REFERENCE))
    config.stash[_SKIPPED_FOR_REFERENCE] = len(needing)


_SKIPPED_FOR_REFERENCE = pytest.StashKey()


def pytest_terminal_summary(terminalreporter, config):
    skipped = config.stash.get(_SKIPPED_FOR_REFERENCE, 0)
    if skipped:
        terminalreporter.write_line(f'{skipped} tests skipped: {MISSING_REFERENCE}', yellow=True)


def reference_state_dict(config_name, seed=0):
    """{reference key: np.ndarray}: the stand-in weights the fixtures were computed with."""
    mw = _load_make_weights()
    return mw.make_state_dict(mw.load_manifest(config_name), seed)


def reference_npz(name):
    """The arrays of ``<REFERENCE_DIR>/<name>.npz`` as a dict."""
    with np.load(os.path.join(REFERENCE_DIR, f'{name}.npz')) as z:
        return {k: z[k] for k in z.files}


def make_weights_module():
    """The reference ``make_weights`` module (load_manifest, make_state_dict, save_pth)."""
    return _load_make_weights()


def reference_params(net, cfg, seed=0):
    """{paddle key: np.ndarray}: the stand-in weights of ``cfg.name`` converted (strictly) for ``net``."""
    from utils.weights.convert import convert_state_dict, fpn_downsample_drop

    params, _ = convert_state_dict(reference_state_dict(cfg.name, seed),
                                   {k: v.shape for k, v in net.state_dict().items()},
                                   [fpn_downsample_drop(cfg.fpn.num_downsample)])
    return params


@pytest.fixture
def without_cpu_ops(monkeypatch):
    """Training convolutions through Paddle's own F.conv2d: utils.training.cpu_ops.conv2d finds no op."""
    import utils.training.cpu_ops

    monkeypatch.setattr(utils.training.cpu_ops, 'load_ops', lambda: None)
