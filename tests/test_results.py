"""Inference results as files (utils/evaluation/results.py): mask polygons, labelme records, all-or-nothing writing."""
import os

import numpy as np
import pytest

from tests.eval_helpers import rasterised
from utils.evaluation import coco_eval


def test_mask_polygons_and_labelme_groups_of_a_two_part_mask(tmp_path):
    from utils.evaluation.results import labelme_record, mask_polygons
    mask = np.zeros((40, 60), bool)
    mask[5:20, 5:25] = True
    mask[25:35, 40:55] = True
    mask[38, 2] = True                                    # a single pixel: no polygon
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    assert (rasterised(polygons, 40, 60) == (mask & ~np.eye(40, 60, k=-36, dtype=bool))).all()
    one = np.zeros((40, 60), bool)
    one[10:30, 10:30] = True
    out = {'labels': ['a', 'b'], 'scores': np.array([0.9, 0.5]), 'masks': np.stack([mask, one])}
    record = labelme_record(out, str(tmp_path / 'img' / 'x.png'), str(tmp_path / 'lm' / 'x.json'), 40, 60)
    assert [(s['label'], s['group_id']) for s in record['shapes']] == [('a', 0), ('a', 0), ('b', None)]
    assert record['imagePath'] == os.path.join('..', 'img', 'x.png')
    assert record['shapes'][2]['description'] == 'score 0.500'


def test_inference_results_are_all_or_nothing(tmp_path):
    from utils.evaluation.results import IMAGE_INFO_FILE, InferenceResults
    out = {'classes': np.array([0]), 'scores': np.array([0.9]), 'boxes': np.array([[1, 1, 5, 5]]),
           'masks': np.ones((1, 8, 8), bool), 'labels': ['a']}
    with pytest.raises(RuntimeError):
        with InferenceResults(['a'], str(tmp_path / 'r')) as results:
            results.add(out, 8, 8, str(tmp_path / 'x.png'))
            raise RuntimeError('stopped midway')
    assert os.listdir(tmp_path / 'r') == []
    with InferenceResults(['a'], str(tmp_path / 'r')) as results:
        results.add(out, 8, 8, str(tmp_path / 'x.png'))
    assert sorted(os.listdir(tmp_path / 'r')) == sorted([coco_eval.BBOX_FILE, coco_eval.MASK_FILE, IMAGE_INFO_FILE])
