"""Post-processing: Detect's output -> image-sized boxes, binary masks and scores."""
import cv2
import numpy as np
import paddle
import paddle.nn.functional as F

from data.config import MEANS, STD
from layers.box_utils import sanitize_coordinates
from utils.augmentations import linear_taps


# cv2.resize places its bilinear samples within 1e-4 px of the exact (PyTorch /
# Paddle) positions and rounds differently, so its values differ from the exact
# ones by < 1e-4 for masks in [0, 1] (measured: 6e-6); pixels this close to the
# 0.5 threshold are recomputed exactly.
_THRESHOLD_MARGIN = 1e-3


@paddle.no_grad()
def postprocess(det, w, h, maskiou_net=None, rescore_bbox=False, rescore_mask=False,
                crop_masks=True, score_threshold=0.0):
    """Assemble the detections of one image at the image's own size.

    Args:
        det: one entry of ``Detect``'s output: 'box' [D, 4] point form relative,
            'mask' [D, K] coefficients, 'class' [D] int64, 'score' [D],
            'proto' [S, S, K].
        w, h: the original image size in pixels.
        maskiou_net: YOLACT++ mask-IoU net, [N, 1, S, S] float masks -> [N, C-1]
            predicted IoUs; used only with ``rescore_mask``.
        rescore_bbox: with rescore_mask, also multiply the box scores by the
            predicted mask IoU.
        rescore_mask: multiply the mask scores by the predicted mask IoU.
        crop_masks: zero each mask outside its box (at prototype resolution).
        score_threshold: drop detections whose score is not above it.
    Returns:
        dict of numpy arrays in Detect's order: 'classes' [N] int64, 'scores'
        [N] float32 box scores (times the predicted mask IoU with
        rescore_bbox), 'boxes' [N, 4] int64 pixel x1, y1, x2, y2, 'masks'
        [N, h, w] bool (the soft masks upsampled bilinearly, align_corners=False,
        and thresholded at 0.5), and with rescore_mask 'mask_scores' [N]
        float32 (score x predicted mask IoU).
    """
    classes, boxes, scores, coeffs = det['class'], det['box'], det['score'], det['mask']
    if score_threshold > 0:
        keep = paddle.nonzero(scores > score_threshold).flatten()
        classes, boxes, scores, coeffs = (paddle.gather(t, keep) for t in (classes, boxes, scores, coeffs))
    if scores.shape[0] == 0:
        return _empty_output(h, w, rescore_mask)

    # Assemble at prototype resolution; cropping there (before upsampling)
    # is what the reference does and what the published weights were trained for.
    masks = F.sigmoid(paddle.matmul(det['proto'], coeffs, transpose_y=True))   # [S, S, N]
    masks = np.ascontiguousarray(masks.numpy().transpose(2, 0, 1))              # [N, S, S]
    if crop_masks:
        _crop_in_place(masks, boxes)

    out = {}
    if rescore_mask:
        if maskiou_net is None:
            raise ValueError('rescore_mask needs the mask-IoU net')
        # The mask-IoU net sees the soft, cropped prototype-resolution masks.
        ious = maskiou_net(paddle.to_tensor(masks[:, None]))
        maskiou = paddle.take_along_axis(ious, classes.unsqueeze(1), axis=1)
        out['mask_scores'] = (scores * maskiou.squeeze(1)).numpy()
        if rescore_bbox:
            scores = paddle.to_tensor(out['mask_scores'])

    x1, x2 = sanitize_coordinates(boxes[:, 0], boxes[:, 2], w)
    y1, y2 = sanitize_coordinates(boxes[:, 1], boxes[:, 3], h)
    out.update(classes=classes.numpy(), scores=scores.numpy(),
               masks=upsample_masks(masks, h, w),
               # Truncation, as the reference's .long() (coordinates are >= 0).
               boxes=paddle.stack([x1, y1, x2, y2], axis=1).astype('int64').numpy())
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
    is above ``threshold``. cv2.resize does the bulk of the work (an order of
    magnitude faster than Paddle's CPU kernel on 100 masks); the few pixels it
    leaves within _THRESHOLD_MARGIN of the threshold are recomputed with the
    exact sample positions and weights (utils.augmentations.linear_taps,
    width first as PyTorch), so the result does not depend on cv2's rounding.
    """
    n, src_h, src_w = masks.shape
    out = np.empty((n, h, w), dtype=bool)
    # Reused buffers: fresh image-sized arrays per mask would cost page faults.
    soft = np.empty((h, w), np.float32)
    band = np.empty((h, w), np.uint8)
    doubtful = []
    for i in range(n):
        cv2.resize(masks[i], (w, h), dst=soft, interpolation=cv2.INTER_LINEAR)
        np.greater(soft, threshold, out=out[i])
        cv2.inRange(soft, threshold - _THRESHOLD_MARGIN, threshold + _THRESHOLD_MARGIN, dst=band)
        if cv2.countNonZero(band):
            cols, rows = cv2.findNonZero(band).reshape(-1, 2).T
            doubtful.append((np.full(rows.size, i), rows, cols))
    if doubtful:
        idx, rows, cols = (np.concatenate(a) for a in zip(*doubtful))
        x0, x1, wx0, wx1 = (a[cols] for a in linear_taps(src_w, w))
        y0, y1, wy0, wy1 = (a[rows] for a in linear_taps(src_h, h))
        top = masks[idx, y0, x0] * wx0 + masks[idx, y0, x1] * wx1
        bottom = masks[idx, y1, x0] * wx0 + masks[idx, y1, x1] * wx1
        out[idx, rows, cols] = top * wy0 + bottom * wy1 > threshold
    return out


def _empty_output(h, w, rescore_mask):
    """postprocess's result for N = 0."""
    out = {'classes': np.zeros(0, np.int64), 'scores': np.zeros(0, np.float32),
           'boxes': np.zeros((0, 4), np.int64), 'masks': np.zeros((0, h, w), bool)}
    if rescore_mask:
        out['mask_scores'] = np.zeros(0, np.float32)
    return out


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
