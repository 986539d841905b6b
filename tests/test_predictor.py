"""The Predictor (utils/predictor.py).

Its detections against the reference's on both paths, and the exported
model's against dygraph: test_detect.py; arrays it converts or refuses:
test_bad_input.py.
"""
import os

import cv2
import numpy as np
import paddle

from data.config import get_config
from tests.eval_helpers import SIDE, shapes, weights  # noqa: F401 (fixtures)
from utils.predictor import Predictor
from yolact import Yolact


def test_drawing_assembles_only_the_top_k_masks_it_draws(shapes, weights):
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    net.set_state_dict(paddle.load(weights))
    net.eval()
    image = cv2.imread(os.path.join(shapes.valid_images, '000003.jpg'))
    predictor = Predictor.from_network(cfg, net, score_threshold=0.3)
    x = predictor.transform(paddle.to_tensor(image[None]))
    full = predictor.predict_preprocessed(x, SIDE, SIDE)
    top = predictor.predict_preprocessed(x, SIDE, SIDE, max_num_detections=5)
    assert len(full['scores']) > 5 and len(top['scores']) == 5
    for key in full:
        np.testing.assert_array_equal(top[key], full[key][:5], err_msg=key)
