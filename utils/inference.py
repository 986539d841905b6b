"""Exported (static) YOLACT networks: export with ``paddle.jit.save``, run with Paddle Inference.

Only the network is exported: ``Detect`` and ``postprocess`` stay in Python
and work unchanged on the outputs of :class:`StaticYolact`, which returns the
same dict as ``Yolact.forward`` in eval mode. An export ``<prefix>`` consists of

* ``<prefix>.json`` (or ``.pdmodel``) + ``<prefix>.pdiparams``: the network,
  input ``x`` [B, 3, S, S] float32 preprocessed, outputs in :data:`OUTPUT_KEYS` order;
* ``<prefix>_maskiou.*`` (YOLACT++ only): the mask-IoU net, [N, 1, h, w] prototype-sized masks -> [N, C-1];
* ``<prefix>.yolact.json``: which config and input size the export was made for.

On CPU Paddle Inference runs the graph with oneDNN, about 6x faster than
dygraph for ResNet-101 at 550x550 on a 2-core machine (0.48 s vs 2.9 s).

Paddle 3.3's oneDNN executor cannot run the ``bilinear_interp`` op of a PIR
program (PaddlePaddle/Paddle#79749), which YOLACT's FPN and ProtoNet use, so
:func:`export_yolact` records bilinear resizes as two matrix products instead
(see :func:`_matmul_bilinear_resize`); the results agree with the op to float
rounding.
"""
import contextlib
import json
import logging
import os

import numpy as np
import paddle
import paddle.nn.functional as F

from utils.augmentations import linear_taps
from utils.errors import MissingFileError
from utils.runtime import default_cpu_threads

logger = logging.getLogger(__name__)

# Output order of the exported network (a static graph has positional outputs only).
OUTPUT_KEYS = ('loc', 'conf', 'mask', 'priors', 'proto')
META_SUFFIX = '.yolact.json'
MASKIOU_SUFFIX = '_maskiou'


class _ForwardOutputs(paddle.nn.Layer):
    """Yolact's eval-mode dict output as a tuple in OUTPUT_KEYS order, for export."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return tuple(out[k] for k in OUTPUT_KEYS)


def export_yolact(net, cfg, path_prefix, batch_size=1):
    """Save a Yolact network (eval mode) as a static inference model.

    Args:
        net: a ``Yolact`` built for ``cfg`` with its weights loaded.
        cfg: its YolactConfig (name, input size, classes go into the metadata).
        path_prefix: output path without extension; folders are created.
        batch_size: the fixed batch dimension of the input spec.
    Returns:
        the metadata dict written to ``<path_prefix>.yolact.json``.
    """
    folder = os.path.dirname(os.path.abspath(path_prefix))
    os.makedirs(folder, exist_ok=True)
    net.eval()
    size = cfg.max_size
    with _matmul_bilinear_resize():
        paddle.jit.save(_ForwardOutputs(net), path_prefix, input_spec=[
            paddle.static.InputSpec([batch_size, 3, size, size], 'float32', 'x')])
    has_maskiou = getattr(net, 'maskiou_net', None) is not None
    if has_maskiou:
        # The number of masks varies per image; the side is the prototypes' (138 at 550).
        paddle.jit.save(net.maskiou_net, path_prefix + MASKIOU_SUFFIX, input_spec=[
            paddle.static.InputSpec([None, 1, None, None], 'float32', 'masks')])
    meta = {'config': cfg.name, 'max_size': size, 'batch_size': batch_size,
            'num_classes': cfg.num_classes, 'class_names': list(cfg.dataset.class_names),
            'outputs': list(OUTPUT_KEYS), 'maskiou': has_maskiou}
    with open(path_prefix + META_SUFFIX, 'w') as f:
        json.dump(meta, f, indent=2)
    logger.info('exported %s (%dx%d, batch %d) to %s', cfg.name, size, size, batch_size, path_prefix)
    return meta


def interpolation_matrix(in_size, out_size):
    """[out_size, in_size] float32 matrix of a 1-D linear resize with align_corners=False.

    Row i holds the two taps of output sample i with Paddle's kernel weights
    (utils.augmentations.linear_taps), so ``A @ v`` resizes a vector ``v``.
    """
    i0, i1, w0, w1 = linear_taps(in_size, out_size)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    # add.at: at the border both taps are the same pixel and their weights add up.
    np.add.at(matrix, (rows, i0), w0)
    np.add.at(matrix, (rows, i1), w1)
    return matrix


@contextlib.contextmanager
def _matmul_bilinear_resize():
    """While tracing for export, compute bilinear resizes as A_h @ x @ A_w^T.

    Replaces ``paddle.nn.functional.interpolate`` (which nn.Upsample calls too)
    for 4-D NCHW bilinear resizes with align_corners=False, the only kind
    YOLACT uses; anything else goes to the original function. A bilinear
    resize is separable and linear, so two products with
    :func:`interpolation_matrix` compute it, and unlike the ``bilinear_interp``
    op they run under Paddle 3.3's oneDNN executor. The input is flattened to
    [B*C, H, W] first: fed the 4-D output of a oneDNN conv directly, oneDNN's
    matmul reads it in the wrong memory layout (wrong values, no error).
    The original function is restored on exit.
    """
    original = F.interpolate

    def interpolate(x, size=None, scale_factor=None, mode='nearest', align_corners=False,
                    align_mode=0, data_format='NCHW', **kwargs):
        if mode != 'bilinear' or align_corners or data_format != 'NCHW' or x.ndim != 4:
            return original(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                            align_mode=align_mode, data_format=data_format, **kwargs)
        b, c, h, w = x.shape
        if size is None:
            sy, sx = scale_factor if isinstance(scale_factor, (list, tuple)) else (scale_factor,) * 2
            size = (int(h * sy), int(w * sx))
        out_h, out_w = int(size[0]), int(size[1])
        rows = paddle.to_tensor(interpolation_matrix(h, out_h))
        cols = paddle.to_tensor(np.ascontiguousarray(interpolation_matrix(w, out_w).T))
        y = paddle.matmul(paddle.matmul(rows, x.reshape([b * c, h, w])), cols)
        return y.reshape([b, c, out_h, out_w])

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


def read_export_meta(path_prefix):
    """The metadata :func:`export_yolact` wrote for ``path_prefix``."""
    path = path_prefix + META_SUFFIX
    if not os.path.isfile(path):
        raise MissingFileError(f'{path!r} not found: is {path_prefix!r} the prefix of a model '
                                'written by tools/export_model.py?')
    with open(path) as f:
        return json.load(f)


def _model_file(path_prefix):
    """The graph file of an export: ``.json`` (PIR, Paddle >= 3) or ``.pdmodel`` (older programs)."""
    for ext in ('.json', '.pdmodel'):
        if os.path.isfile(path_prefix + ext):
            return path_prefix + ext
    raise FileNotFoundError(f'no {path_prefix}.json or {path_prefix}.pdmodel found')


def create_predictor(path_prefix, device='cpu', num_threads=None, use_onednn=True,
                     use_tensorrt=False, gpu_id=0, onednn_cache_capacity=0):
    """A Paddle Inference predictor for one exported graph.

    Args:
        device: 'cpu' or 'gpu'.
        num_threads: CPU math threads (default: utils.runtime.default_cpu_threads, as for dygraph).
        use_onednn: CPU only; oneDNN kernels and graph fusions.
        use_tensorrt: GPU only; run supported subgraphs with TensorRT (float32).
        onednn_cache_capacity: > 0 bounds oneDNN's per-shape kernel cache, for
            inputs whose shape changes (the mask-IoU net's number of masks).
    """
    from paddle import inference

    config = inference.Config(_model_file(path_prefix), path_prefix + '.pdiparams')
    if device == 'gpu':
        config.enable_use_gpu(256, gpu_id)
        if use_tensorrt:
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1, min_subgraph_size=3,
                                          precision_mode=inference.PrecisionType.Float32,
                                          use_static=False, use_calib_mode=False)
    elif device == 'cpu':
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(num_threads or default_cpu_threads())
        if use_onednn:
            config.enable_onednn()
            if onednn_cache_capacity > 0:
                config.set_onednn_cache_capacity(onednn_cache_capacity)
    else:
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return inference.create_predictor(config)


def _run(predictor, array):
    """Run a one-input predictor on a float32 numpy array; list of numpy outputs."""
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(array.shape))
    handle.copy_from_cpu(np.ascontiguousarray(array, dtype=np.float32))
    predictor.run()
    # A CPU predictor run leaves this process's dygraph operators on one thread
    # (Paddle 3.3.1), and Detect and postprocess run in dygraph next (68 ms instead of 57 ms for yolact_base).
    paddle.base.core.set_num_threads(default_cpu_threads())
    return [predictor.get_output_handle(name).copy_to_cpu() for name in predictor.get_output_names()]


class StaticMaskIoU:
    """The exported mask-IoU net, callable like ``Yolact.maskiou_net``: [N, 1, s, s] -> [N, C-1]."""

    def __init__(self, predictor, num_classes):
        self.predictor = predictor
        self.num_classes = num_classes

    def __call__(self, masks):
        if masks.shape[0] == 0:
            return paddle.zeros([0, self.num_classes - 1], 'float32')
        return paddle.to_tensor(_run(self.predictor, masks.numpy())[0])


class StaticYolact:
    """An exported YOLACT network run by Paddle Inference, called like ``Yolact`` in eval mode.

    ``runner(x)`` with x [B, 3, S, S] float32 (paddle tensor or numpy, B as
    exported) returns the dict of ``Yolact.forward``: 'loc' [B, P, 4], 'conf'
    [B, P, C] (softmax), 'mask' [B, P, K], 'priors' [P, 4], 'proto'
    [B, S/4, S/4, K], as paddle tensors on the CPU. ``maskiou_net`` is the
    exported mask-IoU net (YOLACT++) or None.
    """

    def __init__(self, path_prefix, device='cpu', num_threads=None, use_onednn=True,
                 use_tensorrt=False, gpu_id=0):
        self.meta = read_export_meta(path_prefix)
        options = dict(device=device, num_threads=num_threads, use_onednn=use_onednn,
                       use_tensorrt=use_tensorrt, gpu_id=gpu_id)
        self.predictor = create_predictor(path_prefix, **options)
        self.maskiou_net = None
        if self.meta['maskiou']:
            self.maskiou_net = StaticMaskIoU(
                create_predictor(path_prefix + MASKIOU_SUFFIX, onednn_cache_capacity=16, **options),
                self.meta['num_classes'])
        logger.info('loaded exported %s from %s (%s%s)', self.meta['config'], path_prefix, device,
                    ', oneDNN' if device == 'cpu' and use_onednn else '')

    @property
    def config_name(self):
        return self.meta['config']

    @property
    def max_size(self):
        return self.meta['max_size']

    def __call__(self, x):
        array = x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)
        outputs = _run(self.predictor, array)
        return {k: paddle.to_tensor(v) for k, v in zip(self.meta['outputs'], outputs)}
