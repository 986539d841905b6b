"""One-call inference: a BGR image in, instance masks, boxes, classes, class names and scores out.

``Predictor`` bundles a network (dygraph or exported) with its config,
preprocessing, Detect and post-processing. eval.py, training validation,
tools/benchmark.py and users' code all run images through it.
"""
import functools
import logging
import os

import numpy as np
import paddle

from layers.functions import Detect
from layers.output_utils import PostProcess
from data.images import DEFAULT_MAX_PIXELS, read_image
from data.transforms import FastBaseTransform
from utils.deploy.export_cache import cached_export
from utils.deploy.runners import StaticYolact, check_precision
from utils.errors import ConfigError, ImageInputError
from utils.weights.loader import WeightsFile, load_exported
from utils.runtime import select_device

logger = logging.getLogger(__name__)


def as_bgr_image(image, max_pixels=DEFAULT_MAX_PIXELS):
    """The [H, W, 3] BGR image the network takes, from what a user may hand the Predictor.

    Taken as they are: uint8 [H, W, 3] BGR (cv2.imread's), and float [H, W, 3]
    BGR with values in 0..255. Converted, with nothing to guess:
      * a path (str or os.PathLike): read by data.images.read_image (EXIF
        orientation, the ``max_pixels`` cap; UnreadableFileError naming it);
      * uint16: scaled to 8 bits, value * 255 / 65535 rounded (65535 -> 255);
      * gray [H, W] or [H, W, 1]: its value in all three channels;
      * BGRA [H, W, 4]: the alpha channel dropped (not composited).
    Refused with an ImageInputError (a ValueError) of one line, because they need a guess:
      * a float image whose values all lie in 0..1 (a 0..1 scale, or a dark
        0..255 image? multiply by 255 or pass uint8), an all-zero float image included;
      * a float image with values outside 0..255, NaN or infinite (normalised already?);
      * other dtypes (bool, signed integers, uint32, ...), other shapes, an empty image.
    Colour order cannot be checked: a 3-channel image is taken as BGR (an RGB
    image gives different detections; ``image[..., ::-1]`` turns RGB into BGR).
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image), max_pixels=max_pixels)
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f'expected an image path or a numpy array [H, W, 3] BGR, got {type(image).__name__}')
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ImageInputError(f'expected an [H, W, 3] BGR image (or [H, W] / [H, W, 1] gray, [H, W, 4] BGRA), '
                              f'got shape {list(image.shape)}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageInputError(f'the image is empty (shape {list(image.shape)})')
    if image.dtype == np.uint16:
        image = np.round(image.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        image = _checked_float(image)
    elif image.dtype != np.uint8:
        raise ImageInputError(f'image dtype {image.dtype} is not uint8, uint16 or float in 0..255: '
                              'convert it to uint8 BGR')
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    return image


def _checked_float(image):
    """A float image whose values are unmistakably 0..255, as float32; ImageInputError otherwise."""
    image = image.astype(np.float32, copy=False)
    low, high = float(image.min()), float(image.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ImageInputError('the float image holds NaN or infinite values')
    if low < 0 or high > 255:
        raise ImageInputError(f'float image values span {low:.4g}..{high:.4g}, outside 0..255 (normalised '
                              'already?): pass the BGR image in 0..255 or as uint8')
    if high <= 1:
        raise ImageInputError(f'float image values all lie in 0..1 (max {high:.4g}): a 0..1 scale or a dark '
                              '0..255 image cannot be told apart; pass uint8, or multiply by 255')
    return image


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
        precision: of the cached export on a CPU: 'fp32', or 'bf16' on a CPU with
            AVX512-BF16 or AMX (utils.deploy.runners.create_predictor); the
            dygraph network (``dygraph=True``, a GPU) runs fp32 only: anything else
            is a one-line ConfigError. fp16 runs an export on a GPU with TensorRT:
            ``Predictor.from_exported(prefix, device='gpu', precision='fp16')``.
        **detect_overrides: Detect.from_config overrides, e.g.
            ``use_fast_nms=False`` or ``conf_thresh=0.3``.
    Attributes:
        cfg: the YolactConfig (its ``dataset.class_names`` name the classes).
        net: the network, called as ``net(x)`` with x [1, 3, S, S].
    """

    def __init__(self, weights, weights_path=None, config=None, device=None, score_threshold=0.0, dygraph=False,
                 precision='fp32', **detect_overrides):
        if weights_path is not None:
            config, weights = weights, weights_path
        device = select_device(device)
        if precision != 'fp32':
            if device != 'cpu' or dygraph:
                raise ConfigError(f'precision {precision} is an option of Paddle Inference: the dygraph network '
                                  '(dygraph=True, or a GPU) runs fp32; on a GPU run an export (from_exported)')
            check_precision(precision, 'cpu')
        weights_file = WeightsFile(weights)
        if device == 'cpu' and not dygraph:
            # The config only: a cache hit builds no network and reads no weights but a record-less
            # .pdparams's class count.
            cfg = weights_file.config(config)
            load_net = functools.lru_cache(maxsize=None)(lambda: weights_file.load_model(cfg=cfg)[1])
            # cached_export returns None when the export failed its first-use check (it warns): dygraph then.
            prefix = cached_export(load_net, cfg, weights)
            net = StaticYolact(prefix, device='cpu', precision=precision) if prefix is not None else load_net()
            if prefix is None and precision != 'fp32':
                logger.info('the dygraph network runs in fp32, not %s', precision)
        else:
            # A .pdparams is read once, for its class count and its weights.
            cfg, net = weights_file.load_model(config)
        self._setup(cfg, net, score_threshold, detect_overrides)
        logger.info('loaded %s (%d classes) from %s', cfg.name, cfg.num_classes - 1, weights)

    @classmethod
    def from_exported(cls, path_prefix, device='cpu', use_tensorrt=False, config=None, score_threshold=0.0,
                      precision='fp32', **detect_overrides):
        """A Predictor running a network exported by tools/export_model.py with Paddle Inference.

        path_prefix: the export's path without extension (its metadata names
        the config and classes); device: 'cpu' (oneDNN) or 'gpu'; precision:
        'fp32', 'bf16' (CPU) or 'fp16' (GPU, TensorRT), see
        utils.deploy.runners.create_predictor.
        Preprocessing, Detect and post-processing are the dygraph ones.
        """
        cfg, net = load_exported(path_prefix, config, device=device, use_tensorrt=use_tensorrt, precision=precision)
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
            image: [H, W, 3] uint8 BGR (as cv2.imread gives it), or what
                :func:`as_bgr_image` converts without guessing (a path, uint16,
                gray, BGRA, float in 0..255); what needs a guess (e.g. a float
                image in 0..1) is an ImageInputError (a ValueError) of one line.
            max_num_detections: keep only this many best detections (None: all), before the score threshold.
        Returns:
            a dict of numpy arrays in Detect's order (best first): 'classes' [N]
            int64 (0-based, background excluded), 'labels' (a list of N class
            names), 'scores' [N] float32 box scores, 'boxes' [N, 4] int64 pixel
            x1, y1, x2, y2, 'masks' [N, H, W] bool; with YOLACT++ also
            'mask_scores' [N] (box score x predicted mask IoU).
        """
        image = as_bgr_image(image)
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
