"""The whole detector as one traceable layer: raw images in, final boxes, classes, scores and masks out.

:class:`DetectorGraph` wraps a ``Yolact`` network with the reference's
preprocessing, Detect (Fast NMS) and postprocess, written in fixed-shape
Paddle ops plus ``nonzero`` for the number of detections, so that
``paddle.jit.save`` traces it and paddle2onnx converts it: PaddleDetection's
deploy tools, onnxruntime and model servers run the export with no Python of
this project. Its inputs and outputs are PaddleDetection's contract for mask
models (``image``, ``im_shape``, ``scale_factor`` in; ``bbox``, ``bbox_num``,
``mask`` out, plus ``mask_score``); utils/deploy/detector_export.py exports it.

It computes what ``Detect`` + ``PostProcess`` compute, with these differences:

* Ties: candidates of exactly equal score are ordered by the runtime's top-k
  (onnxruntime: lower index first; Paddle: unspecified), not by index.
* Masks are upsampled by two matrix products with PyTorch's sample positions
  (:func:`interpolation_matrix`'s rows, built in the graph from the image
  size), so a pixel within float rounding of the threshold may differ from
  PostProcess's exact sums.
* Traditional NMS has no graph form here (its greedy loop runs as many steps
  as detections): :meth:`DetectorGraph.from_config` refuses it.
"""
import paddle
import paddle.nn.functional as F

from data.config import MEANS, STD
from layers.box_utils import crop, decode, divide_rounded, sanitize_coordinates

# Channel order of the graph's input image (PaddleDetection's decode_image gives RGB).
INPUT_CHANNEL_ORDER = 'RGB'
# Output order of the graph (a static graph has positional outputs only).
OUTPUTS = ('bbox', 'bbox_num', 'mask', 'mask_score')
MASK_DTYPES = ('int32', 'uint8')


class DetectorGraph(paddle.nn.Layer):
    """Preprocess, network, Detect and postprocess of a batch of B images, as one layer.

    Args:
        net: a ``Yolact`` in eval mode (its ``maskiou_net`` is used with rescore_mask).
        max_size: S, the network's input side.
        transform: the backbone's ``TransformConfig`` (normalisation, channel order).
        num_classes: classes including background.
        top_k, conf_thresh, nms_thresh, max_num_detections: as ``Detect``.
        cross_class: Fast NMS across classes (``Detect``'s use_cross_class_nms).
        rescore_mask, rescore_bbox: YOLACT++ mask-IoU rescoring, as ``PostProcess``.
        score_threshold: rows with score <= it are dropped (0: none is, as the reference).
        mask_threshold: a mask pixel is set when its upsampled value is above it.
        mask_dtype: 'int32' (PaddleDetection's) or 'uint8' (a quarter of the memory).

    forward(image, im_shape, scale_factor):
        image [B, 3, H, W] float32 RGB 0..255, images of different sizes padded
        at the bottom and right; im_shape [B, 2] float32 (h, w) of each image's
        valid region; scale_factor [B, 2] float32 (sy, sx) a client applied
        before (1 when it did not resize); the original size is
        round(im_shape / scale_factor).
    Returns (in :data:`OUTPUTS` order):
        bbox [N, 6] float32 (class 0-based, score, x1, y1, x2, y2 in original
        pixels, truncated like the reference's ``.long()``), each image's rows
        together and best first; bbox_num [B] int32; mask [N, Hmax, Wmax]
        (0/1; -1 (uint8: 0) outside a smaller image of the batch); mask_score
        [N] float32 (score x predicted mask IoU with rescore_mask, else the
        score). An image with no detection has one row [-1, 0, 0, 0, 0, 0]
        with an all-zero mask: no output is ever empty.
    """

    def __init__(self, net, max_size, transform, num_classes, top_k, conf_thresh, nms_thresh,
                 max_num_detections, cross_class=False, rescore_mask=False, rescore_bbox=False,
                 score_threshold=0.0, mask_threshold=0.5, mask_dtype='int32', means=MEANS, std=STD):
        super().__init__()
        if mask_dtype not in MASK_DTYPES:
            raise ValueError(f'mask_dtype must be one of {MASK_DTYPES}, got {mask_dtype!r}')
        if rescore_mask and getattr(net, 'maskiou_net', None) is None:
            raise ValueError('rescore_mask needs the network\'s mask-IoU net')
        self.net = net
        self.max_size = max_size
        self.transform = transform
        self.num_classes = num_classes
        self.top_k = top_k
        self.conf_thresh = conf_thresh
        self.nms_thresh = nms_thresh
        self.max_num_detections = max_num_detections
        self.cross_class = cross_class
        self.rescore_mask = rescore_mask
        self.rescore_bbox = rescore_bbox and rescore_mask
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.mask_dtype = mask_dtype
        # MEANS/STD are in BGR order; the input is RGB.
        rgb = [INPUT_CHANNEL_ORDER[::-1].index(c) for c in INPUT_CHANNEL_ORDER]
        self.register_buffer('mean', paddle.to_tensor([means[i] for i in rgb], 'float32').reshape([3, 1, 1]),
                             persistable=False)
        self.register_buffer('std', paddle.to_tensor([std[i] for i in rgb], 'float32').reshape([3, 1, 1]),
                             persistable=False)
        self.channel_index = [INPUT_CHANNEL_ORDER.index(c) for c in transform.channel_order]

    @classmethod
    def from_config(cls, net, cfg, use_fast_nms=True, use_cross_class_nms=False, **overrides):
        """A DetectorGraph with the config's sizes, classes, NMS settings and rescoring rule.

        Raises ValueError for traditional NMS (use_fast_nms=False), which has no graph form.
        Keyword overrides win (e.g. max_num_detections=20, mask_dtype='uint8').
        """
        if not use_fast_nms:
            raise ValueError('traditional NMS cannot be exported (its greedy loop has no graph form '
                             'that every runtime runs): export with Fast NMS')
        kwargs = dict(max_size=cfg.max_size, transform=cfg.backbone.transform, num_classes=cfg.num_classes,
                      top_k=cfg.nms_top_k, conf_thresh=cfg.nms_conf_thresh, nms_thresh=cfg.nms_thresh,
                      max_num_detections=cfg.max_num_detections, cross_class=use_cross_class_nms,
                      rescore_mask=cfg.rescore_mask, rescore_bbox=cfg.rescore_bbox)
        kwargs.update(overrides)
        return cls(net, **kwargs)

    def forward(self, image, im_shape, scale_factor):
        batch = image.shape[0]
        in_h, in_w = paddle.shape(image)[2], paddle.shape(image)[3]
        # Original sizes; every image's masks are laid out at the batch's largest.
        orig = paddle.round(im_shape / scale_factor)                        # [B, 2] float32
        out_h = orig[:, 0].max().astype('int64')
        out_w = orig[:, 1].max().astype('int64')

        x = paddle.stack([self._preprocess(image[b], im_shape[b], in_h, in_w) for b in range(batch)])
        preds = self.net(x)
        rows = []
        for b in range(batch):
            rows.append(self._detect_image(preds['loc'][b], preds['conf'][b], preds['mask'][b], preds['priors'],
                                           preds['proto'][b], orig[b], out_h, out_w, batch > 1))
        # One image: no concat, whose copy of the [N, H, W] masks would stay allocated until the run ends
        # (Paddle Inference's memory reuse cannot be enabled for PIR programs, Paddle#75496).
        bbox, bbox_num, mask, mask_score = (rows[0][i] if batch == 1 else paddle.concat([r[i] for r in rows])
                                            for i in range(4))
        if self.mask_dtype == 'uint8':
            mask = mask.astype('uint8')       # concat has no uint8 kernel in static graphs: bool until here
        return bbox, bbox_num, mask, mask_score

    # ------------------------------------------------------------ preprocessing --
    def _preprocess(self, img, shape, in_h, in_w):
        """One image [3, H, W] RGB 0..255 (valid region ``shape`` (h, w)) -> [3, S, S] network input.

        The reference's FastBaseTransform: bilinear resize (PyTorch's positions,
        width first, then height), then the backbone's normalisation and channel order.
        """
        size = self.max_size
        rows = resize_matrix(shape[0], float(size), size, in_h)             # [S, H]
        cols = resize_matrix(shape[1], float(size), size, in_w)             # [S, W]
        x = paddle.matmul(rows, paddle.matmul(img, cols, transpose_y=True))   # [3, S, S]
        t = self.transform
        if t.normalize:
            x = (x - self.mean) / self.std
        elif t.subtract_means:
            x = x - self.mean
        elif t.to_float:
            x = x / 255.0
        if self.channel_index != [0, 1, 2]:
            x = paddle.stack([x[i] for i in self.channel_index])
        return x

    # -------------------------------------------------------------- detection --
    def _detect_image(self, loc, conf, coeffs, priors, proto, orig, out_h, out_w, padded):
        """One image's rows: (bbox [n, 6], bbox_num [1] int32, mask [n, Hmax, Wmax], mask_score [n]).

        padded: the batch has several images, so this one may be smaller than Hmax x Wmax.
        """
        boxes = decode(loc, priors)                                          # [P, 4] relative point form
        class_scores = conf[:, 1:]                                           # [P, C-1]
        # Candidates: best non-background score above conf_thresh. The others
        # get score -1, rank after every candidate and are dropped at the end;
        # they come after all candidates of a class, so they suppress none.
        candidate = class_scores.max(axis=1) > self.conf_thresh              # [P]
        num_priors = class_scores.shape[0]
        k = min(self.top_k, num_priors)
        if self.cross_class:
            scores = paddle.where(candidate, class_scores.max(axis=1), paddle.full_like(candidate, -1, 'float32'))
            top_scores, top_idx = paddle.topk(scores, k)                    # [k]
            worst = max_iou_with_better(paddle.gather(boxes, top_idx).unsqueeze(0))[0]
            keep = (worst <= self.nms_thresh) & (top_scores >= 0)
            det_scores = top_scores
            det_idx = top_idx
            det_classes = paddle.gather(class_scores.argmax(axis=1), top_idx)
            valid = keep
        else:
            scores = paddle.where(candidate.unsqueeze(1), class_scores,
                                  paddle.full_like(class_scores, -1)).t()   # [C-1, P]
            top_scores, top_idx = paddle.topk(scores, k, axis=1)            # [C-1, k]
            num_classes = top_scores.shape[0]
            class_boxes = paddle.gather(boxes, top_idx.flatten()).reshape([num_classes, k, 4])
            keep = (max_iou_with_better(class_boxes) <= self.nms_thresh) & (top_scores >= 0)
            flat_scores = paddle.where(keep, top_scores, paddle.full_like(top_scores, -1)).flatten()
            det_scores, flat = paddle.topk(flat_scores, min(self.max_num_detections, num_classes * k))
            det_idx = paddle.gather(top_idx.flatten(), flat)
            det_classes = flat // k
            valid = det_scores >= 0
        if self.score_threshold > 0:
            valid = valid & (det_scores > self.score_threshold)

        # Compact to the valid rows, best first; a padding row when there is none.
        none = paddle.logical_not(valid.any()).reshape([1])
        selected = paddle.nonzero(paddle.concat([valid, none])).flatten()    # [n], n >= 1
        zero = paddle.zeros([1], 'float32')
        real = paddle.gather(paddle.concat([paddle.ones_like(det_scores), zero]), selected)
        scores = paddle.gather(paddle.concat([det_scores, zero]), selected)
        classes = paddle.gather(paddle.concat([det_classes.astype('int64'), paddle.zeros([1], 'int64')]), selected)
        det_boxes = paddle.concat([paddle.gather(boxes, det_idx), paddle.zeros([1, 4], 'float32')])
        det_boxes = paddle.gather(det_boxes, selected)                       # [n, 4] relative
        det_coeffs = paddle.concat([paddle.gather(coeffs, det_idx), paddle.zeros([1, coeffs.shape[1]], 'float32')])
        det_coeffs = paddle.gather(det_coeffs, selected)                     # [n, K]

        # Masks at prototype resolution: assemble, sigmoid, crop (the reference's order).
        soft = F.sigmoid(paddle.matmul(proto, det_coeffs, transpose_y=True))  # [s, s, n]
        soft = crop(soft, det_boxes).transpose([2, 0, 1]) * real.reshape([-1, 1, 1])   # [n, s, s]
        mask_scores = scores
        if self.rescore_mask:
            predicted = self.net.maskiou_net(soft.unsqueeze(1))              # [n, C-1]
            maskiou = paddle.take_along_axis(predicted, classes.unsqueeze(1), axis=1).squeeze(1)
            mask_scores = scores * maskiou
            if self.rescore_bbox:
                scores = mask_scores

        height, width = orig[0], orig[1]
        x1, x2 = sanitize_coordinates(det_boxes[:, 0], det_boxes[:, 2], width)
        y1, y2 = sanitize_coordinates(det_boxes[:, 1], det_boxes[:, 3], height)
        # Truncation toward zero, as the reference's .long() (coordinates are >= 0).
        pixel_boxes = paddle.floor(paddle.stack([x1, y1, x2, y2], axis=1))
        class_column = paddle.where(real > 0, classes.astype('float32'), paddle.full_like(real, -1))
        bbox = paddle.concat([class_column.unsqueeze(1), scores.unsqueeze(1), pixel_boxes], axis=1)

        mask = self._upsample(soft, height, width, out_h, out_w, padded)
        bbox_num = paddle.shape(selected)[0:1].astype('int32')
        return bbox, bbox_num, mask, mask_scores

    def _upsample(self, soft, height, width, out_h, out_w, padded):
        """[n, s, s] soft masks -> [n, out_h, out_w] thresholded at the image's (height, width).

        Bilinear, align_corners=False, PyTorch's positions, width first; int32
        (with -1 beyond (height, width) when ``padded``), or (mask_dtype uint8)
        bool with 0 there. The matrices' rows beyond the image are zero, so
        those pixels are 0 before the -1 is subtracted.
        """
        side = soft.shape[1]
        rows = resize_matrix(float(side), height, out_h, side)               # [Hmax, s]
        cols = resize_matrix(float(side), width, out_w, side)                # [Wmax, s]
        values = paddle.matmul(rows, paddle.matmul(soft, cols, transpose_y=True))   # [n, Hmax, Wmax]
        mask = values > self.mask_threshold
        if self.mask_dtype == 'uint8':
            return mask                       # bool; forward casts the batch's masks
        mask = mask.astype('int32')
        if not padded:
            return mask
        outside = ((paddle.arange(out_h, dtype='float32') >= height).unsqueeze(1)
                   | (paddle.arange(out_w, dtype='float32') >= width).unsqueeze(0))
        return mask - outside.astype('int32').unsqueeze(0)


def resize_matrix(in_size, out_size, out_extent, in_extent):
    """[out_extent, in_extent] float32 matrix of a 1-D bilinear resize in_size -> out_size, built in the graph.

    Row i < out_size holds output sample i's two taps at PyTorch's positions
    (:func:`layers.interpolate.linear_taps`: scale = float32 in/out, position
    scale * (i + 0.5) - 0.5 in float64 rounded to float32, clamped at 0); rows
    from out_size on and columns from in_size on are zero. Sizes are float
    scalars or 0-d tensors (dynamic), extents ints or int64 scalars (the
    padded lengths of the axes).
    """
    in_size = paddle.to_tensor(in_size, 'float32') if isinstance(in_size, float) else in_size.astype('float32')
    out_size = paddle.to_tensor(out_size, 'float32') if isinstance(out_size, float) else out_size.astype('float32')
    scale = divide_rounded(in_size, out_size).astype('float64')
    index = paddle.arange(out_extent, dtype='float64')
    src = paddle.maximum((scale * (index + 0.5) - 0.5).astype('float32'), paddle.zeros([1], 'float32'))
    last = in_size - 1
    i0 = paddle.minimum(paddle.floor(src), last)
    w1 = paddle.clip(src - i0, 0, 1)
    i1 = paddle.minimum(i0 + 1, last)
    w0 = 1 - w1
    cols = paddle.arange(in_extent, dtype='float32').unsqueeze(0)
    matrix = (w0.unsqueeze(1) * (cols == i0.unsqueeze(1)).astype('float32')
              + w1.unsqueeze(1) * (cols == i1.unsqueeze(1)).astype('float32'))
    row_used = (index.astype('float32') < out_size).astype('float32').unsqueeze(1)
    return matrix * row_used


def max_iou_with_better(boxes):
    """Each box's largest IoU with an earlier (better) box of its row: [n, k, 4] point form -> [n, k].

    ``Detect``'s rule (layers/functions/detection.py), operation for operation.
    The pairwise operands are expanded to [n, k, k] before each elementwise op:
    Paddle Inference's CPU broadcasting kernels took 585 ms for [80, 200, 200],
    the same ops on expanded operands 48 ms (AMD EPYC, 2 cores, Paddle 3.3.1),
    with identical results. The upper triangle is a constant mask (no triu op
    for converters).
    """
    n, k = boxes.shape[0], boxes.shape[1]

    def pairs(values):
        """[n, k] -> ([n, k, k] with values[i] along rows, [n, k, k] with values[j] along columns)."""
        return values.unsqueeze(2).expand([n, k, k]), values.unsqueeze(1).expand([n, k, k])

    x1, y1, x2, y2 = (pairs(v) for v in paddle.unbind(boxes, axis=2))
    iw = paddle.minimum(x2[0], x2[1]) - paddle.maximum(x1[0], x1[1])
    ih = paddle.minimum(y2[0], y2[1]) - paddle.maximum(y1[0], y1[1])
    inter = paddle.clip(iw, min=0) * paddle.clip(ih, min=0)
    area = pairs((boxes[:, :, 2] - boxes[:, :, 0]) * (boxes[:, :, 3] - boxes[:, :, 1]))
    iou = divide_rounded(inter, area[0] + area[1] - inter)
    index = paddle.arange(k, dtype='int64')
    better = (index.unsqueeze(1) < index.unsqueeze(0)).astype(iou.dtype).unsqueeze(0).expand([n, k, k])
    return (iou * better).max(axis=1)
