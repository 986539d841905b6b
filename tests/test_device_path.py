"""The device path of Detect and PostProcess (GPU: no host copy before the final masks).

The machine running the tests has no GPU, so the device path is forced onto
the CPU (``backend='device'``) and compared with the host (numpy/cv2) path,
the reference fixtures and PyTorch: the same Paddle ops run on a GPU.
"""
import numpy as np
import paddle
import pytest

from layers.functions import Detect
from layers.functions.detection import (_best_pairs, _max_iou_with_better, _max_iou_with_better_device, _rank_keys,
                                        _top_k_by_rank)
from layers.output_utils import PostProcess, upsample_masks, upsample_masks_device
from tests.conftest import needs_reference
from tests.test_detect import (UPSAMPLE_SIZES, H, W, _assert_post_matches, _naive_nms, _preds,  # noqa: F401
                               near_threshold_masks, reference_run)

NMS_MODES = {'fast': dict(use_fast_nms=True), 'cross_class': dict(use_cross_class_nms=True),
             'traditional': dict(use_fast_nms=False)}


def test_rank_keys_order_as_a_stable_descending_sort():
    rng = np.random.default_rng(0)
    # Few distinct values (ties inside and across any cut), negatives, and both zeros.
    scores = (rng.integers(-3, 4, size=(5, 300)) / 4).astype(np.float32)
    scores[:, :7] = [-0.0, 0.0, -0.0, 1e-30, -1e-30, np.float32(3e38), -np.float32(3e38)]
    # numpy's stable sort of -scores: -(-0.0) == -(0.0), a tie as the rule wants.
    expected = np.argsort(-scores, axis=1, kind='stable')
    keys = _rank_keys(paddle.to_tensor(scores)).numpy()
    np.testing.assert_array_equal(np.argsort(-keys, axis=1), expected)
    assert all(len(np.unique(row)) == row.size for row in keys)
    np.testing.assert_array_equal(_top_k_by_rank(paddle.to_tensor(scores), 40).numpy(), expected[:, :40])


def test_max_iou_with_better_device_equals_numpy_and_torch():
    """Bit for bit the numpy path and PyTorch's float32 IoU (Paddle's own float32 division is not)."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1, (4, 60, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(0.01, 0.5, (4, 60, 2)).astype(np.float32)], axis=2)
    boxes[:, 7] = boxes[:, 2]            # an exact duplicate: IoU 1
    boxes[:, 9, 2] = boxes[:, 9, 0]      # a zero-width box
    actual = _max_iou_with_better_device(paddle.to_tensor(boxes)).numpy()
    np.testing.assert_array_equal(actual, _max_iou_with_better(boxes))

    a = torch.from_numpy(boxes)
    inter = torch.clamp(torch.min(a[:, :, None, 2:], a[:, None, :, 2:])
                        - torch.max(a[:, :, None, :2], a[:, None, :, :2]), min=0).prod(3)
    area = (a[:, :, 2] - a[:, :, 0]) * (a[:, :, 3] - a[:, :, 1])
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    np.testing.assert_array_equal(actual, iou.triu(diagonal=1).max(dim=1)[0].numpy())


@pytest.mark.parametrize('src, dst', UPSAMPLE_SIZES)
def test_upsample_masks_device_equals_torch_and_the_host_path(src, dst):
    soft, expected = near_threshold_masks(src, dst)
    actual = upsample_masks_device(paddle.to_tensor(soft), *dst)
    assert actual.dtype == paddle.bool
    np.testing.assert_array_equal(actual.numpy(), expected)
    np.testing.assert_array_equal(actual.numpy(), upsample_masks(soft, *dst))


def test_upsample_masks_device_in_chunks(monkeypatch):
    soft = np.random.default_rng(2).uniform(0, 1, (5, 6, 6)).astype(np.float32)
    whole = upsample_masks_device(paddle.to_tensor(soft), 13, 11).numpy()
    # Two output masks per chunk: three chunks, the last one short.
    monkeypatch.setattr('layers.output_utils._UPSAMPLE_CHUNK_PIXELS', 2 * 13 * 11)
    np.testing.assert_array_equal(upsample_masks_device(paddle.to_tensor(soft), 13, 11).numpy(), whole)
    np.testing.assert_array_equal(whole, upsample_masks(soft, 13, 11))


def _detections(det):
    """(anchor, class, score) rows of a Detect output on _preds boxes (coefficient 0 = anchor)."""
    return list(zip(det['coeffs'].numpy()[:, 0].astype(int).tolist(), det['classes'].numpy().tolist(),
                    det['scores'].numpy().tolist()))


@pytest.mark.parametrize('mode', sorted(NMS_MODES))
def test_device_detect_equals_host_detect_on_random_boxes(mode):
    rng = np.random.default_rng(0)
    n = 120
    # Large boxes on a 1/64 grid: overlaps of all degrees, IoUs exactly on the threshold, tied scores.
    xy = rng.integers(0, 32, size=(n, 2)) / 64
    boxes = np.concatenate([xy, xy + rng.integers(16, 33, size=(n, 2)) / 64], axis=1).astype(np.float32)
    conf = rng.dirichlet(np.full(4, 0.5), size=n).astype(np.float32)
    conf[::7] = conf[3]
    preds = _preds(boxes, conf)
    args = dict(num_classes=4, top_k=40, conf_thresh=0.05, nms_thresh=0.5, max_num_detections=30, **NMS_MODES[mode])
    host = Detect(**args, backend='host')(preds)[0]
    device = Detect(**args, backend='device')(preds)[0]
    assert set(device) == {'boxes', 'scores', 'classes', 'coeffs', 'proto'}
    # Per-class rules fill max_num_detections; cross-class NMS suppresses some of its top_k.
    assert len(_detections(host)) == 30 if mode != 'cross_class' else 0 < len(_detections(host)) < 40
    assert _detections(device) == _detections(host)
    np.testing.assert_array_equal(device['boxes'].numpy(), host['boxes'].numpy())
    if mode != 'cross_class':
        expected = _naive_nms(boxes, conf, mode == 'fast', nms_thresh=0.5, top_k=40, conf_thresh=0.05,
                              max_num=30, max_size=550)
        assert [(a, c, round(s, 6)) for a, c, s in _detections(device)] == expected


def _random_boxes(rng, n):
    xy = rng.uniform(0, 0.7, size=(n, 2))
    return np.concatenate([xy, xy + rng.uniform(0.05, 0.3, size=(n, 2))], axis=1)


def _fast_nms_case(name):
    """(boxes [P, 4], conf [P, C], top_k, max_num_detections) of one case of the block test."""
    rng = np.random.default_rng(3)
    if name == 'late survivors':
        # 290 near-identical boxes outscore 10 small disjoint ones far away: each
        # class keeps its best clustered box and all 10 far ones, which come after
        # its 290 suppressed boxes: the blocks grow until every pair is examined.
        boxes = np.concatenate([0.5 + rng.uniform(0, 0.002, (290, 4)) * [1, 1, 1, 1] + [0, 0, 0.3, 0.3],
                                np.stack([np.arange(10) * 0.04, np.zeros(10), np.arange(10) * 0.04 + 0.03,
                                          np.full(10, 0.03)], axis=1)])
        conf = np.concatenate([rng.uniform(0.5, 0.9, (290, 6)), rng.uniform(0.06, 0.1, (10, 6))])
        return boxes, conf, 300, 100
    n, num_classes, top_k, max_num = {'busy image': (600, 21, 200, 100), 'tied scores': (400, 9, 50, 60),
                                      'fewer anchors than top_k': (20, 5, 200, 100)}[name]
    conf = rng.dirichlet(np.full(num_classes, 0.3), size=n)
    if name == 'tied scores':
        conf = np.round(conf * 16) / 16        # ties inside and across every cut
    return _random_boxes(rng, n), conf, top_k, max_num


@pytest.mark.parametrize('count', [1, 7, 40, 119, 120])
def test_best_pairs_are_the_head_of_a_full_stable_sort(count):
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=(4, 30)).astype(np.float32) / 4     # ties everywhere
    expected = np.argsort(-scores.ravel(), kind='stable')[:count]        # class-major flat positions
    classes, candidates = _best_pairs(scores, scores.max(axis=0), count)
    np.testing.assert_array_equal(classes * 30 + candidates, expected)


@pytest.mark.parametrize('case', ['busy image', 'tied scores', 'fewer anchors than top_k', 'late survivors'])
def test_host_fast_nms_by_blocks_equals_the_full_rule(case):
    """The host path examines the best pairs in blocks; the device path computes every class's full IoU matrix."""
    boxes, conf, top_k, max_num = _fast_nms_case(case)
    preds = _preds(boxes.astype(np.float32), conf.astype(np.float32))
    args = dict(num_classes=conf.shape[1], top_k=top_k, conf_thresh=0.05, nms_thresh=0.5,
                max_num_detections=max_num)
    host = _detections(Detect(**args, backend='host')(preds)[0])
    assert host == _detections(Detect(**args, backend='device')(preds)[0])
    if case == 'late survivors':
        assert len(host) == 5 + 5 * 10 and {a for a, _, _ in host[5:]} == set(range(290, 300))
    elif case == 'fewer anchors than top_k':
        assert 0 < len(host) <= 20 * 4          # fewer pairs than max_num_detections
    else:
        assert len(host) == max_num


@pytest.mark.parametrize('mode', sorted(NMS_MODES))
def test_device_detect_without_candidates(mode):
    preds = _preds([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], [[0.99, 0.01], [0.97, 0.03]])
    det = Detect(2, 200, 0.05, 0.5, 100, **NMS_MODES[mode], backend='device')(preds)[0]
    assert det['boxes'].shape == [0, 4] and det['coeffs'].shape == [0, 2] and det['scores'].shape == [0]
    assert det['classes'].dtype == paddle.int64


class _HostCopyGuard:
    """Records every host copy or scalar read of a paddle.Tensor while active."""

    NAMES = ('numpy', 'item', 'tolist', '__float__', '__int__', '__bool__', '__index__', '__array__')

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(paddle.Tensor, name)
            monkeypatch.setattr(paddle.Tensor, name, self._recording(name, original))

    def _recording(self, name, original):
        def method(tensor, *args, **kwargs):
            self.calls.append((name, tuple(tensor.shape)))
            return original(tensor, *args, **kwargs)
        return method


@pytest.mark.parametrize('mode', sorted(NMS_MODES))
def test_device_path_copies_only_the_final_arrays(monkeypatch, mode):
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 0.5, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (50, 2))], axis=1).astype(np.float32)
    preds = _preds(boxes, rng.dirichlet(np.ones(3), size=50).astype(np.float32))
    preds['proto'] = paddle.to_tensor(rng.normal(size=(1, 8, 8, 2)).astype(np.float32))
    detect = Detect(3, 20, 0.05, 0.5, 10, **NMS_MODES[mode], backend='device')

    def maskiou_net(masks):
        return paddle.nn.functional.sigmoid(masks.mean(axis=[1, 2, 3])).unsqueeze(1).tile([1, 2])

    postprocess = PostProcess(rescore_mask=True, score_threshold=0.01, backend='device')
    guard = _HostCopyGuard(monkeypatch)
    det = detect(preds)[0]
    assert guard.calls == []
    out = postprocess(det, 30, 20, maskiou_net=maskiou_net, max_num_detections=8)
    n = len(out['scores'])
    assert n > 0
    # One copy per returned array, after all the device work: the masks first, once.
    assert guard.calls[0] == ('numpy', (n, 20, 30))
    assert sorted(guard.calls[1:]) == [('numpy', (n,))] * 3 + [('numpy', (n, 4))]


@needs_reference
@pytest.mark.parametrize('mode', sorted(NMS_MODES))
def test_device_path_equals_host_path_on_reference_fixtures(reference_run, mode):  # noqa: F811
    cfg, net, _, ref, preds = reference_run
    args = dict(num_classes=cfg.num_classes, top_k=200, conf_thresh=0.05, nms_thresh=0.5, max_num_detections=100,
                **NMS_MODES[mode])
    host = Detect(**args, backend='host')(preds)[0]
    device = Detect(**args, backend='device')(preds)[0]
    # The same detections in the same order, to the last bit.
    assert host['scores'].shape[0] > 0
    for key in ('classes', 'scores', 'boxes', 'coeffs', 'proto'):
        np.testing.assert_array_equal(device[key].numpy(), host[key].numpy(), err_msg=key)

    posts = {backend: PostProcess.from_config(cfg, backend=backend)(det, W, H, maskiou_net=net.maskiou_net)
             for backend, det in (('host', host), ('device', device))}
    assert set(posts['device']) == set(posts['host'])
    for key in posts['host']:
        np.testing.assert_array_equal(posts['device'][key], posts['host'][key], err_msg=key)
    if mode == 'fast':      # the fixtures hold the reference's Fast NMS results
        _assert_post_matches(posts['device'], ref)
