"""One-call inference: a BGR image in, instance masks, boxes, classes and scores out."""
import logging

import numpy as np
import paddle

from data.config import get_config
from layers.functions import Detect
from layers.output_utils import postprocess
from utils.augmentations import FastBaseTransform
from utils.checkpoint import load_weights
from utils.inference import StaticYolact
from utils.runtime import select_device
from yolact import Yolact

logger = logging.getLogger(__name__)


class Predictor:
    """A YOLACT / YOLACT++ network with its preprocessing and post-processing.

    Args:
        config_name: a data.config preset, e.g. 'yolact_base' or 'yolact_plus_resnet50'.
        weights_path: a ``.pdparams`` state dict for that config (converted
            reference weights or a training checkpoint). Every key and shape
            must match; otherwise a ValueError names the offending keys.
        device: Paddle device for the network, e.g. 'cpu' or 'gpu:0'; None
            picks a GPU if there is one. Set process-wide (utils.runtime.select_device).
        **detect_overrides: Detect.from_config overrides, e.g.
            ``use_fast_nms=False`` or ``conf_thresh=0.3``.
    """

    def __init__(self, config_name, weights_path, device=None, **detect_overrides):
        select_device(device)
        cfg = get_config(config_name)
        net = Yolact.from_config(cfg)
        load_weights(net, weights_path)
        net.eval()
        self._setup(cfg, net, detect_overrides)
        logger.info('loaded %s from %s', cfg.name, weights_path)

    @classmethod
    def from_exported(cls, path_prefix, device='cpu', **detect_overrides):
        """A Predictor running a network exported by tools/export_model.py with Paddle Inference.

        path_prefix: the export's path without extension (its metadata names
        the config); device: 'cpu' (oneDNN) or 'gpu'. Preprocessing, Detect and
        postprocess are the same as for the dygraph network.
        """
        net = StaticYolact(path_prefix, device=device)
        predictor = cls.__new__(cls)
        predictor._setup(get_config(net.config_name), net, detect_overrides)
        return predictor

    def _setup(self, cfg, net, detect_overrides):
        """cfg, its network in eval mode (Yolact or StaticYolact), Detect overrides."""
        self.cfg = cfg
        self.net = net
        self.transform = FastBaseTransform.from_config(cfg)
        self.detect = Detect.from_config(cfg, **detect_overrides)

    @paddle.no_grad()
    def __call__(self, image, score_threshold=0.0):
        """Detect the instances in one image.

        Args:
            image: [H, W, 3] uint8 BGR (as cv2.imread gives it).
            score_threshold: keep detections whose box score is above it.
        Returns:
            postprocess's dict of numpy arrays, in Detect's order: 'classes' [N]
            int64 (0-based, background excluded), 'scores' [N] float32 box
            scores, 'boxes' [N, 4] int64 pixel x1, y1, x2, y2, 'masks'
            [N, H, W] bool; with YOLACT++ also 'mask_scores' [N] (box score x
            predicted mask IoU).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'expected an [H, W, 3] BGR image, got shape {image.shape}')
        h, w = image.shape[:2]
        x = self.transform(paddle.to_tensor(np.ascontiguousarray(image)[None]))
        det = self.detect(self.net(x))[0]
        return postprocess(det, w, h, maskiou_net=self.net.maskiou_net, rescore_bbox=self.cfg.rescore_bbox,
                           rescore_mask=self.cfg.rescore_mask, score_threshold=score_threshold)
