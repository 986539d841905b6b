"""Weight conversion: .pth reading without torch, rename/drop rules, the CLI.

torch is used here only to WRITE .pth files (make_weights.save_pth, torch.save).
Every conversion through the CLI runs in a subprocess where ``import torch``
fails, so the reader and converter are proven torch-free.
"""
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import paddle
import pytest

from backbone import construct_backbone
from data.config import get_config
from tests.conftest import ROOT, make_weights_module, needs_reference
from utils.errors import run_cli as run_cli_in_process
from utils.weights.loader import load_backbone_weights
from utils.weights.convert import (ConversionError, convert_state_dict, fpn_downsample_drop,
                                   imagenet_backbone, save_params)
from utils.weights.pth_reader import PthError, load_pth
from yolact import Yolact

torch = pytest.importorskip('torch')  # test-only: writes the .pth files

CLI = os.path.join(ROOT, 'tools', 'convert_weights.py')
ALL_CONFIGS = ('yolact_base', 'yolact_im700', 'yolact_resnet50', 'yolact_darknet53',
               'yolact_plus_base', 'yolact_plus_resnet50')

# Runs a script with torch made unimportable (sys.modules[name] = None makes
# every `import torch` raise ImportError).
BLOCK_TORCH = """import runpy, sys
sys.modules['torch'] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def paddle_names(state_dict):
    """What the conversion rules make of a reference state dict: BN renames, counters dropped."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith('.num_batches_tracked'):
            continue
        key = key.replace('.running_mean', '._mean').replace('.running_var', '._variance')
        out[key] = value
    return out


def assert_bit_exact(actual, expected):
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))[:10]
    for key, value in expected.items():
        got = np.asarray(actual[key])
        assert got.dtype == value.dtype and got.shape == value.shape, (key, got.dtype, got.shape)
        np.testing.assert_array_equal(got, value, err_msg=key)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """Scratch folder with the torch-blocking launcher."""
    d = tmp_path_factory.mktemp('convert')
    (d / 'block_torch.py').write_text(BLOCK_TORCH)
    return d


def run_cli(work, *args):
    """The CLI in a fresh interpreter without torch, from an unrelated cwd and no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, str(work / 'block_torch.py'), CLI, *map(str, args)],
                          cwd=str(work), env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def mw():
    return make_weights_module()


@pytest.fixture(scope='module')
def resnet50(work, mw):
    """yolact_resnet50 stand-in weights and the same checkpoint in both torch.save formats."""
    state_dict = mw.make_state_dict(mw.load_manifest('yolact_resnet50'), seed=0)
    files = {}
    for fmt in ('legacy', 'zip'):
        (work / fmt).mkdir()
        files[fmt] = work / fmt / 'yolact_resnet50_54_800000.pth'
        mw.save_pth(state_dict, str(files[fmt]), legacy=fmt == 'legacy')
    return state_dict, files


def save(obj, path, fmt):
    torch.save(obj, str(path), _use_new_zipfile_serialization=fmt == 'zip')
    return path


# ------------------------------------------------------------------ reader --
@needs_reference
@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_reader_is_bit_exact(resnet50, fmt):
    state_dict, files = resnet50
    out = load_pth(str(files[fmt]))
    assert list(out) == list(state_dict)  # file order kept
    # save_pth writes np.ascontiguousarray(v), which makes the 0-d BN counters 1-d.
    assert_bit_exact(out, {k: np.ascontiguousarray(v) for k, v in state_dict.items()})


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_reader_rebuilds_views_and_dtypes(tmp_path, fmt):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    tensors = OrderedDict([
        ('transposed_slice', base.t()[1:, 2:5]),      # non-contiguous, storage offset
        ('row', base[3]),                             # offset into a shared storage
        ('column', base[:, 5]),                       # stride 8
        ('whole', base),                              # the shared storage itself
        ('half', torch.linspace(-2, 2, 15).half().reshape(3, 5)),
        ('double', torch.randn(2, 3, dtype=torch.float64)),
        ('bfloat16', torch.randn(9).bfloat16()),
        ('int64', torch.arange(-3, 4)),
        ('int32', torch.arange(5, dtype=torch.int32)),
        ('uint8', torch.arange(250, 256, dtype=torch.uint8)),
        ('bool', torch.tensor([True, False, True])),
        ('scalar', torch.tensor(3.5)),
        ('empty', torch.zeros(0, 4)),
    ])
    out = load_pth(str(save(tensors, tmp_path / 'views.pth', fmt)))
    assert list(out) == list(tensors)
    for key, tensor in tensors.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        got = out[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
        assert got.flags.c_contiguous, key
    # Tensors that share a storage come back as independent arrays.
    out['whole'][3, 0] = -1.0
    assert out['row'][0] == 24.0


def test_reader_resolves_pre_1_0_storage_views(tmp_path):
    """torch < 1.0 could save a tensor on a storage *view*: ('storage', ..., view_metadata)
    with view_metadata = (view key, element offset into the root storage, view numel).
    Current torch never writes one, so the file is assembled here by hand."""
    class ViewStorage:
        pid = ('storage', torch.FloatStorage, 'root', 'cpu', 10, ('view', 4, 5))

    class OldTensor:  # offset 1 into the view, i.e. elements 5 and 7 of the root storage
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (ViewStorage(), 1, (2,), (2,), False, OrderedDict())

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, ViewStorage) else None

    path = tmp_path / 'old.pth'
    with open(path, 'wb') as f:
        for header in (0x1950a86a20f9469cfc6c, 1001, {'protocol_version': 1001, 'little_endian': True}):
            pickle.dump(header, f, protocol=2)
        LegacyPickler(f, protocol=2).dump(OrderedDict([('t', OldTensor())]))
        pickle.dump(['root'], f, protocol=2)
        f.write(struct.pack('<q', 10) + np.arange(10, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(load_pth(str(path))['t'], np.array([5.0, 7.0], np.float32))


def test_reader_unwraps_only_an_unambiguous_wrapper(tmp_path):
    sd = OrderedDict([('a.weight', torch.ones(2, 2)), ('a.bias', torch.zeros(2))])
    out = load_pth(str(save({'state_dict': sd, 'iteration': 800000}, tmp_path / 'w.pth', 'zip')))
    np.testing.assert_array_equal(out['a.weight'], np.ones((2, 2), np.float32))
    with pytest.raises(PthError, match=r"ambiguous\.pth: a dict with keys \['model', 'ema'\]"):
        load_pth(str(save({'model': sd, 'ema': sd}, tmp_path / 'ambiguous.pth', 'zip')))
    with pytest.raises(PthError, match=r"net\.pth: a dict with keys \['net'\]"):
        load_pth(str(save({'net': sd}, tmp_path / 'net.pth', 'legacy')))


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_reader_rejects_other_objects_without_running_them(tmp_path, fmt):
    with pytest.raises(PthError, match=r'module\.pth: unsupported object torch\.nn\.modules\.linear\.Linear'):
        load_pth(str(save(torch.nn.Linear(2, 2), tmp_path / 'module.pth', fmt)))
    with pytest.raises(PthError, match=r'list\.pth: holds a list, not a state dict'):
        load_pth(str(save([torch.ones(2)], tmp_path / 'list.pth', fmt)))

    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    with pytest.raises(PthError, match=r'payload\.pth: unsupported object (posix|os)\.system'):
        load_pth(str(save({'x': Payload()}, tmp_path / 'payload.pth', fmt)))
    assert not marker.exists()


def test_reader_rejects_files_that_are_not_pth(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'notes.pth').write_text('not weights\n')
    paddle.save({'w': paddle.ones([2])}, str(tmp_path / 'paddle.pdparams'))
    for name, message in [('empty.pth', 'empty file'),
                          ('notes.pth', r'not a torch\.save file \(neither a zip archive nor a pickle\)'),
                          ('paddle.pdparams', r'not a torch\.save file \(a pickle without the torch magic')]:
        with pytest.raises(PthError, match=f'^{name}: {message}'):
            load_pth(str(tmp_path / name))


def test_reader_reports_truncation(tmp_path):
    sd = OrderedDict([('w', torch.arange(1000, dtype=torch.float32)), ('b', torch.ones(10))])
    for fmt in ('legacy', 'zip'):
        full = save(sd, tmp_path / f'full_{fmt}.pth', fmt).read_bytes()
        (tmp_path / f'yolact_{fmt}.pth').write_bytes(full[:len(full) - 2000])
    with pytest.raises(PthError, match=r"^yolact_legacy\.pth: truncated: storage '\d+' needs 4000 bytes "
                                       r"at offset \d+, file has \d+$"):
        load_pth(str(tmp_path / 'yolact_legacy.pth'))
    with pytest.raises(PthError, match=r'^yolact_zip\.pth: truncated or corrupt zip archive'):
        load_pth(str(tmp_path / 'yolact_zip.pth'))
    (tmp_path / 'header.pth').write_bytes((tmp_path / 'full_legacy.pth').read_bytes()[:150])
    with pytest.raises(PthError, match=r'^header\.pth: truncated: the file ends inside the object pickle'):
        load_pth(str(tmp_path / 'header.pth'))


# ------------------------------------------------------------------- rules --
@needs_reference
@pytest.mark.parametrize('config_name', ALL_CONFIGS)
def test_every_published_config_converts_into_the_real_model(mw, config_name):
    cfg = get_config(config_name)
    net = Yolact.from_config(cfg)
    source = mw.make_state_dict(mw.load_manifest(config_name), seed=0)
    params, dropped = convert_state_dict(
        source, {k: v.shape for k, v in net.state_dict().items()}, [fpn_downsample_drop(cfg.fpn.num_downsample)])
    assert all(key.endswith('.num_batches_tracked') for key, _ in dropped)
    assert len(params) + len(dropped) == len(source)
    net.set_state_dict(params)
    assert_bit_exact({k: v.numpy() for k, v in net.state_dict().items()}, paddle_names(source))


@needs_reference
def test_reference_compatibility_drops(mw):
    """v1.0 checkpoints: backbone.layerN.* and surplus FPN downsample layers are dropped, by name."""
    cfg = get_config('yolact_resnet50')
    net = Yolact.from_config(cfg)
    source = mw.make_state_dict(mw.load_manifest('yolact_resnet50'), seed=0)
    source['backbone.layer1.0.conv1.weight'] = np.zeros((64, 64, 1, 1), np.float32)
    source['fpn.downsample_layers.2.weight'] = np.zeros((256, 256, 3, 3), np.float32)
    source['fpn.downsample_layers.2.bias'] = np.zeros((256,), np.float32)
    _, dropped = convert_state_dict(source, {k: v.shape for k, v in net.state_dict().items()},
                                    [fpn_downsample_drop(cfg.fpn.num_downsample)])
    reasons = dict(dropped)
    assert reasons['backbone.layer1.0.conv1.weight'] == 'obsolete reference backbone name (backbone.layerN)'
    assert reasons['fpn.downsample_layers.2.bias'] == 'fpn.downsample_layers beyond num_downsample=2'
    source['semantic_seg_conv.extra'] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r'1 source key\(s\) with no target:\n    semantic_seg_conv\.extra'):
        convert_state_dict(source, {k: v.shape for k, v in net.state_dict().items()},
                           [fpn_downsample_drop(cfg.fpn.num_downsample)])


def test_imagenet_backbone_names():
    assert imagenet_backbone('weights/resnet101_reducedfc.pth').name == 'ResNet101'
    assert imagenet_backbone('resnet50-19c8e357.pth').name == 'ResNet50'
    assert imagenet_backbone('darknet53.pth').name == 'DarkNet53'
    with pytest.raises(ValueError, match='resnet152.pth'):
        imagenet_backbone('resnet152.pth')


def test_save_params_is_atomic(tmp_path, monkeypatch):
    dst = tmp_path / 'model.pdparams'
    dst.write_bytes(b'previous')

    def failing_write(f, data):
        f.write(data[:len(data) // 2])
        raise OSError('disk full')

    monkeypatch.setattr('utils.files._write_all', failing_write)
    with pytest.raises(OSError, match='disk full'):
        save_params({'w': np.ones(3, np.float32)}, str(dst))
    assert dst.read_bytes() == b'previous'
    assert os.listdir(tmp_path) == ['model.pdparams']


# --------------------------------------------------------------------- CLI --
@needs_reference
@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_cli_converts_checkpoint_bit_exactly_without_torch(work, resnet50, fmt):
    state_dict, files = resnet50
    dst = work / f'converted_{fmt}.pdparams'
    result = run_cli(work, files[fmt], dst)  # config inferred from the file name
    assert result.returncode == 0, result.stderr
    assert 'dropped 53 key(s): BatchNorm step counter (Paddle keeps none)' in result.stdout
    assert ('yolact_resnet50_54_800000.pth -> config yolact_resnet50: 301 tensors converted, '
            '53 keys dropped, 0 left at initialisation') in result.stdout
    loaded = paddle.load(str(dst))
    expected = paddle_names(state_dict)
    assert_bit_exact({k: v.numpy() for k, v in loaded.items()}, expected)
    if fmt == 'zip':
        net = Yolact.from_config(get_config('yolact_resnet50'))
        net.set_state_dict(loaded)
        assert_bit_exact({k: v.numpy() for k, v in net.state_dict().items()}, expected)


@needs_reference
def test_cli_names_the_keys_of_a_config_mismatch(work, resnet50):
    _, files = resnet50
    dst = work / 'wrong.pdparams'
    result = run_cli(work, files['legacy'], dst, '--config', 'yolact_plus_resnet50')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    err = result.stderr
    assert ('error: state dict does not match the model '
            '(yolact_resnet50_54_800000.pth with config yolact_plus_resnet50):') in err
    assert 'prediction_layers.0.bbox_layer.weight: (12, 256, 3, 3) -> (36, 256, 3, 3)' in err
    assert '    backbone.layers.1.0.conv2.conv_offset_mask.weight\n' in err
    assert '    maskiou_net.maskiou_net.10.bias\n' in err
    assert not dst.exists()


def test_cli_reports_a_truncated_file(work, tmp_path):
    sd = OrderedDict([('w', torch.ones(4096)), ('b', torch.ones(4))])
    full = save(sd, tmp_path / 'full.pth', 'legacy').read_bytes()
    src = tmp_path / 'yolact_base_54_800000.pth'
    src.write_bytes(full[:-1000])
    result = run_cli(work, src, tmp_path / 'out.pdparams')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert "error: yolact_base_54_800000.pth: truncated: storage '" in result.stderr
    assert not (tmp_path / 'out.pdparams').exists()


def test_cli_usage_errors(work, tmp_path):
    result = run_cli(work, tmp_path / 'missing.pth', tmp_path / 'out.pdparams')
    assert result.returncode == 1 and f"error: weights file not found: {tmp_path / 'missing.pth'}" in result.stderr
    (tmp_path / 'weights.pth').write_bytes(b'not read: the config is looked up first')
    result = run_cli(work, tmp_path / 'weights.pth', tmp_path / 'out.pdparams')
    assert result.returncode == 1
    assert "cannot infer the config from the file name 'weights.pth'" in result.stderr
    result = run_cli(work, tmp_path / 'weights.pth', tmp_path / 'out.pdparams', '--config', 'yolact_huge')
    assert result.returncode == 1 and "error: unknown config 'yolact_huge'" in result.stderr


def torchvision_resnet50(mw):
    """A synthetic resnet50-19c8e357.pth state dict: torchvision names, fc, no BN counters (2017)."""
    out = OrderedDict()
    for key, shape, dtype in mw.load_manifest('yolact_resnet50'):
        if not key.startswith('backbone.') or key.endswith('num_batches_tracked'):
            continue
        name = key[len('backbone.'):]
        if name.startswith('layers.'):
            stage, rest = name[len('layers.'):].split('.', 1)
            name = f'layer{int(stage) + 1}.{rest}'
        out[name] = mw.make_tensor(name, shape, dtype, seed=1)
    out['fc.weight'] = mw.make_tensor('fc.weight', (1000, 2048), 'float32', seed=1)
    out['fc.bias'] = mw.make_tensor('fc.bias', (1000,), 'float32', seed=1)
    return out


def expected_backbone(torchvision_sd):
    """The backbone parameters the rules promise for a torchvision ResNet."""
    out = OrderedDict()
    for key, value in paddle_names(torchvision_sd).items():
        if key.startswith('fc.'):
            continue
        if key.startswith('layer'):
            key = f'layers.{int(key[5]) - 1}{key[6:]}'
        out[key] = value
    return out


@needs_reference
def test_cli_converts_torchvision_resnet50(work, mw):
    source = torchvision_resnet50(mw)
    src = work / 'resnet50-19c8e357.pth'
    mw.save_pth(source, str(src), legacy=True)
    dst = work / 'resnet50.pdparams'
    result = run_cli(work, '--backbone', src, dst)
    assert result.returncode == 0, result.stderr
    assert 'dropped 2 key(s): ImageNet classifier (the backbone has no fc)\n    fc.weight, fc.bias' in result.stdout
    assert ('resnet50-19c8e357.pth -> backbone ResNet50: 265 tensors converted, 2 keys dropped, '
            '0 left at initialisation') in result.stdout
    converted = {k: v.numpy() for k, v in paddle.load(str(dst)).items()}
    assert_bit_exact(converted, expected_backbone(source))
    backbone = construct_backbone(get_config('yolact_resnet50').backbone)
    load_backbone_weights(backbone, str(dst))
    assert_bit_exact({k: v.numpy() for k, v in backbone.state_dict().items()}, expected_backbone(source))


@needs_reference
def test_cli_converts_resnet50_for_dcn_leaving_only_dcn_extras(work, mw):
    source = torchvision_resnet50(mw)
    (work / 'dcn').mkdir()
    src = work / 'dcn' / 'resnet50-19c8e357.pth'
    mw.save_pth(source, str(src), legacy=False)
    dst = work / 'resnet50_dcn.pdparams'
    result = run_cli(work, '--backbone', '--config', 'yolact_plus_resnet50', src, dst)
    assert result.returncode == 0, result.stderr
    # DCNv2 ResNet-50: the last 4 + 6 + 3 blocks (interval 1) are deformable, 3 extras each.
    assert 'left at initialisation 39 key(s)' in result.stdout
    assert '-> backbone ResNet50_DCNv2: 265 tensors converted, 2 keys dropped, 39 left at initialisation' \
        in result.stdout
    converted = {k: v.numpy() for k, v in paddle.load(str(dst)).items()}
    assert_bit_exact(converted, expected_backbone(source))

    backbone = construct_backbone(get_config('yolact_plus_resnet50').backbone)
    load_backbone_weights(backbone, str(dst))
    state = {k: v.numpy() for k, v in backbone.state_dict().items()}
    extras = sorted(set(state) - set(converted))
    assert len(extras) == 39 and all('conv2.bias' in k or 'conv_offset_mask' in k for k in extras)
    assert all(not state[k].any() for k in extras)  # zero, as the reference initialises them
    assert_bit_exact({k: state[k] for k in converted}, expected_backbone(source))


@needs_reference
def test_cli_converts_darknet53(work, mw):
    source = OrderedDict(
        (key[len('backbone.'):], mw.make_tensor(key, shape, dtype, seed=2))
        for key, shape, dtype in mw.load_manifest('yolact_darknet53') if key.startswith('backbone.'))
    src = work / 'darknet53.pth'
    mw.save_pth(source, str(src), legacy=False)
    dst = work / 'darknet53.pdparams'
    result = run_cli(work, '--backbone', src, dst)
    assert result.returncode == 0, result.stderr
    assert '-> backbone DarkNet53: 260 tensors converted, 52 keys dropped, 0 left at initialisation' in result.stdout
    converted = {k: v.numpy() for k, v in paddle.load(str(dst)).items()}
    assert_bit_exact(converted, paddle_names(source))
    # A DarkNet file is not a ResNet: the report names the keys on both sides.
    wrong = work / 'darknet_as_resnet.pdparams'
    result = run_cli(work, '--backbone', '--config', 'yolact_resnet50', src, wrong)
    assert result.returncode == 1
    assert '260 source key(s) with no target:\n' in result.stderr
    assert '265 target key(s) missing from the source:\n' in result.stderr
    assert '    _preconv.0.weight\n' in result.stderr and '    conv1.weight\n' in result.stderr
    assert not wrong.exists()


# ------------------------------------------------- DataParallel, output folder --
def _reference_names(net):
    """A Paddle network's state dict under the reference's (torch) names, as torch tensors."""
    out = OrderedDict()
    for key, value in net.state_dict().items():
        key = key.replace('._mean', '.running_mean').replace('._variance', '.running_var')
        out[key] = torch.from_numpy(value.numpy())
    return out


@pytest.fixture(scope='module')
def shapes_net():
    paddle.seed(0)
    return Yolact.from_config(get_config('yolact_shapes'))


def test_cli_strips_a_data_parallel_prefix_and_creates_the_output_folder(tmp_path, capsys, shapes_net):
    """A checkpoint saved from torch's DataParallel (every key 'module.'-prefixed) converts, saying so once,
    into a folder that did not exist; the published-file path (on-the-fly conversion) takes it too."""
    from tools import convert_weights
    src = save(OrderedDict((f'module.{k}', v) for k, v in _reference_names(shapes_net).items()),
               tmp_path / 'yolact_shapes_3_1000.pth', 'zip')
    dst = tmp_path / 'new' / 'folder' / 'yolact_shapes_3_1000.pdparams'
    assert convert_weights.main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if 'DataParallel' in line]
    assert lines == ["yolact_shapes_3_1000.pth: saved from DataParallel; stripped the prefix 'module.' from every key"]
    expected = {k: v.numpy() for k, v in shapes_net.state_dict().items()}
    assert_bit_exact({k: v.numpy() for k, v in paddle.load(str(dst)).items()}, expected)

    from utils.weights.loader import load_model
    _, net = load_model(str(src))
    assert_bit_exact({k: v.numpy() for k, v in net.state_dict().items()}, expected)


def test_a_prefix_on_some_keys_only_is_not_stripped(tmp_path, capsys, shapes_net):
    """Only a prefix every key has is DataParallel's: a few prefixed keys are named as unused, nothing guessed."""
    from tools import convert_weights
    state = _reference_names(shapes_net)
    first = next(iter(state))
    state = OrderedDict((f'module.{k}' if k == first else k, v) for k, v in state.items())
    src = save(state, tmp_path / 'yolact_shapes_3_1000.pth', 'legacy')
    assert run_cli_in_process(convert_weights.main, [str(src), str(tmp_path / 'out.pdparams')]) == 1
    captured = capsys.readouterr()
    assert 'DataParallel' not in captured.out + captured.err
    assert f'    module.{first}\n' in captured.err and not (tmp_path / 'out.pdparams').exists()
