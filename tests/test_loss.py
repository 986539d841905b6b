"""MultiBoxLoss against the reference loss values (loss_*.npz), plus gradient and sampling behaviour.

The fixtures hold the reference's training-mode predictions rounded to float16
(the large-logit one: at full float32) and the loss the reference computed on
exactly those values, so the terms must agree to float32 accuracy.
"""
import numpy as np
import paddle
import pytest

from data.config import get_config
from layers.box_utils import log_sum_exp, match
from layers.modules.multibox_loss import MultiBoxLoss
from tests.conftest import needs_reference, reference_npz, reference_params

PRED_KEYS = ('loc', 'conf', 'mask', 'priors', 'proto', 'segm')
TERMS = {'loss_box': 'loss_B', 'loss_conf': 'loss_C', 'loss_mask': 'loss_M', 'loss_segm': 'loss_S'}
RTOL = 5e-7   # relative; measured up to 1.8e-7 (README "Parity")


def _batch(name, trainable=False, targets_from=None):
    """(predictions, targets, masks, num_crowds) of loss_<name>.npz as float32 Paddle tensors.

    targets_from: another fixture whose targets, masks and crowd counts the predictions go with.
    """
    data = reference_npz(f'loss_{name}')
    truth = reference_npz(f'loss_{targets_from}') if targets_from else data
    predictions = {}
    for key in PRED_KEYS:
        tensor = paddle.to_tensor(data[f'pred_{key}'].astype(np.float32))
        tensor.stop_gradient = not trainable or key == 'priors'
        predictions[key] = tensor
    batch_size = data['pred_loc'].shape[0]
    targets = [paddle.to_tensor(truth[f'targets_{i}']) for i in range(batch_size)]
    masks = [paddle.to_tensor(truth[f'masks_{i}'].astype(np.float32)) for i in range(batch_size)]
    return data, predictions, targets, masks, [int(n) for n in truth['num_crowds']]


def _relative_errors(losses, data, terms):
    return {k: abs(float(losses[k]) - float(data[ref])) / abs(float(data[ref])) for k, ref in terms.items()}


@pytest.fixture(scope='module')
def yolact_plus_net():
    """The YOLACT++ ResNet-50 model with the seed-0 reference weights (its maskiou_net runs in the loss)."""
    from yolact import Yolact

    cfg = get_config('yolact_plus_resnet50')
    net = Yolact.from_config(cfg)
    net.set_state_dict(reference_params(net, cfg))
    return net


@needs_reference
def test_yolact_base_loss_matches_reference():
    data, predictions, targets, masks, num_crowds = _batch('yolact_base')
    criterion = MultiBoxLoss.from_config(get_config('yolact_base'))
    losses = criterion(None, predictions, targets, masks, num_crowds)

    assert set(losses) == set(TERMS)
    errors = _relative_errors(losses, data, TERMS)
    assert max(errors.values()) < RTOL, errors


@needs_reference
def test_yolact_plus_loss_matches_reference(yolact_plus_net):
    data, predictions, targets, masks, num_crowds = _batch('yolact_plus_resnet50')
    criterion = MultiBoxLoss.from_config(get_config('yolact_plus_resnet50'))
    losses = criterion(yolact_plus_net, predictions, targets, masks, num_crowds)

    terms = dict(TERMS, loss_maskiou='loss_I')
    assert set(losses) == set(terms)
    errors = _relative_errors(losses, data, terms)
    assert max(errors.values()) < RTOL, errors


@needs_reference
def test_large_logit_loss_matches_reference():
    """Logits spanning -32..94 after high-learning-rate updates: the hard-negative ranking must still be the reference's."""
    data, predictions, targets, masks, num_crowds = _batch('yolact_resnet50_large_logits',
                                                           targets_from='yolact_base')
    criterion = MultiBoxLoss.from_config(get_config('yolact_resnet50'))
    losses = criterion(None, predictions, targets, masks, num_crowds)

    errors = _relative_errors(losses, data, TERMS)
    assert max(errors.values()) < RTOL, errors


def test_log_sum_exp_matches_torch_far_below_the_batch_maximum():
    """Rows 88-104 below the batch maximum fall in float32's subnormal range, where the ranking still counts."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    logits = rng.uniform(-32, 8, size=(64, 81)).astype(np.float32)
    logits[0, 0] = 94.0
    reference = torch.from_numpy(logits)
    expected = (torch.log(torch.exp(reference - reference.max()).sum(1)) + reference.max()).numpy()
    np.testing.assert_allclose(log_sum_exp(paddle.to_tensor(logits)).numpy(), expected, rtol=0, atol=1e-5)


@needs_reference
def test_loss_leaves_inputs_untouched():
    """The reference strips crowd masks from the caller's list in place; this port must not."""
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    shapes = [m.shape for m in masks]
    MultiBoxLoss.from_config(get_config('yolact_base'))(None, predictions, targets, masks, num_crowds)
    assert [m.shape for m in masks] == shapes
    assert [t.shape[0] for t in targets] == [s[0] for s in shapes]


@needs_reference
def test_gradients_are_finite_and_reach_every_prediction():
    _, predictions, targets, masks, num_crowds = _batch('yolact_base', trainable=True)
    losses = MultiBoxLoss.from_config(get_config('yolact_base'))(None, predictions, targets, masks, num_crowds)
    paddle.add_n(list(losses.values())).backward()

    for key in ('loc', 'conf', 'mask', 'proto', 'segm'):
        grad = predictions[key].grad.numpy()
        assert np.isfinite(grad).all(), key
        assert np.abs(grad).max() > 0, key


@needs_reference
def test_mask_iou_loss_trains_maskiou_net_and_masks(yolact_plus_net):
    _, predictions, targets, masks, num_crowds = _batch('yolact_plus_resnet50', trainable=True)
    criterion = MultiBoxLoss.from_config(get_config('yolact_plus_resnet50'))
    yolact_plus_net.clear_gradients()
    criterion(yolact_plus_net, predictions, targets, masks, num_crowds)['loss_maskiou'].backward()

    grads = [p.grad.numpy() for p in yolact_plus_net.maskiou_net.parameters() if p.grad is not None]
    assert grads and all(np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)
    # As in the reference, the mask-IoU net's input is not detached from the assembled masks.
    assert np.isfinite(predictions['mask'].grad.numpy()).all()
    assert np.abs(predictions['proto'].grad.numpy()).max() > 0
    yolact_plus_net.clear_gradients()


def _positives_per_image(cfg, priors, targets, num_crowds):
    counts = []
    for target, num_crowd in zip(targets, num_crowds):
        objects, crowds = target[:target.shape[0] - num_crowd], target[target.shape[0] - num_crowd:]
        _, conf_t, _ = match(cfg.positive_iou_threshold, cfg.negative_iou_threshold, cfg.crowd_iou_threshold,
                             objects[:, :4], priors, objects[:, 4].astype('int64'), crowds[:, :4])
        counts.append(int((conf_t > 0).astype('int64').sum()))
    return counts


@needs_reference
def test_masks_to_train_samples_exactly_that_many_masks():
    masks_to_train = 5
    cfg = get_config('yolact_base', masks_to_train=masks_to_train)
    _, predictions, targets, masks, num_crowds = _batch('yolact_base', trainable=True)
    criterion = MultiBoxLoss.from_config(cfg, rng=np.random.default_rng(0))
    num_pos = _positives_per_image(cfg, predictions['priors'], targets, num_crowds)
    assert min(num_pos) > masks_to_train

    def anchors_in_mask_loss(criterion):
        predictions['mask'].clear_gradient()
        criterion(None, predictions, targets, masks, num_crowds)['loss_mask'].backward()
        return (np.abs(predictions['mask'].grad.numpy()).max(axis=2) > 0).sum(axis=1).tolist()

    # Only the sampled anchors' coefficients take part in the mask loss ...
    assert anchors_in_mask_loss(criterion) == [masks_to_train] * len(targets)
    # ... while without the cap every positive does.
    assert anchors_in_mask_loss(MultiBoxLoss.from_config(get_config('yolact_base'))) == num_pos


@needs_reference
def test_masks_to_train_sampling_is_seedable_and_rescaled():
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    cfg = get_config('yolact_base', masks_to_train=5)

    def mask_loss(seed):
        criterion = MultiBoxLoss.from_config(cfg, rng=np.random.default_rng(seed))
        return float(criterion(None, predictions, targets, masks, num_crowds)['loss_mask'])

    full = float(MultiBoxLoss.from_config(get_config('yolact_base'))(
        None, predictions, targets, masks, num_crowds)['loss_mask'])
    assert mask_loss(3) == mask_loss(3)
    assert mask_loss(3) != mask_loss(4)
    # Rescaled by num_pos / masks_to_train, a subset's loss estimates the full loss.
    samples = [mask_loss(seed) for seed in range(8)]
    assert abs(np.mean(samples) / full - 1) < 0.1, (samples, full)


@needs_reference
def test_images_without_objects_still_teach_background():
    """An image with no non-crowd object (the reference crashes on it) keeps negpos_ratio hard
    negatives as if it had one positive, so a batch of such images gives a positive loss."""
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    criterion = MultiBoxLoss.from_config(get_config('yolact_base'))
    second = {k: v if k == 'priors' else v[1:2] for k, v in predictions.items()}
    no_target, no_mask = paddle.zeros([0, 5]), paddle.zeros([0] + masks[1].shape[1:])

    # Image 1 without any annotation: every anchor is background; its loss is the
    # cross entropy of its negpos_ratio hardest background anchors (positive count taken as 1).
    empty = criterion(None, second, [no_target], [no_mask], [0])
    logits = predictions['conf'].numpy()[1].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    background_ce = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0] - logits[:, 0]
    expected = np.sort(background_ce)[::-1][:criterion.negpos_ratio].sum() * criterion.conf_alpha
    assert float(empty['loss_conf']) > 0
    np.testing.assert_allclose(float(empty['loss_conf']), expected, rtol=1e-6)
    assert float(empty['loss_box']) == 0 and float(empty['loss_mask']) == 0
    assert float(empty['loss_segm']) > 0

    # Image 1's annotations all crowd: anchors its crowd boxes cover are neutral, the rest still teach
    # background (the hardest of fewer candidates: at most the empty image's loss).
    crowd = criterion(None, second, [targets[1]], [masks[1]], [targets[1].shape[0]])
    assert 0 < float(crowd['loss_conf']) <= float(empty['loss_conf'])
    assert float(crowd['loss_box']) == 0 and float(crowd['loss_mask']) == 0

    # Beside an image with objects, neither adds a positive: the box term is image 0's alone.
    first = {k: v if k == 'priors' else v[0:1] for k, v in predictions.items()}
    alone = criterion(None, first, [targets[0]], [masks[0]], [num_crowds[0]])
    for batch_targets, batch_masks, batch_crowds in (
            ([targets[0], targets[1]], [masks[0], masks[1]], [num_crowds[0], targets[1].shape[0]]),
            ([targets[0], no_target], [masks[0], no_mask], [num_crowds[0], 0])):
        losses = criterion(None, predictions, batch_targets, batch_masks, batch_crowds)
        assert all(np.isfinite(float(v)) and float(v) > 0 for v in losses.values()), losses
        np.testing.assert_allclose(float(losses['loss_box']), float(alone['loss_box']), rtol=1e-6)
        assert float(losses['loss_conf']) > float(alone['loss_conf'])


@needs_reference
def test_non_finite_predictions_give_a_nan_loss_not_an_exception():
    """A diverged network must surface as a NaN loss (which train.py reports), not a kernel error."""
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    predictions['proto'] = paddle.full_like(predictions['proto'], float('nan'))
    losses = MultiBoxLoss.from_config(get_config('yolact_base'))(None, predictions, targets, masks, num_crowds)
    assert np.isnan(float(losses['loss_mask']))
    assert np.isfinite(float(losses['loss_box']))
