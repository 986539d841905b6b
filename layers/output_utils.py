"""Post-processing: Detect's output -> image-sized boxes, binary masks and scores."""
import cv2
import numpy as np
import paddle
import paddle.nn.functional as F

from data.config import MEANS, STD
from layers.box_utils import crop, sanitize_coordinates


@paddle.no_grad()
def postprocess(det, w, h, maskiou_net=None, rescore_bbox=False, rescore_mask=False,
                crop_masks=True, score_threshold=0.0, interpolation_mode='bilinear'):
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
        interpolation_mode: how masks are upsampled to (h, w).
    Returns:
        dict of tensors in Detect's order: 'classes' [N] int64, 'scores' [N]
        box scores (times the predicted mask IoU with rescore_bbox), 'boxes'
        [N, 4] int64 pixel x1, y1, x2, y2, 'masks' [N, h, w] float 0/1, and
        with rescore_mask 'mask_scores' [N] (score x predicted mask IoU).
    """
    classes, boxes, scores, coeffs = det['class'], det['box'], det['score'], det['mask']
    if score_threshold > 0:
        keep = paddle.nonzero(scores > score_threshold).flatten()
        classes, boxes, scores, coeffs = (paddle.gather(t, keep) for t in (classes, boxes, scores, coeffs))
    if scores.shape[0] == 0:
        return _empty_output(h, w, scores.dtype, rescore_mask)

    # Assemble at prototype resolution; cropping there (before upsampling)
    # is what the reference does and what the published weights were trained for.
    masks = F.sigmoid(paddle.matmul(det['proto'], coeffs, transpose_y=True))   # [S, S, N]
    if crop_masks:
        masks = crop(masks, boxes)
    masks = masks.transpose([2, 0, 1])                                          # [N, S, S]

    out = {}
    if rescore_mask:
        if maskiou_net is None:
            raise ValueError('rescore_mask needs the mask-IoU net')
        # The mask-IoU net sees the soft, cropped prototype-resolution masks.
        maskiou = paddle.take_along_axis(maskiou_net(masks.unsqueeze(1)), classes.unsqueeze(1), axis=1)
        out['mask_scores'] = scores * maskiou.squeeze(1)
        if rescore_bbox:
            scores = out['mask_scores']

    masks = F.interpolate(masks.unsqueeze(0), size=(h, w), mode=interpolation_mode,
                          align_corners=False).squeeze(0)
    x1, x2 = sanitize_coordinates(boxes[:, 0], boxes[:, 2], w)
    y1, y2 = sanitize_coordinates(boxes[:, 1], boxes[:, 3], h)
    out.update(classes=classes, scores=scores, masks=(masks > 0.5).astype(masks.dtype),
               # Truncation, as the reference's .long() (coordinates are >= 0).
               boxes=paddle.stack([x1, y1, x2, y2], axis=1).astype('int64'))
    return out


def _empty_output(h, w, dtype, rescore_mask):
    """postprocess's result for N = 0."""
    out = {'classes': paddle.zeros([0], 'int64'), 'scores': paddle.zeros([0], dtype),
           'boxes': paddle.zeros([0, 4], 'int64'), 'masks': paddle.zeros([0, h, w], dtype)}
    if rescore_mask:
        out['mask_scores'] = paddle.zeros([0], dtype)
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
