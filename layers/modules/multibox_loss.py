"""YOLACT training loss: boxes, classes, lincomb masks, semantic segmentation, mask IoU.

Reproduces the reference ``MultiBoxLoss`` (dbolya/yolact) for the published
configurations: SSD-style matching with crowd handling, Smooth-L1 box
regression, OHEM softmax classification, the prototype x coefficient mask
loss normalised to emulate ROI pooling, a per-class semantic-segmentation
loss and, for YOLACT++, the mask-IoU regression loss of the re-scoring net.

Box formats: targets are point form (x1, y1, x2, y2) relative to the image;
priors are center form (cx, cy, w, h) relative; ``loc`` predictions are
offsets in the ``box_utils.encode`` convention.

Two implementations give the same loss (``backend``, as for Detect):

* host path (the CPU default): selects the positive and hard-negative anchors
  with ``nonzero``/``gather`` and runs the matching's forcing loop in numpy,
  which is fastest on a CPU.
* device path (the default when the predictions are on a GPU): fixed-shape
  Paddle ops only, so a training step never waits for the device: no copy to
  the host, no ``nonzero``, no Python decision on a tensor value between the
  predictions and the returned terms. Selections become 0/1 weights over all
  anchors (``where`` on per-anchor losses); the lincomb mask loss works on a
  fixed ``min(masks_to_train, P)`` candidate anchors per image, the
  positives first, invalid candidates weighted 0; the mask-IoU net sees all
  of them, the invalid and the discarded ones weighted 0. Its sums run in a
  different order, so terms agree with the host path to float32 rounding, not
  bit for bit. Only Python data feeds its control flow: shapes and the
  ``num_crowds`` ints.

Random subsets (more positives than ``masks_to_train``, more mask-IoU samples
than ``maskious_to_train``) are uniform on both paths and drawn from ``rng``;
the host path permutes the selected indices in numpy, the device path ranks
random keys from ``paddle.uniform`` seeded by ``rng``, so the same ``rng``
gives different (equally distributed) subsets on the two paths.
"""
import numpy as np
import paddle
import paddle.nn.functional as F

from layers.backend import check_backend, use_device_path
from layers.box_utils import center_size, crop, divide_rounded, jaccard, log_sum_exp, match, point_form


def _select(x, mask):
    """Entries of x [B, P, ...] where mask [B, P] is True -> [N, ...], in row-major order.

    Same as ``x[mask]``, through an index gather (Paddle's boolean indexing
    logs a deprecation warning).
    """
    index = paddle.nonzero(mask.flatten()).flatten()
    return paddle.gather(x.reshape([-1] + list(x.shape[2:])), index)


def _masked_sum(x, mask):
    """Sum of x [...] where the bool mask (broadcastable to x) is True, in fixed-shape ops -> scalar.

    ``where``, not a 0/1 product: a NaN or infinite value where the mask is
    False (an unselected anchor's loss) must not reach the sum, and its
    gradient there is exactly 0.
    """
    return paddle.where(paddle.broadcast_to(mask, x.shape), x, paddle.zeros_like(x)).sum()


def _top_weighted(weight, k, uniform):
    """k entries, those with weight first, a uniform random choice among them (fixed-shape ops).

    weight [N] bool, uniform [N] float32 keys in [0, 1), k <= N -> (their keys [k],
    with -1 for an entry without weight, and indices [k] int64, in descending key order).
    """
    keys = paddle.where(weight, uniform, paddle.full_like(uniform, -1.0))
    return paddle.topk(keys, k)


class MultiBoxLoss:
    """The reference YOLACT / YOLACT++ loss.

    Every term is a sum over its samples, scaled by its alpha; box, class,
    mask and mask-IoU terms are then divided by the number of positive
    anchors in the whole batch, the semantic-segmentation term by the batch
    size (the reference's normalisation).

    Args:
        num_classes: classes including background (81 for COCO).
        pos_threshold / neg_threshold: anchor IoU at or above which an anchor
            is positive / below which it is background (neutral in between).
        crowd_iou_threshold: non-positive anchors whose area is covered by a
            crowd box by more than this become neutral.
        negpos_ratio: hard negatives kept per positive (OHEM).
        bbox_alpha, conf_alpha, mask_alpha, semantic_segmentation_alpha,
            maskiou_alpha: weights of the terms.
        masks_to_train: at most this many positive anchors per image train
            the mask loss (a random subset; the loss is rescaled to the full count).
        mask_proto_crop: zero predicted masks outside their matched GT box.
        binarize_downsampled_gt: threshold the downsampled GT masks at 0.5.
        normalize_emulate_roi_pooling: divide each mask's loss by its GT box
            area (in prototype pixels) so large and small objects weigh alike,
            as a fixed-size ROI-pooled mask head would.
        use_semantic_segmentation_loss: compute ``loss_segm`` from ``predictions['segm']``.
        use_maskiou: compute ``loss_maskiou`` with ``net.maskiou_net`` (YOLACT++).
        maskious_to_train: at most this many masks per batch train the mask-IoU
            net (random subset); <= 0 means all.
        discard_mask_area: masks whose downsampled GT area (prototype pixels)
            is not above this do not train the mask-IoU net; <= 0 keeps all.
        rng: ``numpy.random.Generator`` used for the random subsets, so that
            sampling can be seeded; a fresh unseeded generator by default.
        backend: 'auto' computes on the device path when the predictions are on
            a GPU and on the host path otherwise; 'device' / 'host' force one
            (tests force 'device' to check the GPU path on a CPU).
    """

    def __init__(self, num_classes, pos_threshold=0.5, neg_threshold=0.4, crowd_iou_threshold=0.7,
                 negpos_ratio=3, bbox_alpha=1.5, conf_alpha=1.0, mask_alpha=6.125,
                 semantic_segmentation_alpha=1.0, masks_to_train=100, mask_proto_crop=True,
                 binarize_downsampled_gt=True, normalize_emulate_roi_pooling=True,
                 use_semantic_segmentation_loss=True, use_maskiou=False, maskiou_alpha=1.0,
                 maskious_to_train=-1, discard_mask_area=-1, rng=None, backend='auto'):
        check_backend(backend)
        self.num_classes = num_classes
        self.pos_threshold = pos_threshold
        self.neg_threshold = neg_threshold
        self.crowd_iou_threshold = crowd_iou_threshold
        self.negpos_ratio = negpos_ratio
        self.bbox_alpha = bbox_alpha
        self.conf_alpha = conf_alpha
        self.mask_alpha = mask_alpha
        self.semantic_segmentation_alpha = semantic_segmentation_alpha
        self.masks_to_train = masks_to_train
        self.mask_proto_crop = mask_proto_crop
        self.binarize_downsampled_gt = binarize_downsampled_gt
        self.normalize_emulate_roi_pooling = normalize_emulate_roi_pooling
        self.use_semantic_segmentation_loss = use_semantic_segmentation_loss
        self.use_maskiou = use_maskiou
        self.maskiou_alpha = maskiou_alpha
        self.maskious_to_train = maskious_to_train
        self.discard_mask_area = discard_mask_area
        self.rng = rng if rng is not None else np.random.default_rng()
        self.backend = backend

    @classmethod
    def from_config(cls, cfg, rng=None, backend='auto'):
        """The loss of a ``YolactConfig``; ``rng`` and ``backend`` as in the constructor."""
        return cls(num_classes=cfg.num_classes,
                   pos_threshold=cfg.positive_iou_threshold,
                   neg_threshold=cfg.negative_iou_threshold,
                   crowd_iou_threshold=cfg.crowd_iou_threshold,
                   negpos_ratio=cfg.ohem_negpos_ratio,
                   bbox_alpha=cfg.bbox_alpha,
                   conf_alpha=cfg.conf_alpha,
                   mask_alpha=cfg.mask_alpha,
                   semantic_segmentation_alpha=cfg.semantic_segmentation_alpha,
                   masks_to_train=cfg.masks_to_train,
                   mask_proto_crop=cfg.mask_proto_crop,
                   binarize_downsampled_gt=cfg.mask_proto_binarize_downsampled_gt,
                   normalize_emulate_roi_pooling=cfg.mask_proto_normalize_emulate_roi_pooling,
                   use_semantic_segmentation_loss=cfg.use_semantic_segmentation_loss,
                   use_maskiou=cfg.use_maskiou,
                   maskiou_alpha=cfg.maskiou_alpha,
                   maskious_to_train=cfg.maskious_to_train,
                   discard_mask_area=cfg.discard_mask_area,
                   rng=rng, backend=backend)

    def __call__(self, net, predictions, targets, masks, num_crowds):
        """Compute the loss terms of one batch.

        Args:
            net: the model; only ``net.maskiou_net`` is used (when ``use_maskiou``).
            predictions: the model's training-mode outputs:
                'loc' [B, P, 4], 'conf' [B, P, C] logits, 'mask' [B, P, K] coefficients,
                'priors' [P, 4] center form, 'proto' [B, h, w, K],
                'segm' [B, C-1, hs, ws] logits (with the semantic-segmentation loss).
            targets: B tensors [n_i, 5]: point-form relative boxes and a 0-based label.
            masks: B float tensors [n_i, H, W] of 0/1 instance masks.
            num_crowds: B ints; the last ``num_crowds[i]`` rows of ``targets[i]``
                and ``masks[i]`` are crowd regions.
        Returns:
            {'loss_box', 'loss_conf', 'loss_mask'[, 'loss_segm'][, 'loss_maskiou']}: scalar tensors.
        """
        loc = predictions['loc']
        conf = predictions['conf']
        priors = predictions['priors']
        batch_size = loc.shape[0]
        on_device = use_device_path(loc, self.backend)

        gt = [self._image_targets(targets[b], masks[b], int(num_crowds[b]), priors, on_device)
              for b in range(batch_size)]
        loc_t = paddle.stack([g['loc_t'] for g in gt])          # [B, P, 4]
        conf_t = paddle.stack([g['conf_t'] for g in gt])        # [B, P]
        pos = conf_t > 0
        # The reference divides by the batch's positive count; the guard only
        # matters for a batch without any non-crowd object, where that count is 0.
        if on_device:
            total_num_pos = paddle.clip(pos.astype('int64').sum(), min=1).astype(loc.dtype)
            box_loss = F.smooth_l1_loss(loc, loc_t, reduction='none')                  # [B, P, 4]
            loss_box = _masked_sum(box_loss, pos.unsqueeze(2)) * self.bbox_alpha
            loss_mask, maskiou_samples = self._lincomb_mask_loss_device(predictions['proto'], predictions['mask'],
                                                                        pos, gt)
        else:
            total_num_pos = max(int(pos.astype('int64').sum()), 1)
            loss_box = F.smooth_l1_loss(_select(loc, pos), _select(loc_t, pos), reduction='sum') * self.bbox_alpha
            loss_mask, maskiou_samples = self._lincomb_mask_loss(predictions['proto'], predictions['mask'],
                                                                 pos, gt)
        loss_conf = self._ohem_conf_loss(conf, conf_t, pos, on_device)

        losses = {'loss_box': loss_box / total_num_pos,
                  'loss_conf': loss_conf / total_num_pos,
                  'loss_mask': loss_mask / total_num_pos}
        if self.use_semantic_segmentation_loss:
            losses['loss_segm'] = self._semantic_segmentation_loss(predictions['segm'], gt) / batch_size
        if self.use_maskiou:
            mask_iou_loss = self._mask_iou_loss_device if on_device else self._mask_iou_loss
            losses['loss_maskiou'] = mask_iou_loss(net, maskiou_samples) / total_num_pos
        return losses

    # ----------------------------------------------------------- targets --
    def _image_targets(self, target, mask, num_crowd, priors, on_device):
        """Anchor targets of one image with its crowd annotations split off.

        ``on_device`` picks the device implementation of ``match``'s forcing loop.

        Returns a dict: loc_t [P, 4], conf_t [P] (label+1 / 0 background / -1 neutral),
        idx_t [P] matched truth index, boxes_t [P, 4] matched point-form truth box,
        labels [n] 0-based, masks [n, H, W] (non-crowd objects only).
        """
        num_objects = target.shape[0] - num_crowd
        truths = target[:num_objects, :4]
        labels = target[:num_objects, 4].astype('int64')
        crowd_boxes = target[num_objects:, :4] if num_crowd > 0 else None
        num_priors = priors.shape[0]

        if num_objects > 0:
            loc_t, conf_t, idx_t = match(self.pos_threshold, self.neg_threshold, self.crowd_iou_threshold,
                                         truths, priors, labels, crowd_boxes,
                                         backend='device' if on_device else 'host')
            boxes_t = paddle.gather(truths, idx_t)
        else:
            # No non-crowd object (the reference's matching fails on such an image):
            # every anchor is background except those the crowd rule makes neutral.
            loc_t = paddle.zeros([num_priors, 4], dtype=priors.dtype)
            boxes_t = paddle.zeros([num_priors, 4], dtype=priors.dtype)
            idx_t = paddle.zeros([num_priors], dtype='int64')
            conf_t = paddle.zeros([num_priors], dtype='int64')
            if crowd_boxes is not None and self.crowd_iou_threshold < 1:
                covered = jaccard(point_form(priors), crowd_boxes, iscrowd=True).max(axis=1)
                conf_t = paddle.where(covered > self.crowd_iou_threshold, paddle.full_like(conf_t, -1), conf_t)
        return {'loc_t': loc_t, 'conf_t': conf_t, 'idx_t': idx_t, 'boxes_t': boxes_t,
                'labels': labels, 'masks': mask[:num_objects]}

    # -------------------------------------------------------------- conf --
    def _ohem_conf_loss(self, conf, conf_t, pos, on_device=False):
        """Softmax cross entropy over positives and the hardest background anchors.

        conf [B, P, C] logits, conf_t [B, P], pos [B, P] bool -> scalar (summed, times conf_alpha).
        The host path gathers the kept anchors; the device path weights every
        anchor's cross entropy by 0/1 (the same per-anchor values, summed in
        another order).
        Negatives are ranked by -log softmax(background); per image the top
        ``negpos_ratio * num_pos`` of them are kept. Neutral anchors never count.
        An image without positives (no non-crowd object, which the reference
        cannot train on) keeps ``negpos_ratio`` negatives, as if it had one
        positive: it still teaches background, and a batch of such images gives
        a positive loss, as the batch's positive count is taken as 1 too.
        """
        batch_size, num_priors, num_classes = conf.shape
        with paddle.no_grad():
            flat = conf.reshape([-1, num_classes])
            background_loss = log_sum_exp(flat) - flat[:, 0]
            background_loss = background_loss.reshape([batch_size, num_priors])
            background_loss = paddle.where(conf_t != 0, paddle.zeros_like(background_loss), background_loss)

            # Rank of every anchor by descending loss: argsort of the argsort.
            order = paddle.argsort(background_loss, axis=1, descending=True)
            rank = paddle.argsort(order, axis=1)
            num_pos = pos.astype('int64').sum(axis=1, keepdim=True)
            num_neg = paddle.clip(self.negpos_ratio * paddle.clip(num_pos, min=1), max=num_priors - 1)
            neg = (rank < num_neg) & (conf_t == 0)

        keep = pos | neg
        if on_device:
            # Neutral anchors (label -1) are never kept; class 0 stands in as a valid label.
            labels = paddle.clip(conf_t, min=0).reshape([-1])
            per_anchor = F.cross_entropy(conf.reshape([-1, num_classes]), labels, reduction='none')
            return _masked_sum(per_anchor.reshape([batch_size, num_priors]), keep) * self.conf_alpha
        return F.cross_entropy(_select(conf, keep), _select(conf_t, keep), reduction='sum') * self.conf_alpha

    # -------------------------------------------------------------- mask --
    def _lincomb_mask_loss(self, proto, coeffs, pos, gt):
        """BCE between assembled masks (sigmoid(proto @ coeffs^T)) and downsampled GT masks.

        proto [B, h, w, K], coeffs [B, P, K], pos [B, P] bool.
        Returns (mask loss scalar, mask-IoU samples or None): the samples are
        (net input [N, 1, h, w], IoU targets [N], 0-based labels [N]) when
        ``use_maskiou``.
        """
        mask_h, mask_w = proto.shape[1], proto.shape[2]
        loss = paddle.zeros([], dtype=proto.dtype)
        iou_inputs, iou_targets, iou_labels = [], [], []

        for b, g in enumerate(gt):
            pos_index = paddle.nonzero(pos[b]).flatten()
            num_pos = pos_index.shape[0]
            if num_pos == 0:
                continue
            # The reference trains on a random subset of the positives of an image
            # with many of them and scales the loss back up to the full count.
            if num_pos > self.masks_to_train:
                select = self.rng.permutation(num_pos)[:self.masks_to_train]
                pos_index = paddle.gather(pos_index, paddle.to_tensor(select, dtype='int64'))
            num_used = pos_index.shape[0]

            per_mask, pred_masks, mask_t, obj_index = self._per_mask_loss(proto[b], coeffs[b], g, pos_index)
            loss = loss + per_mask.sum() * (num_pos / num_used)

            if self.use_maskiou:
                labels_t = paddle.gather(g['labels'], obj_index)
                if self.discard_mask_area > 0:
                    big = paddle.nonzero(mask_t.sum(axis=[0, 1]) > self.discard_mask_area).flatten()
                    if big.shape[0] == 0:
                        continue
                    pred_masks = paddle.gather(pred_masks, big, axis=2)
                    mask_t = paddle.gather(mask_t, big, axis=2)
                    labels_t = paddle.gather(labels_t, big)
                # The net sees the cropped soft masks, not detached (as in the
                # reference), so this loss also trains prototypes and coefficients.
                iou_inputs.append(pred_masks.transpose([2, 0, 1]).unsqueeze(1))
                iou_targets.append(self._binary_mask_iou(pred_masks, mask_t))
                iou_labels.append(labels_t)

        loss = loss * self.mask_alpha / mask_h / mask_w
        if not iou_inputs:
            return loss, None
        return loss, (paddle.concat(iou_inputs), paddle.concat(iou_targets), paddle.concat(iou_labels))

    def _lincomb_mask_loss_device(self, proto, coeffs, pos, gt):
        """``_lincomb_mask_loss`` on a fixed number of candidate anchors per image (device path).

        proto [B, h, w, K], coeffs [B, P, K], pos [B, P] bool.
        Each image with a non-crowd object assembles k = min(masks_to_train, P)
        masks: those of all its positives when it has at most k of them, in
        ascending anchor order (the order the host path sums them in), else of
        a uniform random k of its positives, rescaled by num_pos / k; the
        candidates beyond its positives are weighted 0.
        Returns (mask loss scalar, mask-IoU samples or None): the samples are
        (net input [N, 1, h, w], IoU targets [N], 0-based labels [N], weights [N] bool),
        k per image with an object, when ``use_maskiou``.
        """
        mask_h, mask_w = proto.shape[1], proto.shape[2]
        k = min(self.masks_to_train, pos.shape[1])
        loss = paddle.zeros([], dtype=proto.dtype)
        iou_inputs, iou_targets, iou_labels, iou_weights = [], [], [], []

        for b, g in enumerate(gt):
            # An image without a non-crowd object has no positive (an annotation count: host data).
            if g['masks'].shape[0] == 0:
                continue
            pos_index, valid = self._mask_candidates(pos[b], k)                      # [k], [k]
            num_pos = pos[b].astype('int64').sum()
            num_used = paddle.clip(num_pos, min=1, max=k)
            # Correctly rounded like the host path's Python quotient; 1 unless subsampled.
            scale = divide_rounded(num_pos.astype(proto.dtype), num_used.astype(proto.dtype))

            per_mask, pred_masks, mask_t, obj_index = self._per_mask_loss(proto[b], coeffs[b], g, pos_index)
            loss = loss + _masked_sum(per_mask, valid) * scale

            if self.use_maskiou:
                keep = valid
                if self.discard_mask_area > 0:
                    keep = keep & (mask_t.sum(axis=[0, 1]) > self.discard_mask_area)
                iou_t = self._binary_mask_iou(pred_masks, mask_t)
                # A row weighted 0 (a discarded small mask, a candidate that is no positive) may
                # have an empty union, 0 / 0. A zero target keeps that NaN out of the loss's
                # inputs instead of relying on the Smooth-L1 backward to give 0 for a NaN
                # residual under a zero upstream gradient (Paddle 3.3's CPU kernel does).
                iou_targets.append(paddle.where(keep, iou_t, paddle.zeros_like(iou_t)))
                iou_inputs.append(pred_masks.transpose([2, 0, 1]).unsqueeze(1))
                iou_labels.append(paddle.gather(g['labels'], obj_index))
                iou_weights.append(keep)

        loss = loss * self.mask_alpha / mask_h / mask_w
        if not iou_inputs:
            return loss, None
        return loss, tuple(paddle.concat(t) for t in (iou_inputs, iou_targets, iou_labels, iou_weights))

    def _per_mask_loss(self, proto, coeffs, g, anchors):
        """The mask loss of each chosen anchor of one image: the part both paths share.

        proto [h, w, K] and coeffs [P, K] of the image, g its ``_image_targets``,
        anchors [n] int64 anchor indices (the paths differ only in how they choose them).
        Returns (per-mask loss [n], predicted masks [h, w, n] (cropped to the matched
        GT box with ``mask_proto_crop``), GT masks [h, w, n], matched truth indices [n]).
        """
        mask_h, mask_w = proto.shape[0], proto.shape[1]
        with paddle.no_grad():
            gt_masks = self._downsample_masks(g['masks'], mask_h, mask_w)      # [objects, h, w]
            if self.binarize_downsampled_gt:
                gt_masks = (gt_masks > 0.5).astype(proto.dtype)
            obj_index = paddle.gather(g['idx_t'], anchors)
            mask_t = paddle.gather(gt_masks, obj_index).transpose([1, 2, 0])   # [h, w, n]
            boxes_t = paddle.gather(g['boxes_t'], anchors)                     # [n, 4]

        pred_masks = F.sigmoid(paddle.matmul(proto, paddle.gather(coeffs, anchors), transpose_y=True))
        if self.mask_proto_crop:
            pred_masks = crop(pred_masks, boxes_t)
        pixel_loss = _binary_cross_entropy(pred_masks, mask_t)                 # [h, w, n]

        if self.normalize_emulate_roi_pooling:
            weight = mask_h * mask_w if self.mask_proto_crop else 1
            box_wh = center_size(boxes_t)[:, 2:]
            per_mask = pixel_loss.sum(axis=[0, 1]) / (box_wh[:, 0] * mask_w) / (box_wh[:, 1] * mask_h) * weight
        else:
            per_mask = pixel_loss.sum(axis=[0, 1])
        return per_mask, pred_masks, mask_t, obj_index

    def _mask_candidates(self, pos, k):
        """k anchors of one image, its positives first, in fixed-shape ops.

        pos [P] bool -> (anchor indices [k] int64, valid [k] bool). With at most k
        positives: all of them, ascending, then any non-positive anchors
        (valid False). With more: a uniform random k of them, ascending.
        """
        num_priors = pos.shape[0]
        keys, index = _top_weighted(pos, k, self._uniform([num_priors]))
        # Sorted as (not positive, anchor index): one sort gives both the order and the validity.
        order = paddle.sort(paddle.where(keys >= 0, index, index + num_priors))
        return order % num_priors, order < num_priors

    def _uniform(self, shape):
        """Device-side uniform [0, 1) float32 keys of ``shape``, seeded from ``self.rng``.

        An op seed (rather than Paddle's global generator) keeps the sampling
        reproducible from ``rng`` alone, as on the host path; the seed is host
        data drawn without looking at any tensor.
        """
        return paddle.uniform(shape, dtype='float32', min=0.0, max=1.0, seed=int(self.rng.integers(1, 2 ** 31 - 1)))

    @staticmethod
    def _downsample_masks(masks, height, width):
        """[n, H, W] -> [n, height, width] bilinear (align_corners=False), as the reference resizes GT."""
        return F.interpolate(masks.unsqueeze(0).astype('float32'), size=[height, width],
                             mode='bilinear', align_corners=False).squeeze(0)

    @staticmethod
    def _binary_mask_iou(pred_masks, gt_masks):
        """IoU of each predicted mask thresholded at 0.5 with its GT mask.

        pred_masks, gt_masks: [h, w, n] -> [n] (no gradient: it is a regression target).
        """
        with paddle.no_grad():
            binary = (pred_masks > 0.5).astype(gt_masks.dtype)
            inter = (binary * gt_masks).sum(axis=[0, 1])
            union = binary.sum(axis=[0, 1]) + gt_masks.sum(axis=[0, 1]) - inter
            return inter / union

    # ---------------------------------------------------------- mask IoU --
    def _mask_iou_loss(self, net, samples):
        """Smooth L1 between the mask-IoU net's prediction for the GT class and the true mask IoU.

        samples: (input [N, 1, h, w], IoU targets [N], labels [N]) or None
        (every mask was discarded: the term is zero).
        """
        if samples is None:
            return paddle.zeros([])
        net_input, iou_t, labels = samples
        num_samples = iou_t.shape[0]
        if 0 < self.maskious_to_train < num_samples:
            # The reference slices this subset with masks_to_train, a typo that
            # no published config reaches (all use maskious_to_train = -1).
            select = paddle.to_tensor(self.rng.permutation(num_samples)[:self.maskious_to_train], dtype='int64')
            net_input, iou_t, labels = (paddle.gather(t, select) for t in (net_input, iou_t, labels))
        iou_p = net.maskiou_net(net_input)                                   # [N, C-1]
        iou_p = paddle.take_along_axis(iou_p, labels.unsqueeze(1), axis=1).squeeze(1)
        return F.smooth_l1_loss(iou_p, iou_t, reduction='sum') * self.maskiou_alpha

    def _mask_iou_loss_device(self, net, samples):
        """``_mask_iou_loss`` on weighted samples (device path).

        samples: (input [N, 1, h, w], IoU targets [N], labels [N], weights [N] bool)
        or None. The net sees all N rows (it has no batch statistics, so a
        row's prediction does not depend on the others); weight-0 rows add 0.
        With more than ``maskious_to_train`` rows, a uniform random subset of
        that many is taken, the weighted rows first, like the host path's
        subset of its samples.
        """
        if samples is None:
            return paddle.zeros([])
        net_input, iou_t, labels, weight = samples
        num_samples = weight.shape[0]
        if 0 < self.maskious_to_train < num_samples:
            _, select = _top_weighted(weight, self.maskious_to_train, self._uniform([num_samples]))
            select = paddle.sort(select)
            net_input, iou_t, labels = (paddle.gather(t, select) for t in (net_input, iou_t, labels))
            weight = paddle.gather(weight.astype('int32'), select) > 0
        iou_p = net.maskiou_net(net_input)                                   # [N, C-1]
        iou_p = paddle.take_along_axis(iou_p, labels.unsqueeze(1), axis=1).squeeze(1)
        return _masked_sum(F.smooth_l1_loss(iou_p, iou_t, reduction='none'), weight) * self.maskiou_alpha

    # -------------------------------------------------------- semantic --
    def _semantic_segmentation_loss(self, segm, gt):
        """Per-class sigmoid BCE against the union of each class's downsampled GT masks.

        segm [B, C-1, hs, ws] logits -> scalar: summed over pixels and classes,
        divided by hs * ws, times semantic_segmentation_alpha (summed over the batch).
        """
        num_classes, seg_h, seg_w = segm.shape[1], segm.shape[2], segm.shape[3]
        loss = paddle.zeros([], dtype=segm.dtype)
        for b, g in enumerate(gt):
            with paddle.no_grad():
                if g['masks'].shape[0] > 0:
                    down = (self._downsample_masks(g['masks'], seg_h, seg_w) > 0.5).astype(segm.dtype)
                    one_hot = F.one_hot(g['labels'], num_classes).astype(segm.dtype)   # [n, C-1]
                    segm_t = (one_hot[:, :, None, None] * down[:, None]).max(axis=0)
                else:
                    segm_t = paddle.zeros(segm.shape[1:], dtype=segm.dtype)
            loss = loss + F.binary_cross_entropy_with_logits(segm[b], segm_t, reduction='sum')
        return loss / seg_h / seg_w * self.semantic_segmentation_alpha


def _binary_cross_entropy(probs, targets):
    """Element-wise BCE of probabilities [...] -> [...], as torch's (log clamped at -100).

    Written out rather than F.binary_cross_entropy because Paddle's CPU kernel
    raises on a NaN input, while a diverged network must give a NaN loss that
    the trainer reports. Exact zeros and ones take the -100 branch directly so
    that the gradient stays finite (d log p / dp is infinite at p = 0).
    """
    return -(targets * _clamped_log(probs) + (1.0 - targets) * _clamped_log(1.0 - probs))


def _clamped_log(x):
    """max(log x, -100) with a finite gradient at x = 0; NaN stays NaN."""
    tiny = float(np.finfo(np.float32).tiny)
    # `x <= 0`, not `x == 0`: Paddle's float equality is |a - b| < 1e-8.
    return paddle.where(x <= 0, paddle.full_like(x, -100.0),
                        paddle.clip(paddle.log(paddle.clip(x, min=tiny)), min=-100.0))
