"""Drawing detections on an image (utils/visual/drawing.py): the reference's colours, order, threshold and top-k."""
import numpy as np

from data.config import COLORS, SHAPE_CLASSES
from utils.visual.drawing import detection_color, draw_detections


def test_draw_detections_reference_colours_and_order():
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 40, 60), dtype=np.float32)
    masks[0, 5:20, 5:30] = 1
    masks[1, 10:30, 20:50] = 1
    boxes = np.array([[5, 5, 30, 20], [20, 10, 50, 30]])
    out = draw_detections(image, np.array([3, 1]), np.array([0.9, 0.8]), boxes, masks, ['star', 'square'],
                          draw_boxes=False, draw_text=False)
    alpha = 0.45

    def blended(*colors):
        value = np.full(3, 100 / 255.0, dtype=np.float32)
        for color in colors:
            value = value * (1 - alpha) + np.asarray(color, dtype=np.float32) / 255.0 * alpha
        return (value * 255).astype(np.uint8)

    # Per instance: detection j gets COLORS[j * 5], BGR; the first (best) is blended last, on top.
    assert detection_color(1) == tuple(reversed(COLORS[5]))
    np.testing.assert_array_equal(out[6, 6], blended(detection_color(0)))
    np.testing.assert_array_equal(out[25, 45], blended(detection_color(1)))
    np.testing.assert_array_equal(out[15, 25], blended(detection_color(1), detection_color(0)))
    np.testing.assert_array_equal(out[35, 5], image[35, 5])

    by_class = draw_detections(image, np.array([3, 1]), np.array([0.9, 0.8]), boxes, masks, ['star', 'square'],
                               draw_boxes=False, draw_text=False, class_color=True)
    np.testing.assert_array_equal(by_class[6, 6], blended(detection_color(3)))


def test_draw_detections_threshold_top_k_boxes_and_text():
    image = np.zeros((80, 120, 3), dtype=np.uint8)
    boxes = np.array([[10, 30, 60, 70], [70, 40, 110, 75], [0, 0, 5, 5]])
    scores = np.array([0.9, 0.5, 0.3])
    out = draw_detections(image, np.array([0, 1, 2]), scores, boxes, None, list(SHAPE_CLASSES[:3]), max_drawn=5,
                          score_threshold=0.4)
    assert tuple(out[50, 10]) == detection_color(0)          # left edge of the first box
    assert tuple(out[60, 110]) == detection_color(1)
    assert not out[:6, :6].any()                              # below the threshold: not drawn
    assert out[18:30, 10:60].any()                            # the label above the first box
    only_one = draw_detections(image, np.array([0, 1, 2]), scores, boxes, None, list(SHAPE_CLASSES[:3]), max_drawn=1)
    assert not only_one[60, 110].any()
