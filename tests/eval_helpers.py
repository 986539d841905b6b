"""Shared pieces of the evaluation tests: a small synthetic COCO-format dataset, yolact_shapes weights, eval.py runs.

The ``shapes`` and ``weights`` fixtures are module-scoped: a test module imports
them (``from tests.eval_helpers import shapes, weights``) and pytest builds them
once per module. The model is not the point of these tests: yolact_shapes with
random, trained-like weights on NUM_VAL images of SIDE x SIDE pixels written by
tools/make_shapes_dataset.py.
"""
import json
import os

import cv2
import numpy as np
import paddle
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import eval as eval_script
from data.config import get_config
from tools import benchmark as benchmark_tool
from tools.make_shapes_dataset import make_shapes_dataset
from yolact import Yolact

NUM_VAL = 6
SIDE = 128


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """DatasetConfig of NUM_VAL validation images (no training images)."""
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=0, num_val=NUM_VAL,
                               size=SIDE, seed=0)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A yolact_shapes .pdparams with random weights, named so eval.py infers the config.

    The weights have trained-like statistics (tools/benchmark.py), so every
    image gets confident detections to write and draw.
    """
    net = Yolact.from_config(get_config('yolact_shapes'))
    benchmark_tool.benchmark_weights(net, seed=0)
    path = str(tmp_path_factory.mktemp('weights') / 'yolact_shapes_1_100.pdparams')
    paddle.save(net.state_dict(), path)
    return path


def dataset_flags(ds):
    return ['--valid_images', ds.valid_images, '--valid_info', ds.valid_info]


def run_eval(argv):
    code = eval_script.main(argv)
    assert code == 0
    return code


def single_log(log_dir):
    logs = [os.path.join(log_dir, n) for n in os.listdir(log_dir) if n.startswith('eval_') and n.endswith('.json')]
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return json.load(f)


def cocoeval_stats(gt_file, results_file, iou_type, image_ids=None, category_ids=None):
    """COCOeval.stats[:6] computed independently of utils.evaluation.coco_eval."""
    gt = COCO(gt_file)
    dt = gt.loadRes(results_file)
    e = COCOeval(gt, dt, iou_type)
    if image_ids is not None:
        e.params.imgIds = sorted(image_ids)
    if category_ids is not None:
        e.params.catIds = sorted(category_ids)
    e.evaluate()
    e.accumulate()
    e.summarize()
    return [float(v) for v in e.stats[:6]]


def gt_detections(coco, image_id, label_of):
    """The ground truth of an image as PostProcess-style numpy detections (perfect model)."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    boxes = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                      for a in anns], dtype=np.float64)
    return {'classes': np.array([label_of[a['category_id']] - 1 for a in anns]),
            'scores': np.linspace(0.9, 0.6, len(anns)), 'boxes': boxes,
            'masks': np.stack([coco.annToMask(a) for a in anns]).astype(np.float32)}


def rasterised(polygons, height, width):
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(p)).astype(np.int32) for p in polygons], 1)
    return canvas.astype(bool)
