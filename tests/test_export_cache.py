"""The export cache is an optimisation: a read-only, full or corrupt YOLACT_CACHE never stops inference.

Tests run as root, where a chmod'd folder stays writable, so a read-only file
system and a full disk are simulated at the system calls (os.mkdir raising
EROFS, a write raising ENOSPC, shutil.disk_usage reporting little room), and a
folder that cannot be created is a path through a regular file.
"""
import errno
import os

import cv2
import numpy as np
import paddle
import pytest

import eval as eval_script
from data.config import get_config
from tools import benchmark as benchmark_tool
from utils.deploy import export_cache
from utils.deploy.export_cache import EntryState, ExportCache, cached_export
from utils.deploy.runners import StaticYolact
from utils.predictor import Predictor
from yolact import Yolact


@pytest.fixture(scope='module')
def small():
    """(cfg, net): yolact_shapes with trained-like random weights (tools/benchmark.py)."""
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, 0)
    net.eval()
    return cfg, net


@pytest.fixture
def weights(tmp_path, small):
    """The small net's weights under a published-style name, so Predictor and eval.py resolve the config."""
    path = str(tmp_path / 'yolact_shapes_1_10.pdparams')
    paddle.save(small[1].state_dict(), path)
    return path


@pytest.fixture
def unchecked(monkeypatch):
    """New entries skip the child-process check (tests/test_export.py runs it): ~5 s less per export
    (2-core AMD EPYC, 2026-12-03)."""
    monkeypatch.setattr(export_cache, 'check_export', lambda net, path_prefix: None)


def _cache_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == 'utils.deploy.export_cache' and r.levelname == 'WARNING']


def _image():
    return np.random.RandomState(0).randint(0, 255, (90, 120, 3)).astype(np.uint8)


def _read_only(monkeypatch, folder):
    """Creating anything inside ``folder`` fails as on a read-only file system (EROFS)."""
    mkdir = os.mkdir
    inside = os.path.abspath(folder) + os.sep

    def read_only_mkdir(path, *args, **kwargs):
        if os.path.abspath(path).startswith(inside):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, 'mkdir', read_only_mkdir)


def test_a_cache_folder_that_cannot_be_created_runs_dygraph_with_one_warning(tmp_path, monkeypatch, caplog,
                                                                              weights):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    cache = str(blocker / 'cache')
    monkeypatch.setenv('YOLACT_CACHE', cache)
    caplog.set_level('WARNING')
    predictor = Predictor(weights)
    assert isinstance(predictor.net, Yolact)
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and cache in warnings[0] and 'dygraph' in warnings[0], warnings
    expected = Predictor(weights, dygraph=True)(_image())
    got = predictor(_image())
    np.testing.assert_array_equal(got['boxes'], expected['boxes'])
    np.testing.assert_array_equal(got['scores'], expected['scores'])


def test_eval_runs_with_a_cache_it_cannot_write(tmp_path, monkeypatch, caplog, weights):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    monkeypatch.setenv('YOLACT_CACHE', str(blocker / 'cache'))
    src, out = str(tmp_path / 'in.png'), str(tmp_path / 'out.png')
    cv2.imwrite(src, _image())
    caplog.set_level('WARNING')
    assert eval_script.main(['--trained_model', weights, '--image', f'{src}:{out}']) == 0
    assert cv2.imread(out).shape == (90, 120, 3)
    assert len(_cache_warnings(caplog)) == 1


def test_a_read_only_cache_serves_its_entries_and_new_weights_run_dygraph(tmp_path, monkeypatch, caplog, small,
                                                                          weights, unchecked):
    cfg, net = small
    cache = str(tmp_path / 'cache')
    prefix = cached_export(lambda: net, cfg, weights, cache_dir=cache)
    assert ExportCache(cache).state(ExportCache(cache).entry(cfg, weights))[0] is EntryState.VALID
    other = str(tmp_path / 'other.pdparams')
    paddle.save({k: v + 1 for k, v in net.state_dict().items()}, other)
    before = sorted(os.listdir(cache))

    _read_only(monkeypatch, cache)
    caplog.set_level('WARNING')
    assert cached_export(lambda: net, cfg, weights, cache_dir=cache) == prefix   # a hit writes nothing
    assert _cache_warnings(caplog) == []
    built = []
    assert cached_export(lambda: built.append(1) or net, cfg, other, cache_dir=cache) is None
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and cache in warnings[0] and 'Read-only file system' in warnings[0], warnings
    assert built == [1] and sorted(os.listdir(cache)) == before

    # Its entry damaged: still one warning, which says both.
    with open(prefix + '.pdiparams', 'r+b') as f:
        f.truncate(100)
    caplog.clear()
    assert cached_export(lambda: net, cfg, weights, cache_dir=cache) is None
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and 'Read-only file system' in warnings[0] and 'damaged' in warnings[0], warnings


def test_a_full_cache_runs_dygraph_and_leaves_nothing_behind(tmp_path, monkeypatch, caplog, small, weights,
                                                             unchecked):
    cfg, net = small
    cache = str(tmp_path / 'cache')
    os.makedirs(cache)
    caplog.set_level('WARNING')
    real_usage = export_cache.shutil.disk_usage

    # Too little room to start: no export is attempted.
    saves = []
    real_save = export_cache.save_static
    monkeypatch.setattr(export_cache, 'save_static', lambda *a, **k: saves.append(1) or real_save(*a, **k))
    with monkeypatch.context() as m:
        m.setattr(export_cache.shutil, 'disk_usage', lambda path: real_usage(path)._replace(free=2 ** 20))
        assert cached_export(lambda: net, cfg, weights, cache_dir=cache) is None
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and cache in warnings[0] and '1 MB free' in warnings[0], warnings
    assert saves == [] and os.listdir(cache) == []

    # The disk fills up during the export (a write fails with ENOSPC): no entry, no partial folder.
    def fills_up(net_, cfg_, path_prefix, *args, **kwargs):
        real_save(net_, cfg_, path_prefix, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path_prefix + '.yolact.json')

    caplog.clear()
    with monkeypatch.context() as m:
        m.setattr(export_cache, 'save_static', fills_up)
        assert cached_export(lambda: net, cfg, weights, cache_dir=cache) is None
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and cache in warnings[0] and 'No space left on device' in warnings[0], warnings
    assert os.listdir(cache) == []

    # Paddle writes a full disk's truncated files without an error; their check fails. That is
    # no verdict on the export: the next run, with room, exports and checks again.
    checks = []

    def failing_check(net_, path_prefix):
        checks.append(1)
        return 'Paddle Inference failed running the export: truncated parameters'

    monkeypatch.setattr(export_cache, 'check_export', failing_check)
    usage = iter([real_usage(cache), real_usage(cache)._replace(free=0)])
    caplog.clear()
    with monkeypatch.context() as m:
        m.setattr(export_cache.shutil, 'disk_usage', lambda path: next(usage))
        assert cached_export(lambda: net, cfg, weights, cache_dir=cache) is None
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and cache in warnings[0] and 'free after the export' in warnings[0], warnings
    assert os.listdir(cache) == [] and checks == [1]
    caplog.clear()
    assert cached_export(lambda: net, cfg, weights, cache_dir=cache) is None
    assert checks == [1, 1] and [n for n in os.listdir(cache) if n.endswith(export_cache.FAILED_SUFFIX)]
    assert 'failed its check' in _cache_warnings(caplog)[0]


def test_a_corrupt_entry_and_a_corrupt_verdict_are_replaced(tmp_path, caplog, small, weights, unchecked):
    cfg, net = small
    cache = ExportCache(str(tmp_path / 'cache'))
    entry = cache.entry(cfg, weights)
    os.makedirs(cache.folder)
    with open(entry.folder, 'wb') as f:            # the entry's name holds garbage, not a folder
        f.write(b'\x00garbage')
    with open(entry.verdict_path, 'w') as f:       # a verdict cut short: unreadable, so checked again
        f.write('{"cause": ')
    assert cache.state(entry)[0] is EntryState.DAMAGED
    caplog.set_level('WARNING')
    assert cache.get(lambda: net, cfg, weights) == entry.prefix
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and 'damaged' in warnings[0], warnings
    assert cache.state(entry)[0] is EntryState.VALID
    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    with paddle.no_grad():
        expected = net(x)['conf'].numpy()
    np.testing.assert_allclose(StaticYolact(entry.prefix)(x)['conf'].numpy(), expected, rtol=0, atol=1e-4)
