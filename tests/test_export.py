"""Export without global patches, the export cache, and the ONNX export run by onnxruntime."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from tests.conftest import needs_reference, reference_npz, reference_params
from data.config import get_config
from tools import benchmark as benchmark_tool
from utils.deploy import export_cache, onnx_export
from utils.errors import ConfigError
from utils.weights.loader import load_exported
from utils.deploy.export_cache import cached_export, export_cache_key
from utils.deploy.network_export import META_SUFFIX, export_yolact
from utils.deploy.onnx_export import export_onnx
from utils.deploy.runners import OnnxYolact, StaticYolact
from yolact import Resize, Yolact


def _small_net(seed=0, **overrides):
    """yolact_shapes with random weights whose outputs look trained (magnitudes ~1, confident classes)."""
    cfg = get_config('yolact_shapes', **overrides)
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, seed)
    net.eval()
    return cfg, net


def _weights(tmp_path, net, name='w.pdparams'):
    path = str(tmp_path / name)
    paddle.save(net.state_dict(), path)
    return path


def _entries(cache):
    return sorted(n for n in os.listdir(cache) if not n.startswith('.'))


@pytest.fixture
def unchecked(monkeypatch):
    """New cache entries skip the child-process check (its own tests run it): ~5 s less per export."""
    monkeypatch.setattr(export_cache, 'check_export', lambda net, path_prefix: None)


# ----------------------------------------------------------------- Resize --
def test_resize_matmul_mode_equals_bilinear_op():
    x = paddle.rand([2, 3, 35, 18])
    resize = Resize()
    expected = F.interpolate(x, size=(69, 35), mode='bilinear', align_corners=False)
    np.testing.assert_array_equal(resize(x, size=(69, 35)).numpy(), expected.numpy())
    resize.as_matmul = True
    np.testing.assert_allclose(resize(x, size=(69, 35)).numpy(), expected.numpy(), rtol=0, atol=2e-6)
    up = Resize(scale_factor=2)
    expected = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)
    up.as_matmul = True
    np.testing.assert_allclose(up(x).numpy(), expected.numpy(), rtol=0, atol=2e-6)


def test_export_touches_no_global_and_restores_the_resize_mode(tmp_path, monkeypatch):
    cfg, net = _small_net()
    resizes = [layer for layer in net.sublayers() if isinstance(layer, Resize)]
    assert len(resizes) >= 2   # the FPN's top-down upsampling and ProtoNet's
    seen = []
    original_forward = Resize.forward

    def spy(self, x, size=None):
        seen.append(self.as_matmul)
        return original_forward(self, x, size)

    # not_to_static: Paddle 2.6's dy2static would recompile spy without its closure.
    monkeypatch.setattr(Resize, 'forward', paddle.jit.not_to_static(spy))
    interpolate = F.interpolate
    export_yolact(net, cfg, str(tmp_path / 'm'))
    assert F.interpolate is interpolate and paddle.nn.functional.interpolate is interpolate
    assert seen and all(seen)  # traced as matmuls
    assert not any(layer.as_matmul for layer in resizes)
    # Paddle 2.6 writes an older program (and a parameter name list) instead of PIR's .json.
    graph = ['m.json'] if onnx_export.PADDLE_VERSION >= (3, 0) else ['m.pdiparams.info', 'm.pdmodel']
    assert sorted(os.listdir(tmp_path)) == sorted(graph + ['m.pdiparams', 'm.yolact.json'])


def test_an_export_loaded_with_another_config_is_a_clear_error(tmp_path):
    cfg, net = _small_net()
    prefix = str(tmp_path / 'm')
    export_yolact(net, cfg, prefix)
    assert load_exported(prefix)[0].name == cfg.name
    with pytest.raises(ConfigError, match=f'exported for {cfg.max_size}x{cfg.max_size} inputs and 4 classes; '
                                          'config yolact_base has 550x550 and 4'):
        load_exported(prefix, 'yolact_base')


# ------------------------------------------------------------------ cache --
def test_cached_export_reuses_and_keys_on_weights_and_config(tmp_path, monkeypatch, unchecked):
    cache = str(tmp_path / 'cache')
    cfg, net = _small_net()
    weights = _weights(tmp_path, net)
    calls = []
    save = export_cache.save_static
    monkeypatch.setattr(export_cache, 'save_static', lambda *a, **k: calls.append(a[2]) or save(*a, **k))

    prefix = cached_export(lambda: net, cfg, weights, cache_dir=cache)
    assert len(calls) == 1 and os.path.isfile(prefix + META_SUFFIX)
    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    with paddle.no_grad():
        expected = net(x)
    got = StaticYolact(prefix)(x)
    np.testing.assert_allclose(got['conf'].numpy(), expected['conf'].numpy(), rtol=0, atol=1e-4)

    # Same weights bytes under another name: the same entry, no export.
    copy = str(tmp_path / 'copy.pdparams')
    with open(weights, 'rb') as src, open(copy, 'wb') as dst:
        dst.write(src.read())
    def no_network():
        raise AssertionError('a cache hit must not build the network')

    assert cached_export(no_network, cfg, copy, cache_dir=cache) == prefix
    assert len(calls) == 1 and len(_entries(cache)) == 1

    # Other weights: a new entry.
    _, other_net = _small_net(seed=1)
    other = _weights(tmp_path, other_net, 'other.pdparams')
    assert cached_export(lambda: other_net, cfg, other, cache_dir=cache) != prefix
    assert len(calls) == 2 and len(_entries(cache)) == 2

    # Another config (one field) with the first weights: a new entry.
    cfg2 = get_config('yolact_shapes', nms_top_k=cfg.nms_top_k + 1)
    assert export_cache_key(cfg2, weights) != export_cache_key(cfg, weights)
    cached_export(lambda: net, cfg2, weights, cache_dir=cache)
    assert len(calls) == 3 and len(_entries(cache)) == 3

    # $YOLACT_CACHE is the default folder.
    monkeypatch.setenv('YOLACT_CACHE', cache)
    assert cached_export(lambda: net, cfg, weights) == prefix and len(calls) == 3


def test_cached_export_crash_leaves_no_entry_and_leftovers_are_cleaned(tmp_path, monkeypatch, unchecked):
    cache = str(tmp_path / 'cache')
    cfg, net = _small_net()
    weights = _weights(tmp_path, net)

    def crash(net, cfg, path_prefix, batch_size, export_format='paddle'):
        with open(path_prefix + '.json', 'w') as f:
            f.write('{"half": ')
        raise RuntimeError('simulated crash in the middle of an export')

    with monkeypatch.context() as m:
        m.setattr(export_cache, 'save_static', crash)
        with pytest.raises(RuntimeError, match='simulated crash'):
            cached_export(lambda: net, cfg, weights, cache_dir=cache)
    assert os.listdir(cache) == []

    # A process killed mid-export leaves its partial folder; a dead pid of this
    # host is cleaned, a live exporter's (ours) is left alone, and neither is an entry.
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = export_cache.socket.gethostname()
    dead_dir = os.path.join(cache, f'.partial-{host}-{dead}-abc123')
    live_dir = os.path.join(cache, f'.partial-{host}-{os.getpid()}-def456')
    for folder in (dead_dir, live_dir):
        os.makedirs(folder)
        with open(os.path.join(folder, cfg.name + '.json'), 'w') as f:
            f.write('{"half": ')
    prefix = cached_export(lambda: net, cfg, weights, cache_dir=cache)
    assert not os.path.exists(dead_dir) and os.path.isdir(live_dir)
    assert _entries(cache) == [os.path.basename(os.path.dirname(prefix))]
    assert StaticYolact(prefix).meta.config == cfg.name


def test_concurrent_exporter_that_loses_the_rename_uses_the_winner(tmp_path, monkeypatch, unchecked):
    cache = str(tmp_path / 'cache')
    cfg, net = _small_net()
    weights = _weights(tmp_path, net)
    save = export_cache.save_static
    winner = {}

    def racing(net_, cfg_, path_prefix, batch_size, export_format='paddle'):
        # Another process completes the same entry while this one exports.
        if not winner:
            with monkeypatch.context() as m:
                m.setattr(export_cache, 'save_static', save)
                winner['prefix'] = cached_export(lambda: net_, cfg_, weights, cache_dir=cache)
        return save(net_, cfg_, path_prefix, batch_size, export_format)

    monkeypatch.setattr(export_cache, 'save_static', racing)
    assert cached_export(lambda: net, cfg, weights, cache_dir=cache) == winner['prefix']
    assert os.listdir(cache) == [os.path.basename(os.path.dirname(winner['prefix']))]


# ------------------------------------------------------------------- ONNX --
onnx_missing = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ('paddle2onnx', 'onnxruntime')),
    reason='paddle2onnx / onnxruntime not installed (requirements-test.txt)')
# paddle2onnx 2.x refuses Paddle < 3 (test_onnx_export_on_paddle_2_names_the_paddle2onnx_it_needs).
onnx_missing_for_this_paddle = pytest.mark.skipif(
    onnx_export.PADDLE_VERSION < (3, 0) and importlib.util.find_spec('paddle2onnx') is not None
    and not onnx_export.paddle2onnx_version().startswith('1.'),
    reason='paddle2onnx 2.x needs Paddle >= 3; Paddle 2.6 takes paddle2onnx 1.x (requirements-onnx.txt)')


@onnx_missing
@onnx_missing_for_this_paddle
@needs_reference
def test_onnx_export_of_yolact_base_matches_dygraph_on_reference_fixture(tmp_path):
    """ResNet-101 with the seed-0 stand-in weights, raw outputs ONNX (onnxruntime) vs dygraph.

    atol 1e-4, as the Paddle Inference export is held to (test_eval.py):
    onnxruntime's convolutions sum in another order than Paddle's over the 101
    float32 layers, and the kernels differ by CPU (AVX2, AVX-512); on an AMD
    EPYC with AVX-512 the largest difference is 3e-6 (mask coefficients).
    """
    cfg = get_config('yolact_base')
    net = Yolact.from_config(cfg)
    net.set_state_dict(reference_params(net, cfg))
    net.eval()
    ref = reference_npz('forward_yolact_base')
    with paddle.no_grad():
        dygraph = net(paddle.to_tensor(ref['x']))
    prefix = str(tmp_path / 'onnx' / 'yolact_base')
    meta = export_onnx(net, cfg, prefix)
    assert meta.format == 'onnx'
    assert sorted(os.listdir(tmp_path / 'onnx')) == ['yolact_base.onnx', 'yolact_base.yolact.json']
    got = OnnxYolact(prefix)(ref['x'])
    for key in ('loc', 'conf', 'mask', 'priors', 'proto'):
        np.testing.assert_allclose(got[key].numpy(), dygraph[key].numpy(), rtol=0, atol=1e-4, err_msg=key)


@onnx_missing
@onnx_missing_for_this_paddle
def test_onnx_export_of_a_small_yolact_plus_with_dcn_and_mask_iou(tmp_path):
    """YOLACT++'s parts: DCNv2 blocks (ONNX DeformConv, opset 19) and the mask-IoU net, vs dygraph."""
    plus = get_config('yolact_plus_base')
    shapes = get_config('yolact_shapes')
    backbone = dataclasses.replace(shapes.backbone, dcn_layers=(0, 2, 2, 2), dcn_interval=1)
    cfg, net = _small_net(backbone=backbone, use_maskiou=True, maskiou_net=plus.maskiou_net)
    assert any(type(layer).__name__ == 'ModulatedDeformConv2D' for layer in net.sublayers())
    prefix = str(tmp_path / 'plus')
    if onnx_export.PADDLE_VERSION < (3, 0):
        # paddle2onnx 1.x, the one for Paddle 2.6, stops at opset 18: DCNv2 cannot be converted.
        with pytest.raises(ConfigError, match='deformable_conv, requires opset_version >= 19'):
            export_onnx(net, cfg, prefix)
        return
    export_onnx(net, cfg, prefix)
    runner = OnnxYolact(prefix)
    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    with paddle.no_grad():
        expected = net(x)
        masks = paddle.rand([3, 1, 138, 138])   # the prototypes' side at 550
        expected_iou = net.maskiou_net(masks)
    got = runner(x)
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(runner.maskiou_net(masks).numpy(), expected_iou.numpy(), rtol=0, atol=1e-4)
    assert runner.maskiou_net(paddle.zeros([0, 1, 48, 48])).shape == [0, cfg.num_classes - 1]


@onnx_missing
@onnx_missing_for_this_paddle
def test_network_export_format_onnx_and_a_failing_conversion(tmp_path, monkeypatch):
    cfg, net = _small_net()
    prefix = str(tmp_path / 'tool' / 'shapes')
    export_onnx(net, cfg, prefix)
    assert sorted(os.listdir(tmp_path / 'tool')) == ['shapes.onnx', 'shapes.yolact.json']

    # paddle2onnx failing (here: an opset below the graph's needs, which aborts
    # paddle2onnx's process) is a one-line ConfigError, and nothing is written.
    monkeypatch.setattr(onnx_export, 'ONNX_OPSET', 1)
    monkeypatch.setattr(onnx_export, '_PADDLE2ONNX_CHILD', onnx_export._PADDLE2ONNX_CHILD.replace(
        'auto_upgrade_opset=True', 'auto_upgrade_opset=False'))
    with pytest.raises(ConfigError, match='cannot convert yolact_shapes to ONNX') as err:
        export_onnx(net, cfg, str(tmp_path / 'fail' / 'shapes'))
    assert '\n' not in str(err.value)
    assert os.listdir(tmp_path / 'fail') == []


# ------------------------------------------------- DarkNet's LeakyReLU --
def _small_darknet(seed=0):
    """yolact_shapes on a one-block-per-stage DarkNet-53: conv + BN + LeakyReLU(0.1), as yolact_darknet53."""
    darknet = dataclasses.replace(get_config('yolact_darknet53').backbone, layers=(1, 1, 1, 1, 1))
    return _small_net(seed, backbone=darknet)


def test_a_darknet_export_runs_in_paddle_inference_like_dygraph(tmp_path):
    """Paddle 3.3's conv + activation oneDNN fusion segfaulted on leaky_relu (FusedConv2dOp::Build).

    Run in a child process, so that the crash fails this test instead of killing pytest.
    """
    cfg, net = _small_darknet()
    prefix = str(tmp_path / 'darknet')
    export_yolact(net, cfg, prefix)
    x = np.random.RandomState(0).standard_normal([1, 3, cfg.max_size, cfg.max_size]).astype(np.float32)
    with paddle.no_grad():
        expected = net(paddle.to_tensor(x))
    np.save(tmp_path / 'x.npy', x)
    child = ('import sys, numpy as np\nfrom utils.deploy.runners import StaticYolact\n'
             'out = StaticYolact(sys.argv[1])(np.load(sys.argv[2]))\n'
             'np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})\n')
    result = subprocess.run([sys.executable, '-c', child, prefix, str(tmp_path / 'x.npy'), str(tmp_path / 'out.npz')],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, f'exit status {result.returncode}: {result.stderr[-2000:]}'
    with np.load(tmp_path / 'out.npz') as got:
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key].numpy(), rtol=0, atol=1e-4, err_msg=key)


@onnx_missing
@onnx_missing_for_this_paddle
def test_onnx_export_of_a_darknet_keeps_the_leaky_relu_slope(tmp_path):
    """paddle2onnx 2.1 turned leaky_relu's slope (a double in Paddle 3.3) into NaN: every output was NaN."""
    cfg, net = _small_darknet()
    prefix = str(tmp_path / 'darknet')
    leaky = [layer for layer in net.sublayers() if isinstance(layer, paddle.nn.LeakyReLU)]
    export_onnx(net, cfg, prefix)
    assert leaky and [layer for layer in net.sublayers() if 'LeakyReLU' in type(layer).__name__] == leaky
    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    with paddle.no_grad():
        expected = net(x)
    got = OnnxYolact(prefix)(x)
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-4, err_msg=key)


# ------------------------------------------- first-use check and damage --
def _shapes_weights(tmp_path, net):
    """The network's weights under a published-style name, so Predictor resolves yolact_shapes from it."""
    return _weights(tmp_path, net, 'yolact_shapes_1_10.pdparams')


def _inference_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == 'utils.deploy.export_cache' and r.levelname == 'WARNING']


def test_an_export_that_crashes_in_its_check_falls_back_to_dygraph_once_per_paddle(tmp_path, monkeypatch, caplog):
    from utils.predictor import Predictor

    cfg, net = _small_net()
    weights = _shapes_weights(tmp_path, net)
    cache = str(tmp_path / 'cache')
    monkeypatch.setenv('YOLACT_CACHE', cache)
    runs = tmp_path / 'check_runs.txt'
    real_child = export_cache._CHECK_CHILD
    # The check's child dies as Paddle Inference did on yolact_darknet53.
    monkeypatch.setattr(export_cache, '_CHECK_CHILD', f'import os, signal\nopen({str(runs)!r}, "a").write("run\\n")\n'
                                                   'os.kill(os.getpid(), signal.SIGSEGV)\n')
    image = np.random.RandomState(0).randint(0, 255, (90, 120, 3)).astype(np.uint8)
    expected = Predictor(weights, dygraph=True)(image)

    caplog.set_level('WARNING')
    predictor = Predictor(weights)
    assert isinstance(predictor.net, Yolact)   # this process survived and runs dygraph
    warnings = _inference_warnings(caplog)
    assert len(warnings) == 1 and 'crashed with SIGSEGV' in warnings[0] and cfg.name in warnings[0], warnings
    got = predictor(image)
    np.testing.assert_array_equal(got['boxes'], expected['boxes'])
    np.testing.assert_array_equal(got['scores'], expected['scores'])
    assert [n[-len(export_cache.FAILED_SUFFIX):] for n in _entries(cache)] == [export_cache.FAILED_SUFFIX]   # no entry
    assert len(runs.read_text().split()) == 1

    # The verdict is kept: no second check, the same one warning naming the cause.
    caplog.clear()
    assert isinstance(Predictor(weights).net, Yolact)
    assert len(runs.read_text().split()) == 1
    warnings = _inference_warnings(caplog)
    assert len(warnings) == 1 and 'crashed with SIGSEGV' in warnings[0]

    # Another Paddle version checks again (and, with a working check, uses the export).
    monkeypatch.setattr(paddle, '__version__', paddle.__version__ + '.post1')
    Predictor(weights)
    assert len(runs.read_text().split()) == 2
    monkeypatch.setattr(paddle, '__version__', paddle.__version__ + '.post2')
    monkeypatch.setattr(export_cache, '_CHECK_CHILD', real_child)
    assert isinstance(Predictor(weights).net, StaticYolact)


def test_an_export_that_differs_from_dygraph_is_not_cached(tmp_path, monkeypatch, caplog):
    cache = str(tmp_path / 'cache')
    cfg, net = _small_net()
    _, other = _small_net(seed=1)
    weights = _weights(tmp_path, net)
    save = export_cache.save_static
    # The graph written is another network's: the real child's comparison must catch it.
    monkeypatch.setattr(export_cache, 'save_static', lambda net_, *a, **k: save(other, *a, **k))
    caplog.set_level('WARNING')
    assert cached_export(lambda: net, cfg, weights, cache_dir=cache) is None
    warnings = _inference_warnings(caplog)
    assert len(warnings) == 1 and 'differs from dygraph' in warnings[0], warnings
    names = _entries(cache)   # no entry, only the verdict
    assert len(names) == 1 and names[0].endswith(export_cache.FAILED_SUFFIX), names


@pytest.mark.parametrize('damage', ['truncate_params', 'truncate_program', 'delete_meta', 'flip_params'])
def test_a_damaged_cache_entry_is_found_and_exported_again(tmp_path, caplog, unchecked, damage):
    cache = str(tmp_path / 'cache')
    cfg, net = _small_net()
    weights = _weights(tmp_path, net)
    calls = []

    def load_net():
        calls.append(1)
        return net

    prefix = cached_export(load_net, cfg, weights, cache_dir=cache)
    program = '.json' if onnx_export.PADDLE_VERSION >= (3, 0) else '.pdmodel'   # Paddle 2.6: no PIR program
    name, change = {'truncate_params': ('.pdiparams', 'truncate'), 'truncate_program': (program, 'truncate'),
                    'delete_meta': (META_SUFFIX, 'delete'), 'flip_params': ('.pdiparams', 'flip')}[damage]
    path = prefix + name
    if change == 'truncate':
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    elif change == 'delete':
        os.remove(path)
    else:   # same size, other bytes, later mtime
        with open(path, 'r+b') as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    caplog.set_level('WARNING')
    assert cached_export(load_net, cfg, weights, cache_dir=cache) == prefix
    assert len(calls) == 2
    warnings = _inference_warnings(caplog)
    assert len(warnings) == 1 and 'damaged' in warnings[0] and os.path.basename(path) in warnings[0], warnings
    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    with paddle.no_grad():
        expected = net(x)
    np.testing.assert_allclose(StaticYolact(prefix)(x)['conf'].numpy(), expected['conf'].numpy(), rtol=0, atol=1e-4)
    assert _entries(cache) == [os.path.basename(os.path.dirname(prefix))]
    # Intact now: a hit, no export.
    assert cached_export(load_net, cfg, weights, cache_dir=cache) == prefix and len(calls) == 2
def test_onnx_export_on_paddle_2_names_the_paddle2onnx_it_needs(tmp_path, monkeypatch):
    """paddle2onnx 2.x refuses Paddle < 3 at import; on Paddle 2.6 the export says which paddle2onnx works."""
    if importlib.util.find_spec('paddle2onnx') is None:
        pytest.skip('paddle2onnx not installed')
    cfg, net = _small_net()
    monkeypatch.setattr(onnx_export, 'PADDLE_VERSION', (2, 6))
    monkeypatch.setattr(onnx_export, 'paddle2onnx_version', lambda: '2.1.0')
    with pytest.raises(ConfigError, match=r'paddle2onnx 2\.1\.0 needs Paddle >= 3.*"paddle2onnx>=1\.3,<2"'):
        export_onnx(net, cfg, str(tmp_path / 'onnx' / 'shapes'))
    assert not os.path.exists(tmp_path / 'onnx')
