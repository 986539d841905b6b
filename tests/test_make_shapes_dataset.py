"""The synthetic shapes dataset (tools/make_shapes_dataset.py): COCO-valid, visible-part masks, deterministic."""
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.config import SHAPE_CLASSES
from tests.test_data import SIDE, shapes, tight_box  # noqa: F401 (fixture)
from tools.make_shapes_dataset import main as make_shapes_main, make_shapes_dataset


def test_shapes_dataset_scores_ap_1_against_itself(shapes):
    for info_file in (shapes.train_info, shapes.valid_info):
        gt = COCO(info_file)
        assert [c['name'] for c in gt.loadCats(gt.getCatIds())] == list(SHAPE_CLASSES)
        anns = list(gt.anns.values())
        for iou_type in ('bbox', 'segm'):
            key = 'bbox' if iou_type == 'bbox' else 'segmentation'
            dets = [{'image_id': a['image_id'], 'category_id': a['category_id'], key: a[key], 'score': 1.0}
                    for a in anns]
            evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            assert evaluator.stats[0] == pytest.approx(1.0)


def test_shapes_masks_are_the_visible_parts(shapes):
    gt = COCO(shapes.train_info)
    overlapping_boxes = 0
    for img_id in gt.getImgIds():
        anns = gt.imgToAnns[img_id]
        masks = np.stack([gt.annToMask(a) for a in anns])
        assert masks.shape[1:] == (SIDE, SIDE)
        # Occluded parts belong to the shape on top only: visible masks never overlap.
        assert masks.sum(axis=0).max() == 1
        for a, mask in zip(anns, masks):
            assert a['area'] == mask.sum() > 0
            x, y, w, h = a['bbox']
            np.testing.assert_array_equal(tight_box(mask), [x, y, x + w, y + h])
        boxes = np.array([a['bbox'] for a in anns])
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                bi, bj = boxes[i], boxes[j]
                overlapping_boxes += (min(bi[0] + bi[2], bj[0] + bj[2]) > max(bi[0], bj[0])
                                      and min(bi[1] + bi[3], bj[1] + bj[3]) > max(bi[1], bj[1]))
    assert overlapping_boxes > 0, 'the generator should produce overlapping objects'


def test_shapes_generator_is_deterministic(tmp_path):
    def generate(name, seed, num_train=2):
        ds = make_shapes_dataset(str(tmp_path / name), num_train=num_train, num_val=2, size=64, seed=seed)
        files = sorted(os.listdir(ds.valid_images))
        with open(ds.valid_info, 'rb') as f:
            return f.read(), [open(os.path.join(ds.valid_images, n), 'rb').read() for n in files]

    first = generate('a', 0)
    assert generate('b', 0) == first
    assert generate('c', 0, num_train=3) == first  # val does not depend on the train size
    assert generate('d', 1) != first


def test_shapes_cli(tmp_path):
    make_shapes_main(['--out', str(tmp_path), '--num_train', '2', '--num_val', '1', '--size', '64', '--seed', '3'])
    assert len(COCO(str(tmp_path / 'annotations' / 'instances_train.json')).imgs) == 2
    assert len(os.listdir(tmp_path / 'val')) == 1
