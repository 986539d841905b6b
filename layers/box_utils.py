"""Box and mask geometry shared by detection, post-processing and the loss.

Box formats used throughout:
  * point form:  (x1, y1, x2, y2)
  * center form: (cx, cy, w, h)
Coordinates are relative to the image side (0..1) unless a docstring says otherwise.
"""
import paddle

from layers.backend import use_device_path

# SSD box-coding variances used by the reference for both encode and decode.
VARIANCES = (0.1, 0.2)

def divide_rounded(a, b):
    """a / b for float32 tensors, correctly rounded to float32 on every device.

    Paddle's CPU float32 division is at times 1 ulp off the IEEE quotient that
    numpy and PyTorch (the reference) give, which can flip an IoU sitting on
    an NMS threshold. A float64 quotient rounded to float32 is the correctly
    rounded float32 quotient: float64 carries more than 2 x 24 + 2 bits, and
    the quotient of two float32 numbers is never a float32 rounding midpoint.
    """
    return (a.astype('float64') / b.astype('float64')).astype('float32')


def log_sum_exp(x):
    """log(sum(exp(x), axis=1)) of [N, C] float32 logits -> [N], shifted by the maximum of all of x.

    The reference's rule for ranking hard negatives: one shift for the whole
    batch, not one per row, so rows far below the batch maximum land in
    float32's gradual-underflow range, and their values (and the ranking) are
    those of an IEEE float32 exp there. Paddle's vectorised CPU float32 exp is
    not: below about -88.7 it returns a constant 2.9e-39 instead of the
    subnormal result (measured on Paddle 3.3.1), which inflates such rows'
    loss by up to 5 nats at large logits. A float64 exp rounded to float32 is
    the IEEE float32 value, subnormals included.
    """
    x_max = x.max()
    shifted = (x - x_max).astype('float64')
    return paddle.log(paddle.exp(shifted).astype(x.dtype).sum(axis=1)) + x_max


def point_form(boxes):
    """[N, 4] center form -> [N, 4] point form."""
    return paddle.concat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)


def center_size(boxes):
    """[N, 4] point form -> [N, 4] center form."""
    return paddle.concat([(boxes[:, 2:] + boxes[:, :2]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)


def intersect(box_a, box_b):
    """Pairwise intersection areas.

    box_a: [n, A, 4], box_b: [n, B, 4] point form  ->  [n, A, B].
    """
    # Per coordinate rather than on [.., 2] slices: identical numbers, fewer kernels.
    iw = paddle.minimum(box_a[:, :, None, 2], box_b[:, None, :, 2]) - paddle.maximum(box_a[:, :, None, 0], box_b[:, None, :, 0])
    ih = paddle.minimum(box_a[:, :, None, 3], box_b[:, None, :, 3]) - paddle.maximum(box_a[:, :, None, 1], box_b[:, None, :, 1])
    return paddle.clip(iw, min=0) * paddle.clip(ih, min=0)


def jaccard(box_a, box_b, iscrowd=False):
    """Pairwise IoU of point-form boxes.

    box_a: [A, 4] or [n, A, 4]; box_b: [B, 4] or [n, B, 4]  ->  [A, B] or [n, A, B].
    With ``iscrowd`` the denominator is box_a's area (intersection over the
    anchor), the reference's rule for COCO crowd regions.
    """
    batched = box_a.ndim == 3
    if not batched:
        box_a, box_b = box_a[None], box_b[None]
    inter = intersect(box_a, box_b)
    area_a = ((box_a[:, :, 2] - box_a[:, :, 0]) * (box_a[:, :, 3] - box_a[:, :, 1]))[:, :, None]
    area_b = ((box_b[:, :, 2] - box_b[:, :, 0]) * (box_b[:, :, 3] - box_b[:, :, 1]))[:, None, :]
    out = inter / area_a if iscrowd else inter / (area_a + area_b - inter)
    return out if batched else out[0]


def encode(matched, priors):
    """Regression targets of point-form boxes w.r.t. their anchors.

    matched: [P, 4] point form, priors: [P, 4] center form -> [P, 4] (dcx, dcy, dw, dh).
    """
    g_cxcy = ((matched[:, :2] + matched[:, 2:]) / 2 - priors[:, :2]) / (VARIANCES[0] * priors[:, 2:])
    g_wh = paddle.log((matched[:, 2:] - matched[:, :2]) / priors[:, 2:]) / VARIANCES[1]
    return paddle.concat([g_cxcy, g_wh], axis=1)


def decode(loc, priors):
    """Inverse of ``encode``: loc [P, 4] offsets, priors [P, 4] center form -> [P, 4] point form."""
    centers = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    sizes = priors[:, 2:] * paddle.exp(loc[:, 2:] * VARIANCES[1])
    mins = centers - sizes / 2
    return paddle.concat([mins, mins + sizes], axis=1)


def match(pos_thresh, neg_thresh, crowd_iou_thresh, truths, priors, labels, crowd_boxes=None, backend='auto'):
    """Assign each anchor a ground-truth box, as the reference ``match`` does.

    Args:
        truths: [O, 4] point-form ground-truth boxes (non-crowd), O >= 1.
        priors: [P, 4] center-form anchors.
        labels: [O] int64 class labels, 0-based (background excluded).
        crowd_boxes: [K, 4] point-form crowd boxes or None.
        backend: where the "every truth gets its best anchor" loop runs
            ('auto': on the device when ``truths`` is on a GPU, else in numpy;
            see ``layers.backend``). Both give the same assignment.
    Returns:
        loc_t  [P, 4] float: encoded regression targets of the matched truth,
        conf_t [P] int64: label+1 for positives, 0 for background, -1 for neutral,
        idx_t  [P] int64: index of the matched truth.

    Every truth is first given its best anchor (greedily, highest overlap
    first) so no ground truth goes unused; then anchors with IoU >= pos_thresh
    are positive, < neg_thresh background, the rest neutral. Non-positive
    anchors covering a crowd region by more than crowd_iou_thresh become neutral.
    """
    decoded_priors = point_form(priors)
    overlaps = jaccard(truths, decoded_priors)                   # [O, P]
    best_truth_overlap = overlaps.max(axis=0)
    best_truth_idx = overlaps.argmax(axis=0)
    force = _force_best_priors_device if use_device_path(truths, backend) else _force_best_priors
    best_truth_overlap, best_truth_idx = force(overlaps, best_truth_overlap, best_truth_idx)

    matches = paddle.gather(truths, best_truth_idx)
    conf = paddle.gather(labels, best_truth_idx).astype('int64') + 1
    conf = paddle.where(best_truth_overlap < pos_thresh, paddle.full_like(conf, -1), conf)
    conf = paddle.where(best_truth_overlap < neg_thresh, paddle.zeros_like(conf), conf)

    if crowd_boxes is not None and crowd_boxes.shape[0] > 0 and crowd_iou_thresh < 1:
        best_crowd_overlap = jaccard(decoded_priors, crowd_boxes, iscrowd=True).max(axis=1)
        conf = paddle.where((conf <= 0) & (best_crowd_overlap > crowd_iou_thresh),
                            paddle.full_like(conf, -1), conf)

    return encode(matches, priors), conf, best_truth_idx


def _force_best_priors(overlaps, best_truth_overlap, best_truth_idx):
    """The reference's forcing loop, on host copies.

    overlaps [O, P]; best_truth_overlap [P] float, best_truth_idx [P] int64 (each
    anchor's best truth) -> the same two with every truth's best anchor forced
    to it (overlap 2). O times: the largest remaining overlap (ties: the first
    truth, then its first anchor, numpy's argmax rule) assigns anchor i to
    truth j, and row j and column i leave the competition (set to -1). With
    more truths than anchors, the surplus steps find only -1 and reassign
    anchor 0 to truth 0, as the reference does.
    """
    # O is small and each step is a scalar decision: numpy is faster than Paddle's CPU kernels here.
    ov = overlaps.numpy().copy()
    bto = best_truth_overlap.numpy().copy()
    bti = best_truth_idx.numpy().copy()
    for _ in range(ov.shape[0]):
        best_prior_overlap = ov.max(axis=1)
        best_prior_idx = ov.argmax(axis=1)
        j = int(best_prior_overlap.argmax())
        i = int(best_prior_idx[j])
        ov[:, i] = -1
        ov[j, :] = -1
        bto[i] = 2
        bti[i] = j
    return paddle.to_tensor(bto), paddle.to_tensor(bti)


def _force_best_priors_device(overlaps, best_truth_overlap, best_truth_idx):
    """``_force_best_priors`` in fixed-shape Paddle ops: no host copy, no Python decision on a value.

    Same arguments and result, on the tensors' device. Each of the O steps is
    one argmax over the flattened [O * P] matrix: Paddle's argmax returns the
    first maximum (tested on the CPU; its GPU kernel reduces with cub's ArgMax,
    which also keeps the lower index of a tie), and the first maximum in
    row-major order is the host rule's choice: the first truth holding the
    largest overlap and, in its row, the first anchor reaching it.
    """
    num_truths, num_priors = overlaps.shape
    truth_ids = paddle.arange(num_truths, dtype='int64').unsqueeze(1)        # [O, 1]
    prior_ids = paddle.arange(num_priors, dtype='int64')                      # [P]
    removed = paddle.full_like(overlaps, -1)
    forced = paddle.full_like(best_truth_overlap, 2)
    ov = overlaps
    for _ in range(num_truths):
        flat = ov.flatten().argmax()                                          # [] int64
        j = flat // num_priors
        i = flat % num_priors
        anchor = prior_ids == i                                               # [P], True at i only
        ov = paddle.where((truth_ids == j) | anchor.unsqueeze(0), removed, ov)
        best_truth_overlap = paddle.where(anchor, forced, best_truth_overlap)
        best_truth_idx = paddle.where(anchor, j.expand_as(best_truth_idx), best_truth_idx)
    return best_truth_overlap, best_truth_idx


def sanitize_coordinates(x1, x2, img_size, padding=0):
    """Scale relative coordinates to pixels, order them and clamp them to [0, img_size].

    x1, x2: [N] relative -> two [N] float tensors (x1 <= x2), padded by ``padding`` pixels.
    """
    x1 = x1 * img_size
    x2 = x2 * img_size
    lo = paddle.minimum(x1, x2)
    hi = paddle.maximum(x1, x2)
    return paddle.clip(lo - padding, min=0), paddle.clip(hi + padding, max=img_size)


def crop(masks, boxes, padding=1):
    """Zero every mask outside its box.

    masks: [H, W, N] float; boxes: [N, 4] relative point form -> [H, W, N].
    A pixel (row r, col c) is kept when x1 <= c < x2 and y1 <= r < y2 after
    ``sanitize_coordinates`` with ``padding`` pixels.
    """
    h, w, _ = masks.shape
    x1, x2 = sanitize_coordinates(boxes[:, 0], boxes[:, 2], w, padding)
    y1, y2 = sanitize_coordinates(boxes[:, 1], boxes[:, 3], h, padding)
    cols = paddle.arange(w, dtype=x1.dtype)[None, :, None]
    rows = paddle.arange(h, dtype=x1.dtype)[:, None, None]
    keep = ((cols >= x1[None, None, :]) & (cols < x2[None, None, :])
            & (rows >= y1[None, None, :]) & (rows < y2[None, None, :]))
    return masks * keep.astype(masks.dtype)


def mask_iou(masks_a, masks_b, iscrowd=False):
    """Pairwise IoU of binary masks.

    masks_a: [A, H, W], masks_b: [B, H, W] (0/1 floats) -> [A, B].
    """
    a = masks_a.reshape([masks_a.shape[0], -1])
    b = masks_b.reshape([masks_b.shape[0], -1])
    inter = paddle.matmul(a, b, transpose_y=True)
    area_a = a.sum(axis=1)[:, None]
    area_b = b.sum(axis=1)[None, :]
    return inter / area_a if iscrowd else inter / (area_a + area_b - inter)
