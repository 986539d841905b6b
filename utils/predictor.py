"""One-call inference: a BGR image in, instance masks, boxes, classes, class names and scores out.

``Predictor`` bundles a network (dygraph or exported) with its config,
preprocessing, Detect and post-processing. eval.py, training validation,
tools/benchmark.py and users' code all run images through it.
"""
import functools
import logging

import numpy as np
import paddle

from layers.functions import Detect
from layers.output_utils import PostProcess
from data.transforms import FastBaseTransform
from utils.deploy.export_cache import cached_export
from utils.deploy.runners import StaticYolact
from utils.weights.loader import load_exported, load_model, model_config
from utils.runtime import select_device

logger = logging.getLogger(__name__)


class Predictor:
    """A YOLACT / YOLACT++ network with its preprocessing and post-processing.

    ``Predictor('weights/my_model_10_2000.pdparams')`` takes the config and the
    class names from the weights' record (train.py checkpoints) or their file
    name; ``Predictor('yolact_base', 'weights/yolact_base_54_800000.pth')``
    (config first) still works. ``.pth`` files are converted on the fly.

    On a CPU the network runs through Paddle Inference (oneDNN), faster than
    dygraph there (README "Speed and deployment"): it is exported on first use into a cache keyed by the
    weights' content, the config and Paddle's version
    (utils.deploy.export_cache.cached_export; ``$YOLACT_CACHE``, default
    ``~/.cache/yolact/exported``) and reused afterwards, once Paddle Inference
    has run it in a child process with the dygraph network's results; an
    export that crashes or disagrees there is not used (one warning names the
    cause) and the dygraph network runs. ``dygraph=True`` keeps the dygraph
    network (and so does a GPU).

    Args:
        weights: a weights path, or a config name when ``weights_path`` is given.
        weights_path: the weights, in the (config, weights) form.
        config: a config name overriding the one the weights give.
        device: Paddle device for the network, e.g. 'cpu' or 'gpu:0'; None
            picks a GPU if there is one. Set process-wide (utils.runtime.select_device).
        score_threshold: keep detections whose box score is above it.
        dygraph: on a CPU, run the dygraph network instead of the cached export.
        **detect_overrides: Detect.from_config overrides, e.g.
            ``use_fast_nms=False`` or ``conf_thresh=0.3``.
    Attributes:
        cfg: the YolactConfig (its ``dataset.class_names`` name the classes).
        net: the network, called as ``net(x)`` with x [1, 3, S, S].
    """

    def __init__(self, weights, weights_path=None, config=None, device=None, score_threshold=0.0, dygraph=False,
                 **detect_overrides):
        if weights_path is not None:
            config, weights = weights, weights_path
        device = select_device(device)
        if device == 'cpu' and not dygraph:
            # The config only: a cache hit builds no network and reads no weights but a record-less
            # .pdparams's class count.
            cfg = model_config(weights, config)
            load_net = functools.lru_cache(maxsize=None)(lambda: load_model(weights, cfg=cfg)[1])
            # cached_export returns None when the export failed its first-use check (it warns): dygraph then.
            prefix = cached_export(load_net, cfg, weights)
            net = StaticYolact(prefix, device='cpu') if prefix is not None else load_net()
        else:
            # load_model reads a .pdparams once, for its class count and its weights.
            cfg, net = load_model(weights, config)
        self._setup(cfg, net, score_threshold, detect_overrides)
        logger.info('loaded %s (%d classes) from %s', cfg.name, cfg.num_classes - 1, weights)

    @classmethod
    def from_exported(cls, path_prefix, device='cpu', use_tensorrt=False, config=None, score_threshold=0.0,
                      **detect_overrides):
        """A Predictor running a network exported by tools/export_model.py with Paddle Inference.

        path_prefix: the export's path without extension (its metadata names
        the config and classes); device: 'cpu' (oneDNN) or 'gpu'.
        Preprocessing, Detect and post-processing are the dygraph ones.
        """
        cfg, net = load_exported(path_prefix, config, device=device, use_tensorrt=use_tensorrt)
        return cls.from_network(cfg, net, score_threshold, **detect_overrides)

    @classmethod
    def from_network(cls, cfg, net, score_threshold=0.0, **detect_overrides):
        """A Predictor around a network already built for ``cfg`` (e.g. the one being trained)."""
        predictor = cls.__new__(cls)
        predictor._setup(cfg, net, score_threshold, detect_overrides)
        return predictor

    def _setup(self, cfg, net, score_threshold, detect_overrides):
        self.cfg = cfg
        self.net = net
        self.transform = FastBaseTransform.from_config(cfg)
        self.detect = Detect.from_config(cfg, **detect_overrides)
        self.postprocess = PostProcess.from_config(cfg, score_threshold=score_threshold)

    @property
    def class_names(self):
        """The class names, indexed by the 0-based class of the results."""
        return self.cfg.dataset.class_names

    @paddle.no_grad()
    def __call__(self, image, max_num_detections=None):
        """Detect the instances in one image.

        Args:
            image: [H, W, 3] uint8 BGR (as cv2.imread gives it).
            max_num_detections: keep only this many best detections (None: all), before the score threshold.
        Returns:
            a dict of numpy arrays in Detect's order (best first): 'classes' [N]
            int64 (0-based, background excluded), 'labels' (a list of N class
            names), 'scores' [N] float32 box scores, 'boxes' [N, 4] int64 pixel
            x1, y1, x2, y2, 'masks' [N, H, W] bool; with YOLACT++ also
            'mask_scores' [N] (box score x predicted mask IoU).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'expected an [H, W, 3] BGR image, got shape {image.shape}')
        height, width = image.shape[:2]
        x = self.transform(paddle.to_tensor(np.ascontiguousarray(image)[None]))
        return self.predict_preprocessed(x, width, height, max_num_detections)

    @paddle.no_grad()
    def predict_preprocessed(self, x, width, height, max_num_detections=None):
        """Detections of one preprocessed image [1, 3, S, S] at its original size; see __call__."""
        return self.finish(self.detect(self.net(x))[0], width, height, max_num_detections)

    def finish(self, det, width, height, max_num_detections=None):
        """The final detections (see __call__) from one image's Detect output."""
        out = self.postprocess(det, width, height, maskiou_net=self.net.maskiou_net,
                               max_num_detections=max_num_detections)
        out['labels'] = [self.class_names[c] for c in out['classes']]
        return out
