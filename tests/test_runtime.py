"""utils/runtime.py: DataLoader shared memory, COCO zips, the MKL kernels. Finding COCO: test_coco_root.py."""
import collections
import dataclasses
import json
import logging
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from data.config import SHAPES, get_config
from tests.conftest import ROOT
from utils import runtime
from utils.errors import ConfigError, DatasetError
from utils.runtime import (dataloader_shared_memory, eval_sample_bytes, training_batch_bytes,
                           unpack_zips)

MB = 2 ** 20
Usage = collections.namedtuple('Usage', 'total used free')


def _fake_shm(monkeypatch, free):
    def disk_usage(path):
        assert path == '/dev/shm'
        if free is None:
            raise FileNotFoundError(path)
        return Usage(free, 0, free)
    monkeypatch.setattr(runtime.shutil, 'disk_usage', disk_usage)


def test_shared_memory_auto_follows_free_space(monkeypatch, caplog):
    train_batch = training_batch_bytes(550, 8)
    assert 95 * MB < train_batch < 105 * MB      # 8 x (3 + 7.3) x 550^2 x 4 bytes
    _fake_shm(monkeypatch, 64 * MB)              # AI Studio, Docker's default
    with caplog.at_level(logging.INFO, logger='utils.runtime'):
        assert dataloader_shared_memory(4, train_batch) is False
    assert 'shared memory off: /dev/shm has 64 MB free, 4 workers need' in caplog.text
    # An eval sample is small: 2 workers x 2 prefetched x 3.6 MB x 2 = 29 MB fits in 64 MB (MB = 2**20 bytes here).
    assert dataloader_shared_memory(2, eval_sample_bytes(550)) is True
    _fake_shm(monkeypatch, 27 * MB)             # 2 x 2 x 3.63e6 x 2 bytes = 27.7 MB do not fit
    assert dataloader_shared_memory(2, eval_sample_bytes(550)) is False
    _fake_shm(monkeypatch, 2048 * MB)
    assert dataloader_shared_memory(4, train_batch) is True
    _fake_shm(monkeypatch, None)                 # no /dev/shm at all
    assert dataloader_shared_memory(1, 1000) is False


def test_shared_memory_forced_and_without_workers(monkeypatch):
    _fake_shm(monkeypatch, 1 * MB)
    assert dataloader_shared_memory(4, training_batch_bytes(550, 8), setting='on') is True
    _fake_shm(monkeypatch, 10 ** 12)
    assert dataloader_shared_memory(4, 1000, setting='off') is False
    assert dataloader_shared_memory(0, 1000, setting='on') is False
    with pytest.raises(ConfigError, match='maybe'):
        dataloader_shared_memory(2, 1000, setting='maybe')


def test_training_batch_bytes_match_collated_batch(tmp_path):
    """The size rule against what data/coco.py really hands the DataLoader for yolact_base."""
    from data.coco import COCODetection, detection_collate
    from data.transforms import SSDAugmentation
    subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_shapes_dataset.py'), '--out',
                    str(tmp_path), '--num_train', '8', '--num_val', '1', '--size', '300',
                    '--max_objects', '6'], check=True, capture_output=True)
    ds = dataclasses.replace(SHAPES, train_images=str(tmp_path / 'train'),
                             train_info=str(tmp_path / 'annotations' / 'instances_train.json'))
    cfg = get_config('yolact_base', dataset=ds)
    data = COCODetection.from_config(cfg, SSDAugmentation.from_config(cfg, rng=np.random.RandomState(0)))
    images, targets, masks, _ = detection_collate([data[i] for i in range(8)])
    objects = sum(len(t) for t in targets)
    collated = images.nbytes + sum(m.nbytes for m in masks) + sum(t.nbytes for t in targets)
    expected = training_batch_bytes(550, 8, objects / 8)
    assert objects > 8
    assert expected <= collated <= expected + objects * 5 * 4


def _zip(path, members):
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_unpack_zips_idempotent_and_merges_annotations(tmp_path):
    zips, dest = tmp_path / 'data7122', tmp_path / 'coco'
    zips.mkdir()
    _zip(zips / 'val2017.zip', {'val2017/000000000139.jpg': b'x' * 10, 'val2017/000000000285.jpg': b'y' * 7})
    _zip(zips / 'annotations_trainval2017.zip', {'annotations/instances_val2017.json': b'{"a": 1}'})
    _zip(zips / 'image_info_test2017.zip', {'annotations/image_info_test-dev2017.json': b'{"b": 2}'})
    names = ['val2017.zip', 'annotations_trainval2017.zip', 'image_info_test2017.zip', 'train2017.zip']
    assert unpack_zips(str(zips), str(dest), names) == {
        'val2017.zip': 'unpacked', 'annotations_trainval2017.zip': 'unpacked',
        'image_info_test2017.zip': 'unpacked', 'train2017.zip': 'absent'}
    assert (dest / 'val2017' / '000000000285.jpg').read_bytes() == b'y' * 7
    assert json.loads((dest / 'annotations' / 'image_info_test-dev2017.json').read_text()) == {'b': 2}
    assert json.loads((dest / 'annotations' / 'instances_val2017.json').read_text()) == {'a': 1}
    assert sorted(os.listdir(dest)) == ['annotations', 'val2017']          # no temporary folder left
    mtime = os.path.getmtime(dest / 'val2017' / '000000000139.jpg')
    assert unpack_zips(str(zips), str(dest), names[:3]) == dict.fromkeys(names[:3], 'present')
    assert os.path.getmtime(dest / 'val2017' / '000000000139.jpg') == mtime
    # A truncated file (an interrupted copy) and an interrupted unpacking's leftovers: unpacked again.
    (dest / 'val2017' / '000000000139.jpg').write_bytes(b'x')
    (dest / '.unpacking-val2017.zip').mkdir()
    assert unpack_zips(str(zips), str(dest), ['val2017.zip']) == {'val2017.zip': 'unpacked'}
    assert (dest / 'val2017' / '000000000139.jpg').read_bytes() == b'x' * 10
    assert sorted(os.listdir(dest)) == ['annotations', 'val2017']
    (zips / 'test2017.zip').write_bytes(b'not a zip')
    with pytest.raises(DatasetError, match='test2017.zip'):
        unpack_zips(str(zips), str(dest), ['test2017.zip'])


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 avx {avx2} fma

processor\t: 1
vendor_id\t: {vendor}
flags\t\t: fpu sse2 avx avx2 fma
"""


@pytest.mark.parametrize('vendor, avx2, expected', [('AuthenticAMD', 'avx2', True), ('AuthenticAMD', '', False),
                                                    ('GenuineIntel', 'avx2', False)])
def test_mkl_avx2_only_on_amd_with_avx2(tmp_path, monkeypatch, vendor, avx2, expected):
    monkeypatch.delenv(runtime.MKL_CPU_TYPE_VAR, raising=False)
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(CPUINFO.format(vendor=vendor, model='Some CPU', avx2=avx2))
    assert runtime.use_mkl_avx2_on_amd(str(cpuinfo)) is expected
    assert os.environ.get(runtime.MKL_CPU_TYPE_VAR) == ('5' if expected else None)


def test_mkl_cpu_type_set_by_the_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.MKL_CPU_TYPE_VAR, '4')
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(CPUINFO.format(vendor='AuthenticAMD', model='Some CPU', avx2='avx2'))
    assert not runtime.use_mkl_avx2_on_amd(str(cpuinfo))
    assert os.environ[runtime.MKL_CPU_TYPE_VAR] == '4'
    assert not runtime.use_mkl_avx2_on_amd(str(tmp_path / 'missing'))


# A convolution whose result differs between MKL's generic and AVX2 GEMM kernels (their
# accumulation orders differ), printed bit for bit.
CONV_PROBE = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
from utils.runtime import select_device
if sys.argv[1] == 'select_device':
    select_device('cpu', cpu_threads=1)
import paddle
paddle.seed(0)
x = paddle.to_tensor(np.random.RandomState(0).randn(2, 64, 33, 33).astype('float32'))
conv = paddle.nn.Conv2D(64, 64, 3, padding=1)
print(conv(x).numpy().astype(np.float64).sum().hex())
"""


def _conv_probe(mode, cpu_type):
    env = {k: v for k, v in os.environ.items() if k != runtime.MKL_CPU_TYPE_VAR}
    if cpu_type is not None:
        env[runtime.MKL_CPU_TYPE_VAR] = cpu_type
    env['OMP_NUM_THREADS'] = '1'
    out = subprocess.run([sys.executable, '-c', CONV_PROBE.format(root=ROOT), mode], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.split()[-1]


def test_select_device_switches_mkl_before_its_first_call():
    """On an AMD CPU, select_device's process computes what MKL's AVX2 kernels compute, not its generic ones."""
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
        cpuinfo = f.read(1 << 16)
    if 'AuthenticAMD' not in cpuinfo or ' avx2' not in cpuinfo:
        pytest.skip('MKL_DEBUG_CPU_TYPE is only set on an AMD CPU with AVX2')
    generic = _conv_probe('plain', None)
    avx2 = _conv_probe('plain', '5')
    assert generic != avx2, 'the probe no longer tells the two kernels apart'
    assert _conv_probe('select_device', None) == avx2
