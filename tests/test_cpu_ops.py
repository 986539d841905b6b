"""layers.cpu_ops: oneDNN's convolution for CPU training, against Paddle's own F.conv2d.

The op must be built here (tools/setup.sh installs its headers): a missing
op fails these tests rather than skipping them, since every CPU training
step takes it.
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import layers.cpu_ops as cpu_ops
from tests.conftest import ROOT

# (batch, in, out, height, width, kernel, stride, padding, dilation, input needs a gradient, bias)
GEOMETRIES = [
    (2, 16, 8, 13, 11, 3, 1, 1, 1, True, True),
    (2, 16, 8, 13, 11, 3, 2, 1, 1, True, False),
    (1, 3, 8, 33, 31, 7, 2, 3, 1, False, False),   # the ResNet stem on an image
    (2, 8, 8, 15, 15, 3, 1, 2, 2, True, True),     # dilated
    (2, 8, 8, 14, 14, 3, 2, 1, 1, True, True),     # even size, stride 2
    (3, 12, 20, 9, 7, 3, 1, 0, 1, True, True),     # no padding
]


@pytest.fixture(scope='module')
def ops():
    module = cpu_ops.load_ops()
    assert module is not None, 'the oneDNN convolution op was not built (see the warning above)'
    return module


def _run(conv, geometry, magnitude=False, seed=0):
    """[out, grad x, grad weight, grad bias] of sum(conv(x, w, b) * cos(i)); with ``magnitude`` of every
    value's absolute, which bounds each result's terms: the scale of its float rounding."""
    n, c, o, h, w, k, stride, padding, dilation, input_grad, with_bias = geometry
    rng = np.random.default_rng(seed)
    value = np.abs if magnitude else (lambda a: a)
    x = paddle.to_tensor(value(rng.standard_normal((n, c, h, w))).astype('float32'), stop_gradient=not input_grad)
    weight = paddle.to_tensor(value(rng.standard_normal((o, c, k, k))).astype('float32'), stop_gradient=False)
    bias = (paddle.to_tensor(value(rng.standard_normal(o)).astype('float32'), stop_gradient=False)
            if with_bias else None)
    out = conv(x, weight, bias, stride, padding, dilation)
    cotangent = paddle.cos(paddle.arange(out.size, dtype='float32')).reshape(out.shape)
    (out * (cotangent.abs() if magnitude else cotangent)).sum().backward()
    grads = [None if x.grad is None else x.grad.numpy(), weight.grad.numpy(),
             None if bias is None else bias.grad.numpy()]
    return [out.numpy()] + grads


def _paddle_conv(x, weight, bias, stride, padding, dilation):
    return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: 'x'.join(map(str, g[:9])))
def test_op_gives_paddle_conv_results_and_gradients(ops, geometry, monkeypatch):
    calls = []
    original = ops.cpu_conv2d
    monkeypatch.setattr(ops, 'cpu_conv2d', lambda *a: calls.append(1) or original(*a))
    ours = _run(cpu_ops.conv2d, geometry)
    assert calls == [1]
    theirs = _run(_paddle_conv, geometry)
    scale = _run(_paddle_conv, geometry, magnitude=True)
    for name, a, b, m in zip(('out', 'grad x', 'grad weight', 'grad bias'), ours, theirs, scale):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            # A different summation order's float rounding only: within 8 float32 epsilons of the sum of
            # the terms' magnitudes (measured over 3 seeds: at most 2.04 epsilons).
            assert np.all(np.abs(a - b) <= 1e-6 * m), (name, (np.abs(a - b) / m).max())


def test_op_is_taken_only_while_training_a_kernel_larger_than_1x1(ops, monkeypatch):
    calls = []
    original = ops.cpu_conv2d
    monkeypatch.setattr(ops, 'cpu_conv2d', lambda *a: calls.append(1) or original(*a))
    x = paddle.randn([2, 4, 9, 9])
    x.stop_gradient = False
    w3 = paddle.randn([4, 4, 3, 3])
    w3.stop_gradient = False
    w1 = paddle.randn([4, 4, 1, 1])
    w1.stop_gradient = False

    cpu_ops.conv2d(x, w3, padding=1)
    assert calls == [1]
    with paddle.no_grad():
        inference = cpu_ops.conv2d(x, w3, padding=1)
    cpu_ops.conv2d(x, w1)                                   # 1x1: Paddle's GEMM is the faster
    cpu_ops.conv2d(x, paddle.randn([4, 2, 3, 3]), padding=1, groups=2)
    cpu_ops.conv2d(x.detach(), w3.detach(), padding=1)     # nothing needs a gradient
    cpu_ops.conv2d(x, w3, padding=[1, 1, 1, 1])             # not a symmetric pair
    assert calls == [1]
    np.testing.assert_array_equal(inference.numpy(), F.conv2d(x, w3, padding=1).numpy())


def test_the_installed_headers_are_the_pinned_ones():
    from importlib import metadata

    with open(cpu_ops.REQUIREMENTS) as f:
        pins = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    assert pins == [f'{cpu_ops.HEADERS_PACKAGE}=={metadata.version(cpu_ops.HEADERS_PACKAGE)}']


def test_missing_headers_warn_once_and_fall_back_to_paddle(monkeypatch, caplog):
    monkeypatch.setattr(cpu_ops, 'HEADERS_PACKAGE', 'no-such-onednn-headers')
    cpu_ops.load_ops.cache_clear()
    try:
        x = paddle.randn([2, 4, 9, 9])
        x.stop_gradient = False
        w = paddle.randn([4, 4, 3, 3])
        with caplog.at_level(logging.WARNING, logger='layers.cpu_ops'):
            outs = [cpu_ops.conv2d(x, w, padding=1) for _ in range(2)]
        warnings = [r.getMessage() for r in caplog.records if r.name == 'layers.cpu_ops']
        assert len(warnings) == 1
        assert "Paddle's own convolution" in warnings[0] and 'not installed' in warnings[0]
        assert cpu_ops.INSTALL_HINT in warnings[0]
        for out in outs:
            np.testing.assert_array_equal(out.numpy(), F.conv2d(x, w, padding=1).numpy())
    finally:
        cpu_ops.load_ops.cache_clear()


_CHILD = r'''
import json, logging, sys
import numpy as np, paddle
sys.path.insert(0, sys.argv[1])
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger('layers.cpu_ops').addHandler(Keep())
logging.getLogger('layers.cpu_ops').setLevel(logging.INFO)
import layers.cpu_ops as cpu_ops
x = paddle.to_tensor(np.arange(2 * 3 * 8 * 8, dtype='float32').reshape([2, 3, 8, 8]) / 100, stop_gradient=False)
w = paddle.to_tensor(np.ones([5, 3, 3, 3], 'float32') / 27, stop_gradient=False)
out = cpu_ops.conv2d(x, w, padding=1)
out.sum().backward()
ref = paddle.nn.functional.conv2d(x.detach(), w.detach(), padding=1)
print(json.dumps({'built': cpu_ops.load_ops() is not None, 'logs': records,
                  'error': float(np.abs(out.numpy() - ref.numpy()).max())}))
'''


def test_concurrent_first_use_builds_once(tmp_path):
    """Two processes (data-parallel ranks) starting on an empty cache: one builds, the other waits and loads."""
    env = dict(os.environ, YOLACT_CACHE=str(tmp_path))
    children = [subprocess.Popen([sys.executable, '-c', _CHILD, ROOT], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r['built'] for r in results)
    assert all(r['error'] < 1e-5 for r in results)
    builds = [m for r in results for m in r['logs'] if m.startswith('building the oneDNN convolution op')]
    assert len(builds) == 1, results
    entries = [e for e in os.listdir(tmp_path / 'ops') if not e.endswith('.lock')]
    assert len(entries) == 1 and os.path.isfile(tmp_path / 'ops' / entries[0] / 'done')
