"""MultiBoxLoss on both paths (layers.backend: host and device) against the reference loss values
(loss_*.npz) and each other, plus gradient and sampling behaviour.

The machine running the tests has no GPU, so the device path is forced onto
the CPU (``backend='device'``): the same Paddle ops run on a GPU.

The fixtures hold the reference's training-mode predictions rounded to float16
(the large-logit one: at full float32) and the loss the reference computed on
exactly those values, so the terms must agree to float32 accuracy.
"""
import numpy as np
import paddle
import pytest

from data.config import get_config
from layers.box_utils import _force_best_priors, _force_best_priors_device, jaccard, log_sum_exp, match, point_form
from layers.modules.multibox_loss import MultiBoxLoss
from tests.conftest import needs_reference, reference_npz, reference_params
from tests.test_detect import _HostCopyGuard

PRED_KEYS = ('loc', 'conf', 'mask', 'priors', 'proto', 'segm')
TERMS = {'loss_box': 'loss_B', 'loss_conf': 'loss_C', 'loss_mask': 'loss_M', 'loss_segm': 'loss_S'}
RTOL = 5e-7   # relative; measured up to 1.8e-7 (README "Parity")
GRAD_KEYS = ('loc', 'conf', 'mask', 'proto', 'segm')
# fixture -> (its config, the fixture whose targets go with its predictions)
CASES = {'yolact_base': ('yolact_base', None),
         'yolact_plus_resnet50': ('yolact_plus_resnet50', None),
         'yolact_resnet50_large_logits': ('yolact_resnet50', 'yolact_base')}
# The two paths of layers.backend; the device path runs on the CPU here (the same Paddle ops run on a GPU).
BACKENDS_COMPARED = ('host', 'device')


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


def _both(cfg, net, predictions, targets, masks, num_crowds, **kwargs):
    """{backend: loss dict} of the host and the device path on the same batch."""
    return {backend: MultiBoxLoss.from_config(cfg, backend=backend, **kwargs)(net, predictions, targets, masks,
                                                                              num_crowds)
            for backend in BACKENDS_COMPARED}


def _assert_terms_equal(device, host, rtol=RTOL):
    assert set(device) == set(host)
    for key in host:
        np.testing.assert_allclose(float(device[key]), float(host[key]), rtol=rtol, atol=0, err_msg=key)


@pytest.fixture(scope='module')
def yolact_plus_net():
    """The YOLACT++ ResNet-50 model with the seed-0 reference weights (its maskiou_net runs in the loss)."""
    from yolact import Yolact

    cfg = get_config('yolact_plus_resnet50')
    net = Yolact.from_config(cfg)
    net.set_state_dict(reference_params(net, cfg))
    return net


@needs_reference
@pytest.mark.parametrize('backend', BACKENDS_COMPARED)
@pytest.mark.parametrize('name', sorted(CASES))
def test_loss_matches_reference(name, backend, yolact_plus_net):
    """Every term to float32 accuracy; the large-logit fixture: logits spanning -32..94 after
    high-learning-rate updates, where the hard-negative ranking must still be the reference's.
    The device path also equals the host path's terms."""
    config, targets_from = CASES[name]
    cfg = get_config(config)
    data, predictions, targets, masks, num_crowds = _batch(name, targets_from=targets_from)
    net = yolact_plus_net if cfg.use_maskiou else None
    losses = MultiBoxLoss.from_config(cfg, backend=backend)(net, predictions, targets, masks, num_crowds)
    terms = dict(TERMS, loss_maskiou='loss_I') if cfg.use_maskiou else TERMS
    assert set(losses) == set(terms)
    errors = _relative_errors(losses, data, terms)
    assert max(errors.values()) < RTOL, errors
    if backend == 'device':
        host = MultiBoxLoss.from_config(cfg, backend='host')(net, predictions, targets, masks, num_crowds)
        _assert_terms_equal(losses, host)


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
@pytest.mark.parametrize('backend', BACKENDS_COMPARED)
def test_loss_leaves_inputs_untouched(backend):
    """The reference strips crowd masks from the caller's list in place; this port must not."""
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    shapes = [m.shape for m in masks]
    MultiBoxLoss.from_config(get_config('yolact_base'), backend=backend)(None, predictions, targets, masks,
                                                                         num_crowds)
    assert [m.shape for m in masks] == shapes
    assert [t.shape[0] for t in targets] == [s[0] for s in shapes]


@needs_reference
@pytest.mark.parametrize('backend', BACKENDS_COMPARED)
def test_gradients_are_finite_and_reach_every_prediction(backend):
    _, predictions, targets, masks, num_crowds = _batch('yolact_base', trainable=True)
    losses = MultiBoxLoss.from_config(get_config('yolact_base'), backend=backend)(None, predictions, targets, masks,
                                                                                  num_crowds)
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
@pytest.mark.parametrize('backend', BACKENDS_COMPARED)
def test_masks_to_train_samples_exactly_that_many_masks(backend):
    masks_to_train = 5
    cfg = get_config('yolact_base', masks_to_train=masks_to_train)
    _, predictions, targets, masks, num_crowds = _batch('yolact_base', trainable=True)
    num_pos = _positives_per_image(cfg, predictions['priors'], targets, num_crowds)
    assert min(num_pos) > masks_to_train

    def anchors_in_mask_loss(criterion):
        predictions['mask'].clear_gradient()
        criterion(None, predictions, targets, masks, num_crowds)['loss_mask'].backward()
        return (np.abs(predictions['mask'].grad.numpy()).max(axis=2) > 0).sum(axis=1).tolist()

    # Only the sampled anchors' coefficients take part in the mask loss ...
    for seed in range(3):
        criterion = MultiBoxLoss.from_config(cfg, rng=np.random.default_rng(seed), backend=backend)
        assert anchors_in_mask_loss(criterion) == [masks_to_train] * len(targets)
    # ... while without the cap every positive does.
    full = MultiBoxLoss.from_config(get_config('yolact_base'), backend=backend)
    assert anchors_in_mask_loss(full) == num_pos


@needs_reference
@pytest.mark.parametrize('backend', BACKENDS_COMPARED)
def test_masks_to_train_sampling_is_seedable_and_rescaled(backend):
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    cfg = get_config('yolact_base', masks_to_train=5)

    def mask_loss(seed):
        criterion = MultiBoxLoss.from_config(cfg, rng=np.random.default_rng(seed), backend=backend)
        return float(criterion(None, predictions, targets, masks, num_crowds)['loss_mask'])

    full = float(MultiBoxLoss.from_config(get_config('yolact_base'), backend=backend)(
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
@pytest.mark.parametrize('backend', BACKENDS_COMPARED)
def test_non_finite_predictions_give_a_nan_loss_not_an_exception(backend):
    """A diverged network must surface as a NaN loss (which train.py reports), not a kernel error."""
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    predictions['proto'] = paddle.full_like(predictions['proto'], float('nan'))
    losses = MultiBoxLoss.from_config(get_config('yolact_base'), backend=backend)(
        None, predictions, targets, masks, num_crowds)
    assert np.isnan(float(losses['loss_mask']))
    assert np.isfinite(float(losses['loss_box'])) and np.isfinite(float(losses['loss_conf']))


# ------------------------------------------------------- device path --
# Device-path specifics: match's forcing loop, fixed-shape sampling, no host copy.

# ------------------------------------------------------------------ match --
def test_paddle_argmax_takes_the_first_maximum():
    """The device forcing loop relies on it (numpy's rule, which the host loop uses)."""
    values = np.zeros(100_000, dtype=np.float32)
    values[[500, 70_000, 99_999]] = 5
    assert int(paddle.to_tensor(values).argmax()) == 500
    rows = np.full((300, 2000), -1, dtype=np.float32)
    assert int(paddle.to_tensor(rows).flatten().argmax()) == 0
    rows[[7, 9], [1500, 3]] = 0.5
    assert int(paddle.to_tensor(rows).flatten().argmax()) == 7 * 2000 + 1500


def _tied_overlaps(rng, num_truths, num_priors):
    """IoU-like [O, P] matrices on a 1/4 grid: ties within rows, across rows and at the maximum; zero rows."""
    overlaps = rng.integers(0, 5, size=(num_truths, num_priors)).astype(np.float32) / 4
    overlaps[rng.uniform(size=overlaps.shape) < 0.5] = 0
    if num_truths > 2:
        overlaps[1] = overlaps[0]          # duplicate truth
        overlaps[2] = 0                    # a truth that overlaps no anchor
    return overlaps


@pytest.mark.parametrize('num_truths, num_priors', [(1, 6), (3, 3), (7, 40), (12, 5), (20, 300)])
def test_device_forcing_loop_equals_the_host_loop(num_truths, num_priors):
    """Exactly the same anchors forced to the same truths, with ties and with more truths than anchors."""
    rng = np.random.default_rng(num_truths * 1000 + num_priors)
    for _ in range(20):
        overlaps = paddle.to_tensor(_tied_overlaps(rng, num_truths, num_priors))
        start = overlaps.max(axis=0), overlaps.argmax(axis=0)
        host_overlap, host_idx = _force_best_priors(overlaps, *start)
        device_overlap, device_idx = _force_best_priors_device(overlaps, *start)
        np.testing.assert_array_equal(device_overlap.numpy(), host_overlap.numpy())
        np.testing.assert_array_equal(device_idx.numpy(), host_idx.numpy())
        assert device_idx.dtype == host_idx.dtype == paddle.int64
        if num_truths <= num_priors:
            # Every truth owns a forced anchor.
            assert len(set(host_idx.numpy()[host_overlap.numpy() == 2])) == num_truths


def _priors(n):
    """n x n center-form anchors of side 1/n (a coarse grid: few anchors overlap a small box)."""
    centers = (np.arange(n) + 0.5) / n
    cx, cy = np.meshgrid(centers, centers)
    return np.stack([cx.ravel(), cy.ravel(), np.full(n * n, 1 / n), np.full(n * n, 1 / n)], axis=1)


def _match_case(name):
    """(truths [O, 4], priors [P, 4], labels [O], crowd boxes [K, 4] or None) as Paddle tensors."""
    rng = np.random.default_rng(7)
    if name == 'random':
        xy = rng.uniform(0, 0.7, (9, 2))
        truths = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (9, 2))], axis=1)
        truths[4] = truths[1]                                   # a duplicate: tied overlaps
        priors, crowds = _priors(8), np.array([[0.6, 0.6, 1.0, 1.0]])
    elif name == 'grid ties':
        # Boxes on the anchors' grid: many IoUs exactly equal.
        corners = rng.integers(0, 4, (10, 2)) / 4
        truths = np.concatenate([corners, corners + 0.25], axis=1)
        priors, crowds = _priors(4), None
    else:
        # 12 tiny truths in one anchor cell of a 3 x 3 grid: more truths than anchors with overlap.
        xy = 0.02 + rng.uniform(0, 0.2, (12, 2))
        truths = np.concatenate([xy, xy + 0.05], axis=1)
        priors, crowds = _priors(3), np.array([[0.0, 0.0, 0.5, 0.5]])
    labels = rng.integers(0, 80, len(truths))
    return (paddle.to_tensor(truths.astype(np.float32)), paddle.to_tensor(priors.astype(np.float32)),
            paddle.to_tensor(labels.astype(np.int64)),
            None if crowds is None else paddle.to_tensor(crowds.astype(np.float32)))


@pytest.mark.parametrize('case', ['random', 'grid ties', 'more truths than overlapping anchors'])
def test_device_match_equals_host_match(case):
    truths, priors, labels, crowds = _match_case(case)
    host = match(0.5, 0.4, 0.7, truths, priors, labels, crowds, backend='host')
    device = match(0.5, 0.4, 0.7, truths, priors, labels, crowds, backend='device')
    for name, h, d in zip(('loc_t', 'conf_t', 'idx_t'), host, device):
        np.testing.assert_array_equal(d.numpy(), h.numpy(), err_msg=name)
    if case == 'more truths than overlapping anchors':
        # One anchor overlaps the 12 truths, of 9 anchors: forcing steps on zeros, then on -1 only.
        overlapping = (jaccard(truths, point_form(priors)).max(axis=0) > 0).astype('int64').sum()
        assert int(overlapping) == 1 and truths.shape[0] > priors.shape[0]


@needs_reference
def test_device_match_equals_host_match_on_the_fixture():
    cfg = get_config('yolact_base')
    _, predictions, targets, _, num_crowds = _batch('yolact_base')
    for target, num_crowd in zip(targets, num_crowds):
        objects, crowds = target[:target.shape[0] - num_crowd], target[target.shape[0] - num_crowd:]
        args = (cfg.positive_iou_threshold, cfg.negative_iou_threshold, cfg.crowd_iou_threshold,
                objects[:, :4], predictions['priors'], objects[:, 4].astype('int64'), crowds[:, :4])
        for h, d in zip(match(*args, backend='host'), match(*args, backend='device')):
            np.testing.assert_array_equal(d.numpy(), h.numpy())


# ------------------------------------------------------------------- loss --
def test_backend_is_validated():
    cfg = get_config('yolact_base')
    assert MultiBoxLoss.from_config(cfg).backend == 'auto'
    assert MultiBoxLoss.from_config(cfg, backend='device').backend == 'device'
    with pytest.raises(ValueError, match='gpu'):
        MultiBoxLoss(81, backend='gpu')
    with pytest.raises(ValueError, match='gpu'):
        MultiBoxLoss.from_config(cfg, backend='gpu')


def _gradients(cfg, net, backend):
    """{prediction or maskiou_net parameter: gradient} of the summed loss terms on the fixture."""
    _, predictions, targets, masks, num_crowds = _batch(cfg.name, trainable=True)
    if net is not None:
        net.clear_gradients()
    losses = MultiBoxLoss.from_config(cfg, backend=backend)(net, predictions, targets, masks, num_crowds)
    paddle.add_n(list(losses.values())).backward()
    grads = {key: predictions[key].grad.numpy() for key in GRAD_KEYS}
    if net is not None:
        grads.update({name: p.grad.numpy() for name, p in net.maskiou_net.named_parameters()})
        net.clear_gradients()
    return grads


@needs_reference
@pytest.mark.parametrize('config', ['yolact_base', 'yolact_plus_resnet50'])
def test_device_gradients_equal_host_gradients(config, yolact_plus_net):
    cfg = get_config(config)
    net = yolact_plus_net if cfg.use_maskiou else None
    host, device = _gradients(cfg, net, 'host'), _gradients(cfg, net, 'device')
    assert set(device) == set(host)
    for key, expected in host.items():
        assert np.abs(expected).max() > 0, key
        # float32 accuracy: the sums over anchors (mask, proto) run in another order.
        np.testing.assert_allclose(device[key], expected, rtol=1e-5, atol=2e-6 * np.abs(expected).max(), err_msg=key)
    # Anchors outside the loss get exactly no gradient, as on the host path.
    for key in ('loc', 'conf', 'mask'):
        np.testing.assert_array_equal(device[key] == 0, host[key] == 0, err_msg=key)


@needs_reference
def test_device_path_on_images_without_objects_or_only_crowds():
    """The host path's cases of test_images_without_objects_still_teach_background, on the device path."""
    cfg = get_config('yolact_base')
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    second = {k: v if k == 'priors' else v[1:2] for k, v in predictions.items()}
    no_target, no_mask = paddle.zeros([0, 5]), paddle.zeros([0] + masks[1].shape[1:])
    batches = {'empty image': (second, [no_target], [no_mask], [0]),
               'only crowds': (second, [targets[1]], [masks[1]], [targets[1].shape[0]]),
               'two empty images': (predictions, [no_target, no_target], [no_mask, no_mask], [0, 0]),
               'beside only crowds': (predictions, [targets[0], targets[1]], [masks[0], masks[1]],
                                      [num_crowds[0], targets[1].shape[0]]),
               'beside an empty image': (predictions, [targets[0], no_target], [masks[0], no_mask],
                                         [num_crowds[0], 0])}
    for name, batch in batches.items():
        losses = _both(cfg, None, *batch)
        _assert_terms_equal(losses['device'], losses['host'])
        assert all(np.isfinite(float(v)) for v in losses['device'].values()), name
        assert float(losses['device']['loss_conf']) > 0, name
        if name in ('empty image', 'only crowds', 'two empty images'):
            assert float(losses['device']['loss_box']) == 0 and float(losses['device']['loss_mask']) == 0, name


@needs_reference
def test_device_path_of_images_without_objects_with_the_mask_iou_net(yolact_plus_net):
    cfg = get_config('yolact_plus_resnet50')
    _, predictions, targets, masks, num_crowds = _batch('yolact_plus_resnet50')
    no_target, no_mask = paddle.zeros([0, 5]), paddle.zeros([0] + masks[1].shape[1:])
    for batch_targets, batch_masks, batch_crowds in (([no_target, no_target], [no_mask, no_mask], [0, 0]),
                                                     ([targets[0], no_target], [masks[0], no_mask],
                                                      [num_crowds[0], 0])):
        losses = _both(cfg, yolact_plus_net, predictions, batch_targets, batch_masks, batch_crowds)
        _assert_terms_equal(losses['device'], losses['host'])


@needs_reference
def test_device_masks_to_train_at_the_positive_count_takes_every_positive():
    """k = num_pos of one image (no candidate left over) and k > num_pos of the other: the host's loss."""
    _, predictions, targets, masks, num_crowds = _batch('yolact_base')
    cfg = get_config('yolact_base')
    num_pos = _positives_per_image(cfg, predictions['priors'], targets, num_crowds)
    assert num_pos[0] < num_pos[1]
    losses = _both(get_config('yolact_base', masks_to_train=num_pos[1]), None, predictions, targets, masks,
                   num_crowds)
    _assert_terms_equal(losses['device'], losses['host'])


class _RecordingMaskIoUNet:
    """A stand-in for ``net`` whose maskiou_net records the batches it sees."""

    def __init__(self, net):
        self.inputs = []
        self._net = net
        self.maskiou_net = self._forward

    def _forward(self, x):
        self.inputs.append(list(x.shape))
        return self._net.maskiou_net(x)


@needs_reference
def test_device_maskious_to_train_subset(yolact_plus_net):
    _, predictions, targets, masks, num_crowds = _batch('yolact_plus_resnet50')
    cfg = get_config('yolact_plus_resnet50')

    def maskiou_loss(maskious_to_train, seed=0, backend='device'):
        net = _RecordingMaskIoUNet(yolact_plus_net)
        criterion = MultiBoxLoss.from_config(get_config(cfg.name, maskious_to_train=maskious_to_train),
                                             rng=np.random.default_rng(seed), backend=backend)
        return float(criterion(net, predictions, targets, masks, num_crowds)['loss_maskiou']), net.inputs

    full, inputs = maskiou_loss(-1)
    # A fixed-size batch: masks_to_train candidates per image, whatever the number of positives.
    assert inputs == [[2 * cfg.masks_to_train, 1, 138, 138]]
    subset, inputs = maskiou_loss(3, seed=1)
    assert inputs == [[3, 1, 138, 138]]
    assert subset == maskiou_loss(3, seed=1)[0] and subset != maskiou_loss(3, seed=2)[0]
    assert 0 < subset < full
    # A cap below the candidates but above the weighted samples (at most the positives)
    # keeps every weighted one: the host path, which has fewer samples than the cap, takes no subset.
    cap = sum(_positives_per_image(cfg, predictions['priors'], targets, num_crowds))
    assert cap < 2 * cfg.masks_to_train
    capped, inputs = maskiou_loss(cap)
    assert inputs == [[cap, 1, 138, 138]]
    np.testing.assert_allclose(capped, full, rtol=RTOL)
    host, inputs = maskiou_loss(cap, backend='host')
    assert inputs[0][0] <= cap
    np.testing.assert_allclose(capped, host, rtol=RTOL)


@needs_reference
@pytest.mark.parametrize('discard_mask_area', [360, 10_000])
def test_device_discard_mask_area_equals_host(discard_mask_area, yolact_plus_net):
    """The fixture's GT masks cover 212..576 prototype pixels: 360 drops half of them, 10000 all."""
    cfg = get_config('yolact_plus_resnet50', discard_mask_area=discard_mask_area)
    _, predictions, targets, masks, num_crowds = _batch('yolact_plus_resnet50')
    losses = _both(cfg, yolact_plus_net, predictions, targets, masks, num_crowds)
    _assert_terms_equal(losses['device'], losses['host'])
    default = MultiBoxLoss.from_config(get_config('yolact_plus_resnet50'), backend='host')(
        yolact_plus_net, predictions, targets, masks, num_crowds)['loss_maskiou']
    if discard_mask_area == 10_000:
        assert float(losses['device']['loss_maskiou']) == 0
    else:
        assert 0 < float(losses['device']['loss_maskiou']) < float(default)


# --------------------------------------------------------- no host copy --
class _LossGuard(_HostCopyGuard):
    """_HostCopyGuard plus the ops whose output shape depends on tensor values and boolean-mask indexing."""

    OPS = ('nonzero', 'masked_select', 'unique', 'to_tensor')

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch)
        for name in self.OPS:
            monkeypatch.setattr(paddle, name, self._recording_op(name, getattr(paddle, name)))
        for name in ('nonzero', 'masked_select', 'unique'):
            monkeypatch.setattr(paddle.Tensor, name, self._recording_op(name, getattr(paddle.Tensor, name)))
        for name in ('__getitem__', '__setitem__'):
            monkeypatch.setattr(paddle.Tensor, name, self._indexing(name, getattr(paddle.Tensor, name)))

    def _recording_op(self, name, original):
        def op(*args, **kwargs):
            self.calls.append((name, None))
            return original(*args, **kwargs)
        return op

    def _indexing(self, name, original):
        def method(tensor, item, *args):
            items = item if isinstance(item, tuple) else (item,)
            if any(isinstance(i, paddle.Tensor) and i.dtype == paddle.bool for i in items):
                self.calls.append((name + '[bool]', tuple(tensor.shape)))
            return original(tensor, item, *args)
        return method


@needs_reference
def test_device_loss_makes_no_host_copy(monkeypatch, yolact_plus_net):
    """Between the predictions and the returned terms: no copy to the host, no scalar read, no value-dependent shape.

    A Python-level guard: it sees every call through paddle.Tensor's Python
    methods and the paddle.* functions named (the loss calls ops as paddle.*),
    not what a C++ kernel does inside; none of the ops the device path uses
    has an output shape that depends on values.
    """
    batches = {name: _batch(name, trainable=True) for name in ('yolact_base', 'yolact_plus_resnet50')}
    no_target = paddle.zeros([0, 5])
    runs = []
    for name, (_, predictions, targets, masks, num_crowds) in batches.items():
        cfg = get_config(name)
        net = yolact_plus_net if cfg.use_maskiou else None
        runs.append((cfg, net, predictions, targets, masks, num_crowds))
        # Sampling: more positives than masks_to_train and mask-IoU samples than maskious_to_train.
        runs.append((get_config(name, masks_to_train=5, maskious_to_train=3), net, predictions, targets,
                     masks, num_crowds))
        # An image without objects and one with only crowds.
        runs.append((cfg, net, predictions, [no_target, targets[1]],
                     [paddle.zeros([0] + masks[1].shape[1:]), masks[1]], [0, targets[1].shape[0]]))
    criteria = [MultiBoxLoss.from_config(run[0], rng=np.random.default_rng(0), backend='device') for run in runs]
    host = MultiBoxLoss.from_config(runs[0][0], backend='host')

    guard = _LossGuard(monkeypatch)
    # The guard sees what the host path does (so it would see it on the device path too) ...
    host(*runs[0][1:])
    assert {'numpy', '__int__', 'nonzero'} <= {name for name, _ in guard.calls}, guard.calls
    del guard.calls[:]
    # ... and the device path does none of it, gradients included.
    for criterion, run in zip(criteria, runs):
        losses = criterion(*run[1:])
        paddle.add_n(list(losses.values())).backward()
    assert guard.calls == []
