"""Weights and optimizer files are read without running code (utils/weights/paddle_reader.py, utils/weights/safe_pickle.py).

A ``.pdparams`` / ``.pdopt`` is a pickle; one with a ``__reduce__`` payload ran it
through plain ``paddle.load`` in every program that loads weights. Each entry point
gets a payload that would create a marker file; the marker must not appear and the
program must print one line naming the file and the refused object. The reader must
also give back exactly what paddle.load gives for every file paddle.save writes.
"""
import collections
import io
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

import eval as eval_script
import train
from data.config import get_config
from tests.conftest import ROOT
from tools.make_shapes_dataset import make_shapes_dataset
from utils.training import checkpoint
from utils.errors import EXIT_USER_ERROR, WeightsError, run_cli
from utils.weights.paddle_reader import PaddleFileError, load_paddle_file
from utils.predictor import Predictor
from yolact import Yolact


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()',)


def _write_payload(path, payload_class, marker, wrap):
    """A pickle whose loading would create ``marker``; wrap: 'state dict' (one tensor replaced by
    the payload, the rest a real state dict) or 'optimizer' (as train.py's .pdopt)."""
    if wrap == 'state dict':
        obj = {k: v.numpy() for k, v in paddle.nn.Linear(2, 3).state_dict().items()}
        obj['weight'] = payload_class(marker)
        obj['StructuredToParameterName@@'] = {'weight': 'linear_0.w_0', 'bias': 'linear_0.b_0'}
    else:
        obj = {'accumulators': {'conv.weight@velocity_0': payload_class(marker)}}
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=4)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=2, num_val=1, size=64, seed=0)


@pytest.fixture(scope='module')
def good_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('good') / 'yolact_shapes_1_10.pdparams')
    paddle.save(Yolact.from_config(get_config('yolact_shapes')).state_dict(), path)
    return path


def _error_line(capsys, main, argv):
    assert run_cli(main, argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


def _train_argv(shapes, tmp_path, *extra):
    return ['--config', 'yolact_shapes', '--batch_size', '1', '--num_workers', '0', '--validation_epoch', '-1',
            '--backbone_weights', 'none', '--max_iter', '1', '--train_images', shapes.train_images,
            '--train_info', shapes.train_info, '--save_folder', str(tmp_path / 'w'),
            '--log_folder', str(tmp_path / 'logs'), *extra]


@pytest.mark.parametrize('payload, refused', [(_SystemPayload, r'(posix|os)\.system'), (_ExecPayload, 'builtins.exec')])
@pytest.mark.parametrize('entry', ['eval.py --trained_model', 'Predictor', 'train.py --trained_model'])
def test_a_weights_payload_never_runs(capsys, shapes, tmp_path, entry, payload, refused):
    marker = tmp_path / 'MARKER'
    path = tmp_path / 'yolact_shapes_1_10.pdparams'
    _write_payload(path, payload, str(marker), 'state dict')
    if entry == 'Predictor':
        with pytest.raises(WeightsError) as info:
            Predictor(str(path))
        line = f'error: {info.value}'
    elif entry == 'eval.py --trained_model':
        line = _error_line(capsys, eval_script.main, ['--trained_model', str(path), '--image',
                                                      f'{shapes.train_images}/000001.jpg:{tmp_path}/out.png'])
    else:
        line = _error_line(capsys, train.main, _train_argv(shapes, tmp_path, '--trained_model', str(path)))
    assert not marker.exists()
    assert '\n' not in line
    assert re.match(rf'^error: yolact_shapes_1_10\.pdparams: unsupported object {refused} in the pickle', line), line


def _resumable_copy(tmp_path, good_weights):
    """good_weights as <tmp_path>/run/yolact_shapes_1_10.pdparams; returns (weights, optimizer, record) paths."""
    folder = tmp_path / 'run'
    folder.mkdir()
    weights = folder / 'yolact_shapes_1_10.pdparams'
    weights.write_bytes(open(good_weights, 'rb').read())
    return (weights,) + checkpoint.sidecar_paths(str(weights))


def test_an_optimizer_payload_never_runs_on_resume(capsys, shapes, tmp_path, good_weights):
    weights, opt_path, state_path = _resumable_copy(tmp_path, good_weights)
    marker = tmp_path / 'MARKER'
    _write_payload(opt_path, _SystemPayload, str(marker), 'optimizer')
    with open(state_path, 'w') as f:
        json.dump({'iteration': 10, 'epoch': 1, 'config': 'yolact_shapes'}, f)
    line = _error_line(capsys, train.main, _train_argv(shapes, tmp_path, '--resume', str(weights)))
    assert not marker.exists()
    assert line.startswith('error: yolact_shapes_1_10.pdopt: unsupported object') and 'system' in line


def test_a_real_eval_process_refuses_the_payload(tmp_path):
    marker = tmp_path / 'MARKER'
    path = tmp_path / 'yolact_shapes_1_10.pdparams'
    _write_payload(path, _SystemPayload, str(marker), 'state dict')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--trained_model', str(path),
                             '--image', f'{tmp_path}/in.png:{tmp_path}/out.png'],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == EXIT_USER_ERROR and 'Traceback' not in result.stderr, result.stderr
    assert not marker.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'yolact_shapes_1_10.pdparams: unsupported object' in errors[0]


def test_a_corrupt_optimizer_file_on_resume_is_one_line(capsys, shapes, tmp_path, good_weights):
    weights, opt_path, state_path = _resumable_copy(tmp_path, good_weights)
    with open(state_path, 'w') as f:
        json.dump({'iteration': 10, 'epoch': 1, 'config': 'yolact_shapes'}, f)
    for content, message in [(b'\x80\x04garbage', 'yolact_shapes_1_10.pdopt: truncated'),
                             (pickle.dumps([1, 2]), 'yolact_shapes_1_10.pdopt: not an optimizer state'),
                             (pickle.dumps({'accumulators': {'nothing@velocity_0': np.zeros(2, np.float32)}}),
                              'yolact_shapes_1_10.pdopt: does not fit the model')]:
        with open(opt_path, 'wb') as f:
            f.write(content)
        line = _error_line(capsys, train.main, _train_argv(shapes, tmp_path, '--resume', str(weights)))
        assert message in line, line


# ------------------------------------------------------------ the format --

def _model_and_optimizer():
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.AdaptiveAvgPool2D(1),
                               paddle.nn.Flatten(), paddle.nn.Linear(4, 2))
    schedule = paddle.optimizer.lr.LinearWarmup(paddle.optimizer.lr.PiecewiseDecay([10, 20], [0.1, 0.01, 0.001]),
                                                5, 0.0, 0.1)
    optimizer = paddle.optimizer.Momentum(learning_rate=schedule, momentum=0.9, parameters=net.parameters(),
                                          weight_decay=5e-4)
    net(paddle.randn([1, 3, 8, 8])).mean().backward()
    optimizer.step()
    schedule.step()
    return net, optimizer


def _assert_same(expected, got, where='top'):
    """Same structure, types, tensor names, dtypes and values (bit for bit)."""
    assert type(expected) is type(got), (where, type(expected), type(got))
    if isinstance(expected, dict):
        assert list(expected) == list(got), where
        for key in expected:
            _assert_same(expected[key], got[key], f'{where}.{key}')
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (e, g) in enumerate(zip(expected, got)):
            _assert_same(e, g, f'{where}[{i}]')
    elif isinstance(expected, paddle.Tensor):
        assert (expected.name, expected.dtype, expected.shape) == (got.name, got.dtype, got.shape), where
        np.testing.assert_array_equal(expected.numpy(), got.numpy())
    elif isinstance(expected, np.ndarray):
        assert expected.dtype == got.dtype and got.flags.writeable, where
        np.testing.assert_array_equal(expected, got)
    else:
        assert expected == got, where


@pytest.mark.parametrize('protocol', [2, 3, 4])
def test_reads_what_paddle_save_writes_as_paddle_load_does(tmp_path, protocol):
    """A model state dict, an SGD-momentum optimizer state with its LR-scheduler state, train.py's .pdopt
    layout (nested, saved through paddle's pickler) and every dtype a state dict holds."""
    net, optimizer = _model_and_optimizer()
    scaler = paddle.amp.GradScaler(enable=True, init_loss_scaling=1024.0)
    objects = {
        'model.pdparams': net.state_dict(),
        'optimizer.pdopt': optimizer.state_dict(),
        'train_py.pdopt': {'accumulators': checkpoint.optimizer_state_by_name(optimizer, net),
                           'grad_scaler': scaler.state_dict()},
        'dtypes.pdparams': {name: paddle.to_tensor(np.arange(6).reshape(2, 3).astype(name))
                            for name in ('float32', 'float64', 'float16', 'int64', 'int32', 'uint8', 'bool')},
        'numpy_scalars.pdopt': {'LR_Scheduler': {'last_lr': np.float64(0.5), 'last_epoch': np.int64(3)},
                                'w': net.state_dict()['0.weight']},
    }
    assert 'LR_Scheduler' in objects['optimizer.pdopt']
    for name, obj in objects.items():
        path = str(tmp_path / name)
        paddle.save(obj, path, protocol=protocol)
        for return_numpy in (False, True):
            _assert_same(paddle.load(path, return_numpy=return_numpy), load_paddle_file(path, return_numpy))


def test_a_resumed_optimizer_continues_as_with_paddle_load(tmp_path):
    """A checkpoint resumed by load_checkpoint (our reader) takes the next SGD step exactly as one whose
    .pdopt is read by paddle.load."""
    net, optimizer = _model_and_optimizer()
    path = str(tmp_path / 'net_1_1.pdparams')
    checkpoint.save_checkpoint(path, net, optimizer, checkpoint.CheckpointRecord(iteration=1))
    steps = []
    for use_paddle_load in (True, False):
        fresh, fresh_optimizer = _model_and_optimizer()
        if use_paddle_load:
            fresh.set_state_dict(paddle.load(path))
            opt_state = paddle.load(checkpoint.sidecar_paths(path)[0])
            checkpoint.load_optimizer_state_by_name(fresh_optimizer, fresh, opt_state['accumulators'])
        else:
            assert checkpoint.load_checkpoint(path, fresh, fresh_optimizer) == (checkpoint.CheckpointRecord(iteration=1), True)
        fresh(paddle.ones([1, 3, 8, 8])).mean().backward()
        fresh_optimizer.step()
        steps.append([p.numpy() for p in fresh.parameters()] + [fresh_optimizer.get_lr()])
    for a, b in zip(*steps):
        np.testing.assert_array_equal(a, b)


def test_big_parameters_split_by_paddle_save_are_joined(tmp_path):
    """Under protocol 2/3 paddle.save splits arrays over 1 GB into ``<key>@@.<i>`` slices of the flattened
    array listed in ``UnpackBigParamInfor@@`` (paddle.framework.io_utils._unpack_saved_dict); the same
    layout at a small size, read by paddle.load and by us."""
    big = np.arange(40, dtype=np.float32).reshape(5, 8)
    parts = {f'big@@.{i}': big.flatten()[i * 16:(i + 1) * 16] for i in range(3)}
    split = {'small': np.ones(3, np.float32), **parts,
             'StructuredToParameterName@@': {'big': 'b_0', 'small': 's_0'},
             'UnpackBigParamInfor@@': {'big': {'OriginShape': big.shape, 'slices': list(parts)}}}
    path = str(tmp_path / 'split.pdparams')
    with open(path, 'wb') as f:
        pickle.dump(split, f, protocol=2)
    for return_numpy in (False, True):
        _assert_same(paddle.load(path, return_numpy=return_numpy), load_paddle_file(path, return_numpy))
    np.testing.assert_array_equal(load_paddle_file(path, return_numpy=True)['big'], big)


@pytest.mark.parametrize('obj, message', [
    (np.array([1, 'a'], dtype=object), "unsupported array: unsupported dtype 'O8'"),
    (np.zeros(2, dtype=[('a', 'f4'), ('b', 'i4')]), 'unsupported dtype'),
    (collections.Counter(a=1), 'unsupported object collections.Counter'),
    ({1.5: np.zeros(2)}, 'a dict key of type float'),
    (io.BytesIO(b'x'), 'unsupported object _io.BytesIO'),
])
def test_anything_but_numeric_arrays_and_plain_data_is_refused(tmp_path, obj, message):
    path = str(tmp_path / 'x.pdparams')
    with open(path, 'wb') as f:
        pickle.dump({'w': obj} if not isinstance(obj, dict) else obj, f, protocol=4)
    with pytest.raises(PaddleFileError, match=r'^x\.pdparams: ') as info:
        load_paddle_file(path)
    assert message in str(info.value) and '\n' not in str(info.value)


def test_a_self_referencing_pickle_is_refused(tmp_path):
    loop = []
    loop.append(loop)
    path = str(tmp_path / 'loop.pdparams')
    with open(path, 'wb') as f:
        pickle.dump({'w': loop}, f, protocol=4)
    with pytest.raises(PaddleFileError, match='nested deeper than'):
        load_paddle_file(path)


def test_empty_and_truncated_files(tmp_path, good_weights):
    empty = tmp_path / 'empty.pdparams'
    empty.write_bytes(b'')
    with pytest.raises(PaddleFileError, match=r'^empty\.pdparams: empty file'):
        load_paddle_file(str(empty))
    cut = tmp_path / 'cut.pdparams'
    cut.write_bytes(open(good_weights, 'rb').read()[:5000])
    with pytest.raises(PaddleFileError, match=r'^cut\.pdparams: truncated'):
        load_paddle_file(str(cut))


@pytest.mark.parametrize('module, name', [('numpy', 'dtype'), ('collections', 'OrderedDict'), ('numpy', 'ndarray')])
def test_a_pickle_cannot_modify_an_allowed_global(tmp_path, module, name):
    """BUILD on a global (``setattr(numpy.dtype stand-in, '__init__', ...)``) would outlive the load."""
    slot_state = b'N}X\x08\x00\x00\x00__init__K\x01s\x86'  # (None, {'__init__': 1})
    path = tmp_path / 'build.pdparams'
    path.write_bytes(b'\x80\x02c' + f'{module}\n{name}\n'.encode() + slot_state + b'b.')
    with pytest.raises(PaddleFileError, match=r'^build\.pdparams: corrupt pickle: TypeError: .* cannot be given a state'):
        load_paddle_file(str(path))
    good = str(tmp_path / 'good.pdparams')
    paddle.save({'w': paddle.ones([2])}, good)
    np.testing.assert_array_equal(load_paddle_file(good, return_numpy=True)['w'], np.ones(2, np.float32))
