"""Configurations: plain, frozen data.

One preset per published YOLACT / YOLACT++ configuration, plus dataset and
backbone descriptions. Nothing in the code base mutates a config; derive a
variant with ``get_config(name, **overrides)`` or ``dataclasses.replace``.

Numbers are the reference implementation's (dbolya/yolact ``data/config.py``),
so that converted published weights reproduce the published results.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from utils.errors import ConfigError

# ImageNet statistics in BGR order, as the reference uses them.
MEANS = (103.94, 116.78, 123.68)
STD = (57.38, 57.12, 58.40)

# Drawing palette (RGB), indexed by class or instance as the reference does.
COLORS = ((244, 67, 54), (233, 30, 99), (156, 39, 176), (103, 58, 183),
          (63, 81, 181), (33, 150, 243), (3, 169, 244), (0, 188, 212),
          (0, 150, 136), (76, 175, 80), (139, 195, 74), (205, 220, 57),
          (255, 235, 59), (255, 193, 7), (255, 152, 0), (255, 87, 34),
          (121, 85, 72), (158, 158, 158), (96, 125, 139))

COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck',
    'boat', 'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench',
    'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra',
    'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup',
    'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush')

# COCO category id -> 1-based contiguous label (the reference's COCO_LABEL_MAP).
_COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
    24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47,
    48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70,
    72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_LABEL_MAP = tuple((cat, i + 1) for i, cat in enumerate(_COCO_CATEGORY_IDS))


# ----------------------------------------------------------------- datasets --
@dataclass(frozen=True)
class DatasetConfig:
    """Where a COCO-format dataset lives and how its categories map to labels.

    ``label_map`` is a tuple of ``(category_id, label)`` pairs with labels
    1-based and contiguous (0 is background). ``None`` means category ids are
    already 1..C in the order of ``class_names``.
    """
    name: str
    train_images: str = './data/coco/images/'
    train_info: str = ''
    valid_images: str = './data/coco/images/'
    valid_info: str = ''
    has_gt: bool = True
    class_names: Tuple[str, ...] = COCO_CLASSES
    label_map: Optional[Tuple[Tuple[int, int], ...]] = None

    def label_map_dict(self):
        """{category_id: 1-based label}."""
        if self.label_map is None:
            return {i + 1: i + 1 for i in range(len(self.class_names))}
        return dict(self.label_map)


COCO2017 = DatasetConfig(
    name='COCO 2017',
    train_images='./data/coco/images/', train_info='./data/coco/annotations/instances_train2017.json',
    valid_images='./data/coco/images/', valid_info='./data/coco/annotations/instances_val2017.json',
    label_map=COCO_LABEL_MAP)

COCO2017_TESTDEV = DatasetConfig(
    name='COCO 2017 Test-Dev',
    train_images='./data/coco/images/', train_info='./data/coco/annotations/instances_train2017.json',
    valid_images='./data/coco/images/', valid_info='./data/coco/annotations/image_info_test-dev2017.json',
    has_gt=False, label_map=COCO_LABEL_MAP)

COCO2014 = DatasetConfig(
    name='COCO 2014',
    train_info='./data/coco/annotations/instances_train2014.json',
    valid_info='./data/coco/annotations/instances_val2014.json',
    label_map=COCO_LABEL_MAP)

# Names accepted by --dataset, spelled as in the reference.
DATASETS = {
    'coco2014_dataset': COCO2014,
    'coco2017_dataset': COCO2017,
    'coco2017_testdev_dataset': COCO2017_TESTDEV,
}


# --------------------------------------------------------------- transforms --
@dataclass(frozen=True)
class TransformConfig:
    """Input normalisation a backbone was pre-trained with (applied after resize).

    normalize: (x - MEANS) / STD;  subtract_means: x - MEANS;  to_float: x / 255.
    channel_order: the order the network sees ('RGB' for all published backbones).
    """
    channel_order: str = 'RGB'
    normalize: bool = True
    subtract_means: bool = False
    to_float: bool = False


RESNET_TRANSFORM = TransformConfig(normalize=True)
DARKNET_TRANSFORM = TransformConfig(normalize=False, to_float=True)


# ---------------------------------------------------------------- backbones --
@dataclass(frozen=True)
class BackboneConfig:
    """Backbone architecture and the anchors of the prediction layers on top of it.

    kind: 'resnet' (Bottleneck ResNet) or 'darknet' (DarkNet-53).
    layers: blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
    dcn_layers / dcn_interval: per stage, how many of the last blocks may use a
        modulated deformable 3x3 conv, and every how many blocks (YOLACT++).
    selected_layers: backbone stage indices fed to the FPN.
    pred_scales: per prediction layer, anchor sizes (pixels if use_pixel_scales).
    pred_aspect_ratios: per prediction layer, groups of aspect ratios.
    path: ImageNet weights file the reference trains from (converted to .pdparams).
    base_width: ResNet width of the first stage (64 in every published model;
        smaller for the CPU-sized quickstart model).
    """
    name: str
    kind: str
    path: str
    layers: Tuple[int, ...]
    transform: TransformConfig
    selected_layers: Tuple[int, ...]
    pred_scales: Tuple[Tuple[float, ...], ...]
    pred_aspect_ratios: Tuple[Tuple[Tuple[float, ...], ...], ...]
    dcn_layers: Tuple[int, ...] = (0, 0, 0, 0)
    dcn_interval: int = 1
    use_pixel_scales: bool = True
    preapply_sqrt: bool = False
    use_square_anchors: bool = False
    base_width: int = 64


_YOLACT_SCALES = ((24,), (48,), (96,), (192,), (384,))
_YOLACT_RATIOS = (((1, 1 / 2, 2),),) * 5
_YOLACT_PLUS_SCALES = tuple(tuple(s * 2 ** (j / 3.0) for j in range(3)) for s in (24, 48, 96, 192, 384))

RESNET101 = BackboneConfig(
    name='ResNet101', kind='resnet', path='resnet101_reducedfc.pth', layers=(3, 4, 23, 3),
    transform=RESNET_TRANSFORM, selected_layers=(1, 2, 3),
    pred_scales=_YOLACT_SCALES, pred_aspect_ratios=_YOLACT_RATIOS,
    # Backward compatibility with a reference bug: YOLACT v1 anchors are square.
    use_square_anchors=True)

RESNET50 = dataclasses.replace(
    RESNET101, name='ResNet50', path='resnet50-19c8e357.pth', layers=(3, 4, 6, 3))

DARKNET53 = BackboneConfig(
    name='DarkNet53', kind='darknet', path='darknet53.pth', layers=(1, 2, 8, 8, 4),
    transform=DARKNET_TRANSFORM, selected_layers=(2, 3, 4),
    pred_scales=_YOLACT_SCALES, pred_aspect_ratios=_YOLACT_RATIOS, use_square_anchors=True)

RESNET101_DCN_INTER3 = dataclasses.replace(
    RESNET101, name='ResNet101_DCN_Interval3', dcn_layers=(0, 4, 23, 3), dcn_interval=3,
    pred_scales=_YOLACT_PLUS_SCALES, use_square_anchors=False)

RESNET50_DCNV2 = dataclasses.replace(
    RESNET50, name='ResNet50_DCNv2', dcn_layers=(0, 4, 6, 3), dcn_interval=1,
    pred_scales=_YOLACT_PLUS_SCALES, use_square_anchors=False)


# ---------------------------------------------------------------------- FPN --
@dataclass(frozen=True)
class FPNConfig:
    """Feature pyramid: lateral 1x1 convs, 3x3 pred convs, extra stride-2 levels."""
    num_features: int = 256
    interpolation_mode: str = 'bilinear'
    num_downsample: int = 2
    use_conv_downsample: bool = True
    pad: bool = True
    relu_downsample_layers: bool = False
    relu_pred_layers: bool = True


# ------------------------------------------------------------------- models --
# A conv layer spec for ProtoNet / head / mask-IoU nets: (out_channels, kernel, padding, stride).
# out_channels None with a negative kernel -k means bilinear upsampling by k.
LayerSpec = Tuple[Optional[int], int, int, int]

_PROTO_NET = ((256, 3, 1, 1),) * 3 + ((None, -2, 0, 1), (256, 3, 1, 1), (32, 1, 0, 1))
_MASKIOU_NET = ((8, 3, 0, 2), (16, 3, 0, 2), (32, 3, 0, 2), (64, 3, 0, 2), (128, 3, 0, 2))


@dataclass(frozen=True)
class YolactConfig:
    """Everything that defines one YOLACT model, its training and its post-processing."""
    name: str
    backbone: BackboneConfig
    dataset: DatasetConfig = COCO2017
    num_classes: int = 81                       # including background
    max_size: int = 550                         # square input side
    fpn: FPNConfig = FPNConfig()

    # ProtoNet (mask_proto_src=0: built on the first FPN level) and head.
    mask_proto_net: Tuple[LayerSpec, ...] = _PROTO_NET
    extra_head_net: Tuple[LayerSpec, ...] = ((256, 3, 1, 1),)
    share_prediction_module: bool = True

    # Training.
    max_iter: int = 800000
    lr: float = 1e-3
    momentum: float = 0.9
    decay: float = 5e-4
    gamma: float = 0.1
    lr_steps: Tuple[int, ...] = (280000, 600000, 700000, 750000)
    lr_warmup_init: float = 1e-4
    lr_warmup_until: int = 500
    freeze_bn: bool = False

    # Loss.
    conf_alpha: float = 1.0
    bbox_alpha: float = 1.5
    mask_alpha: float = 6.125
    semantic_segmentation_alpha: float = 1.0
    use_semantic_segmentation_loss: bool = True
    positive_iou_threshold: float = 0.5
    negative_iou_threshold: float = 0.4
    crowd_iou_threshold: float = 0.7
    ohem_negpos_ratio: int = 3
    masks_to_train: int = 100
    mask_proto_crop: bool = True
    mask_proto_binarize_downsampled_gt: bool = True
    mask_proto_normalize_emulate_roi_pooling: bool = True

    # Augmentation (SSD style) for training.
    augment_photometric_distort: bool = True
    augment_expand: bool = True
    augment_random_sample_crop: bool = True
    augment_random_mirror: bool = True
    discard_box_width: float = 4 / 550
    discard_box_height: float = 4 / 550

    # Detection / NMS.
    max_num_detections: int = 100
    nms_top_k: int = 200
    nms_conf_thresh: float = 0.05
    nms_thresh: float = 0.5

    # YOLACT++ mask re-scoring.
    use_maskiou: bool = False
    maskiou_net: Tuple[LayerSpec, ...] = ()
    maskiou_alpha: float = 1.0
    maskious_to_train: int = -1
    discard_mask_area: int = -1
    rescore_bbox: bool = False
    rescore_mask: bool = False

    @property
    def mask_dim(self):
        """Number of prototypes (channels of ProtoNet's last layer)."""
        return self.mask_proto_net[-1][0]

    @property
    def num_priors_per_location(self):
        """Anchors per feature-map cell, per prediction layer (shared head: all equal)."""
        return [len(s) * sum(len(r) for r in ars)
                for s, ars in zip(self.backbone.pred_scales, self.backbone.pred_aspect_ratios)]


YOLACT_BASE = YolactConfig(name='yolact_base', backbone=RESNET101)

YOLACT_IM400 = dataclasses.replace(
    YOLACT_BASE, name='yolact_im400', max_size=400,
    backbone=dataclasses.replace(RESNET101, pred_scales=tuple((int(s[0] / 550 * 400),) for s in _YOLACT_SCALES)))

YOLACT_IM700 = dataclasses.replace(
    YOLACT_BASE, name='yolact_im700', max_size=700, masks_to_train=300,
    backbone=dataclasses.replace(RESNET101, pred_scales=tuple((int(s[0] / 550 * 700),) for s in _YOLACT_SCALES)))

YOLACT_DARKNET53 = dataclasses.replace(YOLACT_BASE, name='yolact_darknet53', backbone=DARKNET53)

YOLACT_RESNET50 = dataclasses.replace(YOLACT_BASE, name='yolact_resnet50', backbone=RESNET50)

YOLACT_PLUS_BASE = dataclasses.replace(
    YOLACT_BASE, name='yolact_plus_base', backbone=RESNET101_DCN_INTER3,
    use_maskiou=True, maskiou_net=_MASKIOU_NET, maskiou_alpha=25.0,
    rescore_bbox=False, rescore_mask=True, discard_mask_area=5 * 5)

YOLACT_PLUS_RESNET50 = dataclasses.replace(
    YOLACT_PLUS_BASE, name='yolact_plus_resnet50', backbone=RESNET50_DCNV2)

# ------------------------------------------------ CPU-sized quickstart model --
# The same architecture, narrowed and shrunk so that it trains from scratch on
# the synthetic shapes dataset (tools/make_shapes_dataset.py) on 2 CPU cores.
SHAPE_CLASSES = ('circle', 'square', 'triangle', 'star')   # tools/make_shapes_dataset.py draws these

SHAPES = DatasetConfig(
    name='Shapes (synthetic)',
    train_images='./data/shapes/train/', train_info='./data/shapes/annotations/instances_train.json',
    valid_images='./data/shapes/val/', valid_info='./data/shapes/annotations/instances_val.json',
    class_names=SHAPE_CLASSES)
DATASETS['shapes_dataset'] = SHAPES

RESNET_SHAPES = BackboneConfig(
    name='ResNet26-w16', kind='resnet', path='', layers=(2, 2, 2, 2), base_width=16,
    transform=RESNET_TRANSFORM, selected_layers=(1, 2, 3),
    # Objects are 33-77 px across (5th-95th percentile) in 192 px images and
    # nearly square, so three square anchors per cell, ~1.2x apart, 30-190 px:
    # 14.5 anchors per object at IoU >= 0.5 against 3.4 with YOLACT's
    # 1:1/1:2/2:1 ratios at one scale, which is what the classifier learns
    # from (mask AP 0.57 vs 0.24 after 1,500 iterations of 8 images).
    pred_scales=((30, 36, 44), (44, 53, 64), (64, 77, 92), (92, 110, 132), (132, 158, 190)),
    pred_aspect_ratios=(((1,),),) * 5)

YOLACT_SHAPES = YolactConfig(
    name='yolact_shapes', backbone=RESNET_SHAPES, dataset=SHAPES,
    num_classes=len(SHAPE_CLASSES) + 1, max_size=192,
    fpn=FPNConfig(num_features=64),
    mask_proto_net=((64, 3, 1, 1),) * 3 + ((None, -2, 0, 1), (64, 3, 1, 1), (32, 1, 0, 1)),
    extra_head_net=((64, 3, 1, 1),),
    # For 8 images per step, like the reference's; tools/quickstart.py trains
    # with 16 and train.py's --autoscale doubles lr and halves the iterations.
    max_iter=2000, lr=1e-2, lr_steps=(1500, 1850), lr_warmup_init=1e-3, lr_warmup_until=300,
    decay=1e-4, discard_box_width=4 / 192, discard_box_height=4 / 192,
    # The shapes already vary in size and position; without expand and random
    # crops a from-scratch model learns them faster (mask AP 0.18 vs 0.04 after
    # 1,200 steps of 8 images with YOLACT's anchors at one scale).
    augment_expand=False, augment_random_sample_crop=False)

CONFIGS = {c.name: c for c in (
    YOLACT_BASE, YOLACT_IM400, YOLACT_IM700, YOLACT_DARKNET53, YOLACT_RESNET50,
    YOLACT_PLUS_BASE, YOLACT_PLUS_RESNET50, YOLACT_SHAPES)}


def get_config(name, **overrides):
    """A fresh config for a preset name (``'yolact_base'`` or ``'yolact_base_config'``).

    Keyword overrides replace top-level fields, e.g.
    ``get_config('yolact_base', max_size=400, dataset=my_dataset)``.
    Raises ConfigError for an unknown name, listing the known ones.
    """
    key = name[:-len('_config')] if name.endswith('_config') else name
    if key not in CONFIGS:
        raise ConfigError(f"unknown config {name!r}; known configs: {', '.join(sorted(CONFIGS))}")
    return dataclasses.replace(CONFIGS[key], **overrides)


def config_name_from_weights(path):
    """The config a weights file belongs to, read from its name the reference way.

    ``yolact_base_54_800000.pth`` -> ``yolact_base``; ``yolact_plus_resnet50_12_3000_interrupt.pdparams``
    -> ``yolact_plus_resnet50``. Raises ConfigError when the name has no
    ``<config>_<epoch>_<iteration>`` form.
    """
    stem = os.path.basename(path)
    for ext in ('.pth', '.pdparams'):
        if stem.endswith(ext):
            stem = stem[:-len(ext)]
    parts = stem.split('_')
    if parts and parts[-1] == 'interrupt':
        parts = parts[:-1]
    if len(parts) < 3 or not (parts[-1].isdigit() and parts[-2].isdigit()):
        raise ConfigError(f'cannot infer the config from the file name {os.path.basename(path)!r} '
                         '(expected <config>_<epoch>_<iteration>.pth); pass --config')
    return '_'.join(parts[:-2])
