"""Images with more objects than OpenCV takes channels in one image (128 in OpenCV 5.x, 512 in 4.x).

Mask resizing hands cv2 the instances as channels; with chunks of 512, an image
of more than 128 objects aborted training under OpenCV 5.x (``opencv-python>=4.8``
allows it). The chunked resize must equal resizing each mask on its own, bit for bit.
"""
import cv2
import numpy as np

from data.config import get_config
from data.transforms import SSDAugmentation, _resize_masks

NUM_OBJECTS = 300


def _masks(n, height, width, seed=0):
    """n random blob masks (uint8 0/1) with their point-form boxes in pixels."""
    rng = np.random.RandomState(seed)
    masks = np.zeros((n, height, width), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        x, y = rng.randint(0, width - 12), rng.randint(0, height - 12)
        w, h = rng.randint(6, 12), rng.randint(6, 12)
        masks[i, y:y + h, x:x + w] = rng.rand(h, w) > 0.2
        boxes[i] = (x, y, x + w, y + h)
    return masks, boxes


def test_resizing_300_masks_equals_resizing_each_alone():
    masks, _ = _masks(NUM_OBJECTS, 97, 131)
    for size in (64, 550):
        resized = _resize_masks(masks, size)
        alone = np.stack([cv2.resize(m, (size, size)) for m in masks])
        assert resized.shape == (NUM_OBJECTS, size, size) and resized.dtype == np.uint8
        np.testing.assert_array_equal(resized, alone)


def test_training_augmentation_of_an_image_with_300_objects():
    cfg = get_config('yolact_shapes')
    height, width = 120, 160
    masks, boxes = _masks(NUM_OBJECTS, height, width, seed=1)
    image = np.random.RandomState(2).randint(0, 255, (height, width, 3)).astype(np.uint8)
    scale = np.array([width, height, width, height], np.float32)
    augment = SSDAugmentation.from_config(cfg, rng=np.random.RandomState(3))
    img, out_masks, out_boxes, labels, num_crowds = augment(image, masks, boxes / scale,
                                                            np.zeros(NUM_OBJECTS, np.int64), 0)
    assert img.shape == (3, cfg.max_size, cfg.max_size)
    assert out_masks.shape[1:] == (cfg.max_size, cfg.max_size) and len(out_masks) == len(out_boxes) == len(labels)
    assert len(out_masks) > 128
