"""YOLACT / YOLACT++: backbone + FPN + ProtoNet + shared prediction head.

The network returns raw outputs only (see Yolact.forward); decoding, NMS and
mask assembly live in layers/functions/detection.py and layers/output_utils.py,
the training loss in layers/modules/multibox_loss.py.

Box conventions: priors are center form (cx, cy, w, h) relative to the input
side; 'loc' are offsets in the box_utils.encode convention w.r.t. those priors.
"""
from math import sqrt

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from backbone import Conv2D, construct_backbone
from layers.compat import layer_train
from layers.interpolate import interpolation_matrix


class Resize(nn.Layer):
    """Parameter-free resize of NCHW maps (align_corners=False), the FPN's and ProtoNet's upsampling.

    Args:
        scale_factor: output side = input side * scale_factor, when forward gets no size.
        mode: F.interpolate mode ('bilinear' in every published config).
    Forward: x [B, C, H, W], optional size (out_h, out_w) -> [B, C, out_h, out_w].

    ``as_matmul`` (False by default; utils.deploy.graph_rewrites.resize_as_matmul sets it
    while tracing) computes a bilinear resize as ``A_h @ x @ A_w^T`` with
    :func:`interpolation_matrix`: a bilinear resize is separable and linear,
    and unlike the ``bilinear_interp`` op the two products run under Paddle
    3.3's oneDNN executor (PaddlePaddle/Paddle#79749) and export to ONNX as
    plain MatMul. Results agree with the op to float rounding. Other modes
    always use F.interpolate.
    """

    def __init__(self, scale_factor=None, mode='bilinear'):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.as_matmul = False

    def forward(self, x, size=None):
        if not (self.as_matmul and self.mode == 'bilinear'):
            scale = None if size is not None else self.scale_factor
            return F.interpolate(x, size=size, scale_factor=scale, mode=self.mode, align_corners=False)
        b, c, h, w = x.shape
        if size is None:
            size = (int(h * self.scale_factor), int(w * self.scale_factor))
        out_h, out_w = int(size[0]), int(size[1])
        rows = paddle.to_tensor(interpolation_matrix(h, out_h))
        cols = paddle.to_tensor(np.ascontiguousarray(interpolation_matrix(w, out_w).T))
        # Flattened to [B*C, H, W] first: fed the 4-D output of a oneDNN conv
        # directly, oneDNN's matmul reads it in the wrong memory layout (wrong values, no error).
        y = paddle.matmul(paddle.matmul(rows, x.reshape([b * c, h, w])), cols)
        return y.reshape([b, c, out_h, out_w])


def make_net(in_channels, layer_specs, include_last_relu=True):
    """nn.Sequential from LayerSpecs (out_channels, kernel, padding, stride), and its output channels.

    Every layer is followed by a ReLU (the last one only if include_last_relu),
    including upsampling layers, so Sequential indices match the reference's
    (a conv at every even index). A spec (None, -k, _, _) is a bilinear
    upsampling by k (align_corners=False).
    """
    layers = []
    for out_channels, kernel, padding, stride in layer_specs:
        if kernel > 0:
            layers.append(Conv2D(in_channels, out_channels, kernel, stride=stride, padding=padding))
            in_channels = out_channels
        elif out_channels is None:
            layers.append(Resize(scale_factor=-kernel))
        else:
            raise ValueError(f'unsupported layer spec {(out_channels, kernel, padding, stride)}: a negative '
                             'kernel means bilinear upsampling and needs out_channels None')
        layers.append(nn.ReLU())
    if layers and not include_last_relu:
        layers.pop()
    return nn.Sequential(*layers), in_channels


class FPN(nn.Layer):
    """Feature pyramid over the selected backbone stages, plus extra coarser levels.

    Args:
        in_channels: channels of each input map, finest first.
        num_features: channels of every output level.
        num_downsample: extra levels appended after the coarsest input, each at
            half the previous resolution (a stride-2 3x3 conv, or a stride-2
            subsampling when use_conv_downsample is False).
        pad: pad the 3x3 prediction convs (keeps the input resolutions).
        relu_pred_layers: ReLU after the prediction convs.
        relu_downsample_layers: ReLU on the extra levels.
        interpolation_mode: F.interpolate mode of the top-down pathway (a parameter-free Resize).
    Forward: list of [B, in_channels[i], H_i, W_i] -> list of
    len(in_channels) + num_downsample maps [B, num_features, H_i, W_i].

    Layer order follows the reference: lat_layers.0 / pred_layers.0 belong to
    the coarsest input.
    """

    def __init__(self, in_channels, num_features=256, num_downsample=2, use_conv_downsample=True,
                 pad=True, relu_pred_layers=True, relu_downsample_layers=False,
                 interpolation_mode='bilinear'):
        super().__init__()
        self.lat_layers = nn.LayerList([Conv2D(c, num_features, 1) for c in reversed(in_channels)])
        self.pred_layers = nn.LayerList([
            Conv2D(num_features, num_features, 3, padding=1 if pad else 0) for _ in in_channels])
        if use_conv_downsample:
            self.downsample_layers = nn.LayerList([
                Conv2D(num_features, num_features, 3, stride=2, padding=1) for _ in range(num_downsample)])
        self.num_downsample = num_downsample
        self.use_conv_downsample = use_conv_downsample
        self.relu_pred_layers = relu_pred_layers
        self.relu_downsample_layers = relu_downsample_layers
        self.upsample = Resize(mode=interpolation_mode)

    def forward(self, feats):
        num_in = len(feats)
        outs = [None] * num_in
        # Top-down: upsample the running sum to each finer lateral and add.
        x = None
        for lat_layer, j in zip(self.lat_layers, reversed(range(num_in))):
            lateral = lat_layer(feats[j])
            if x is not None:
                lateral = self.upsample(x, size=feats[j].shape[2:]) + lateral
            x = lateral
            outs[j] = x
        for pred_layer, j in zip(self.pred_layers, reversed(range(num_in))):
            outs[j] = pred_layer(outs[j])
            if self.relu_pred_layers:
                outs[j] = F.relu(outs[j])
        for i in range(self.num_downsample):
            if self.use_conv_downsample:
                extra = self.downsample_layers[i](outs[-1])
            else:
                extra = F.max_pool2d(outs[-1], 1, stride=2)
            outs.append(extra)
        if self.relu_downsample_layers:
            # The reference assigns these to the first levels instead (an indexing
            # slip); no published config enables the option, so it does the evident intent.
            outs[num_in:] = [F.relu(o) for o in outs[num_in:]]
        return outs


class PredictionModule(nn.Layer):
    """Box, class and mask-coefficient head applied to one pyramid level.

    Args:
        in_channels: channels of the level.
        num_priors: anchors per feature-map cell (A).
        num_classes: classes including background (C).
        mask_dim: mask coefficients per anchor (K, the number of prototypes).
        extra_head_net: LayerSpecs of the shared trunk ``upfeature`` (each + ReLU).
    Forward: [B, in_channels, H, W] -> (loc [B, H*W*A, 4], conf [B, H*W*A, C]
    raw logits, mask [B, H*W*A, K] after tanh), rows ordered cell-major
    (row-major over H, W), then anchor, matching the priors.
    """

    def __init__(self, in_channels, num_priors, num_classes, mask_dim, extra_head_net):
        super().__init__()
        self.upfeature, channels = make_net(in_channels, extra_head_net)
        self.bbox_layer = Conv2D(channels, num_priors * 4, 3, padding=1)
        self.conf_layer = Conv2D(channels, num_priors * num_classes, 3, padding=1)
        self.mask_layer = Conv2D(channels, num_priors * mask_dim, 3, padding=1)
        self.num_classes = num_classes
        self.mask_dim = mask_dim

    def forward(self, x):
        x = self.upfeature(x)
        if self.training and paddle.in_dynamic_mode():
            loc, conf, mask = self._fused_heads(x)
        else:
            loc, conf, mask = self.bbox_layer(x), self.conf_layer(x), self.mask_layer(x)
        loc = _flatten_anchors(loc, 4)
        conf = _flatten_anchors(conf, self.num_classes)
        mask = paddle.tanh(_flatten_anchors(mask, self.mask_dim))
        return loc, conf, mask

    def _fused_heads(self, x):
        """The three head convolutions as one on their shared input; [B, C, H, W] -> three [B, A*d, H, W].

        They read the same x with the same 3x3 kernel geometry, so one conv
        with the kernels stacked computes the same sums: one im2col of x
        instead of three, forward and backward. On the CPU (1 thread,
        2x256x69x69, yolact_resnet50's heads, forward + backward) 0.75 s ->
        0.53 s; the outputs differ from the separate convs by float rounding
        (1e-6), as the GEMM blocks differently, so training uses it and
        inference keeps the separate layers the reference's outputs are compared with.
        """
        layers = (self.bbox_layer, self.conf_layer, self.mask_layer)
        # The three share their geometry (3x3, stride 1, padding 1): bbox_layer's stands for all.
        out = self.bbox_layer.convolve(x, paddle.concat([layer.weight for layer in layers]),
                                       paddle.concat([layer.bias for layer in layers]))
        return paddle.split(out, [layer.weight.shape[0] for layer in layers], axis=1)


def _flatten_anchors(x, depth):
    """[B, A * depth, H, W] -> [B, H * W * A, depth]."""
    # 0 keeps the batch dimension, so the reshape also traces with a dynamic batch.
    return x.transpose([0, 2, 3, 1]).reshape([0, -1, depth])


class PriorGenerator:
    """Anchors of all prediction levels, exactly as the reference's make_priors.

    Args:
        pred_scales: per level, anchor scales (pixels of a max_size input if
            use_pixel_scales, else multiples of the level's cell size).
        pred_aspect_ratios: per level, groups of aspect ratios w/h.
        max_size: input side the pixel scales refer to.
        preapply_sqrt: ratios are already square-rooted (else sqrt is applied).
        use_square_anchors: h = w (reproduces YOLACT v1, whose anchors are square).
    Call with the [(H, W)] of every level -> np.float32 [P, 4] priors
    (cx, cy, w, h) relative, ordered level, cell (row-major), ratio group,
    scale, ratio. Results are cached per set of level sizes.
    """

    def __init__(self, pred_scales, pred_aspect_ratios, max_size, use_pixel_scales=True,
                 preapply_sqrt=False, use_square_anchors=False):
        if len(pred_scales) != len(pred_aspect_ratios):
            raise ValueError(f'{len(pred_scales)} levels of scales but '
                             f'{len(pred_aspect_ratios)} of aspect ratios')
        self.pred_scales = pred_scales
        self.pred_aspect_ratios = pred_aspect_ratios
        self.max_size = max_size
        self.use_pixel_scales = use_pixel_scales
        self.preapply_sqrt = preapply_sqrt
        self.use_square_anchors = use_square_anchors
        self._cache = {}

    @property
    def num_priors_per_location(self):
        """Anchors per cell, per level."""
        return [len(scales) * sum(len(ars) for ars in groups)
                for scales, groups in zip(self.pred_scales, self.pred_aspect_ratios)]

    def __call__(self, feature_sizes):
        key = tuple((h, w) for h, w in feature_sizes)
        if not all(isinstance(v, int) and v > 0 for hw in key for v in hw):
            # What tracing with a dynamic input size gives (-1 or a Tensor).
            raise ValueError(f'feature map sizes {key} are not static; trace with a fixed input size')
        if key not in self._cache:
            if len(key) != len(self.pred_scales):
                raise ValueError(f'{len(key)} feature maps for {len(self.pred_scales)} anchor levels')
            self._cache[key] = np.concatenate(
                [self._level_priors(level, h, w) for level, (h, w) in enumerate(key)], axis=0)
        return self._cache[key]

    def _level_priors(self, level, conv_h, conv_w):
        """[conv_h * conv_w * A, 4] float32, computed in float64 like the reference."""
        sizes = []
        for ars in self.pred_aspect_ratios[level]:
            for scale in self.pred_scales[level]:
                for ar in ars:
                    if not self.preapply_sqrt:
                        ar = sqrt(ar)
                    if self.use_pixel_scales:
                        w, h = scale * ar / self.max_size, scale / ar / self.max_size
                    else:
                        w, h = scale * ar / conv_w, scale / ar / conv_h
                    sizes.append((w, w if self.use_square_anchors else h))
        cy, cx = np.meshgrid((np.arange(conv_h) + 0.5) / conv_h, (np.arange(conv_w) + 0.5) / conv_w,
                             indexing='ij')
        centers = np.stack([cx.ravel(), cy.ravel()], axis=1)                      # [HW, 2]
        sizes = np.asarray(sizes, dtype=np.float64)                                # [A, 2]
        priors = np.concatenate([np.repeat(centers, len(sizes), axis=0),
                                 np.tile(sizes, (len(centers), 1))], axis=1)       # [HW * A, 4]
        return priors.astype(np.float32)


class FastMaskIoUNet(nn.Layer):
    """YOLACT++ mask re-scoring net: predicted mask -> IoU with its ground truth, per class.

    Args:
        layer_specs: LayerSpecs of the conv trunk (cfg.maskiou_net).
        num_classes: classes including background; the net predicts num_classes - 1.
    Forward: [N, 1, h, w] float masks -> [N, num_classes - 1] (ReLU after every
    conv including the last, then global max pooling).
    """

    def __init__(self, layer_specs, num_classes):
        super().__init__()
        specs = tuple(layer_specs) + ((num_classes - 1, 1, 0, 1),)
        self.maskiou_net, _ = make_net(1, specs, include_last_relu=True)

    def forward(self, x):
        return self.maskiou_net(x).max(axis=[2, 3])


class Yolact(nn.Layer):
    """The YOLACT network.

    Args:
        backbone: nn.Layer, [B, 3, S, S] -> list of stage maps (backbone.py).
        selected_layers: indices of the stages fed to the FPN, finest first.
        fpn: FPN over those stages.
        proto_net: ProtoNet on the finest FPN level, [B, F, S/8, S/8] -> [B, K, S/4, S/4]
            (before the prototype ReLU).
        prediction_layers: nn.LayerList of PredictionModule, one shared by all
            levels or one per level.
        prior_generator: PriorGenerator for the FPN levels.
        semantic_seg_conv: optional 1x1 conv on the finest FPN level, [B, C-1, S/8, S/8]
            logits (training only).
        maskiou_net: optional FastMaskIoUNet (YOLACT++), used by the loss and postprocess.
    """

    def __init__(self, backbone, selected_layers, fpn, proto_net, prediction_layers, prior_generator,
                 semantic_seg_conv=None, maskiou_net=None):
        super().__init__()
        if len(prediction_layers) not in (1, len(prior_generator.pred_scales)):
            raise ValueError(f'{len(prediction_layers)} prediction modules for '
                             f'{len(prior_generator.pred_scales)} levels '
                             '(expected 1 shared or one per level)')
        self.backbone = backbone
        self.selected_layers = tuple(selected_layers)
        self.proto_net = proto_net
        self.maskiou_net = maskiou_net
        self.fpn = fpn
        self.prediction_layers = prediction_layers
        self.semantic_seg_conv = semantic_seg_conv
        self.prior_generator = prior_generator
        self._bn_frozen = False

    @classmethod
    def from_config(cls, cfg):
        """The untrained network of a data.config.YolactConfig (BatchNorm frozen if cfg.freeze_bn)."""
        num_levels = len(cfg.backbone.selected_layers) + cfg.fpn.num_downsample
        if len(cfg.backbone.pred_scales) != num_levels:
            raise ValueError(f'{cfg.name}: {len(cfg.backbone.pred_scales)} anchor levels '
                             f'for {num_levels} FPN levels')
        backbone = construct_backbone(cfg.backbone)
        fpn = FPN([backbone.channels[i] for i in cfg.backbone.selected_layers],
                  num_features=cfg.fpn.num_features, num_downsample=cfg.fpn.num_downsample,
                  use_conv_downsample=cfg.fpn.use_conv_downsample, pad=cfg.fpn.pad,
                  relu_pred_layers=cfg.fpn.relu_pred_layers,
                  relu_downsample_layers=cfg.fpn.relu_downsample_layers,
                  interpolation_mode=cfg.fpn.interpolation_mode)
        proto_net, _ = make_net(cfg.fpn.num_features, cfg.mask_proto_net, include_last_relu=False)
        priors = PriorGenerator(cfg.backbone.pred_scales, cfg.backbone.pred_aspect_ratios, cfg.max_size,
                                use_pixel_scales=cfg.backbone.use_pixel_scales,
                                preapply_sqrt=cfg.backbone.preapply_sqrt,
                                use_square_anchors=cfg.backbone.use_square_anchors)
        per_location = priors.num_priors_per_location
        if cfg.share_prediction_module:
            if len(set(per_location)) != 1:
                raise ValueError(f'{cfg.name}: a shared prediction module needs the same number of '
                                 f'anchors on every level, got {per_location}')
            per_location = per_location[:1]
        heads = nn.LayerList([
            PredictionModule(cfg.fpn.num_features, n, cfg.num_classes, cfg.mask_dim, cfg.extra_head_net)
            for n in per_location])
        segm = (Conv2D(cfg.fpn.num_features, cfg.num_classes - 1, 1)
                if cfg.use_semantic_segmentation_loss else None)
        maskiou = FastMaskIoUNet(cfg.maskiou_net, cfg.num_classes) if cfg.use_maskiou else None
        net = cls(backbone, cfg.backbone.selected_layers, fpn, proto_net, heads, priors,
                  semantic_seg_conv=segm, maskiou_net=maskiou)
        if cfg.freeze_bn:
            net.freeze_bn(True)
        return net

    def forward(self, x):
        """Raw predictions for a preprocessed batch.

        Args:
            x: [B, 3, S, S] float32, normalised RGB (data/transforms.py).
        Returns a dict:
            'loc'    [B, P, 4]  box offsets w.r.t. the priors (box_utils.encode convention)
            'conf'   [B, P, C]  softmax probabilities (eval) / raw logits (training), C incl. background
            'mask'   [B, P, K]  mask coefficients in [-1, 1] (tanh)
            'priors' [P, 4]     anchors, center form (cx, cy, w, h), relative
            'proto'  [B, S/4, S/4, K] prototypes after ReLU, channels last
            'segm'   [B, C-1, S/8, S/8] semantic-segmentation logits (training, if the net has the conv)
        """
        stages = self.backbone(x)
        feats = self.fpn([stages[i] for i in self.selected_layers])

        proto = F.relu(self.proto_net(feats[0])).transpose([0, 2, 3, 1])

        loc, conf, mask = [], [], []
        for level, feat in enumerate(feats):
            head = self.prediction_layers[level if len(self.prediction_layers) > 1 else 0]
            level_loc, level_conf, level_mask = head(feat)
            loc.append(level_loc)
            conf.append(level_conf)
            mask.append(level_mask)
        # Level sizes are static once the input size is, so the priors are a
        # constant of the traced graph.
        priors = paddle.to_tensor(self.prior_generator([f.shape[2:] for f in feats]))

        preds = {'loc': paddle.concat(loc, axis=1), 'conf': paddle.concat(conf, axis=1),
                 'mask': paddle.concat(mask, axis=1), 'priors': priors, 'proto': proto}
        if self.training:
            if self.semantic_seg_conv is not None:
                preds['segm'] = self.semantic_seg_conv(feats[0])
        else:
            preds['conf'] = F.softmax(preds['conf'], axis=-1)
        return preds

    def freeze_bn(self, enable=True):
        """Freeze (enable=True) or release every BatchNorm layer.

        Frozen BatchNorm normalises with its running statistics, never updates
        them and gets no gradient, also in training mode (the state survives
        train()). The reference's freeze_bn(enable=False) is this freeze_bn(True).
        """
        self._bn_frozen = enable
        for bn in self._batch_norms():
            bn.weight.stop_gradient = enable
            bn.bias.stop_gradient = enable
            # The flag, not bn.eval(): Layer.eval() also switches Paddle's global tracer mode.
            bn.training = self.training and not enable

    def train(self, mode=True):
        """Training (or eval) mode; frozen BatchNorm layers stay in eval mode."""
        layer_train(self, mode)
        if self._bn_frozen:
            for bn in self._batch_norms():
                bn.training = False
        return self

    def _batch_norms(self):
        return [layer for layer in self.sublayers() if isinstance(layer, nn.BatchNorm2D)]

    def init_weights(self):
        """Reference initialisation for training.

        Every conv outside the backbone gets Xavier-uniform weights and zero
        bias; the backbone keeps its construction init (DCN layers: zero
        offsets). ImageNet backbone weights are loaded afterwards by
        utils.weights.loader.load_backbone_weights(net.backbone, path).
        """
        xavier, zero = nn.initializer.XavierUniform(), nn.initializer.Constant(0.0)
        for name, layer in self.named_sublayers():
            if isinstance(layer, nn.Conv2D) and not name.startswith('backbone.'):
                xavier(layer.weight)
                if layer.bias is not None:
                    zero(layer.bias)
