"""utils.training.cpu_ops: oneDNN's convolution for CPU training, against Paddle's own F.conv2d,
swapped into the model's convolutions from the training side; its cache never stops training.

The op must be built here (tools/setup.sh installs its headers): a missing
op fails these tests rather than skipping them, since every CPU training
step takes it.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import utils.training.cpu_ops as cpu_ops
from backbone import Conv2D
from data.config import get_config
from tests.conftest import ROOT
from yolact import Yolact

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
        with caplog.at_level(logging.WARNING, logger='utils.training.cpu_ops'):
            outs = [cpu_ops.conv2d(x, w, padding=1) for _ in range(2)]
        warnings = [r.getMessage() for r in caplog.records if r.name == 'utils.training.cpu_ops']
        assert len(warnings) == 1
        assert "Paddle's own convolution" in warnings[0] and 'not installed' in warnings[0]
        assert cpu_ops.INSTALL_HINT in warnings[0]
        for out in outs:
            np.testing.assert_array_equal(out.numpy(), F.conv2d(x, w, padding=1).numpy())
    finally:
        cpu_ops.load_ops.cache_clear()


def test_cpu_bias_add_gives_paddle_conv_results_and_gradients(without_cpu_ops):
    """A swapped-in Conv2D (bias added over the last axis in CPU dygraph: add_channel_bias) computes
    what nn.Conv2D does. Paddle's own convolution on both sides; the op is tested above."""
    paddle.seed(0)
    plain = paddle.nn.Conv2D(8, 16, 3, stride=2, padding=1)
    fast = Conv2D(8, 16, 3, stride=2, padding=1)
    cpu_ops.use_cpu_training_convolutions(fast)
    plain.bias.set_value(paddle.randn([16]))
    fast.set_state_dict(plain.state_dict())
    grads = []
    for conv in (plain, fast):
        x = paddle.to_tensor(np.random.default_rng(0).standard_normal((3, 8, 11, 13)).astype('float32'),
                             stop_gradient=False)
        out = conv(x)
        (out * paddle.arange(out.size, dtype='float32').reshape(out.shape) / out.size).sum().backward()
        grads.append([out.numpy(), x.grad.numpy(), conv.weight.grad.numpy(), conv.bias.grad.numpy()])
        conv.clear_gradients()
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _training_outputs(net, x):
    out = net(x)
    loss = sum((out[k] * paddle.cos(paddle.arange(out[k].size, dtype='float32')).reshape(out[k].shape)).sum()
               for k in ('loc', 'conf', 'mask', 'proto', 'segm'))
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in net.named_parameters() if p.grad is not None}
    net.clear_gradients()
    return {k: out[k].numpy() for k in ('loc', 'conf', 'mask', 'proto', 'segm')}, grads


def test_the_model_takes_the_op_only_when_the_training_side_swaps_it_in(ops, monkeypatch):
    """yolact.py and backbone.py compute plain convolutions; use_cpu_training_convolutions routes every
    Conv2D (own kernel and computed ones: the folded BatchNorm, the fused heads) through the op, and back."""
    calls = []
    original = ops.cpu_conv2d
    monkeypatch.setattr(ops, 'cpu_conv2d', lambda *a: calls.append(a[1].shape) or original(*a))
    paddle.seed(0)
    net = Yolact.from_config(get_config('yolact_shapes'))
    net.train()
    net.freeze_bn(True)
    x = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype('float32'))
    plain_out, plain_grads = _training_outputs(net, x)
    assert calls == []
    convs = [layer for layer in net.sublayers() if isinstance(layer, Conv2D)]
    with cpu_ops.cpu_training_convolutions(net) as swapped:
        assert swapped is net
        swapped_out, swapped_grads = _training_outputs(net, x)
    # One op call per 3x3 (or larger) convolution run: the backbone's (BatchNorm folded), FPN, ProtoNet,
    # each level's head trunk and its fused heads (kernels of bbox, conf and mask stacked).
    head = net.prediction_layers[0]
    fused = sum(layer.weight.shape[0] for layer in (head.bbox_layer, head.conf_layer, head.mask_layer))
    assert fused in {c[0] for c in calls}
    assert all(c[2] * c[3] > 1 for c in calls)
    assert all('forward' not in layer.__dict__ and 'convolve' not in layer.__dict__ for layer in convs)
    del calls[:]
    _training_outputs(net, x)
    assert calls == []
    for key, value in plain_out.items():
        np.testing.assert_allclose(swapped_out[key], value, rtol=1e-4, atol=1e-4, err_msg=key)
    assert set(swapped_grads) == set(plain_grads)


@pytest.mark.parametrize('blocked', ['cache is a file', 'lock is a folder'])
def test_an_unwritable_cache_warns_once_and_trains_with_paddle(blocked, tmp_path, monkeypatch, caplog):
    """A read-only, full or broken YOLACT_CACHE: one warning naming the folder, F.conv2d, no traceback."""
    if blocked == 'cache is a file':
        cache = tmp_path / 'cache'
        cache.write_text('not a folder')
    else:
        cache = tmp_path
    monkeypatch.setenv('YOLACT_CACHE', str(cache))
    if blocked == 'lock is a folder':
        build_dir, _ = cpu_ops.build_folder()
        os.makedirs(build_dir + '.lock')
    cpu_ops.load_ops.cache_clear()
    try:
        x = paddle.randn([2, 4, 9, 9])
        x.stop_gradient = False
        w = paddle.randn([4, 4, 3, 3])
        with caplog.at_level(logging.WARNING, logger='utils.training.cpu_ops'):
            outs = [cpu_ops.conv2d(x, w, padding=1) for _ in range(2)]
        warnings = [r.getMessage() for r in caplog.records if r.name == 'utils.training.cpu_ops']
        assert len(warnings) == 1, warnings
        assert f'the op cache folder {cache}' in warnings[0] and 'YOLACT_CACHE' in warnings[0]
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
logging.getLogger('utils.training.cpu_ops').addHandler(Keep())
logging.getLogger('utils.training.cpu_ops').setLevel(logging.INFO)
import utils.training.cpu_ops as cpu_ops
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


def test_a_corrupt_build_is_rebuilt(ops, tmp_path):
    """A built op whose library was damaged (a truncated write) is built again, never loaded (which can kill the
    process: SIGBUS under Paddle 2.6) and not skipped forever."""
    build_dir, _ = cpu_ops.build_folder()
    assert os.path.isfile(os.path.join(build_dir, 'done'))
    copy = tmp_path / 'ops' / os.path.basename(build_dir)
    shutil.copytree(build_dir, copy)
    libraries = [os.path.join(folder, name) for folder, _, names in os.walk(copy) for name in names
                 if name.endswith('.so')]
    assert libraries
    for library in libraries:
        with open(library, 'r+b') as f:
            f.truncate(4096)
    child = subprocess.run([sys.executable, '-c', _CHILD, ROOT], env=dict(os.environ, YOLACT_CACHE=str(tmp_path)),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result['built'] and result['error'] < 1e-5, result
    assert any('is damaged' in m and 'differs from what was built' in m and 'building it again' in m
               for m in result['logs']), result['logs']
    assert any(m.startswith('oneDNN convolution op built') for m in result['logs']), result['logs']
