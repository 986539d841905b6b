"""Speed measures of the training step: the same functions, the same gradients.

Training with frozen BatchNorm folds it into the preceding convolution
(backbone.conv_bn), and the prediction head runs its three convolutions as
one (yolact.PredictionModule._fused_heads): the same outputs and gradients
for the parameters and the input, and the reference's training-mode outputs.
"""
import numpy as np
import paddle
import pytest

from backbone import Conv2D, ConvBN, conv_bn
from yolact import PredictionModule
from tests.conftest import needs_reference, reference_npz
from tests.test_model import _reference_net, assert_matches_float16, preprocess
from utils.training.cpu_ops import use_cpu_training_convolutions


def _frozen_pair(seed=0):
    paddle.seed(seed)
    conv = Conv2D(6, 10, 3, stride=2, padding=1, bias_attr=False)
    bn = paddle.nn.BatchNorm2D(10)
    rng = np.random.default_rng(seed)
    bn.set_state_dict({'weight': rng.uniform(0.3, 1.5, 10).astype('float32'),
                       'bias': rng.normal(0, 0.5, 10).astype('float32'),
                       '_mean': rng.normal(0, 0.5, 10).astype('float32'),
                       '_variance': rng.uniform(0.2, 2.0, 10).astype('float32')})
    bn.training = False
    bn.weight.stop_gradient = bn.bias.stop_gradient = True
    return conv, bn


def _run(fn, conv, batch):
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((batch, 6, 9, 11)).astype('float32'),
                         stop_gradient=False)
    out = fn(x)
    (out * paddle.arange(out.size, dtype='float32').reshape(out.shape) / out.size).sum().backward()
    result = out.numpy(), x.grad.numpy(), conv.weight.grad.numpy()
    conv.clear_gradients()
    return result


def test_folded_conv_bn_gives_the_results_and_gradients_of_conv_then_bn():
    conv, bn = _frozen_pair()
    for batch in (1, 3):
        plain = _run(lambda x: bn(conv(x)), conv, batch)
        folded = _run(lambda x: conv_bn(conv, bn, x), conv, batch)
        for a, b in zip(plain, folded):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)



def test_frozen_bn_is_not_run_while_training(monkeypatch):
    conv, bn = _frozen_pair()
    monkeypatch.setattr(bn, 'forward', lambda x: pytest.fail('BatchNorm ran: the fold was not taken'))
    conv_bn(conv, bn, paddle.ones([2, 6, 9, 11]))


def test_fold_only_where_it_is_exact():
    """Trainable BatchNorm (batch statistics) and inference keep the two ops."""
    conv, bn = _frozen_pair()
    x = paddle.randn([2, 6, 9, 11])
    with paddle.no_grad():
        np.testing.assert_array_equal(conv_bn(conv, bn, x).numpy(), bn(conv(x)).numpy())
    bn.training = True
    bn.weight.stop_gradient = bn.bias.stop_gradient = False
    mean_before = bn._mean.numpy().copy()
    conv_bn(conv, bn, x)
    # Batch statistics were used and the running mean moved: the BatchNorm itself ran.
    assert not np.array_equal(bn._mean.numpy(), mean_before)


def test_conv_bn_sequential_keeps_the_parameter_names():
    conv, bn = _frozen_pair()
    plain, fused = paddle.nn.Sequential(conv, bn, paddle.nn.ReLU()), ConvBN(conv, bn, paddle.nn.ReLU())
    assert list(fused.state_dict()) == list(plain.state_dict())


@needs_reference
def test_training_forward_with_gradients_matches_reference():
    """The training path itself (gradients recorded, BatchNorm folded, the convolutions CPU training
    swaps in) gives the reference's training outputs."""
    net = _reference_net('yolact_base')
    use_cpu_training_convolutions(net)
    ref = reference_npz('loss_yolact_base')
    net.train()
    net.freeze_bn(True)
    out = net(paddle.to_tensor(preprocess(ref['images_bgr'])))
    for key in ('loc', 'conf', 'mask', 'proto', 'segm'):
        assert not out[key].stop_gradient
        assert_matches_float16(out[key].numpy(), ref[f'pred_{key}'], key)


@pytest.mark.parametrize('batch', [1, 2])
def test_fused_head_convs_give_the_separate_convs_results_and_gradients(batch):
    paddle.seed(0)
    head = PredictionModule(16, num_priors=3, num_classes=5, mask_dim=4, extra_head_net=[(16, 3, 1, 1)])
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((batch, 16, 7, 9)).astype('float32'),
                         stop_gradient=False)
    layers = (head.bbox_layer, head.conf_layer, head.mask_layer)

    def run(training):
        head.train() if training else head.eval()
        outs = head(x)
        loss = sum((o * paddle.arange(o.size, dtype='float32').reshape(o.shape) / o.size).sum() for o in outs)
        loss.backward()
        grads = [x.grad.numpy()] + [p.grad.numpy() for layer in layers for p in (layer.weight, layer.bias)]
        x.clear_gradient()
        head.clear_gradients()
        return [o.numpy() for o in outs], grads

    fused_calls = []
    original = PredictionModule._fused_heads
    head._fused_heads = lambda y: fused_calls.append(1) or original(head, y)
    fused_out, fused_grads = run(training=True)
    separate_out, separate_grads = run(training=False)
    assert fused_calls == [1]   # training took the fused convolution, inference did not
    for a, b in zip(fused_out + fused_grads, separate_out + separate_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
