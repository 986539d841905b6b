"""Post-processing (``PostProcess``): Detect's output -> image-sized boxes, binary masks and scores."""
import cv2
import numpy as np
import paddle
import paddle.nn.functional as F

from data.config import MEANS, STD
from layers.backend import check_backend, use_device_path
from layers.box_utils import crop, sanitize_coordinates
from layers.interpolate import linear_taps, sample_taps, sample_taps_tensor, taps_tensors


# cv2.resize places its bilinear samples within 1e-4 px of the exact (PyTorch /
# Paddle) positions and rounds differently, so its values differ from the exact
# ones by < 1e-4 for masks in [0, 1] (measured: 6e-6); pixels this close to the
# 0.5 threshold are recomputed exactly.
_THRESHOLD_MARGIN = 1e-3


class PostProcess:
    """Detect's output of one image -> image-sized boxes, binary masks and scores.

    Two implementations give the same result: on a CPU the masks are cropped
    and upsampled in numpy/cv2 (faster than Paddle's CPU kernels;
    tools/benchmark.py times it); when the detections are on a GPU, mask assembly, crop,
    mask-IoU rescoring, upsampling and thresholding stay there and the host
    receives the final boolean masks in one copy (plus the small
    per-detection arrays).

    Args:
        rescore_bbox: with rescore_mask, also multiply the box scores by the
            predicted mask IoU.
        rescore_mask: multiply the mask scores by the mask-IoU net's predicted
            IoU (YOLACT++); then ``__call__`` needs ``maskiou_net``.
        crop_masks: zero each mask outside its box (at prototype resolution).
        score_threshold: drop detections whose box score is not above it.
        mask_threshold: a pixel is in a mask when its upsampled soft value is
            above it.
        backend: 'auto' runs the device path when the detections are on a GPU
            and the host path otherwise; 'device' / 'host' force one (tests use
            'device' to check the GPU path on a CPU).
    """

    def __init__(self, rescore_bbox=False, rescore_mask=False, crop_masks=True, score_threshold=0.0,
                 mask_threshold=0.5, backend='auto'):
        check_backend(backend)
        self.rescore_bbox = rescore_bbox
        self.rescore_mask = rescore_mask
        self.crop_masks = crop_masks
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.backend = backend

    @classmethod
    def from_config(cls, cfg, **overrides):
        """PostProcess with the config's rescoring rule (YOLACT++: rescore_mask);
        keyword overrides win (e.g. ``score_threshold=0.15``)."""
        kwargs = dict(rescore_bbox=cfg.rescore_bbox, rescore_mask=cfg.rescore_mask)
        kwargs.update(overrides)
        return cls(**kwargs)

    @paddle.no_grad()
    def __call__(self, det, width, height, maskiou_net=None, max_num_detections=None):
        """Assemble the detections of one image at the image's own size.

        Args:
            det: one entry of ``Detect``'s output: 'boxes' [D, 4] point form
                relative, 'scores' [D], 'classes' [D] int64, 'coeffs' [D, K],
                'proto' [S, S, K].
            width, height: the original image size in pixels.
            maskiou_net: YOLACT++ mask-IoU net, [N, 1, S, S] float masks ->
                [N, C-1] predicted IoUs; needed with ``rescore_mask``.
            max_num_detections: assemble only the first (best) this many
                detections, before the score threshold (drawing shows only
                --top_k); None: all.
        Returns:
            dict of numpy arrays in Detect's order: 'classes' [N] int64,
            'scores' [N] float32 box scores (times the predicted mask IoU
            with rescore_bbox), 'boxes' [N, 4] int64 pixel x1, y1, x2, y2,
            'masks' [N, height, width] bool (the soft masks upsampled
            bilinearly, align_corners=False, and thresholded), and with
            rescore_mask 'mask_scores' [N] float32 (score x predicted mask IoU).
        """
        if self.rescore_mask and maskiou_net is None:
            raise ValueError('rescore_mask needs the mask-IoU net')
        classes, boxes, scores, coeffs = det['classes'], det['boxes'], det['scores'], det['coeffs']
        if max_num_detections is not None:
            classes, boxes, scores, coeffs = (t[:max_num_detections] for t in (classes, boxes, scores, coeffs))
        if self.score_threshold > 0:
            # Data-dependent size: the device path's one synchronisation before the copy.
            keep = paddle.nonzero(scores > self.score_threshold).flatten()
            classes, boxes, scores, coeffs = (paddle.gather(t, keep) for t in (classes, boxes, scores, coeffs))
        if scores.shape[0] == 0:
            return self._empty_output(height, width)

        on_device = use_device_path(det['proto'], self.backend)
        # Assemble at prototype resolution; cropping there (before upsampling)
        # is what the reference does and what the published weights were trained for.
        masks = F.sigmoid(paddle.matmul(det['proto'], coeffs, transpose_y=True))   # [S, S, N]
        if on_device:
            if self.crop_masks:
                masks = crop(masks, boxes)
            soft = masks.transpose([2, 0, 1])                                      # [N, S, S] tensor
        else:
            soft = np.ascontiguousarray(masks.numpy().transpose(2, 0, 1))          # [N, S, S] numpy
            if self.crop_masks:
                _crop_in_place(soft, boxes)

        out = {}
        if self.rescore_mask:
            # The mask-IoU net sees the soft, cropped prototype-resolution masks.
            net_input = (soft if on_device else paddle.to_tensor(soft)).unsqueeze(1)
            maskiou = paddle.take_along_axis(maskiou_net(net_input), classes.unsqueeze(1), axis=1)
            mask_scores = scores * maskiou.squeeze(1)
            out['mask_scores'] = mask_scores
            if self.rescore_bbox:
                scores = mask_scores

        x1, x2 = sanitize_coordinates(boxes[:, 0], boxes[:, 2], width)
        y1, y2 = sanitize_coordinates(boxes[:, 1], boxes[:, 3], height)
        out.update(classes=classes, scores=scores,
                   # Truncation, as the reference's .long() (coordinates are >= 0).
                   boxes=paddle.stack([x1, y1, x2, y2], axis=1).astype('int64'))
        if on_device:
            # All the device work is queued: the masks' copy is the first wait for it.
            masks = upsample_masks_device(soft, height, width, self.mask_threshold).numpy()
        else:
            masks = upsample_masks(soft, height, width, self.mask_threshold)
        out = {key: value.numpy() for key, value in out.items()}
        out['masks'] = masks
        return out

    def _empty_output(self, height, width):
        """The result for N = 0."""
        out = {'classes': np.zeros(0, np.int64), 'scores': np.zeros(0, np.float32),
               'boxes': np.zeros((0, 4), np.int64), 'masks': np.zeros((0, height, width), bool)}
        if self.rescore_mask:
            out['mask_scores'] = np.zeros(0, np.float32)
        return out


def _crop_in_place(masks, boxes, padding=1):
    """Zero each [N, S, S] numpy mask outside its box: layers.box_utils.crop, by slicing.

    crop keeps row r when y1 <= r < y2 (the box sanitised in pixels of the
    prototype, padded by ``padding``), i.e. ceil(y1) <= r < ceil(y2); the same
    for columns. Slicing a rectangle is much cheaper than crop's per-pixel
    comparisons and gives the same values.
    """
    _, h, w = masks.shape
    x1, x2 = (np.ceil(t.numpy()).astype(np.int64) for t in sanitize_coordinates(boxes[:, 0], boxes[:, 2], w, padding))
    y1, y2 = (np.ceil(t.numpy()).astype(np.int64) for t in sanitize_coordinates(boxes[:, 1], boxes[:, 3], h, padding))
    for mask, left, right, top, bottom in zip(masks, x1, x2, y1, y2):
        mask[:top] = 0
        mask[bottom:] = 0
        mask[:, :left] = 0
        mask[:, right:] = 0


def upsample_masks(masks, h, w, threshold=0.5):
    """Binary image-sized masks from soft prototype-sized ones.

    masks: [N, S, S] float32 in [0, 1] -> [N, h, w] bool, True where the
    bilinear upsampling (align_corners=False, the reference's F.interpolate)
    is above ``threshold``.

    Cropped masks are zero outside their box, and an output pixel whose four
    taps are all zero is exactly zero, so only each mask's window (the output
    pixels whose taps reach its non-zero rows and columns) is computed: a
    small window exactly, from layers.interpolate.linear_taps (positions
    and weights as PyTorch, width first); a large one with cv2.resize, an
    order of magnitude faster per pixel than numpy, whose few pixels within
    _THRESHOLD_MARGIN of the threshold are then recomputed exactly. Either
    way the result does not depend on cv2's rounding.
    """
    n, src_h, src_w = masks.shape
    out = np.zeros((n, h, w), dtype=bool)
    if n == 0:
        return out
    taps_x, taps_y = linear_taps(src_w, w), linear_taps(src_h, h)
    if threshold < 0:
        # Zero is above the threshold: every pixel counts, whatever the mask.
        windows = [(0, h, 0, w)] * n
    else:
        windows = _mask_windows(masks, taps_y, taps_x)
    soft = None
    doubtful = []
    for i, window in enumerate(windows):
        if window is None:
            continue                        # all zero: no pixel above a threshold >= 0
        top, bottom, left, right = window
        if top >= bottom or left >= right:
            continue                        # shrinking (an image under S px): no output pixel taps it
        if (bottom - top) * (right - left) <= _EXACT_WINDOW_PIXELS:
            values = _exact_window(masks[i], taps_y, taps_x, window)
            np.greater(values, threshold, out=out[i, top:bottom, left:right])
            continue
        if soft is None:
            # Reused buffers: fresh image-sized arrays per mask would cost page faults.
            soft = np.empty((h, w), np.float32)
            band = np.empty((h, w), np.uint8)
        cv2.resize(masks[i], (w, h), dst=soft, interpolation=cv2.INTER_LINEAR)
        np.greater(soft[top:bottom, left:right], threshold, out=out[i, top:bottom, left:right])
        near = band[top:bottom, left:right]
        cv2.inRange(soft[top:bottom, left:right], threshold - _THRESHOLD_MARGIN, threshold + _THRESHOLD_MARGIN,
                    dst=near)
        if cv2.countNonZero(near):
            cols, rows = cv2.findNonZero(near).reshape(-1, 2).T
            doubtful.append((np.full(rows.size, i), rows + top, cols + left))
    if doubtful:
        idx, rows, cols = (np.concatenate(a) for a in zip(*doubtful))
        x0, x1, wx0, wx1 = (a[cols] for a in taps_x)
        y0, y1, wy0, wy1 = (a[rows] for a in taps_y)
        upper = masks[idx, y0, x0] * wx0 + masks[idx, y0, x1] * wx1
        lower = masks[idx, y1, x0] * wx0 + masks[idx, y1, x1] * wx1
        out[idx, rows, cols] = upper * wy0 + lower * wy1 > threshold
    return out


# Windows up to this many output pixels are computed in numpy, larger ones by
# cv2.resize of the whole mask: the two cost the same near 1/8 of a 640x480 image.
_EXACT_WINDOW_PIXELS = 40_000


def _mask_windows(masks, taps_y, taps_x):
    """Each mask's window: output (top, bottom, left, right), half-open, or None for an all-zero mask.

    A window holds every output pixel with a tap on the mask's non-zero
    bounding box. Taps are non-decreasing along each axis, so it is one
    range of rows and one of columns.
    """
    nonzero = masks != 0
    rows_used, cols_used = nonzero.any(axis=2), nonzero.any(axis=1)        # [N, S] each
    windows = []
    for rows, cols in zip(rows_used, cols_used):
        if not rows.any():
            windows.append(None)
            continue
        windows.append(_tap_range(rows, taps_y) + _tap_range(cols, taps_x))
    return windows


def _tap_range(used, taps):
    """(first, end) output positions whose taps (i0 <= i1) reach the first..last True source position."""
    i0, i1 = taps[0], taps[1]
    first = int(np.argmax(used))
    last = used.size - 1 - int(np.argmax(used[::-1]))
    return int(np.searchsorted(i1, first, side='left')), int(np.searchsorted(i0, last, side='right'))


def _exact_window(mask, taps_y, taps_x, window):
    """One [S, S] mask's upsampled values in an output window, bit for bit the doubtful-pixel formula."""
    top, bottom, left, right = window
    y0, y1, wy0, wy1 = (a[top:bottom] for a in taps_y)
    first, last = y0[0], y1[-1] + 1          # only the source rows the window samples
    return sample_taps(mask[first:last], (y0 - first, y1 - first, wy0, wy1), tuple(a[left:right] for a in taps_x))


# Output pixels per chunk of the device upsampling: its float32 temporaries
# stay near 64 MB each (about 55 masks at 640x480).
_UPSAMPLE_CHUNK_PIXELS = 2 ** 24


def upsample_masks_device(masks, h, w, threshold=0.5):
    """upsample_masks in Paddle ops, on the masks' device.

    masks: [N, S, S] float32 tensor in [0, 1] -> [N, h, w] bool tensor.
    The bilinear samples are computed exactly as upsample_masks recomputes its
    doubtful pixels (linear_taps positions and weights, width first), which
    is PyTorch's F.interpolate(align_corners=False). Paddle's own bilinear
    kernel places its samples up to 1.5e-5 px off PyTorch's, which moves
    values by up to 7e-7 and flips pixels next to the threshold (2 of 1.2M in
    a 138 -> 480x640 test).
    """
    n, src_h, src_w = masks.shape
    taps_x, taps_y = taps_tensors(src_w, w, masks.place), taps_tensors(src_h, h, masks.place)
    chunk = max(1, _UPSAMPLE_CHUNK_PIXELS // (h * w))
    out = []
    for start in range(0, n, chunk):
        out.append(sample_taps_tensor(masks[start:start + chunk], taps_y, taps_x) > threshold)
    return out[0] if len(out) == 1 else paddle.concat(out)


def undo_image_transformation(img, w, h, transform):
    """Network input back to a displayable image.

    img: [3, S, S] network input (RGB, normalised per ``transform``, a
    ``TransformConfig``) -> float32 numpy [h, w, 3] RGB in [0, 1].
    """
    img = np.asarray(img.numpy() if isinstance(img, paddle.Tensor) else img, dtype=np.float32)
    bgr = img.transpose(1, 2, 0)[:, :, ::-1]
    if transform.normalize:
        bgr = (bgr * np.array(STD) + np.array(MEANS)) / 255.0
    elif transform.subtract_means:
        bgr = bgr / 255.0 + np.array(MEANS) / 255.0
    rgb = np.clip(bgr[:, :, ::-1], 0, 1).astype(np.float32)
    return cv2.resize(rgb, (w, h))
