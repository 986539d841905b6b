"""Detect: turn raw head outputs into per-image detections (decode + NMS).

Three suppression rules, all as the reference implementation applies them:

* Fast NMS (default): per class, the ``top_k`` best candidates are compared
  all-against-all at once; a candidate survives when no better-scoring
  candidate of its class overlaps it by more than ``nms_thresh``, even one that
  was itself suppressed. The survivors of all classes are pooled and the
  ``max_num_detections`` best kept.
* Cross-class Fast NMS: the same on each candidate's best class only, all
  classes competing together.
* Traditional NMS: the classic greedy per-class NMS.

Tie rule: candidates of exactly equal score are ranked by their index (the
earlier anchor, or the lower class, first). The reference sorts with PyTorch's
unstable CPU sort, whose order of exact ties is unspecified; for distinct
scores both orders are the same.

Two implementations of each rule give the same detections: on a CPU the IoU
matrices and the greedy loop run in numpy (faster than Paddle's CPU kernels);
when the network's outputs are on a GPU everything stays there in Paddle ops,
with no copy to the host and no Python decision on a tensor value. The only
synchronisations of the device path are the data-dependent shapes (the
candidate anchors and the surviving detections, through ``paddle.nonzero``).
"""
import numpy as np
import paddle

from layers.backend import check_backend, use_device_path
from layers.box_utils import decode, divide_rounded
from layers.compat import argsort_stable


class Detect:
    """Decode boxes and suppress duplicates, per image.

    Args:
        num_classes: classes including background (index 0 of ``conf``).
        top_k: Fast NMS: candidates per class (cross-class: in total) compared.
        conf_thresh: an anchor is a candidate when its best non-background
            score is > conf_thresh (traditional NMS: per class).
        nms_thresh: IoU above which (traditional NMS: at or above which) the
            lower-scoring box is suppressed.
        max_num_detections: detections kept per image (per-class rules).
        use_fast_nms: Fast NMS (True) or traditional NMS (False).
        use_cross_class_nms: with Fast NMS, suppress across classes.
        max_size: network input side. Traditional NMS measures boxes in pixels
            of this size with the "+1 pixel" width convention of the
            reference's Cython NMS, so the scale changes which boxes overlap.
        backend: 'auto' runs the device path when the outputs are on a GPU and
            the host (numpy) path otherwise; 'device' / 'host' force one (tests
            use 'device' to check the GPU path on a CPU).
    """

    def __init__(self, num_classes, top_k, conf_thresh, nms_thresh, max_num_detections,
                 use_fast_nms=True, use_cross_class_nms=False, max_size=550, backend='auto'):
        check_backend(backend)
        if nms_thresh <= 0:
            raise ValueError(f'nms_thresh must be positive, got {nms_thresh}')
        if use_cross_class_nms and not use_fast_nms:
            raise ValueError('cross-class NMS exists only as Fast NMS (use_fast_nms=True)')
        self.num_classes = num_classes
        self.top_k = top_k
        self.conf_thresh = conf_thresh
        self.nms_thresh = nms_thresh
        self.max_num_detections = max_num_detections
        self.use_fast_nms = use_fast_nms
        self.use_cross_class_nms = use_cross_class_nms
        self.max_size = max_size
        self.backend = backend

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Detect with the config's NMS settings; keyword overrides win
        (e.g. ``use_fast_nms=False``, ``conf_thresh=0.3``)."""
        kwargs = dict(num_classes=cfg.num_classes, top_k=cfg.nms_top_k,
                      conf_thresh=cfg.nms_conf_thresh, nms_thresh=cfg.nms_thresh,
                      max_num_detections=cfg.max_num_detections, max_size=cfg.max_size)
        kwargs.update(overrides)
        return cls(**kwargs)

    @paddle.no_grad()
    def __call__(self, preds):
        """Detections of a batch.

        Args:
            preds: the eval-mode model output: 'loc' [B, P, 4] offsets,
                'conf' [B, P, C] softmax probabilities, 'mask' [B, P, K]
                coefficients, 'priors' [P, 4] center form, 'proto' [B, S, S, K].
        Returns:
            one dict per image, on the outputs' device: 'boxes' [D, 4] point
            form relative, 'scores' [D], 'classes' [D] int64 0-based
            (background removed), 'coeffs' [D, K] mask coefficients, 'proto'
            [S, S, K]. Per-class rules give descending scores; D may be 0.
        """
        loc, conf, coeffs, priors = preds['loc'], preds['conf'], preds['mask'], preds['priors']
        on_device = use_device_path(loc, self.backend)
        out = []
        for b in range(loc.shape[0]):
            boxes = decode(loc[b], priors)
            det = self._detect_image(boxes, conf[b], coeffs[b], on_device)
            det['proto'] = preds['proto'][b]
            out.append(det)
        return out

    def _detect_image(self, boxes, conf, coeffs, on_device):
        """boxes [P, 4] point form, conf [P, C], coeffs [P, K] -> detection dict without 'proto'."""
        class_scores = conf[:, 1:]
        # Data-dependent size: the device path's first synchronisation.
        candidates = paddle.nonzero(class_scores.max(axis=1) > self.conf_thresh).flatten()
        if candidates.shape[0] == 0:
            return _empty_detections(boxes.dtype, coeffs.shape[1])
        # [C-1, M]: each class's scores over the M candidate anchors.
        scores = paddle.gather(class_scores, candidates).t()
        boxes = paddle.gather(boxes, candidates)
        coeffs = paddle.gather(coeffs, candidates)

        if not self.use_fast_nms:
            nms = self._traditional_nms_device if on_device else self._traditional_nms
        elif self.use_cross_class_nms:
            nms = self._cc_fast_nms_device if on_device else self._cc_fast_nms
        else:
            nms = self._fast_nms_device if on_device else self._fast_nms
        idx, classes, scores = nms(boxes, scores)
        return {'boxes': paddle.gather(boxes, idx), 'scores': scores, 'classes': classes,
                'coeffs': paddle.gather(coeffs, idx)}

    def _fast_nms(self, boxes, scores):
        """boxes [M, 4], scores [C-1, M] -> (candidate index [D], class [D], score [D]).

        The rule needs every class's [top_k, top_k] IoU matrix, but only the
        max_num_detections best survivors are kept, and whether a (class,
        candidate) pair survives depends only on the better pairs of its
        class. So the pairs are examined best first, in blocks: the T best of
        all pairs (for each class, its T_c best), T growing until enough of
        them survive or every pair within the top_k of its class has been
        seen. Each pair gets the IoUs _max_iou_with_better would give it,
        from its class's [T_c, T_c] matrix, so the result is the full rule's;
        a busy image needs one block of 4 * max_num_detections pairs.
        """
        scores = scores.numpy()
        boxes = boxes.numpy()
        num_classes, num_candidates = scores.shape
        k = min(self.top_k, num_candidates)
        best_of_candidate = scores.max(axis=0)
        count = 4 * self.max_num_detections
        while True:
            count = min(count, num_classes * num_candidates)
            classes, candidates = _best_pairs(scores, best_of_candidate, count)
            # A pair's rank in its class is the number of its class's pairs before it.
            by_class = np.argsort(classes, kind='stable')
            starts = np.searchsorted(classes[by_class], np.arange(num_classes + 1))
            per_class = np.diff(starts)
            rank = np.empty(count, np.int64)
            rank[by_class] = np.arange(count) - np.repeat(starts[:-1], per_class)
            survives = rank < k
            for c in np.flatnonzero(per_class):
                pairs = by_class[starts[c]:starts[c + 1]][:k]           # class c's best, in rank order
                worst = _max_iou_with_better(boxes[candidates[pairs]][None])[0]
                survives[pairs] &= worst <= self.nms_thresh
            survivors = np.flatnonzero(survives)
            if (survivors.size >= self.max_num_detections or count == num_classes * num_candidates
                    or np.minimum(per_class, k).sum() == num_classes * k):
                break
            count *= 4
        survivors = survivors[:self.max_num_detections]
        return (paddle.to_tensor(candidates[survivors]), paddle.to_tensor(classes[survivors]),
                paddle.to_tensor(scores[classes[survivors], candidates[survivors]]))

    def _cc_fast_nms(self, boxes, scores):
        """Fast NMS over each candidate's best class only; at most top_k results, best first."""
        classes = scores.argmax(axis=0)
        scores = scores.max(axis=0)
        order = _top_k_desc(scores.unsqueeze(0), min(self.top_k, scores.shape[0]))[0]
        # Each box's worst overlap with any better box, of any class.
        max_iou = _max_iou_with_better(paddle.gather(boxes, order).numpy()[None])[0]
        idx = paddle.gather(order, paddle.to_tensor(np.flatnonzero(max_iou <= self.nms_thresh)))
        return idx, paddle.gather(classes, idx), paddle.gather(scores, idx)

    def _traditional_nms(self, boxes, scores):
        """Greedy NMS per class (numpy); the max_num_detections best survivors of all classes."""
        boxes_px = boxes.numpy() * self.max_size
        scores_np = scores.numpy()
        idx, classes, kept_scores = [], [], []
        for c in range(scores_np.shape[0]):
            cls_idx = np.nonzero(scores_np[c] > self.conf_thresh)[0]
            if cls_idx.size == 0:
                continue
            # A class's survivors come best first, and only max_num_detections
            # of all survivors are kept: later ones of this class cannot make it.
            keep = cls_idx[_greedy_nms(boxes_px[cls_idx], scores_np[c, cls_idx], self.nms_thresh,
                                       self.max_num_detections)]
            idx.append(keep)
            classes.append(np.full(keep.size, c, dtype=np.int64))
            kept_scores.append(scores_np[c, keep])
        if not idx:
            return (paddle.zeros([0], 'int64'),) * 2 + (paddle.zeros([0], scores.dtype),)
        idx, classes, kept_scores = (np.concatenate(a) for a in (idx, classes, kept_scores))
        best = np.argsort(-kept_scores, kind='stable')[:self.max_num_detections]
        return (paddle.to_tensor(idx[best]), paddle.to_tensor(classes[best]),
                paddle.to_tensor(kept_scores[best]))


    # ------------------------------------------------------------ device path --
    # The same rules in Paddle ops only: no copy to the host, no Python decision
    # on a tensor value. Ranking uses _rank_keys (score, then index) instead of
    # _top_k_desc's tie check; IoUs divide with divide_rounded, as numpy does.

    def _fast_nms_device(self, boxes, scores):
        """_fast_nms on the device."""
        num_classes, num_candidates = scores.shape
        k = min(self.top_k, num_candidates)
        order = _top_k_by_rank(scores, k)                              # [C-1, k]
        scores = paddle.take_along_axis(scores, order, axis=1)
        class_boxes = paddle.gather(boxes, order.flatten()).reshape([num_classes, k, 4])
        keep = (_max_iou_with_better_device(class_boxes) <= self.nms_thresh).flatten()

        # Data-dependent size: one synchronisation. The best box of every class
        # survives (its overlap with no better box is 0), so flat is never empty.
        flat = paddle.nonzero(keep).flatten()
        scores = paddle.gather(scores.flatten(), flat)
        best = _top_k_by_rank(scores.unsqueeze(0), min(self.max_num_detections, flat.shape[0]))[0]
        flat = paddle.gather(flat, best)
        return (paddle.gather(order.flatten(), flat), flat // k,
                paddle.gather(scores, best))

    def _cc_fast_nms_device(self, boxes, scores):
        """_cc_fast_nms on the device."""
        classes = scores.argmax(axis=0)
        scores = scores.max(axis=0)
        order = _top_k_by_rank(scores.unsqueeze(0), min(self.top_k, scores.shape[0]))[0]
        max_iou = _max_iou_with_better_device(paddle.gather(boxes, order).unsqueeze(0))[0]
        idx = paddle.gather(order, paddle.nonzero(max_iou <= self.nms_thresh).flatten())
        return idx, paddle.gather(classes, idx), paddle.gather(scores, idx)

    def _traditional_nms_device(self, boxes, scores):
        """_traditional_nms on the device: one greedy loop over the pairs of all classes.

        The (candidate, class) pairs scoring above conf_thresh are ranked by
        score, ties by class then candidate (the order in which _traditional_nms
        pools its survivors). Each step keeps the best alive pair and kills the
        pairs of its class it overlaps by >= nms_thresh (IoU as _greedy_nms):
        the best alive pair has outlived every better pair of its class, so the
        kept pairs come out as the pooled survivors, best first, and
        max_num_detections steps are all it takes. The loop count depends on no
        tensor value.
        """
        num_candidates = scores.shape[1]
        # Data-dependent size: one synchronisation. Class-major flat positions c * M + m.
        pairs = paddle.nonzero((scores > self.conf_thresh).flatten()).flatten()
        num_pairs = pairs.shape[0]
        if num_pairs == 0:
            return (paddle.zeros([0], 'int64'),) * 2 + (paddle.zeros([0], scores.dtype),)
        pair_scores = paddle.gather(scores.flatten(), pairs)
        order = _top_k_by_rank(pair_scores.unsqueeze(0), num_pairs, index=pairs.unsqueeze(0))[0]
        pairs = paddle.gather(pairs, order)
        pair_scores = paddle.gather(pair_scores, order)
        classes = pairs // num_candidates
        idx = pairs % num_candidates
        x1, y1, x2, y2 = paddle.unbind(paddle.gather(boxes * self.max_size, idx), axis=1)   # [K] each
        areas = (x2 - x1 + 1) * (y2 - y1 + 1)

        alive = paddle.ones([num_pairs], 'bool')
        rank = paddle.arange(num_pairs, dtype='int64')
        none_left = paddle.full_like(rank, num_pairs)
        picks = []
        for _ in range(min(self.max_num_detections, num_pairs)):
            pick = paddle.where(alive, rank, none_left).min(keepdim=True)    # [1]; num_pairs: none left
            picks.append(pick)
            i = paddle.clip(pick, max=num_pairs - 1)
            bx1, by1, bx2, by2, barea, bclass = (paddle.gather(t, i) for t in (x1, y1, x2, y2, areas, classes))
            w = paddle.clip(paddle.minimum(bx2, x2) - paddle.maximum(bx1, x1) + 1, min=0)
            h = paddle.clip(paddle.minimum(by2, y2) - paddle.maximum(by1, y1) + 1, min=0)
            inter = w * h
            overlap = divide_rounded(inter, barea + areas - inter)
            alive = alive & ((classes != bclass) | (overlap < self.nms_thresh)) & (rank != pick)
        picks = paddle.concat(picks)
        # Data-dependent size: one synchronisation (fewer survivors than steps).
        kept = paddle.gather(picks, paddle.nonzero(picks < num_pairs).flatten())
        return paddle.gather(idx, kept), paddle.gather(classes, kept), paddle.gather(pair_scores, kept)


def _best_pairs(scores, best_of_candidate, count):
    """The ``count`` best (class, candidate) pairs of ``scores`` [C, M] numpy, best first.

    Order: score descending, ties by class then candidate (the flat position
    in Fast NMS's class-major layout). best_of_candidate [M] is scores.max(0):
    a pair among the ``count`` best has a candidate among the ``count`` best
    by that (each better candidate has a better pair), so only those
    candidates' columns are sorted. Returns (classes [count], candidates
    [count]) int64.
    """
    num_classes, num_candidates = scores.shape
    columns = np.arange(num_candidates)
    if count < num_candidates:
        cut = np.partition(best_of_candidate, num_candidates - count)[num_candidates - count]
        columns = np.flatnonzero(best_of_candidate >= cut)
    block = scores[:, columns]
    # A stable sort of the negated scores keeps the class-major order of ties.
    order = np.argsort(-block.ravel(), kind='stable')[:count]
    return order // columns.size, columns[order % columns.size]


def _argsort_desc(x, axis):
    """Descending argsort of x [R, M] along axis 1; equal values keep their index order (the module's tie rule).

    (Paddle 2.6, which has no stable sort, sorts the unique _rank_keys instead.)
    """
    return argsort_stable(x, axis=axis, descending=True, keys=_rank_keys)


def _top_k_desc(scores, k):
    """Column indices of each row's k largest values, descending; ties by index.

    scores: [R, M] -> [R, k] int64. A partial top-k is much cheaper than a full
    sort of M ~ 20k-60k candidates; its own order of equal values is
    unspecified, so its k winners are re-sorted stably by index, and a full
    stable sort decides when equal values straddle the k-th place.
    """
    if k < scores.shape[1]:
        values, idx = paddle.topk(scores, k + 1, axis=1)
        if not bool((values[:, k - 1] == values[:, k]).any()):
            idx = paddle.sort(idx[:, :k], axis=1)
            order = _argsort_desc(paddle.take_along_axis(scores, idx, axis=1), axis=1)
            return paddle.take_along_axis(idx, order, axis=1)
    return _argsort_desc(scores, axis=1)[:, :k]


def _rank_keys(scores, index=None):
    """int64 keys ordering the columns of each row by the module's rule.

    scores: [R, M] float32; index: [R, M] int64 in [0, 2**32), distinct
    within a row (default: the column) -> [R, M] int64. A larger key means a
    higher score, or an equal score at a lower index, so keys are unique
    within a row and any top-k of them is the stable descending order, with no
    tie to look at. The float's bits become an order-preserving integer
    (negative floats have their magnitude bits reversed), shifted left 32
    bits, and the low 32 bits hold 2**32 - 1 - index.
    """
    # + 0.0 turns -0.0 (bits 0x80000000) into +0.0: equal scores, equal keys.
    bits = (scores + 0.0).view('int32').astype('int64')
    ordered = paddle.where(bits < 0, -(bits + 2 ** 31) - 1, bits)
    if index is None:
        index = paddle.arange(scores.shape[1], dtype='int64').unsqueeze(0)
    return ordered * 2 ** 32 + (2 ** 32 - 1 - index)


def _top_k_by_rank(scores, k, index=None):
    """_top_k_desc without its synchronising tie check: [R, M] -> [R, k] int64 column indices.

    index: see _rank_keys (ties go to the lower index)."""
    return paddle.topk(_rank_keys(scores, index), k, axis=1)[1]


def _max_iou_with_better_device(boxes):
    """_max_iou_with_better in Paddle ops, bit for bit: [n, k, 4] point form -> [n, k]."""
    x1, y1, x2, y2 = paddle.unbind(boxes, axis=2)
    iw = paddle.minimum(x2.unsqueeze(2), x2.unsqueeze(1)) - paddle.maximum(x1.unsqueeze(2), x1.unsqueeze(1))
    ih = paddle.minimum(y2.unsqueeze(2), y2.unsqueeze(1)) - paddle.maximum(y1.unsqueeze(2), y1.unsqueeze(1))
    inter = paddle.clip(iw, min=0) * paddle.clip(ih, min=0)
    area = (x2 - x1) * (y2 - y1)
    iou = divide_rounded(inter, area.unsqueeze(2) + area.unsqueeze(1) - inter)
    # Upper triangle (j > i): the IoU of box j with the better box i.
    return paddle.triu(iou, diagonal=1).max(axis=1)


def _max_iou_with_better(boxes):
    """Each box's largest IoU with an earlier (better) box of its row.

    boxes: [n, k, 4] float32 numpy point form -> [n, k] (0 for the first box).
    The pairwise IoU is ``layers.box_utils.jaccard``'s, operation for operation
    in float32. numpy computes the [n, k, k] matrix faster than Paddle's CPU
    broadcasting kernels (tools/benchmark.py times Detect) and divides
    correctly rounded, as PyTorch (the reference) does; Paddle's CPU division
    is at times 1 ulp off.
    """
    x1, y1, x2, y2 = (boxes[:, :, i] for i in range(4))
    iw = np.minimum(x2[:, :, None], x2[:, None, :]) - np.maximum(x1[:, :, None], x1[:, None, :])
    ih = np.minimum(y2[:, :, None], y2[:, None, :]) - np.maximum(y1[:, :, None], y1[:, None, :])
    inter = np.maximum(iw, 0, out=iw) * np.maximum(ih, 0, out=ih)
    area = (x2 - x1) * (y2 - y1)
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    # Upper triangle (j > i): the IoU of box j with the better box i; a column's max is box j's worst overlap.
    iou[:, ~np.triu(np.ones(iou.shape[1:], dtype=bool), k=1)] = 0
    return iou.max(axis=1)


def _greedy_nms(boxes, scores, thresh, max_keep):
    """Classic greedy NMS of one class, as the reference's Cython NMS computes it.

    boxes: [M, 4] point form in pixels, scores: [M]. Widths and heights count
    both end pixels (x2 - x1 + 1); a box is suppressed when its IoU with a kept
    box is >= thresh. Returns the indices of the first ``max_keep`` kept boxes,
    best first.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind='stable')
    keep = []
    while order.size and len(keep) < max_keep:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) < thresh]
    return np.asarray(keep, dtype=np.int64)


def _empty_detections(dtype, mask_dim):
    """A detection dict with D = 0."""
    return {'boxes': paddle.zeros([0, 4], dtype), 'scores': paddle.zeros([0], dtype),
            'classes': paddle.zeros([0], 'int64'), 'coeffs': paddle.zeros([0, mask_dim], dtype)}
