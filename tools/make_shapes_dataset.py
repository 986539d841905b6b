"""Generate a small COCO-format instance-segmentation dataset of coloured shapes.

Each image shows 1..max_objects shapes (circle, square, triangle, star) of random
size, rotation and colour on a textured, noisy background. Shapes drawn later
occlude earlier ones; every annotation is the *visible* part of its shape, as a
COCO RLE, with bbox and area computed from it by pycocotools. Placements that
would hide more than half of an earlier shape are redrawn, so every object stays
recognisable.

Output (JPEG images, one json per split, category ids 1..4 in SHAPE_CLASSES order):
    <out>/train/000001.jpg ...   <out>/annotations/instances_train.json
    <out>/val/000001.jpg ...     <out>/annotations/instances_val.json

The content depends only on the arguments: image i of a split is drawn from a
generator seeded with (seed, split, i), so the validation set does not change
when --num_train does.

    python tools/make_shapes_dataset.py --out data/shapes --num_train 600 --num_val 100
"""
import argparse
import json
import logging
import math
import os
import sys
import time

import cv2
import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.config import SHAPE_CLASSES, DatasetConfig  # noqa: E402

logger = logging.getLogger(__name__)

# Object radius (centre to farthest point) as a fraction of the image side.
_RADIUS_RANGE = (0.09, 0.22)
# A new shape may hide at most this fraction of an earlier one.
_MAX_OCCLUDED = 0.5
_PLACEMENT_TRIES = 30
# Sub-pixel precision of polygon vertices for cv2.fillPoly.
_SHIFT = 4


def _regular_polygon(cx, cy, radius, angle, corners, inner_ratio=None):
    """[k, 2] float vertices; with inner_ratio, a star with that inner radius."""
    if inner_ratio is None:
        radii = [radius] * corners
        angles = angle + 2 * math.pi * np.arange(corners) / corners
    else:
        radii = [radius, radius * inner_ratio] * corners
        angles = angle + math.pi * np.arange(2 * corners) / corners
    return np.stack([cx + np.array(radii) * np.cos(angles), cy + np.array(radii) * np.sin(angles)], axis=1)


def _shape_mask(kind, cx, cy, radius, angle, size):
    """[size, size] bool mask of a whole shape."""
    mask = np.zeros((size, size), dtype=np.uint8)
    if kind == 'circle':
        cv2.circle(mask, (round(cx * 2 ** _SHIFT), round(cy * 2 ** _SHIFT)), round(radius * 2 ** _SHIFT), 1,
                   thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)
        return mask.astype(bool)
    vertices = {'square': lambda: _regular_polygon(cx, cy, radius, angle, 4),
                'triangle': lambda: _regular_polygon(cx, cy, radius, angle, 3),
                'star': lambda: _regular_polygon(cx, cy, radius, angle, 5, inner_ratio=0.45)}[kind]()
    cv2.fillPoly(mask, [np.round(vertices * 2 ** _SHIFT).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def _background(rng, size):
    """[size, size, 3] float32 BGR: tinted base, smooth blotches, a stripe texture and noise."""
    base = rng.uniform(60, 190, size=3)
    blotches = cv2.resize(rng.uniform(-45, 45, size=(4, 4, 3)).astype(np.float32), (size, size),
                          interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 24)
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
    texture = stripes[..., None] * rng.uniform(5, 20, size=3)
    noise = rng.normal(0, 8, size=(size, size, 3))
    return (base + blotches + texture + noise).astype(np.float32)


def _object_colour(rng, behind):
    """A saturated BGR colour at least 90 (Euclidean) away from the mean colour ``behind``."""
    for _ in range(100):
        hsv = np.uint8([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(110, 256)]]])
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
        if np.linalg.norm(colour - behind) >= 90:
            return colour
    return 255 - behind


def render_image(rng, size, max_objects):
    """One image and its objects.

    Returns (image [size, size, 3] BGR uint8, objects): objects is a list of
    (class index into SHAPE_CLASSES, visible mask [size, size] bool), in
    drawing order (later ones on top).
    """
    image = _background(rng, size)
    classes, full_masks, visible_masks = [], [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _ in range(_PLACEMENT_TRIES):
            kind = int(rng.integers(len(SHAPE_CLASSES)))
            radius = rng.uniform(*_RADIUS_RANGE) * size
            cx, cy = rng.uniform(radius, size - radius, size=2)
            mask = _shape_mask(SHAPE_CLASSES[kind], cx, cy, radius, rng.uniform(0, 2 * math.pi), size)
            still_visible = all((visible & ~mask).sum() >= (1 - _MAX_OCCLUDED) * full.sum()
                                for visible, full in zip(visible_masks, full_masks))
            if mask.any() and still_visible:
                break
        else:
            continue
        visible_masks = [visible & ~mask for visible in visible_masks]
        classes.append(kind)
        full_masks.append(mask)
        visible_masks.append(mask)

        yy, xx = np.nonzero(mask)
        colour = _object_colour(rng, image[yy, xx].mean(axis=0))
        # A gentle linear shade across the object, so its colour is not perfectly flat.
        direction = rng.normal(size=2)
        shade = ((xx - xx.mean()) * direction[0] + (yy - yy.mean()) * direction[1]) / radius * 12
        image[yy, xx] = colour + shade[:, None] + rng.normal(0, 6, size=(len(xx), 3))

    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), list(zip(classes, visible_masks))


def _annotation(ann_id, image_id, class_index, mask):
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {'id': ann_id, 'image_id': image_id, 'category_id': class_index + 1,
            'segmentation': {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')},
            'area': float(mask_utils.area(rle)), 'bbox': [float(v) for v in mask_utils.toBbox(rle)],
            'iscrowd': 0}


def _write_split(out_dir, split, split_code, count, size, seed, max_objects):
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        image, objects = render_image(rng, size, max_objects)
        image_id = index + 1
        file_name = f'{image_id:06d}.jpg'
        if not cv2.imwrite(os.path.join(image_dir, file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f'could not write {os.path.join(image_dir, file_name)}')
        images.append({'id': image_id, 'file_name': file_name, 'height': size, 'width': size})
        for class_index, mask in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, class_index, mask))

    info_file = os.path.join(out_dir, 'annotations', f'instances_{split}.json')
    os.makedirs(os.path.dirname(info_file), exist_ok=True)
    dataset = {
        'info': {'description': f'synthetic shapes, {split} split, seed {seed}'},
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': [{'id': i + 1, 'name': name, 'supercategory': 'shape'} for i, name in enumerate(SHAPE_CLASSES)],
    }
    with open(info_file, 'w') as f:
        json.dump(dataset, f)
    return image_dir, info_file


def make_shapes_dataset(out_dir, num_train=600, num_val=100, size=192, seed=0, max_objects=4):
    """Write the dataset under ``out_dir``; returns a DatasetConfig pointing at it.

    The config's train_images/train_info/valid_images/valid_info are the image
    folders and json files written; class_names is SHAPE_CLASSES (category ids
    1..4, so no label map is needed).
    """
    train_images, train_info = _write_split(out_dir, 'train', 0, num_train, size, seed, max_objects)
    valid_images, valid_info = _write_split(out_dir, 'val', 1, num_val, size, seed, max_objects)
    return DatasetConfig(name='Shapes', train_images=train_images, train_info=train_info,
                         valid_images=valid_images, valid_info=valid_info, class_names=SHAPE_CLASSES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--num_train', type=int, default=600)
    parser.add_argument('--num_val', type=int, default=100)
    parser.add_argument('--size', type=int, default=192, help='image side in pixels (square images)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--max_objects', type=int, default=4, help='objects per image: 1..max_objects')
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format='%(message)s')
    start = time.perf_counter()
    ds = make_shapes_dataset(args.out, args.num_train, args.num_val, args.size, args.seed, args.max_objects)
    logger.info('wrote %d train and %d val images of %dx%d in %.1f s:\n  %s\n  %s',
                args.num_train, args.num_val, args.size, args.size, time.perf_counter() - start,
                ds.train_info, ds.valid_info)


if __name__ == '__main__':
    main()
