"""Image transforms: network-input preprocessing and SSD-style training augmentation.

Three entry points, all producing what the network takes, a [3, S, S] float32 RGB
image normalised as the backbone was pre-trained (S = ``cfg.max_size``):

* ``FastBaseTransform``: Paddle layer for inference on batches, BGR [B, H, W, 3] in.
* ``BaseTransform``: the same numbers in numpy, for DataLoader workers at evaluation.
* ``SSDAugmentation``: the reference training augmentation, keeping boxes, masks,
  labels and the crowd count consistent through every step.

Boxes are point form (x1, y1, x2, y2). The augmentation steps work on absolute
pixel coordinates with pixel *edges* as integers: a mask whose pixels span columns
a..b has the box x1 = a, x2 = b + 1. Inputs and outputs of ``SSDAugmentation`` are
relative to the image side (0..1).
"""
import dataclasses

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F

from data.config import MEANS, STD
from layers.compat import BILINEAR_AS_TORCH
from layers.interpolate import resize_bilinear, sample_taps_tensor, taps_tensors

# Channel order of images as cv2.imread returns them.
_INPUT_CHANNEL_ORDER = 'BGR'


def _channel_permutation(transform):
    """Indices picking the backbone's channel order out of a BGR image."""
    return [_INPUT_CHANNEL_ORDER.index(c) for c in transform.channel_order]


def _normalize(img, mean, std, transform):
    """Apply ``transform``'s value normalisation; works on numpy arrays and paddle tensors.

    ``mean``/``std`` must broadcast against ``img`` with channels in BGR order.
    """
    if transform.normalize:
        return (img - mean) / std
    if transform.subtract_means:
        return img - mean
    if transform.to_float:
        return img / 255.0
    return img


# ------------------------------------------------------------- preprocessing --
class FastBaseTransform(paddle.nn.Layer):
    """Network input from raw BGR images, as the reference ``FastBaseTransform``.

    Resizes to max_size x max_size with bilinear interpolation (align_corners=False,
    no antialiasing, aspect ratio not preserved), normalises per ``transform`` and
    reorders channels. Pure Paddle ops, so it can be part of an exported graph.
    Before Paddle 3.3, whose bilinear kernel is off PyTorch's (layers.compat),
    dygraph resizes with the exact taps of :func:`linear_taps`; a traced graph
    there keeps the kernel (the taps need the image size when tracing).
    """

    def __init__(self, max_size, transform, means=MEANS, std=STD):
        super().__init__()
        self.max_size = max_size
        self.transform = transform
        self.register_buffer('mean', paddle.to_tensor(means, dtype='float32').reshape([1, 3, 1, 1]),
                             persistable=False)
        self.register_buffer('std', paddle.to_tensor(std, dtype='float32').reshape([1, 3, 1, 1]),
                             persistable=False)
        self.register_buffer('channel_index', paddle.to_tensor(_channel_permutation(transform), dtype='int64'),
                             persistable=False)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.max_size, cfg.backbone.transform)

    def forward(self, img):
        """img: [B, H, W, 3] BGR, uint8 or float in 0..255 -> [B, 3, S, S] float32."""
        x = img.astype('float32').transpose([0, 3, 1, 2])
        if BILINEAR_AS_TORCH or not paddle.in_dynamic_mode():
            x = F.interpolate(x, size=[self.max_size, self.max_size], mode='bilinear', align_corners=False)
        else:
            x = sample_taps_tensor(x, taps_tensors(x.shape[2], self.max_size, x.place),
                                   taps_tensors(x.shape[3], self.max_size, x.place))
        x = _normalize(x, self.mean, self.std, self.transform)
        return paddle.index_select(x, self.channel_index, axis=1)


class BaseTransform:
    """Evaluation preprocessing in numpy: the numbers of ``FastBaseTransform`` for one image.

    Meant for DataLoader workers, where Paddle ops are not wanted. The reference
    ``BaseTransform`` resized with cv2.resize and so fed the network slightly
    different values than its ``FastBaseTransform`` (see ``linear_taps``); here
    both give the same input, so dataset evaluation and single-image inference
    see identical numbers.
    """

    def __init__(self, max_size, transform, means=MEANS, std=STD):
        self.max_size = max_size
        self.transform = transform
        self.mean = np.asarray(means, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.channel_index = _channel_permutation(transform)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.max_size, cfg.backbone.transform)

    def __call__(self, img):
        """img: [H, W, 3] BGR uint8 (or float 0..255) -> [3, S, S] float32."""
        x = resize_bilinear(img.astype(np.float32), self.max_size, self.max_size)
        x = _normalize(x, self.mean, self.std, self.transform)
        return np.ascontiguousarray(x[:, :, self.channel_index].transpose(2, 0, 1), dtype=np.float32)


# -------------------------------------------------------- training augmentation --
@dataclasses.dataclass
class Annotations:
    """The ground truth of one image while it is being augmented.

    boxes:    [n, 4] float32 point form, absolute pixels of the current image.
    masks:    [n, H, W] uint8 0/1, H and W those of the current image.
    labels:   [n] int64 0-based classes.
    is_crowd: [n] bool; crowd regions are the last rows and stay last, because
              every step either keeps all rows or selects a subset in order.
    """
    boxes: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    is_crowd: np.ndarray

    def select(self, keep):
        """The rows where the boolean ``keep`` [n] is set."""
        return Annotations(self.boxes[keep], self.masks[keep], self.labels[keep], self.is_crowd[keep])


class RandomBrightness:
    """With probability 1/2 add one uniform offset in [-delta, delta] to all channels, in place."""

    def __init__(self, delta=32.0):
        self.delta = delta

    def __call__(self, image, rng):
        if rng.randint(2):
            image += rng.uniform(-self.delta, self.delta)
        return image


class RandomContrast:
    """With probability 1/2 scale all values by a uniform factor in [lower, upper], in place."""

    def __init__(self, lower=0.5, upper=1.5):
        self.lower, self.upper = lower, upper

    def __call__(self, image, rng):
        if rng.randint(2):
            image *= rng.uniform(self.lower, self.upper)
        return image


class RandomSaturation:
    """HSV image: with probability 1/2 scale S by a uniform factor in [lower, upper], in place."""

    def __init__(self, lower=0.5, upper=1.5):
        self.lower, self.upper = lower, upper

    def __call__(self, image, rng):
        if rng.randint(2):
            image[:, :, 1] *= rng.uniform(self.lower, self.upper)
        return image


class RandomHue:
    """HSV image (H in degrees): with probability 1/2 rotate H by up to +-delta degrees, in place."""

    def __init__(self, delta=18.0):
        self.delta = delta

    def __call__(self, image, rng):
        if rng.randint(2):
            hue = image[:, :, 0]
            hue += rng.uniform(-self.delta, self.delta)
            hue[hue > 360.0] -= 360.0
            hue[hue < 0.0] += 360.0
        return image


class PhotometricDistort:
    """Brightness, then contrast before or after (1/2 each) saturation and hue in HSV.

    Geometry is untouched. The reference's channel shuffling ("lighting noise") is
    disabled there and left out here.
    """

    def __init__(self):
        self.brightness = RandomBrightness()
        self.contrast = RandomContrast()
        self.saturation = RandomSaturation()
        self.hue = RandomHue()

    def __call__(self, image, ann, rng):
        image = self.brightness(image.copy(), rng)
        contrast_first = rng.randint(2)
        if contrast_first:
            image = self.contrast(image, rng)
        # cv2 converts float32 BGR to HSV with H in degrees, S in 0..1, V on the input scale.
        image = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        image = self.hue(self.saturation(image, rng), rng)
        image = cv2.cvtColor(image, cv2.COLOR_HSV2BGR)
        if not contrast_first:
            image = self.contrast(image, rng)
        return image, ann


class Expand:
    """With probability 1/2 zoom out: place the image on a canvas 1..4 times larger.

    The canvas is filled with the mean colour, so after normalisation it is zero.
    """

    def __init__(self, means=MEANS, max_ratio=4.0):
        self.means = np.asarray(means, dtype=np.float32)
        self.max_ratio = max_ratio

    def __call__(self, image, ann, rng):
        if rng.randint(2):
            return image, ann
        height, width, depth = image.shape
        ratio = rng.uniform(1, self.max_ratio)
        left = int(rng.uniform(0, width * ratio - width))
        top = int(rng.uniform(0, height * ratio - height))
        new_h, new_w = int(height * ratio), int(width * ratio)

        canvas = np.empty((new_h, new_w, depth), dtype=image.dtype)
        canvas[:] = self.means
        canvas[top:top + height, left:left + width] = image
        masks = np.zeros((len(ann.masks), new_h, new_w), dtype=ann.masks.dtype)
        masks[:, top:top + height, left:left + width] = ann.masks
        boxes = ann.boxes + np.array([left, top, left, top], dtype=ann.boxes.dtype)
        return canvas, Annotations(boxes, masks, ann.labels, ann.is_crowd)


def _box_iou_numpy(boxes, rect):
    """IoU of [n, 4] point-form boxes with one [4] box -> [n]."""
    wh = np.clip(np.minimum(boxes[:, 2:], rect[2:]) - np.maximum(boxes[:, :2], rect[:2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (rect[2] - rect[0]) * (rect[3] - rect[1])
    return inter / (area_a + area_b - inter)


class RandomSampleCrop:
    """SSD random crop: keep the whole image, or cut a patch keeping the objects centred in it.

    A mode is drawn from ``sample_options``: None keeps the image; otherwise up to
    50 patches are tried with sides in [0.3, 1] of the image's and aspect ratio
    h/w in [0.5, 2]. A patch is accepted when it contains the centre of at least
    one non-crowd box; boxes are clipped to it, and boxes whose centres fall
    outside are dropped with their masks. If all 50 tries fail, a new mode is drawn.
    The patch corner is uniform over the valid positions (the reference's
    ``uniform(width - w)`` draws from [1, width - w], an off-by-one-pixel slip).

    The (min IoU, max IoU) check is the reference's: a patch is rejected only if
    the smallest IoU with a box is below min_iou *and* the largest above max_iou.
    max_iou is infinite in every mode, so the IoU modes never reject a patch; the
    reference's author reports that enforcing min_iou halved early mAP, so that is
    kept.
    """

    def __init__(self, sample_options=(None, (0.1, None), (0.3, None), (0.7, None), (0.9, None), (None, None)),
                 min_side=0.3, max_aspect=2.0, max_trials=50):
        self.sample_options = sample_options
        self.min_side = min_side
        self.max_aspect = max_aspect
        self.max_trials = max_trials

    def __call__(self, image, ann, rng):
        if not (~ann.is_crowd).any():
            # No patch can be accepted; only the keep-the-image mode would end the search.
            return image, ann
        height, width, _ = image.shape
        while True:
            mode = self.sample_options[rng.randint(len(self.sample_options))]
            if mode is None:
                return image, ann
            min_iou = -np.inf if mode[0] is None else mode[0]
            max_iou = np.inf if mode[1] is None else mode[1]

            for _ in range(self.max_trials):
                w = rng.uniform(self.min_side * width, width)
                h = rng.uniform(self.min_side * height, height)
                if not 1 / self.max_aspect <= h / w <= self.max_aspect:
                    continue
                left = rng.uniform(0, width - w)
                top = rng.uniform(0, height - h)
                rect = np.array([int(left), int(top), int(left + w), int(top + h)])

                overlap = _box_iou_numpy(ann.boxes, rect)
                if overlap.min() < min_iou and overlap.max() > max_iou:
                    continue

                centers = (ann.boxes[:, :2] + ann.boxes[:, 2:]) / 2
                keep = ((rect[0] < centers[:, 0]) & (rect[1] < centers[:, 1])
                        & (rect[2] > centers[:, 0]) & (rect[3] > centers[:, 1]))
                if not (keep & ~ann.is_crowd).any():
                    continue

                kept = ann.select(keep)
                boxes = kept.boxes.copy()
                boxes[:, :2] = np.maximum(boxes[:, :2], rect[:2]) - rect[:2]
                boxes[:, 2:] = np.minimum(boxes[:, 2:], rect[2:]) - rect[:2]
                masks = kept.masks[:, rect[1]:rect[3], rect[0]:rect[2]]
                image = image[rect[1]:rect[3], rect[0]:rect[2]]
                return image, Annotations(boxes, masks, kept.labels, kept.is_crowd)


class RandomMirror:
    """With probability 1/2 flip horizontally."""

    def __call__(self, image, ann, rng):
        if not rng.randint(2):
            return image, ann
        width = image.shape[1]
        boxes = ann.boxes.copy()
        boxes[:, 0] = width - ann.boxes[:, 2]
        boxes[:, 2] = width - ann.boxes[:, 0]
        return image[:, ::-1], Annotations(boxes, ann.masks[:, :, ::-1], ann.labels, ann.is_crowd)


# The most channels every supported OpenCV accepts in one image: 4.x takes 512
# (CV_CN_MAX), 5.x 128.
_CV_MAX_CHANNELS = 128


def _resize_masks(masks, size):
    """[n, H, W] uint8 -> [n, size, size] uint8, bilinear then rounded (threshold 0.5).

    cv2 resizes the instances as channels of one image, at most
    _CV_MAX_CHANNELS at a time; it drops a single channel's axis, hence the
    reshape. Each channel is resized on its own, so the chunking does not
    change a value.
    """
    chunks = [cv2.resize(np.ascontiguousarray(masks[i:i + _CV_MAX_CHANNELS].transpose(1, 2, 0)), (size, size))
              .reshape(size, size, -1).transpose(2, 0, 1)
              for i in range(0, len(masks), _CV_MAX_CHANNELS)]
    return np.concatenate(chunks) if chunks else np.zeros((0, size, size), dtype=masks.dtype)


class Resize:
    """Resize to size x size (aspect ratio not kept) and drop boxes that became too small.

    A box is kept when its width is above ``discard_width`` and its height above
    ``discard_height``, both fractions of the output side (4/550 = 4 px at 550).
    The reference compares absolute pixel sizes against these fractions, which
    in effect only drops degenerate boxes; here they mean what their values say.
    """

    def __init__(self, size, discard_width, discard_height):
        self.size = size
        self.discard_width = discard_width
        self.discard_height = discard_height

    def __call__(self, image, ann, rng):
        height, width, _ = image.shape
        image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        scale = np.array([self.size / width, self.size / height] * 2, dtype=np.float32)
        ann = Annotations(ann.boxes * scale, _resize_masks(ann.masks, self.size), ann.labels, ann.is_crowd)
        w = (ann.boxes[:, 2] - ann.boxes[:, 0]) / self.size
        h = (ann.boxes[:, 3] - ann.boxes[:, 1]) / self.size
        return image, ann.select((w > self.discard_width) & (h > self.discard_height))


class SSDAugmentation:
    """The reference training augmentation.

    Steps: photometric distortion, expand (zoom out), random SSD crop, horizontal
    mirror (each optional), resize to max_size x max_size discarding tiny boxes,
    then the backbone's normalisation and channel order.

    rng: source of randomness (``randint``, ``uniform``), e.g. an
    ``np.random.RandomState`` for reproducible tests. By default numpy's global
    state, which paddle.io.DataLoader reseeds differently in each worker; a
    RandomState passed in would be copied into every worker and repeat itself.
    """

    def __init__(self, max_size, transform, photometric_distort=True, expand=True, random_sample_crop=True,
                 random_mirror=True, discard_box_width=4 / 550, discard_box_height=4 / 550,
                 means=MEANS, std=STD, rng=None):
        optional_steps = ((photometric_distort, PhotometricDistort()), (expand, Expand(means)),
                          (random_sample_crop, RandomSampleCrop()), (random_mirror, RandomMirror()))
        self.steps = [step for enabled, step in optional_steps if enabled]
        self.steps.append(Resize(max_size, discard_box_width, discard_box_height))
        self.mean = np.asarray(means, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.transform = transform
        self.channel_index = _channel_permutation(transform)
        self.rng = np.random if rng is None else rng

    @classmethod
    def from_config(cls, cfg, rng=None):
        return cls(cfg.max_size, cfg.backbone.transform,
                   photometric_distort=cfg.augment_photometric_distort, expand=cfg.augment_expand,
                   random_sample_crop=cfg.augment_random_sample_crop, random_mirror=cfg.augment_random_mirror,
                   discard_box_width=cfg.discard_box_width, discard_box_height=cfg.discard_box_height, rng=rng)

    def __call__(self, image, masks, boxes, labels, num_crowds):
        """Augment one image with its ground truth.

        image: [H, W, 3] BGR uint8; masks: [n, H, W] uint8 0/1; boxes: [n, 4] point
        form relative to the image; labels: [n] 0-based classes; num_crowds: the
        last num_crowds rows are crowd regions.
        Returns (image [3, S, S] float32 network input, masks [m, S, S] uint8,
        boxes [m, 4] float32 relative, labels [m] int64, num_crowds), m <= n.
        """
        height, width, _ = image.shape
        is_crowd = np.arange(len(boxes)) >= len(boxes) - num_crowds
        scale = np.array([width, height, width, height], dtype=np.float32)
        ann = Annotations(np.asarray(boxes, dtype=np.float32) * scale, np.asarray(masks, dtype=np.uint8),
                          np.asarray(labels, dtype=np.int64), is_crowd)
        image = image.astype(np.float32)
        for step in self.steps:
            image, ann = step(image, ann, self.rng)

        image = _normalize(image, self.mean, self.std, self.transform)[:, :, self.channel_index]
        image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        side = np.float32(image.shape[-1])
        return (image, np.ascontiguousarray(ann.masks), ann.boxes / side, ann.labels,
                int(ann.is_crowd.sum()))
