"""Data pipeline: preprocessing parity, augmentation consistency, COCO datasets.

The shapes generator (tools/make_shapes_dataset.py) has its tests in test_make_shapes_dataset.py.
"""
import json
import logging
import os
import re
import shutil

import cv2
import numpy as np
import paddle
import pytest
from pycocotools.coco import COCO

from tests.conftest import needs_reference, reference_npz
from data.coco import (COCODetection, COCOEvalImages, SampleError, check_batches, custom_dataset_config,
                       detection_collate, read_image)
from data.config import MEANS, SHAPE_CLASSES, STD, get_config
from tools.make_shapes_dataset import make_shapes_dataset
from data.transforms import (Annotations, BaseTransform, Expand, FastBaseTransform, RandomMirror,
                             RandomSampleCrop, Resize, SSDAugmentation)
from layers.interpolate import resize_bilinear
from utils.errors import DatasetError

SIDE = 96  # generated test images are SIDE x SIDE


class FixedRng:
    """A stand-in random source: randint always gives ``value``, uniform a fixed fraction of its range."""

    def __init__(self, value, fraction=0.5):
        self.value, self.fraction = value, fraction

    def randint(self, n):
        return self.value

    def uniform(self, low, high):
        return low + self.fraction * (high - low)


def tight_box(mask):
    """Pixel-edge box of a non-empty [H, W] mask: (x1, y1, x2 + 1, y2 + 1)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def random_sample(rs, height=120, width=160, num=5, num_crowds=1, ellipses=False):
    """Image, masks, relative boxes (tight around the masks), labels, num_crowds.

    Crowd rows are last and labelled 9; the others 0..num-num_crowds-1.
    """
    image = rs.randint(0, 256, (height, width, 3)).astype(np.uint8)
    masks = np.zeros((num, height, width), dtype=np.uint8)
    for mask in masks:
        if ellipses:
            center = (int(rs.randint(15, width - 15)), int(rs.randint(15, height - 15)))
            axes = (int(rs.randint(5, 30)), int(rs.randint(5, 30)))
            cv2.ellipse(mask, center, axes, rs.uniform(0, 180), 0, 360, 1, thickness=-1)
        else:
            x1, y1 = rs.randint(0, width - 12), rs.randint(0, height - 12)
            mask[y1:rs.randint(y1 + 10, min(height, y1 + 70) + 1), x1:rs.randint(x1 + 10, min(width, x1 + 70) + 1)] = 1
    boxes = np.stack([tight_box(m) for m in masks]) / np.array([width, height, width, height], dtype=np.float32)
    labels = np.array(list(range(num - num_crowds)) + [9] * num_crowds)
    return image, masks, boxes, labels, num_crowds


# ------------------------------------------------------------- preprocessing --
@needs_reference
def test_fast_base_transform_reproduces_reference_input():
    # Measured max abs diff 7.2e-7 (values span about -2.1..2.7; 3 float32 ulps is ~7e-7).
    ref = reference_npz('forward_yolact_base')
    transform = FastBaseTransform.from_config(get_config('yolact_base'))
    x = transform(paddle.to_tensor(ref['input_bgr'][None])).numpy()
    assert x.shape == ref['x'].shape and x.dtype == np.float32
    np.testing.assert_allclose(x, ref['x'], rtol=0, atol=2e-6)


@needs_reference
def test_base_transform_reproduces_reference_input():
    # Measured max abs diff 7.2e-7. cv2.resize would be off by 1.7e-4 (see linear_taps).
    ref = reference_npz('forward_yolact_base')
    x = BaseTransform.from_config(get_config('yolact_base'))(ref['input_bgr'])
    assert x.shape == ref['x'].shape[1:] and x.dtype == np.float32
    np.testing.assert_allclose(x, ref['x'][0], rtol=0, atol=2e-6)


@pytest.mark.parametrize('in_hw,out_hw', [((37, 71), (550, 550)), ((700, 300), (550, 550)),
                                          ((480, 640), (400, 400)), ((5, 3), (17, 13))])
def test_resize_bilinear_matches_torch(in_hw, out_hw):
    torch = pytest.importorskip('torch')
    img = np.random.RandomState(0).randint(0, 256, in_hw + (3,)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(img.transpose(2, 0, 1)[None]), size=out_hw,
                                               mode='bilinear', align_corners=False)[0].numpy().transpose(1, 2, 0)
    # Same sample positions as torch; the weighted sums round differently by at
    # most 2 float32 ulps at 255 (3.05e-5 measured), whatever the sizes.
    np.testing.assert_allclose(resize_bilinear(img, *out_hw), expected, rtol=0, atol=6.2e-5)


@pytest.mark.parametrize('config', ['yolact_base', 'yolact_darknet53'])
def test_fast_and_numpy_transforms_agree_and_export(config, tmp_path):
    cfg = get_config(config, max_size=160)
    img = cv2.GaussianBlur(np.random.RandomState(1).randint(0, 256, (90, 130, 3)).astype(np.uint8), (5, 5), 2)
    fast = FastBaseTransform.from_config(cfg)
    x = fast(paddle.to_tensor(img[None])).numpy()[0]
    # Paddle's kernel places some samples up to 1.5e-5 px off torch's (and numpy's); on
    # this smooth image that is < 2e-6 after normalisation.
    np.testing.assert_allclose(BaseTransform.from_config(cfg)(img), x, rtol=0, atol=2e-6)

    static = paddle.jit.to_static(fast, input_spec=[paddle.static.InputSpec([None, None, None, 3], 'uint8')],
                                  full_graph=True)
    paddle.jit.save(static, str(tmp_path / 'transform'))
    loaded = paddle.jit.load(str(tmp_path / 'transform'))
    # The exported graph may turn x / 255 into x * (1 / 255): one float32 ulp.
    np.testing.assert_allclose(loaded(paddle.to_tensor(img[None])).numpy()[0], x, rtol=0, atol=2.4e-7)


# ------------------------------------------------------- training augmentation --
def check_augmented(out, labels_in, side, ellipses=False):
    """Shapes, dtypes, crowd bookkeeping and box/mask agreement of one SSDAugmentation output."""
    image, masks, boxes, labels, num_crowds = out
    assert image.shape == (3, side, side) and image.dtype == np.float32 and np.isfinite(image).all()
    assert masks.shape == (len(boxes), side, side) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert boxes.shape == (len(labels), 4) and len(labels) >= 1
    # Rows are a subsequence of the input rows, crowds (label 9) last and counted.
    it = iter(labels_in)
    assert all(any(l == m for m in it) for l in labels)
    assert num_crowds == (labels == 9).sum() and (labels[len(labels) - num_crowds:] == 9).all()
    assert num_crowds < len(labels), 'at least one non-crowd object must remain'
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    worst = 0.0
    for mask, box in zip(masks, boxes * side):
        if not mask.any():
            continue
        tight = tight_box(mask)
        if ellipses:  # clipping a box to a crop can leave it larger than the clipped mask
            worst = max(worst, (box[:2] - tight[:2]).max(), (tight[2:] - box[2:]).max())
        else:
            worst = max(worst, np.abs(tight - box).max())
    return worst


@pytest.mark.parametrize('ellipses', [False, True])
def test_augmentation_keeps_boxes_and_masks_consistent(ellipses):
    side = 128
    aug = SSDAugmentation.from_config(get_config('yolact_base', max_size=side), rng=np.random.RandomState(3))
    rs = np.random.RandomState(4)
    worst = 0.0
    for _ in range(150):
        sample = random_sample(rs, ellipses=ellipses)
        worst = max(worst, check_augmented(aug(*sample), sample[3], side, ellipses))
    # Rectangles: each box is its mask's tight box within a pixel after crop,
    # mirror, expand and resize (measured 0.73 px). Other shapes: mask inside box.
    assert worst <= 1.0


def test_augmentation_is_deterministic_under_a_seed():
    cfg = get_config('yolact_base', max_size=96)
    samples = [random_sample(np.random.RandomState(i)) for i in range(6)]

    def run(seed):
        aug = SSDAugmentation.from_config(cfg, rng=np.random.RandomState(seed))
        return [aug(*s) for s in samples]

    first, again, other = run(11), run(11), run(12)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_augmentation_without_random_steps_is_resize_and_normalise():
    cfg = get_config('yolact_base', max_size=64, augment_photometric_distort=False, augment_expand=False,
                     augment_random_sample_crop=False, augment_random_mirror=False)
    image, masks, boxes, labels, num_crowds = random_sample(np.random.RandomState(5))
    out = SSDAugmentation.from_config(cfg)(image, masks, boxes, labels, num_crowds)
    expected = (cv2.resize(image.astype(np.float32), (64, 64)) - np.float32(MEANS)) / np.float32(STD)
    np.testing.assert_allclose(out[0], expected[:, :, ::-1].transpose(2, 0, 1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[2], boxes, rtol=0, atol=1e-6)
    assert out[4] == num_crowds and (out[3] == labels).all()


def rect_annotations(height=40, width=50):
    masks = np.zeros((2, height, width), dtype=np.uint8)
    masks[0, 5:15, 3:20] = 1
    masks[1, 20:38, 30:49] = 1
    return Annotations(np.stack([tight_box(m) for m in masks]), masks, np.array([1, 2]), np.array([False, True]))


def test_expand_moves_everything_together():
    ann = rect_annotations()
    image = np.random.RandomState(0).uniform(0, 255, (40, 50, 3)).astype(np.float32)
    out, expanded = Expand(MEANS)(image, ann, FixedRng(0))  # ratio 2.5, offset half the slack
    left, top = int(0.5 * (50 * 2.5 - 50)), int(0.5 * (40 * 2.5 - 40))
    assert out.shape == (100, 125, 3) and expanded.masks.shape == (2, 100, 125)
    np.testing.assert_array_equal(out[top:top + 40, left:left + 50], image)
    np.testing.assert_allclose(out[0, 0], MEANS, rtol=1e-6)
    for mask, box in zip(expanded.masks, expanded.boxes):
        np.testing.assert_array_equal(tight_box(mask), box)
    image_again, same = Expand(MEANS)(image, ann, FixedRng(1))
    assert image_again is image and same is ann


def test_mirror_flips_image_masks_and_boxes():
    ann = rect_annotations()
    image = np.random.RandomState(0).uniform(0, 255, (40, 50, 3)).astype(np.float32)
    out, mirrored = RandomMirror()(image, ann, FixedRng(1))
    np.testing.assert_array_equal(out, image[:, ::-1])
    for mask, box in zip(mirrored.masks, mirrored.boxes):
        np.testing.assert_array_equal(tight_box(mask), box)
    assert (mirrored.is_crowd == ann.is_crowd).all()


def test_resize_discards_small_boxes_and_recounts_crowds():
    masks = np.zeros((3, 100, 100), dtype=np.uint8)
    masks[0, 10:50, 10:50] = 1
    masks[1, 60:64, 60:90] = 1  # 4% of the side tall: below the 5% threshold
    masks[2, 0:100, 0:100] = 1
    ann = Annotations(np.stack([tight_box(m) for m in masks]), masks, np.array([0, 1, 3]),
                      np.array([False, False, True]))
    image, out = Resize(110, 0.05, 0.05)(np.zeros((100, 100, 3), np.float32), ann, FixedRng(0))
    assert image.shape == (110, 110, 3)
    assert out.labels.tolist() == [0, 3] and out.is_crowd.tolist() == [False, True]
    np.testing.assert_allclose(out.boxes, [[11, 11, 55, 55], [0, 0, 110, 110]], rtol=1e-6)
    assert out.masks.shape == (2, 110, 110)


def test_random_crop_always_keeps_a_non_crowd_object():
    # A large central crowd region and one small non-crowd object near a corner:
    # crops that keep only the crowd region must be rejected.
    masks = np.zeros((2, 100, 100), dtype=np.uint8)
    masks[0, 2:12, 85:97] = 1
    masks[1, 20:80, 20:80] = 1
    ann = Annotations(np.stack([tight_box(m) for m in masks]), masks, np.array([0, 5]), np.array([False, True]))
    image = np.zeros((100, 100, 3), np.float32)
    rng = np.random.RandomState(0)
    for _ in range(100):
        out_image, out = RandomSampleCrop()(image, ann, rng)
        assert (~out.is_crowd).sum() == 1
        assert out.masks.shape[1:] == out_image.shape[:2]
        assert (out.boxes[:, 2:] <= np.array(out_image.shape[1::-1])).all()


# ------------------------------------------------------------ COCO datasets --
@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """The shapes dataset: 16 training and 8 validation images of SIDE x SIDE."""
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=16, num_val=8, size=SIDE, seed=0)


def copy_dataset(ds, dst):
    """A writable copy of the train split: (image folder, json dict, json path)."""
    image_dir = str(dst / 'images')
    shutil.copytree(ds.train_images, image_dir)
    with open(ds.train_info) as f:
        info = json.load(f)
    return image_dir, info, str(dst / 'instances.json')


def write_json(info, path):
    with open(path, 'w') as f:
        json.dump(info, f)
    return path


def test_coco_detection_targets_match_annotations(shapes):
    ds = COCODetection(shapes.train_images, shapes.train_info)
    gt = COCO(shapes.train_info)
    assert len(ds) == len(gt.imgs)
    for index in range(len(ds)):
        img, (target, masks, num_crowds) = ds[index]
        img_id = ds.ids[index]
        anns = gt.imgToAnns[img_id]
        raw = cv2.imread(os.path.join(shapes.train_images, gt.imgs[img_id]['file_name']))
        np.testing.assert_array_equal(img, raw.transpose(2, 0, 1))
        assert num_crowds == 0 and target.dtype == np.float32 and masks.dtype == np.uint8
        xywh = np.array([a['bbox'] for a in anns])
        np.testing.assert_allclose(target[:, :4] * SIDE, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                   rtol=0, atol=1e-4)
        assert target[:, 4].tolist() == [a['category_id'] - 1 for a in anns]
        np.testing.assert_array_equal(masks, np.stack([gt.annToMask(a) for a in anns]))

    reversed_map = {cat: len(SHAPE_CLASSES) + 1 - cat for cat in range(1, len(SHAPE_CLASSES) + 1)}
    _, (target, _, _) = COCODetection(shapes.train_images, shapes.train_info, label_map=reversed_map)[0]
    anns = gt.imgToAnns[ds.ids[0]]
    assert target[:, 4].tolist() == [len(SHAPE_CLASSES) - a['category_id'] for a in anns]


def test_crowds_go_last_and_unusable_images_are_skipped(shapes, tmp_path):
    image_dir, info, info_file = copy_dataset(shapes, tmp_path)
    by_image = {}
    for a in info['annotations']:
        by_image.setdefault(a['image_id'], []).append(a)
    multi = next(i for i, anns in by_image.items() if len(anns) >= 3)
    crowd_only = next(i for i in by_image if i != multi)
    no_annotations = next(i for i in by_image if i not in (multi, crowd_only))
    by_image[multi][0]['iscrowd'] = 1
    for a in by_image[crowd_only]:
        a['iscrowd'] = 1
    info['annotations'] = [a for a in info['annotations'] if a['image_id'] != no_annotations]
    write_json(info, info_file)

    ds = COCODetection(image_dir, info_file)
    assert multi in ds.ids and crowd_only not in ds.ids and no_annotations not in ds.ids
    _, (target, masks, num_crowds) = ds[ds.ids.index(multi)]
    anns = by_image[multi]
    expected_order = anns[1:] + anns[:1]
    assert num_crowds == 1
    assert target[:, 4].tolist() == [a['category_id'] - 1 for a in expected_order]
    gt = COCO(info_file)
    np.testing.assert_array_equal(masks[-1], gt.annToMask(gt.anns[anns[0]['id']]))

    aug = SSDAugmentation.from_config(get_config('yolact_base', max_size=64), rng=np.random.RandomState(0))
    ds_aug = COCODetection(image_dir, info_file, transform=aug)
    for _ in range(10):
        img, (target, masks, num_crowds) = ds_aug[ds.ids.index(multi)]
        assert num_crowds <= 1 and len(target) > num_crowds and masks.shape == (len(target), 64, 64)


def test_augmentation_that_removes_all_objects_moves_to_the_next_image(shapes):
    class DropAllOnce:
        """Loses every object of the first image it sees, keeps the rest."""

        def __init__(self):
            self.calls = 0

        def __call__(self, image, masks, boxes, labels, num_crowds):
            self.calls += 1
            keep = np.full(len(boxes), self.calls > 1)
            return image.transpose(2, 0, 1), masks[keep], boxes[keep], labels[keep], num_crowds

    ds = COCODetection(shapes.train_images, shapes.train_info, transform=DropAllOnce())
    img, target, masks, _, _, _ = ds.pull_item(0)
    second = ds.coco.imgs[ds.ids[1]]
    second_image = read_image(os.path.join(shapes.train_images, second['file_name']))
    np.testing.assert_array_equal(img, second_image.transpose(2, 0, 1))
    assert len(target) == len(masks) == len(ds.coco.getAnnIds(imgIds=second['id'])) > 0


def test_dataloader_with_workers_and_collate(shapes):
    cfg = get_config('yolact_base', max_size=64, augment_photometric_distort=False, augment_expand=False,
                     augment_random_sample_crop=False, augment_random_mirror=False)
    ds = COCODetection(shapes.train_images, shapes.train_info, transform=SSDAugmentation.from_config(cfg))
    loader = paddle.io.DataLoader(ds, batch_size=3, shuffle=False, num_workers=2, collate_fn=detection_collate)
    seen = 0
    for images, targets, masks, num_crowds in loader:
        assert isinstance(images, paddle.Tensor) and images.shape == [len(targets), 3, 64, 64]
        for i, (target, mask) in enumerate(zip(targets, masks)):
            img, (t, m, n) = ds[seen + i]
            np.testing.assert_array_equal(images[i].numpy(), img)
            np.testing.assert_array_equal(target.numpy(), t)
            assert mask.dtype == paddle.float32 and mask.shape == [len(t), 64, 64]
            np.testing.assert_array_equal(mask.numpy(), m)
            assert num_crowds[i] == n
        seen += len(targets)
    assert seen == len(ds)


def test_corrupt_or_missing_image_named_in_error_and_counted_in_eval(shapes, tmp_path, caplog):
    image_dir, info, info_file = copy_dataset(shapes, tmp_path)
    write_json(info, info_file)
    corrupt = os.path.join(image_dir, info['images'][1]['file_name'])
    missing = os.path.join(image_dir, info['images'][2]['file_name'])
    with open(corrupt, 'wb') as f:
        f.write(b'this is not a jpeg')
    os.remove(missing)
    bad_ids = {info['images'][1]['id'], info['images'][2]['id']}

    # Validation drops the missing file up front; a file that is corrupt (or
    # disappears) later is skipped by pull_item, named in a warning, and the
    # next readable image takes its place.
    assert info['images'][2]['id'] not in COCODetection(image_dir, info_file).ids
    ds = COCODetection(image_dir, info_file, check_files=False)
    for bad in bad_ids:
        index = ds.ids.index(bad)
        following = next(i % len(ds.ids) for i in range(index, index + len(ds.ids)) if ds.ids[i % len(ds.ids)]
                         not in bad_ids)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='data.coco'):
            sample = ds.pull_item(index)
        np.testing.assert_array_equal(sample[0], ds.pull_item(following)[0])
        named = corrupt if bad == info['images'][1]['id'] else missing
        assert f'skipping image {bad}: ' in caplog.text and named in caplog.text
    # With no readable image at all, the sample is an error naming the folder, raised by check_batches.
    empty = str(tmp_path / 'empty')
    os.makedirs(empty)
    nothing = COCODetection(empty, info_file, check_files=False)
    error = nothing[0]
    assert isinstance(error, SampleError) and error.image_id == nothing.ids[0]
    with pytest.raises(DatasetError, match=f'none of the {len(nothing.ids)} images in {re.escape(empty)} can be read'):
        list(check_batches([detection_collate([error])]))

    transform = BaseTransform(64, get_config('yolact_base').backbone.transform)
    eval_ds = COCOEvalImages(image_dir, info_file, transform)
    bad_ids = {info['images'][1]['id'], info['images'][2]['id']}
    loader = paddle.io.DataLoader(eval_ds, batch_size=5, num_workers=2)
    ids, oks, heights = [], [], []
    for images, image_ids, h, w, ok in loader:
        assert images.shape[1:] == [3, 64, 64]
        ids += image_ids.tolist()
        oks += ok.tolist()
        heights += h.tolist()
    assert sorted(ids) == sorted(eval_ds.ids)
    assert {i for i, ok in zip(ids, oks) if not ok} == bad_ids
    assert set(heights) == {SIDE}  # the info file's size stands in for unreadable images
    img, img_id, h, w, ok = eval_ds[0]
    raw = cv2.imread(os.path.join(image_dir, COCO(info_file).imgs[img_id]['file_name']))
    assert ok and (h, w) == raw.shape[:2]
    np.testing.assert_array_equal(img, transform(raw))


def test_info_file_without_annotations(shapes, tmp_path):
    with open(shapes.valid_info) as f:
        info = json.load(f)
    del info['annotations']
    info_file = write_json(info, tmp_path / 'image_info.json')

    transform = BaseTransform(64, get_config('yolact_base').backbone.transform)
    eval_ds = COCOEvalImages(shapes.valid_images, str(info_file), transform)
    assert sorted(eval_ds.ids) == sorted(im['id'] for im in info['images'])
    assert eval_ds[0][4]


def test_shapes_config_anchors_cover_every_shapes_object(tmp_path):
    """yolact_shapes' anchors, on the FPN grid of its 192 px input, give each object of the
    shapes dataset several positives (IoU >= the config's pos_threshold): what its classifier
    learns from. YOLACT's own 1:1/1:2/2:1 single-scale anchors averaged 3.4 here."""
    from layers.box_utils import jaccard, point_form
    from yolact import Yolact

    cfg = get_config('yolact_shapes')
    ds = make_shapes_dataset(str(tmp_path), num_train=60, num_val=1, size=cfg.max_size, seed=3)
    net = Yolact.from_config(cfg)
    net.eval()
    with paddle.no_grad():
        priors = net(paddle.zeros([1, 3, cfg.max_size, cfg.max_size]))['priors']
    coco = COCO(ds.train_info)
    boxes = np.array([a['bbox'] for a in coco.dataset['annotations']], dtype=np.float32) / cfg.max_size
    boxes[:, 2:] += boxes[:, :2]
    iou = jaccard(paddle.to_tensor(boxes), point_form(priors)).numpy()
    positives = (iou >= cfg.positive_iou_threshold).sum(axis=1)
    assert positives.min() >= 1, boxes[positives.argmin()] * cfg.max_size
    assert positives.mean() >= 8, positives.mean()


def test_custom_dataset_classes_follow_the_model_by_name(shapes):
    """eval.py without --class_names: the evaluated file's categories meet the model's classes by name."""
    ids = {c['name']: c['id'] for c in COCO(shapes.valid_info).loadCats(COCO(shapes.valid_info).getCatIds())}
    # A model fine-tuned on two of the file's categories: those are the classes, the others ignored.
    ds = custom_dataset_config(shapes.valid_info, model_classes=('star', 'circle'))
    assert ds.class_names == ('star', 'circle') and ds.label_map_dict() == {ids['star']: 1, ids['circle']: 2}
    # A model with more classes than the file has categories: the file's map to the model's.
    model = ('hexagon',) + tuple(reversed(SHAPE_CLASSES))
    ds = custom_dataset_config(shapes.valid_info, model_classes=model)
    assert ds.class_names == model and ds.label_map_dict() == {ids[n]: model.index(n) + 1 for n in SHAPE_CLASSES}
    # Neither way round: every category is a class (eval.py then names the mismatch).
    assert custom_dataset_config(shapes.valid_info, model_classes=('star', 'hexagon')).class_names == SHAPE_CLASSES

