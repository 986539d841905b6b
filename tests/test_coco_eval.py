"""COCO results files and mAP (utils/evaluation/coco_eval.py): RLE encoding, detection records, COCOeval scores."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from data.config import SHAPE_CLASSES
from tests.eval_helpers import NUM_VAL, cocoeval_stats, gt_detections, shapes  # noqa: F401 (fixture)
from utils.evaluation import coco_eval


def test_ground_truth_as_detections_scores_ap_one(shapes, tmp_path):
    coco = COCO(shapes.valid_info)
    label_map = {i + 1: i + 1 for i in range(len(SHAPE_CLASSES))}
    with coco_eval.CocoResultsWriter(str(tmp_path), coco_eval.class_to_category(label_map)) as writer:
        for image_id in coco.getImgIds():
            det = gt_detections(coco, image_id, label_map)
            writer.add(image_id, det['classes'], det['boxes'], det['scores'], det['masks'])
    assert writer.num_images == NUM_VAL
    assert writer.num_detections == len(coco.getAnnIds())
    results = coco_eval.evaluate_coco(shapes.valid_info, {'bbox': writer.bbox_path, 'segm': writer.mask_path}).metrics
    for iou_type in ('bbox', 'segm'):
        assert results[iou_type]['AP'] == pytest.approx(1.0)
        assert results[iou_type]['AP50'] == pytest.approx(1.0)
        assert results[iou_type]['AP75'] == pytest.approx(1.0)


def test_rle_encoding_equals_pycocotools():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    masks = rng.random((12, h, w)) < 0.3
    masks[:6] &= np.pad(np.ones((10, 12), bool), ((5, h - 15), (7, w - 19)))[None]   # box-like bands
    masks[6] = False                              # empty
    masks[7] = True                               # full
    masks[8] = False
    masks[8, :, -1] = True                        # the last column only
    masks[9] = False
    masks[9, 0, 0] = True                         # the first pixel only
    masks[10] = False
    masks[10, -1, -1] = True                      # the last pixel only
    masks[11, 3:9, :] = rng.random((6, w)) < 0.5  # every column, some rows
    expected = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert coco_eval.encode_rle(masks) == expected
    assert coco_eval.encode_rle(masks.astype(np.float32)) == expected
    for trial in range(500):
        # Random blocks of random density in small images: every edge case of the block arithmetic.
        h, w = rng.integers(1, 12, 2)
        masks = np.zeros((3, h, w), bool)
        for k in range(3):
            (r0, r1), (c0, c1) = sorted(rng.integers(0, h + 1, 2)), sorted(rng.integers(0, w + 1, 2))
            masks[k, r0:r1, c0:c1] = rng.random((r1 - r0, c1 - c0)) < rng.random()
        expected = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        assert coco_eval.encode_rle(masks) == expected, masks


def test_records_map_categories_back_and_encode_rle_as_text():
    masks = np.zeros((3, 20, 30), dtype=np.float32)
    masks[0, 2:6, 3:9] = 1
    masks[1, 10:15, 0:4] = 1
    boxes = np.array([[3, 2, 9, 6], [0, 10, 4, 15], [5, 5, 5, 9]])   # the last one has no width
    class_to_cat = coco_eval.class_to_category({7: 1, 42: 2})
    bbox, segm = coco_eval.detection_records(5, [1, 0, 0], boxes, [0.9, 0.8, 0.7], masks, class_to_cat,
                                             mask_scores=[0.5, 0.4, 0.3])
    assert [r['category_id'] for r in bbox] == [42, 7]
    assert bbox[0]['bbox'] == [3.0, 2.0, 6.0, 4.0] and all(isinstance(v, float) for v in bbox[0]['bbox'])
    assert [r['score'] for r in bbox] == [0.9, 0.8]
    # YOLACT++: masks carry the rescored mask score, boxes the box score.
    assert [r['score'] for r in segm] == [0.5, 0.4]
    assert isinstance(segm[0]['segmentation']['counts'], str)
    decoded = mask_util.decode({'size': segm[0]['segmentation']['size'],
                                'counts': segm[0]['segmentation']['counts'].encode()})
    np.testing.assert_array_equal(decoded, masks[0])
    json.dumps(bbox + segm)


def test_empty_results_score_zero(shapes, tmp_path):
    with coco_eval.CocoResultsWriter(str(tmp_path), {0: 1}) as writer:
        pass
    with open(writer.bbox_path) as f:
        assert json.load(f) == []
    results = coco_eval.evaluate_coco(shapes.valid_info, {'bbox': writer.bbox_path, 'segm': writer.mask_path}).metrics
    assert results['bbox']['AP'] == 0.0 and results['segm']['AP'] == 0.0


def test_unwritable_results_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(OSError, match='cannot create results directory'):
        coco_eval.CocoResultsWriter(str(blocker / 'results'), {0: 1})


def test_per_class_ap_of_a_category_without_ground_truth_is_not_available(tmp_path):
    """A category with no object in the images scored: -1 (n/a), as pycocotools' summarize gives it."""
    mask = np.zeros((20, 20), np.uint8)
    mask[2:10, 2:10] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle['counts'] = rle['counts'].decode()
    gt = {'images': [{'id': 1, 'width': 20, 'height': 20, 'file_name': 'a.png'}],
          'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [2, 2, 8, 8], 'area': 64,
                           'iscrowd': 0, 'segmentation': rle}]}
    gt_file = str(tmp_path / 'gt.json')
    with open(gt_file, 'w') as f:
        json.dump(gt, f)
    results_file = str(tmp_path / 'dt.json')
    with open(results_file, 'w') as f:
        json.dump([{'image_id': 1, 'category_id': c, 'bbox': [2, 2, 8, 8], 'score': 0.9} for c in (1, 2)], f)
    scores = coco_eval.evaluate_coco(gt_file, {'bbox': results_file})
    assert [(r['name'], r['bbox']) for r in scores.per_class] == [('a', pytest.approx(1.0)), ('b', -1.0)]
    assert cocoeval_stats(gt_file, results_file, 'bbox', category_ids=[2])[0] == -1.0
    assert 'n/a' in coco_eval.format_per_class_table(scores.per_class).splitlines()[3]
