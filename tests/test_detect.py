"""Detect (decode + NMS), PostProcess and Predictor, on both paths (layers.backend: host and device).

Hand-made cases use boxes with dyadic coordinates and zero offsets, so every
decoded box and IoU is exact and the expected detections are worked out by
hand in the comments. The parity tests run the seed-0 network on the
reference fixtures and require the reference's detections, in its order.
"""
import numpy as np
import paddle
import pytest

from data.config import get_config
from layers.functions import Detect
from layers.box_utils import crop, jaccard
from layers.functions.detection import (_best_pairs, _max_iou_with_better, _max_iou_with_better_device, _rank_keys,
                                        _top_k_by_rank, _top_k_desc)
from layers.output_utils import (PostProcess, _crop_in_place, undo_image_transformation, upsample_masks,
                                 upsample_masks_device)
from tests.conftest import needs_reference, reference_npz, reference_params
from data.transforms import FastBaseTransform
from utils.deploy.network_export import export_yolact
from utils.predictor import Predictor
from yolact import Yolact

MASK_DIM = 2


def _preds(boxes, conf):
    """One image whose anchors decode exactly to ``boxes`` (all offsets 0).

    boxes: [P, 4] point form; conf: [P, C] scores, column 0 background.
    Mask coefficient 0 of each anchor is its index, to tell which anchor a detection is.
    """
    boxes = np.asarray(boxes, np.float32)
    conf = np.asarray(conf, np.float32)
    n = len(boxes)
    priors = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
    coeffs = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    return {'loc': paddle.zeros([1, n, 4]), 'conf': paddle.to_tensor(conf[None]),
            'mask': paddle.to_tensor(coeffs[None]), 'priors': paddle.to_tensor(priors),
            'proto': paddle.zeros([1, 4, 4, MASK_DIM])}


@pytest.fixture(params=['host', 'device'])
def backend(request):
    """Each path of Detect and PostProcess (see layers.backend): the device path runs on the CPU here."""
    return request.param


def _detect(backend, boxes, conf, **kwargs):
    """[(anchor, class, score)] of one image, in output order, by the ``backend`` path."""
    args = dict(num_classes=len(conf[0]), top_k=200, conf_thresh=0.05, nms_thresh=0.5, max_num_detections=100,
                backend=backend)
    args.update(kwargs)
    det = Detect(**args)(_preds(boxes, conf))[0]
    assert det['classes'].dtype == paddle.int64
    anchors = det['coeffs'].numpy()[:, 0].astype(int)
    return [(int(a), int(c), round(float(s), 6))
            for a, c, s in zip(anchors, det['classes'].numpy(), det['scores'].numpy())]


# Boxes on the unit square spanning the full height; IoU of x-intervals.
X_0_50 = [0, 0, 0.5, 1]
X_125_625 = [0.125, 0, 0.625, 1]     # IoU with X_0_50: 0.375 / 0.625 = 0.6
X_25_75 = [0.25, 0, 0.75, 1]         # IoU with X_125_625: 0.6, with X_0_50: 0.25 / 0.75 = 1/3
X_25_50 = [0.25, 0, 0.5, 1]          # IoU with X_0_50: 0.25 / 0.5 = 0.5 exactly
FAR = [[0, 0, 0.125, 0.125], [0.25, 0.25, 0.375, 0.375], [0.5, 0.5, 0.625, 0.625],
       [0.75, 0.75, 0.875, 0.875], [0.875, 0, 1, 0.125]]   # pairwise disjoint


class TestFastNMS:
    def test_suppresses_overlapping_lower_score(self, backend):
        # Anchor 1 overlaps anchor 0 (IoU 0.6) and scores lower; anchor 2 is far away.
        conf = [[0, 0.9], [0, 0.8], [0, 0.7]]
        assert _detect(backend, [X_0_50, X_125_625, FAR[3]], conf) == [(0, 0, 0.9), (2, 0, 0.7)]

    def test_higher_score_wins_whatever_the_anchor_order(self, backend):
        assert _detect(backend, [X_0_50, X_125_625], [[0, 0.8], [0, 0.9]]) == [(1, 0, 0.9)]

    def test_suppressed_boxes_still_suppress(self, backend):
        # 2 is suppressed by 1 (IoU 0.6) although 1 is itself suppressed by 0;
        # greedy NMS would keep 2, as IoU(0, 2) = 1/3.
        boxes, conf = [X_0_50, X_125_625, X_25_75], [[0, 0.9], [0, 0.8], [0, 0.7]]
        assert _detect(backend, boxes, conf) == [(0, 0, 0.9)]

    def test_threshold_boundary(self, backend):
        boxes, conf = [X_0_50, X_25_50], [[0, 0.9], [0, 0.8]]
        # IoU exactly 0.5 is not above nms_thresh 0.5: kept.
        assert _detect(backend, boxes, conf, nms_thresh=0.5) == [(0, 0, 0.9), (1, 0, 0.8)]
        assert _detect(backend, boxes, conf, nms_thresh=0.4375) == [(0, 0, 0.9)]

    def test_classes_are_independent(self, backend):
        # Overlapping anchors, each best in another class. Class 0: anchor 0 (0.9)
        # suppresses anchor 1 (0.2); class 1: anchor 1 (0.8) suppresses anchor 0 (0.1).
        assert _detect(backend, [X_0_50, X_125_625], [[0, 0.9, 0.1], [0, 0.2, 0.8]]) == [(0, 0, 0.9), (1, 1, 0.8)]

    def test_cross_class(self, backend):
        # Each anchor competes with its best class only: 0 (class 0, 0.9) suppresses 1 (class 1, 0.8).
        assert _detect(backend, [X_0_50, X_125_625], [[0, 0.9, 0.1], [0, 0.2, 0.8]],
                       use_cross_class_nms=True) == [(0, 0, 0.9)]
        # Disjoint boxes all survive, best first, with their best class.
        assert _detect(backend, FAR[:3], [[0, 0.3, 0.6], [0, 0.9, 0.0], [0, 0.1, 0.2]],
                       use_cross_class_nms=True) == [(1, 0, 0.9), (0, 1, 0.6), (2, 1, 0.2)]

    def test_every_class_row_is_kept_without_a_second_threshold(self, backend):
        # As the reference: after candidate selection, each class keeps its
        # unsuppressed anchors whatever their score in that class.
        conf = [[0, 0.9, 0.01], [0, 0.02, 0.6]]
        assert _detect(backend, FAR[:2], conf) == [(0, 0, 0.9), (1, 1, 0.6), (1, 0, 0.02), (0, 1, 0.01)]

    def test_candidates_need_a_foreground_score_above_conf_thresh(self, backend):
        # Anchor 0's best foreground score is 0.04 <= 0.05: never a candidate, in no class.
        assert _detect(backend, FAR[:2], [[0.96, 0.04], [0.4, 0.6]]) == [(1, 0, 0.6)]

    def test_no_candidates(self, backend):
        det = Detect(2, 200, 0.05, 0.5, 100, backend=backend)(_preds(FAR[:2], [[0.99, 0.01], [0.97, 0.03]]))[0]
        assert det['boxes'].shape == [0, 4] and det['coeffs'].shape == [0, MASK_DIM]
        assert det['classes'].shape == [0] and det['scores'].shape == [0]
        assert det['classes'].dtype == paddle.int64
        assert det['proto'].shape == [4, 4, MASK_DIM]

    def test_top_k_per_class(self, backend):
        conf = [[0, 0.7], [0, 0.9], [0, 0.8]]
        assert _detect(backend, FAR[:3], conf, top_k=2) == [(1, 0, 0.9), (2, 0, 0.8)]
        # top_k applies to each class separately: each keeps its own best anchor ...
        conf = [[0, 0.7, 0.1], [0, 0.9, 0.3], [0, 0.6, 0.2]]
        assert _detect(backend, FAR[:3], conf, top_k=1) == [(1, 0, 0.9), (1, 1, 0.3)]
        # ... and to all candidates together in cross-class NMS (best classes: 0.7, 0.9, 0.6).
        assert _detect(backend, FAR[:3], conf, top_k=2, use_cross_class_nms=True) == [(1, 0, 0.9), (0, 0, 0.7)]

    def test_max_num_detections_keeps_the_best_of_all_classes(self, backend):
        # Disjoint boxes, pooled: 0.9 (0, c0), 0.8 (1, c1), 0.6 (2, c1), 0.5 (2, c0), 0.3, 0.2.
        conf = [[0, 0.9, 0.3], [0, 0.2, 0.8], [0, 0.5, 0.6]]
        assert _detect(backend, FAR[:3], conf, max_num_detections=3) == [(0, 0, 0.9), (1, 1, 0.8), (2, 1, 0.6)]

    def test_ties_go_to_the_lower_index(self, backend):
        # Equal scores: the earlier anchor ranks first, so it suppresses the later one.
        assert _detect(backend, [X_125_625, X_0_50], [[0, 0.5], [0, 0.5]]) == [(0, 0, 0.5)]
        # A tie across the top_k cut: the earlier anchors are the ones kept.
        conf = [[0, 0.5], [0, 0.9], [0, 0.5], [0, 0.5]]
        assert _detect(backend, FAR[:4], conf, top_k=2) == [(1, 0, 0.9), (0, 0, 0.5)]
        assert _detect(backend, FAR[:4], conf, top_k=3) == [(1, 0, 0.9), (0, 0, 0.5), (2, 0, 0.5)]
        # A tie inside the top_k only.
        conf = [[0, 0.5], [0, 0.9], [0, 0.5], [0, 0.1]]
        assert _detect(backend, FAR[:4], conf, top_k=3) == [(1, 0, 0.9), (0, 0, 0.5), (2, 0, 0.5)]

    def test_top_k_desc_matches_a_stable_sort(self):
        rng = np.random.default_rng(0)
        # Few distinct values: many ties inside and across the cut.
        scores = rng.integers(0, 6, size=(7, 300)).astype(np.float32) / 8
        expected = np.argsort(-scores, axis=1, kind='stable')[:, :50]
        np.testing.assert_array_equal(_top_k_desc(paddle.to_tensor(scores), 50).numpy(), expected)
        scores = rng.random((7, 300)).astype(np.float32)
        expected = np.argsort(-scores, axis=1, kind='stable')[:, :50]
        np.testing.assert_array_equal(_top_k_desc(paddle.to_tensor(scores), 50).numpy(), expected)

    def test_boxes_are_decoded_offsets(self, backend):
        # Prior (cx, cy, w, h) = (0.5, 0.5, 0.25, 0.5); loc (1, -1, ln 2 / 0.2, 0):
        # center (0.5 + 0.1 * 0.25, 0.5 - 0.1 * 0.5) = (0.525, 0.45), size (0.5, 0.5).
        preds = _preds([[0.375, 0.25, 0.625, 0.75]], [[0, 0.9]])
        preds['loc'] = paddle.to_tensor([[[1.0, -1.0, np.log(2) / 0.2, 0.0]]])
        det = Detect(2, 200, 0.05, 0.5, 100, backend=backend)(preds)[0]
        np.testing.assert_allclose(det['boxes'].numpy(), [[0.275, 0.2, 0.775, 0.7]], atol=1e-6)

    def test_batch(self, backend):
        # Priors are shared; image 0 prefers anchor 0, image 1 anchor 1 (IoU 0.6: one survivor each).
        a = _preds([X_0_50, X_125_625], [[0, 0.9], [0, 0.8]])
        b = _preds([X_0_50, X_125_625], [[0, 0.3], [0, 0.4]])
        preds = {k: paddle.concat([a[k], b[k]]) for k in ('loc', 'conf', 'mask')}
        preds['priors'] = a['priors']
        preds['proto'] = paddle.concat([paddle.zeros([1, 4, 4, MASK_DIM]), paddle.ones([1, 4, 4, MASK_DIM])])
        out = Detect(2, 200, 0.05, 0.5, 100, backend=backend)(preds)
        assert len(out) == 2
        for det, anchor, score in zip(out, (0, 1), (0.9, 0.4)):
            assert det['coeffs'].numpy()[:, 0].tolist() == [anchor]
            assert det['scores'].numpy().tolist() == pytest.approx([score])
        assert float(out[0]['proto'].max()) == 0 and float(out[1]['proto'].min()) == 1


class TestTraditionalNMS:
    def test_greedy(self, backend):
        # Only kept boxes suppress: 2 survives (IoU with 0 is about 1/3).
        boxes, conf = [X_0_50, X_125_625, X_25_75], [[0, 0.9], [0, 0.8], [0, 0.7]]
        assert _detect(backend, boxes, conf, use_fast_nms=False) == [(0, 0, 0.9), (2, 0, 0.7)]

    def test_per_class_conf_threshold(self, backend):
        conf = [[0, 0.9, 0.01], [0, 0.02, 0.6]]
        assert _detect(backend, FAR[:2], conf, use_fast_nms=False) == [(0, 0, 0.9), (1, 1, 0.6)]
        assert _detect(backend, [X_0_50, X_125_625], [[0, 0.9, 0.1], [0, 0.2, 0.8]],
                       use_fast_nms=False) == [(0, 0, 0.9), (1, 1, 0.8)]

    def test_pixel_convention(self, backend):
        # At max_size 550, widths count both end pixels: X_0_50 spans 0..275 px,
        # 276 wide, X_25_50 137.5..275, 138.5 wide; IoU 138.5 / 276 = 0.5018
        # (the relative IoU is 0.5): suppressed at 0.501.
        boxes, conf = [X_0_50, X_25_50], [[0, 0.9], [0, 0.8]]
        assert _detect(backend, boxes, conf, use_fast_nms=False, nms_thresh=0.501) == [(0, 0, 0.9)]
        # At max_size 2: 2 px and 1.5 px wide, IoU 1.5 / 2 = 0.75 exactly; an
        # IoU equal to the threshold suppresses.
        assert _detect(backend, boxes, conf, use_fast_nms=False, nms_thresh=0.8,
                       max_size=2) == [(0, 0, 0.9), (1, 0, 0.8)]
        assert _detect(backend, boxes, conf, use_fast_nms=False, nms_thresh=0.75, max_size=2) == [(0, 0, 0.9)]

    def test_max_num_detections(self, backend):
        conf = [[0, 0.9, 0.3], [0, 0.2, 0.8], [0, 0.5, 0.6]]
        assert _detect(backend, FAR[:3], conf, use_fast_nms=False,
                       max_num_detections=4) == [(0, 0, 0.9), (1, 1, 0.8), (2, 1, 0.6), (2, 0, 0.5)]
        # All of the cut from one class.
        conf = [[0, 0.9], [0, 0.7], [0, 0.8]]
        assert _detect(backend, FAR[:3], conf, use_fast_nms=False, max_num_detections=2) == [(0, 0, 0.9), (2, 0, 0.8)]

    def test_cross_class_needs_fast_nms(self):
        with pytest.raises(ValueError, match='cross-class'):
            Detect(2, 200, 0.05, 0.5, 100, use_fast_nms=False, use_cross_class_nms=True)


def _naive_iou(a, b, plus_one):
    """IoU of two point-form boxes, pixel-inclusive widths when plus_one."""
    e = 1 if plus_one else 0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + e)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + e)
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + e) * (r[3] - r[1] + e)
    return inter / (area(a) + area(b) - inter)


def _naive_nms(boxes, conf, fast, top_k, conf_thresh, nms_thresh, max_num, max_size):
    """Pair-by-pair transcription of the reference rules (Fast NMS / Cython greedy NMS)."""
    fg = conf[:, 1:]
    candidates = [p for p in range(len(boxes)) if fg[p].max() > conf_thresh]
    pooled = []
    for c in range(fg.shape[1]):
        pool = candidates if fast else [p for p in candidates if fg[p, c] > conf_thresh]
        ranked = sorted(pool, key=lambda p: -fg[p, c])[:top_k if fast else None]
        kept = []
        for j, p in enumerate(ranked):
            if fast:
                if all(_naive_iou(boxes[q], boxes[p], False) <= nms_thresh for q in ranked[:j]):
                    kept.append(p)
            elif all(_naive_iou(boxes[q] * max_size, boxes[p] * max_size, True) < nms_thresh for q in kept):
                kept.append(p)
        pooled += [(p, c, fg[p, c]) for p in kept]
    pooled.sort(key=lambda d: -d[2])
    return [(p, c, round(float(s), 6)) for p, c, s in pooled[:max_num]]


@pytest.mark.parametrize('fast', [True, False])
def test_matches_pairwise_transcription_on_random_boxes(fast, backend):
    rng = np.random.default_rng(0)
    n = 120
    # Large boxes on a 1/64 grid (exact in float32): overlaps of all degrees.
    xy = rng.integers(0, 32, size=(n, 2)) / 64
    boxes = np.concatenate([xy, xy + rng.integers(16, 33, size=(n, 2)) / 64], axis=1).astype(np.float32)
    conf = rng.dirichlet(np.full(3, 0.5), size=n).astype(np.float32)
    args = dict(top_k=40, conf_thresh=0.05, max_num=20, max_size=550)
    expected = _naive_nms(boxes, conf, fast, nms_thresh=0.5, **args)
    # The case exercises suppression and the max_num_detections cut.
    assert len(expected) == 20 and expected != _naive_nms(boxes, conf, fast, nms_thresh=2, **args)
    assert _detect(backend, boxes, conf, use_fast_nms=fast, top_k=40, max_num_detections=20) == expected


def test_from_config():
    cfg = get_config('yolact_base')
    d = Detect.from_config(cfg, conf_thresh=0.3)
    assert (d.num_classes, d.top_k, d.conf_thresh, d.nms_thresh, d.max_num_detections, d.max_size) == (
        81, 200, 0.3, 0.5, 100, 550)
    assert d.use_fast_nms and not d.use_cross_class_nms


# ---------------------------------------------------------------- PostProcess --
SIG2 = 1 / (1 + np.exp(-2.0))    # sigmoid of the coefficient 2 on an all-ones prototype


def _det(boxes, scores, classes, size=8):
    """Detections on an 8x8 all-ones prototype with coefficient 2: soft mask value SIG2 everywhere."""
    n = len(boxes)
    return {'boxes': paddle.to_tensor(np.asarray(boxes, np.float32)),
            'scores': paddle.to_tensor(np.asarray(scores, np.float32)),
            'classes': paddle.to_tensor(np.asarray(classes, np.int64)),
            'coeffs': paddle.to_tensor(np.full((n, 1), 2.0, np.float32)),
            'proto': paddle.ones([size, size, 1])}


class TestPostProcess:
    def test_crop_and_boxes(self, backend):
        # Box [0.25, 0.5] on an 8 px prototype: pixels 2..3, widened by the
        # 1-pixel crop padding to 1..4. Output at the prototype size: no resampling.
        out = PostProcess(backend=backend)(_det([[0.25, 0.25, 0.5, 0.5]], [0.9], [3]), 8, 8)
        expected = np.zeros((1, 8, 8), bool)
        expected[0, 1:5, 1:5] = True
        np.testing.assert_array_equal(out['masks'], expected)
        np.testing.assert_array_equal(out['boxes'], [[2, 2, 4, 4]])
        assert out['classes'].tolist() == [3]
        assert 'mask_scores' not in out
        uncropped = PostProcess(backend=backend, crop_masks=False)(_det([[0.25, 0.25, 0.5, 0.5]], [0.9], [3]), 8, 8)
        np.testing.assert_array_equal(uncropped['masks'], np.ones((1, 8, 8), bool))

    def test_upsampling_then_threshold(self, backend):
        # 8 -> 16 px, bilinear (align_corners=False): output column o samples
        # source (o + 0.5) / 2 - 0.5. Columns 2 and 9 sample 0.75 of the way into
        # the kept pixels 1 and 4 (0.75 * SIG2 = 0.66 > 0.5), columns 1 and 10
        # only 0.25 (0.22): the mask is rows/cols 2..9, except the corners
        # (0.75 * 0.75 * SIG2 = 0.495).
        out = PostProcess(backend=backend)(_det([[0.25, 0.25, 0.5, 0.5]], [0.9], [0]), 16, 16)
        expected = np.zeros((1, 16, 16), bool)
        expected[0, 2:10, 2:10] = True
        expected[0, [2, 2, 9, 9], [2, 9, 2, 9]] = False
        np.testing.assert_array_equal(out['masks'], expected)
        np.testing.assert_array_equal(out['boxes'], [[4, 4, 8, 8]])

    def test_box_sanitising(self, backend):
        # x: (-0.1, 0.55) * 10 -> (0, 5.5) -> (0, 5); y: (1.2, 0.2) * 20 -> ordered (4, 24), clamped to 20.
        out = PostProcess(backend=backend)(_det([[-0.1, 1.2, 0.55, 0.2]], [0.9], [0]), 10, 20)
        np.testing.assert_array_equal(out['boxes'], [[0, 4, 5, 20]])
        assert out['boxes'].dtype == np.int64

    def test_score_threshold(self, backend):
        det = _det(FAR[:3], [0.9, 0.5, 0.6], [0, 1, 2])
        out = PostProcess(backend=backend, score_threshold=0.5)(det, 8, 8)
        assert out['classes'].tolist() == [0, 2]
        assert out['scores'].tolist() == pytest.approx([0.9, 0.6])
        assert out['masks'].shape == (2, 8, 8)
        empty = PostProcess(backend=backend, score_threshold=0.95)(det, 8, 6)
        assert empty['masks'].shape == (0, 6, 8) and empty['boxes'].shape == (0, 4)

    def test_rescoring(self, backend):
        seen = []

        def maskiou_net(masks):
            seen.append(masks.numpy())
            return paddle.to_tensor([[0.5, 0.25], [1.0, 0.125]])

        det = _det([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], [0.8, 0.6], [1, 0])
        out = PostProcess(backend=backend, rescore_mask=True)(det, 8, 8, maskiou_net=maskiou_net)
        # Each detection takes the IoU of its own class: 0.25 and 1.0.
        assert out['scores'].tolist() == pytest.approx([0.8, 0.6])
        assert out['mask_scores'].tolist() == pytest.approx([0.2, 0.6])
        # The net sees the soft cropped masks at prototype resolution, [N, 1, 8, 8].
        assert seen[0].shape == (2, 1, 8, 8)
        np.testing.assert_allclose(np.unique(seen[0]), [0, SIG2], rtol=1e-6)
        both = PostProcess(backend=backend, rescore_mask=True, rescore_bbox=True)(det, 8, 8, maskiou_net=maskiou_net)
        assert both['scores'].tolist() == pytest.approx([0.2, 0.6])
        assert both['mask_scores'].tolist() == pytest.approx([0.2, 0.6])


def test_postprocess_from_config():
    plus = PostProcess.from_config(get_config('yolact_plus_resnet50'), score_threshold=0.15)
    assert (plus.rescore_mask, plus.rescore_bbox, plus.score_threshold, plus.crop_masks) == (True, False, 0.15, True)
    base = PostProcess.from_config(get_config('yolact_base'))
    assert (base.rescore_mask, base.rescore_bbox, base.score_threshold, base.backend) == (False, False, 0.0, 'auto')
    with pytest.raises(ValueError, match='gpu'):
        PostProcess(backend='gpu')
    with pytest.raises(ValueError, match='gpu'):
        Detect.from_config(get_config('yolact_base'), backend='gpu')
    with pytest.raises(ValueError, match='mask-IoU net'):
        PostProcess(rescore_mask=True)(_det(FAR[:1], [0.9], [0]), 8, 8)


def test_max_detections_keeps_the_first_before_the_score_threshold(backend):
    det = _det(FAR[:4], [0.9, 0.2, 0.7, 0.6], [0, 1, 2, 3])
    out = PostProcess(backend=backend, score_threshold=0.5)(det, 8, 8, max_num_detections=3)
    assert out['classes'].tolist() == [0, 2] and out['masks'].shape == (2, 8, 8)
    assert PostProcess(backend=backend)(det, 8, 8, max_num_detections=0)['masks'].shape == (0, 8, 8)


UPSAMPLE_SIZES = [((138, 138), (480, 640)), ((138, 138), (427, 640)), ((9, 7), (5, 30))]


def near_threshold_masks(src, dst):
    """(soft masks [4, *src], PyTorch's bilinear upsampling of them to ``dst`` thresholded at 0.5).

    Three of the four masks are near 0.5, where any difference of sample
    positions or rounding flips pixels.
    """
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    soft = rng.uniform(0.45, 0.55, (4,) + src).astype(np.float32)
    soft[0] = rng.uniform(0, 1, src)
    expected = torch.nn.functional.interpolate(torch.from_numpy(soft)[None], size=dst, mode='bilinear',
                                               align_corners=False)[0].numpy() > 0.5
    return soft, expected


@pytest.mark.parametrize('src, dst', UPSAMPLE_SIZES)
def test_upsample_masks_equals_torch_bilinear_then_threshold(src, dst, backend):
    """Host: cv2 plus the exact recomputation near 0.5; device: Paddle ops. Both = PyTorch's
    F.interpolate + threshold, pixel for pixel."""
    soft, expected = near_threshold_masks(src, dst)
    if backend == 'host':
        np.testing.assert_array_equal(upsample_masks(soft, *dst), expected)
        return
    actual = upsample_masks_device(paddle.to_tensor(soft), *dst)
    assert actual.dtype == paddle.bool
    np.testing.assert_array_equal(actual.numpy(), expected)
    np.testing.assert_array_equal(actual.numpy(), upsample_masks(soft, *dst))


def cropped_masks(num, size, seed=0):
    """Soft [num, size, size] masks near 0.5 inside random boxes and 0 outside, as PostProcess crops them.

    The boxes range from one prototype pixel to the whole mask and include
    boxes on each border; the last mask is all zero.
    """
    rng = np.random.default_rng(seed)
    soft = np.zeros((num, size, size), np.float32)
    for i in range(num - 1):
        y1, y2 = np.sort(rng.integers(0, size + 1, 2))
        x1, x2 = np.sort(rng.integers(0, size + 1, 2))
        if i == 0:
            y1, y2, x1, x2 = 0, size, 0, size
        elif i == 1:
            y1, y2, x1, x2 = 5, 6, size - 1, size
        y2, x2 = max(y2, y1 + 1), max(x2, x1 + 1)
        soft[i, y1:y2, x1:x2] = rng.uniform(0.45, 0.55, (y2 - y1, x2 - x1))
    return soft


@pytest.mark.parametrize('exact_window_pixels', [0, 40_000, 10 ** 9])
def test_upsample_masks_of_cropped_masks_equals_torch(monkeypatch, exact_window_pixels):
    """Windows computed exactly or by cv2 (forced both ways and mixed) = PyTorch's upsampling + threshold."""
    torch = pytest.importorskip('torch')
    monkeypatch.setattr('layers.output_utils._EXACT_WINDOW_PIXELS', exact_window_pixels)
    soft = cropped_masks(40, 138)
    expected = torch.nn.functional.interpolate(torch.from_numpy(soft)[None], size=(480, 640), mode='bilinear',
                                               align_corners=False)[0].numpy()
    np.testing.assert_array_equal(upsample_masks(soft, 480, 640), expected > 0.5)
    # A threshold below 0 counts the zeros outside the boxes too.
    np.testing.assert_array_equal(upsample_masks(soft, 480, 640, threshold=-0.1), expected > -0.1)


def test_upsample_masks_to_a_smaller_image_skips_untapped_pixels():
    """Masks shrink for images under the prototype side: a pixel no output samples counts for nothing."""
    torch = pytest.importorskip('torch')
    soft = np.zeros((3, 9, 9), np.float32)
    soft[0, 4, 4] = 1          # 9 -> 3: output i samples source 3i + 1, so row/column 4 is tapped
    soft[1, 3, 3] = 1          # ... and 3 is not
    soft[2, 2:8, 1:6] = 0.9
    expected = torch.nn.functional.interpolate(torch.from_numpy(soft)[None], size=(3, 3), mode='bilinear',
                                               align_corners=False)[0].numpy() > 0.5
    assert expected[0].any() and not expected[1].any() and expected[2].any()
    np.testing.assert_array_equal(upsample_masks(soft, 3, 3), expected)


def test_upsample_masks_of_no_masks():
    assert upsample_masks(np.zeros((0, 138, 138), np.float32), 48, 64).shape == (0, 48, 64)


def test_crop_in_place_equals_box_utils_crop():
    rng = np.random.default_rng(0)
    corners = rng.uniform(-0.1, 1.1, (50, 4)).astype(np.float32)
    # Edges exactly on pixel borders (the kept range is half-open) and degenerate boxes.
    corners[:10] = rng.integers(0, 17, (10, 4)) / np.float32(16)
    corners[10, 2] = corners[10, 0]
    masks = rng.uniform(0, 1, (16, 16, 50)).astype(np.float32)
    expected = crop(paddle.to_tensor(masks), paddle.to_tensor(corners)).numpy().transpose(2, 0, 1)
    actual = np.ascontiguousarray(masks.transpose(2, 0, 1))
    _crop_in_place(actual, paddle.to_tensor(corners))
    np.testing.assert_array_equal(actual, expected)


def test_max_iou_with_better_equals_the_reference_jaccard():
    """Bit for bit the reference's (PyTorch's) float32 IoU; Paddle's jaccard within 1 ulp."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (3, 40, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(0.01, 0.5, (3, 40, 2)).astype(np.float32)], axis=2)
    boxes[:, 5] = boxes[:, 3]            # an exact duplicate: IoU 1
    actual = _max_iou_with_better(boxes)

    # The reference's jaccard (box_utils.py), then Fast NMS's triu(diagonal=1).max(dim=1).
    a = torch.from_numpy(boxes)
    max_xy = torch.min(a[:, :, None, 2:], a[:, None, :, 2:])
    min_xy = torch.max(a[:, :, None, :2], a[:, None, :, :2])
    inter = torch.clamp(max_xy - min_xy, min=0).prod(3)
    area = ((a[:, :, 2] - a[:, :, 0]) * (a[:, :, 3] - a[:, :, 1]))
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    np.testing.assert_array_equal(actual, iou.triu(diagonal=1).max(dim=1)[0].numpy())

    # Paddle's CPU division is not always correctly rounded: 1 ulp (2**-24 relative) apart at most.
    t = paddle.to_tensor(boxes)
    np.testing.assert_allclose(actual, paddle.triu(jaccard(t, t), diagonal=1).max(axis=1).numpy(),
                               rtol=2.0 ** -23, atol=0)


@pytest.mark.parametrize('backbone', ['yolact_base', 'yolact_darknet53'])
def test_undo_image_transformation_inverts_the_preprocessing(backbone):
    transform = get_config(backbone).backbone.transform
    bgr = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    # Same size in and out: the resizes are identities.
    x = FastBaseTransform(8, transform)(paddle.to_tensor(bgr[None]))[0]
    rgb = undo_image_transformation(x, 8, 8, transform)
    np.testing.assert_allclose(rgb, bgr[:, :, ::-1] / 255.0, rtol=0, atol=1e-6)


# ------------------------------------------------------------ reference parity --
W, H = 640, 480
# Parity with the reference fixtures, as docs/parity.md's table states it: every mask pixel
# equal; scores within SCORE_ATOL in dygraph (measured up to 1.1e-6) and EXPORTED_SCORE_ATOL
# through Paddle Inference, the CPU default (measured up to 2.3e-6); YOLACT++ mask scores within
# MASK_SCORE_ATOL (measured up to 4.8e-8).
SCORE_ATOL = 2e-6
EXPORTED_SCORE_ATOL = 5e-6
MASK_SCORE_ATOL = 1e-7


def _fixture_masks(ref):
    shape = tuple(ref['post_masks_shape'])
    return np.unpackbits(ref['post_masks_packed'], axis=-1, count=shape[-1]).astype(bool).reshape(shape)


@pytest.fixture(scope='module', params=['yolact_base', 'yolact_plus_resnet50'])
def reference_run(request):
    """(cfg, seed-0 network in eval mode, its params, fixture, raw eval outputs on the fixture's x)."""
    cfg = get_config(request.param)
    net = Yolact.from_config(cfg)
    params = reference_params(net, cfg)
    net.set_state_dict(params)
    net.eval()
    ref = reference_npz(f'forward_{cfg.name}')
    with paddle.no_grad():
        preds = net(paddle.to_tensor(ref['x']))
    return cfg, net, params, ref, preds


def _assert_post_matches(post, ref, score_atol=SCORE_ATOL):
    np.testing.assert_array_equal(post['classes'], ref['post_classes'])
    np.testing.assert_allclose(post['scores'], ref['post_scores'], rtol=0, atol=score_atol)
    np.testing.assert_array_equal(post['boxes'], ref['post_boxes'])
    np.testing.assert_array_equal(post['masks'], _fixture_masks(ref))
    if 'post_mask_scores' in ref:
        np.testing.assert_allclose(post['mask_scores'], ref['post_mask_scores'], rtol=0, atol=MASK_SCORE_ATOL)
    else:
        assert 'mask_scores' not in post


@needs_reference
@pytest.mark.parametrize('name', ['forward_yolact_base', 'forward_yolact_plus_resnet50'])
def test_postprocess_reproduces_reference_from_its_detections(name):
    """PostProcess alone, fed the reference's own Detect output."""
    ref = reference_npz(name)
    # The reference's postprocess converts its input boxes to pixels in place, so the
    # stored det_box are sanitised pixel coordinates; /(w, h) gives back the relative boxes.
    det = {'boxes': paddle.to_tensor(ref['det_box'] / np.float32([W, H, W, H])),
           'scores': paddle.to_tensor(ref['det_score']), 'classes': paddle.to_tensor(ref['det_class']),
           'coeffs': paddle.to_tensor(ref['det_mask']), 'proto': paddle.to_tensor(ref['det_proto'])}
    post = PostProcess()(det, W, H)
    ref.pop('post_mask_scores', None)     # the mask-IoU net is tested with the network below
    _assert_post_matches(post, ref, score_atol=0)     # the scores given are the scores kept


@needs_reference
def test_detect_and_postprocess_match_reference(reference_run, backend):
    cfg, net, _, ref, preds = reference_run
    det = Detect(cfg.num_classes, top_k=200, conf_thresh=0.05, nms_thresh=0.5, max_num_detections=100,
                 use_fast_nms=True, use_cross_class_nms=False, backend=backend)(preds)[0]
    # Same detections in the same order: classes, scores and (identifying the
    # anchor) mask coefficients row by row.
    np.testing.assert_array_equal(det['classes'].numpy(), ref['det_class'])
    np.testing.assert_allclose(det['scores'].numpy(), ref['det_score'], rtol=0, atol=SCORE_ATOL)
    # Measured up to 3.0e-6 and 2.8e-7.
    np.testing.assert_allclose(det['coeffs'].numpy(), ref['det_mask'], rtol=0, atol=1e-5)
    np.testing.assert_allclose(det['proto'].numpy(), ref['det_proto'], rtol=0, atol=1e-6)
    # det_box holds the pixel boxes the reference's postprocess wrote in place (see above).
    scale = np.float32([W, H, W, H])
    pixel_boxes = np.clip(det['boxes'].numpy() * scale, 0, scale)
    np.testing.assert_allclose(pixel_boxes, ref['det_box'], rtol=0, atol=2e-4)     # measured up to 6.1e-5 px

    post = PostProcess.from_config(cfg, crop_masks=True, score_threshold=0, backend=backend)(
        det, W, H, maskiou_net=net.maskiou_net)
    _assert_post_matches(post, ref)


@needs_reference
def test_predictor_matches_reference(reference_run, tmp_path):
    cfg, _, params, ref, _ = reference_run
    path = str(tmp_path / f'{cfg.name}_seed0.pdparams')
    paddle.save(params, path)
    predictor = Predictor(cfg.name, path)
    result = predictor(ref['input_bgr'])
    assert result['masks'].dtype == np.bool_ and result['masks'].shape == (len(ref['post_classes']), H, W)
    exported = not isinstance(predictor.net, Yolact)    # the CPU default: the cached export
    _assert_post_matches(result, ref, EXPORTED_SCORE_ATOL if exported else SCORE_ATOL)


def test_predictor_names_mismatched_keys(tmp_path):
    path = str(tmp_path / 'bad.pdparams')
    paddle.save({'backbone.conv1.weight': np.zeros((1, 1), np.float32),
                 'not.a.key': np.zeros(1, np.float32)}, path)
    with pytest.raises(ValueError, match='not.a.key') as info:
        Predictor('yolact_resnet50', path)
    assert 'backbone.conv1.weight' in str(info.value) and 'fpn.lat_layers.0.weight' in str(info.value)


@needs_reference
# One export (ResNet-101) is enough here; the YOLACT++ export is tested in test_network_export.py.
@pytest.mark.parametrize('reference_run', ['yolact_base'], indirect=True)
def test_exported_predictor_equals_dygraph_predictor(reference_run, tmp_path):
    cfg, net, params, ref, _ = reference_run
    path = str(tmp_path / 'seed0.pdparams')
    paddle.save(params, path)
    prefix = str(tmp_path / 'exported' / cfg.name)
    export_yolact(net, cfg, prefix)
    dygraph = Predictor(cfg.name, path)(ref['input_bgr'])
    exported = Predictor.from_exported(prefix)(ref['input_bgr'])
    assert set(exported) == set(dygraph)
    np.testing.assert_array_equal(exported['classes'], dygraph['classes'])
    np.testing.assert_array_equal(exported['boxes'], dygraph['boxes'])
    np.testing.assert_allclose(exported['scores'], dygraph['scores'], rtol=0, atol=EXPORTED_SCORE_ATOL)
    np.testing.assert_array_equal(exported['masks'], dygraph['masks'])
    _assert_post_matches(exported, ref, EXPORTED_SCORE_ATOL)


# ------------------------------------------------------- device path --
# The device path of Detect and PostProcess (on a GPU: no host copy before the final masks) against the
# host (numpy/cv2) path, the reference fixtures and PyTorch, forced onto the CPU: the same Paddle ops run on a GPU.
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
def test_device_path_equals_host_path_on_reference_fixtures(reference_run, mode):
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
