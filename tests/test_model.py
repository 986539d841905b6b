"""The network (backbone.py, yolact.py) against the reference implementation.

Parity tests load the seed-0 stand-in weights of shared/reference (converted
strictly: every key used) and compare the raw outputs with the reference
PyTorch forward passes stored there.

Tolerance: the fixtures store pred_* as float16 b = fp16(r) of the reference
float32 value r, so |r - b| <= ulp16(b) / 2. We require our float32 output a
to be within FLOAT32_TOL * (1 + |b|) of r, i.e.
    |a - b| <= ulp16(|b|) / 2 + FLOAT32_TOL * (1 + |b|).
The largest excess over the float16 rounding measured here is 5.5e-6 (training
conf logits, |b| up to 7.3) and 3e-6 elsewhere (mask coefficients); priors are
stored in float32 and must match exactly.
"""
import numpy as np
import paddle
import pytest

from backbone import DarkNetBackbone, ModulatedDeformConv2D, construct_backbone
from data.config import MEANS, STD, get_config
from tests.conftest import make_weights_module, needs_reference, reference_npz, reference_state_dict
from utils.weights.loader import load_backbone_weights
from utils.weights.convert import ConversionError, convert_state_dict, fpn_downsample_drop
from yolact import Yolact

CONFIG_NAMES = ('yolact_base', 'yolact_im700', 'yolact_resnet50', 'yolact_darknet53',
                'yolact_plus_base', 'yolact_plus_resnet50')
FLOAT32_TOL = 1e-5


def _shapes(layer):
    return {k: v.shape for k, v in layer.state_dict().items()}


def _convert(net, cfg, source):
    return convert_state_dict(source, _shapes(net), [fpn_downsample_drop(cfg.fpn.num_downsample)],
                              context=f' ({cfg.name})')


def _reference_net(name):
    cfg = get_config(name)
    net = Yolact.from_config(cfg)
    params, _ = _convert(net, cfg, reference_state_dict(name))
    net.set_state_dict(params)
    return net


@pytest.fixture(scope='module')
def yolact_base():
    return _reference_net('yolact_base')


@pytest.fixture(scope='module')
def yolact_plus_resnet50():
    return _reference_net('yolact_plus_resnet50')


def assert_matches_float16(actual, stored, what):
    """actual (float32) agrees with the float32 value that was rounded to stored (float16)."""
    assert actual.shape == stored.shape, what
    b = stored.astype(np.float64)
    half_ulp = np.spacing(np.abs(stored)).astype(np.float64) / 2
    excess = np.abs(actual.astype(np.float64) - b) - half_ulp
    ratio = excess / (FLOAT32_TOL * (1 + np.abs(b)))
    worst = np.unravel_index(np.argmax(ratio), ratio.shape)
    assert ratio.max() <= 1, (
        f'{what}: |a - b| exceeds the float16 rounding of b by {excess[worst]:.3g} at {worst} '
        f'(a={actual[worst]!r}, b={stored[worst]!r}; allowed {FLOAT32_TOL * (1 + abs(b[worst])):.3g})')


def preprocess(images_bgr):
    """uint8 BGR [B, S, S, 3] already at the network size -> [B, 3, S, S] as the reference feeds it."""
    x = (images_bgr.astype(np.float32) - np.array(MEANS, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(x[..., ::-1].transpose(0, 3, 1, 2))


@needs_reference
@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_reference_checkpoint_converts_without_leftovers(name):
    cfg = get_config(name)
    net = Yolact.from_config(cfg)
    manifest = make_weights_module().load_manifest(name)
    # Values do not matter here, only names and shapes (zeros cost no memory).
    source = {key: np.zeros(shape, dtype) for key, shape, dtype in manifest}
    params, dropped = _convert(net, cfg, source)
    assert set(params) == set(net.state_dict())
    assert sorted(key for key, _ in dropped) == sorted(
        key for key, _, _ in manifest if key.endswith('.num_batches_tracked'))
    assert (net.maskiou_net is not None) == cfg.use_maskiou


@needs_reference
@pytest.mark.parametrize('name', ('yolact_base', 'yolact_plus_resnet50'))
def test_eval_forward_matches_reference(name, request):
    net = request.getfixturevalue(name)
    net.freeze_bn(False)
    net.eval()
    ref = reference_npz(f'forward_{name}')
    with paddle.no_grad():
        out = net(paddle.to_tensor(ref['x']))
    assert set(out) == {'loc', 'conf', 'mask', 'priors', 'proto'}
    for key in ('loc', 'conf', 'mask', 'proto'):
        assert_matches_float16(out[key].numpy(), ref[f'pred_{key}'], key)
    np.testing.assert_array_equal(out['priors'].numpy(), ref['pred_priors'])
    np.testing.assert_allclose(out['conf'].numpy().sum(-1), 1.0, rtol=0, atol=1e-5)


@needs_reference
def test_training_forward_with_frozen_bn_matches_reference(yolact_base):
    net = yolact_base
    ref = reference_npz('loss_yolact_base')
    net.train()
    net.freeze_bn(True)
    bns = [layer for layer in net.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)]
    stats_before = [bn._mean.numpy().copy() for bn in bns]
    try:
        # train() after freezing must keep BatchNorm frozen, as the reference's train() does.
        net.train()
        assert not any(bn.training for bn in bns)
        assert all(bn.weight.stop_gradient and bn.bias.stop_gradient for bn in bns)
        with paddle.no_grad():
            out = net(paddle.to_tensor(preprocess(ref['images_bgr'])))
    finally:
        net.freeze_bn(False)
        net.eval()
    assert set(out) == {'loc', 'conf', 'mask', 'priors', 'proto', 'segm'}
    for key in ('loc', 'conf', 'mask', 'proto', 'segm'):
        assert_matches_float16(out[key].numpy(), ref[f'pred_{key}'], key)
    np.testing.assert_array_equal(out['priors'].numpy(), ref['pred_priors'])
    for bn, before in zip(bns, stats_before):
        np.testing.assert_array_equal(bn._mean.numpy(), before)
    assert not any(bn.weight.stop_gradient for bn in bns)


@needs_reference
def test_maskiou_net_is_relu_then_global_max(yolact_plus_resnet50):
    maskiou_net = yolact_plus_resnet50.maskiou_net
    masks = paddle.to_tensor(np.random.RandomState(0).rand(3, 1, 64, 48).astype(np.float32))
    with paddle.no_grad():
        scores = maskiou_net(masks)
        trunk = maskiou_net.maskiou_net(masks)
    assert scores.shape == [3, 80]
    np.testing.assert_array_equal(scores.numpy(), trunk.numpy().max(axis=(2, 3)))
    assert trunk.numpy().min() >= 0


def test_darknet_stage_shapes():
    backbone = DarkNetBackbone((1, 2, 8, 8, 4))
    backbone.eval()
    with paddle.no_grad():
        outs = backbone(paddle.zeros([1, 3, 64, 64]))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 2, 2)]
    assert backbone.channels == [64, 128, 256, 512, 1024]


@needs_reference
def test_init_weights_loads_imagenet_backbone(tmp_path):
    cfg = get_config('yolact_plus_resnet50')
    net = Yolact.from_config(cfg)
    # An ImageNet checkpoint as torchvision names it: layerN., running stats,
    # a classifier, and no DCN offsets or DCN biases.
    reference = reference_state_dict(cfg.name)
    imagenet = {}
    for key, value in reference.items():
        dcn_only = '.conv2.conv_offset_mask.' in key or key.endswith('.conv2.bias')
        if not key.startswith('backbone.') or dcn_only:
            continue
        key = key[len('backbone.'):]
        if key.startswith('layers.'):
            stage, rest = key[len('layers.'):].split('.', 1)
            key = f'layer{int(stage) + 1}.{rest}'
        imagenet[key] = value
    imagenet['fc.weight'] = np.zeros((1000, 2048), np.float32)
    path = str(tmp_path / 'resnet50.pdparams')
    paddle.save(imagenet, path)

    net.init_weights()
    load_backbone_weights(net.backbone, path)

    state = net.state_dict()
    np.testing.assert_array_equal(state['backbone.layers.2.5.conv3.weight'].numpy(),
                                  reference['backbone.layers.2.5.conv3.weight'])
    np.testing.assert_array_equal(state['backbone.layers.0.0.bn1._variance'].numpy(),
                                  reference['backbone.layers.0.0.bn1.running_var'])
    dcn = [layer for layer in net.backbone.sublayers() if isinstance(layer, ModulatedDeformConv2D)]
    assert len(dcn) == 13
    for layer in dcn:
        assert not layer.conv_offset_mask.weight.numpy().any()
        assert not layer.bias.numpy().any()
    for name in ('fpn.lat_layers.0', 'proto_net.10', 'prediction_layers.0.conf_layer',
                 'semantic_seg_conv', 'maskiou_net.maskiou_net.10'):
        weight, bias = state[f'{name}.weight'].numpy(), state[f'{name}.bias'].numpy()
        out_ch, in_ch, kh, kw = weight.shape
        # Xavier's uniform limit as the float32 kernel holds it: a draw may equal the rounded limit.
        bound = np.float32(np.sqrt(6.0 / ((in_ch + out_ch) * kh * kw)))
        assert not bias.any(), name
        assert np.abs(weight).max() <= bound and np.abs(weight).max() > 0.5 * bound, name

    del imagenet['layer1.0.conv1.weight']
    paddle.save(imagenet, path)
    with pytest.raises(ConversionError, match='layers.0.0.conv1.weight'):
        load_backbone_weights(construct_backbone(cfg.backbone), path)
