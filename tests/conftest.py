"""Shared test helpers: the reference fixtures in ../shared/reference.

``YOLACT_REFERENCE_DIR`` overrides the location. Tests that need the
fixtures are skipped only when the folder is absent (CI always has it).
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


needs_reference = pytest.mark.skipif(
    not os.path.isdir(REFERENCE_DIR), reason=f'reference fixtures not found at {REFERENCE_DIR}')


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
    """Training convolutions through Paddle's own F.conv2d: layers.cpu_ops.conv2d finds no op."""
    import layers.cpu_ops

    monkeypatch.setattr(layers.cpu_ops, 'load_ops', lambda: None)
