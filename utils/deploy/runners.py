"""Running exports: Paddle Inference predictors (:class:`StaticYolact`) and onnxruntime sessions (:class:`OnnxYolact`).

Both are called like ``Yolact`` in eval mode and return its dict, so Detect
and postprocess work unchanged on their outputs.

Precision (:data:`PRECISIONS`) is an option of the Paddle Inference predictor,
not of the exported files: 'fp32' everywhere (the default); 'bf16' on a CPU
with AVX512-BF16 or AMX, through oneDNN's bfloat16 kernels (inputs and outputs
stay float32); 'fp16' on a GPU, through TensorRT in half precision.
"""
import logging
import os

import numpy as np
import paddle

from layers.compat import enable_onednn, predictor_run
from utils.deploy.graph_rewrites import crashing_cpu_passes
from utils.deploy.network_export import MASKIOU_SUFFIX, ONNX_SUFFIX, ExportMeta, model_file
from utils.errors import ConfigError, MissingFileError
from utils.runtime import dygraph_threads_restored, predictor_cpu_threads

logger = logging.getLogger(__name__)

PRECISIONS = ('fp32', 'bf16', 'fp16')
# Where Linux lists the CPU's instruction set extensions.
CPUINFO = '/proc/cpuinfo'
# Either runs oneDNN's bfloat16 kernels natively (AMX through its tile instructions).
_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')


def cpu_bf16_flags():
    """The CPU flags of :data:`_BF16_FLAGS` this CPU has (from :data:`CPUINFO`; none where it cannot be read)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.partition(':')[2].split())
                    return tuple(flag for flag in _BF16_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def check_precision(precision, device='cpu', use_onednn=True):
    """Refuse, with a one-line ConfigError, a precision this device cannot run (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == 'bf16':
        if device != 'cpu':
            raise ConfigError('precision bf16 runs on a CPU (oneDNN); on a GPU use fp16 (TensorRT) or fp32')
        if not use_onednn:
            raise ConfigError('precision bf16 runs through oneDNN, which is turned off')
        if not cpu_bf16_flags():
            raise ConfigError(f'precision bf16 needs a CPU with AVX512-BF16 or AMX ({" or ".join(_BF16_FLAGS)} '
                              f'in {CPUINFO}); this CPU has neither: use fp32')
    if precision == 'fp16' and device != 'gpu':
        raise ConfigError('precision fp16 runs on a GPU (TensorRT); on a CPU use bf16 (AVX512-BF16 or AMX) or fp32')


def create_predictor(path_prefix, device='cpu', num_threads=None, use_onednn=True,
                     use_tensorrt=False, gpu_id=0, onednn_cache_capacity=0, precision='fp32'):
    """A Paddle Inference predictor for one exported graph.

    Args:
        device: 'cpu' or 'gpu'.
        num_threads: CPU math threads (default: utils.runtime.default_cpu_threads, as for dygraph).
        use_onednn: CPU only; oneDNN kernels and graph fusions.
        use_tensorrt: GPU only; run supported subgraphs with TensorRT.
        onednn_cache_capacity: > 0 bounds oneDNN's per-shape kernel cache, for
            inputs whose shape changes (the mask-IoU net's number of masks).
        precision: 'fp32'; 'bf16' (CPU with AVX512-BF16 or AMX: oneDNN's
            bfloat16 kernels); 'fp16' (GPU: TensorRT in half precision, so
            TensorRT is used whatever ``use_tensorrt`` says). Anything this
            device cannot run is a one-line ConfigError (:func:`check_precision`).
    """
    from paddle import inference

    if device not in ('cpu', 'gpu'):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    check_precision(precision, device, use_onednn)
    graph = model_file(path_prefix)
    config = inference.Config(graph, path_prefix + '.pdiparams')
    if device == 'gpu':
        config.enable_use_gpu(256, gpu_id)
        if use_tensorrt or precision == 'fp16':
            # Not run here (no GPU on the machines that test this project).
            mode = inference.PrecisionType.Half if precision == 'fp16' else inference.PrecisionType.Float32
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1, min_subgraph_size=3,
                                          precision_mode=mode, use_static=False, use_calib_mode=False)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(predictor_cpu_threads(num_threads))
        if use_onednn:
            enable_onednn(config, onednn_cache_capacity)
        if precision == 'bf16':
            # enable_mkldnn_bfloat16 before Paddle 3.2 (kept as an alias in 3.3).
            enable_bf16 = getattr(config, 'enable_onednn_bfloat16', None) or config.enable_mkldnn_bfloat16
            enable_bf16()
        for name in crashing_cpu_passes(graph):
            config.delete_pass(name)
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return inference.create_predictor(config)


def run_predictor(predictor, x):
    """Run a one-input predictor on a float32 paddle tensor; its outputs as paddle tensors.

    Paddle tensors in and out (``Predictor.run(inputs)``), not numpy: on a GPU
    the outputs stay on the device for Detect and PostProcess, with no copy
    to the host and back.
    """
    x = x if isinstance(x, paddle.Tensor) else paddle.to_tensor(np.asarray(x, dtype=np.float32))
    with dygraph_threads_restored():
        return predictor_run(predictor, [x.astype('float32')])


class ExportedMaskIoU:
    """An exported mask-IoU net, callable like ``Yolact.maskiou_net``: [N, 1, s, s] -> [N, C-1].

    run: [N, 1, s, s] -> [N, C-1], paddle tensors (``tensors``: a Paddle
    Inference predictor) or float32 numpy arrays (an onnxruntime session);
    no masks need no run.
    """

    def __init__(self, run, num_classes, tensors=False):
        self.run = run
        self.num_classes = num_classes
        self.tensors = tensors

    def __call__(self, masks):
        if masks.shape[0] == 0:
            return paddle.zeros([0, self.num_classes - 1], 'float32')
        if self.tensors:
            return self.run(masks)
        return paddle.to_tensor(self.run(np.ascontiguousarray(masks.numpy(), dtype=np.float32)))


class StaticYolact:
    """An exported YOLACT network run by Paddle Inference, called like ``Yolact`` in eval mode.

    ``runner(x)`` with x [B, 3, S, S] float32 (paddle tensor or numpy, B as
    exported) returns the dict of ``Yolact.forward``: 'loc' [B, P, 4], 'conf'
    [B, P, C] (softmax), 'mask' [B, P, K], 'priors' [P, 4], 'proto'
    [B, S/4, S/4, K], float32 paddle tensors on the predictor's device (no host
    copy on a GPU). ``maskiou_net`` is the exported mask-IoU net (YOLACT++) or None.
    ``precision``: see :func:`create_predictor` (both nets run in it).
    """

    def __init__(self, path_prefix, device='cpu', num_threads=None, use_onednn=True,
                 use_tensorrt=False, gpu_id=0, precision='fp32'):
        self.meta = ExportMeta.read(path_prefix)
        self.precision = precision
        options = dict(device=device, num_threads=num_threads, use_onednn=use_onednn,
                       use_tensorrt=use_tensorrt, gpu_id=gpu_id, precision=precision)
        self.predictor = create_predictor(path_prefix, **options)
        self.maskiou_net = None
        if self.meta.maskiou:
            maskiou = create_predictor(path_prefix + MASKIOU_SUFFIX, onednn_cache_capacity=16, **options)
            self.maskiou_net = ExportedMaskIoU(lambda masks: run_predictor(maskiou, masks)[0],
                                               self.meta.num_classes, tensors=True)
        logger.info('loaded exported %s from %s (%s%s, %s)', self.meta.config, path_prefix, device,
                    ', oneDNN' if device == 'cpu' and use_onednn else '', precision)

    def __call__(self, x):
        return dict(zip(self.meta.outputs, run_predictor(self.predictor, x)))


def create_onnx_session(onnx_path, num_threads=None):
    """An onnxruntime CPU session for one ONNX file (onnxruntime is imported here, only when used).

    Its threads do not spin-wait after a run: Detect and postprocess run in
    dygraph right after the network and would share the cores with them.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError('running an ONNX export needs onnxruntime, which is not installed '
                          '(pip install onnxruntime)') from e
    if not os.path.isfile(onnx_path):
        raise MissingFileError(f'{onnx_path!r} not found: export it with tools/export_model.py --format onnx')
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = predictor_cpu_threads(num_threads)
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.log_severity_level = 3   # its warnings about initializers paddle2onnx left unused are noise
    return onnxruntime.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])


class OnnxYolact:
    """An ONNX export (utils.deploy.onnx_export.export_onnx) run by onnxruntime on the CPU, called like ``Yolact``.

    ``runner(x)`` with x [B, 3, S, S] float32 (paddle tensor or numpy, B as
    exported) returns the dict of :class:`StaticYolact`: 'loc' [B, P, 4],
    'conf' [B, P, C] (softmax), 'mask' [B, P, K], 'priors' [P, 4], 'proto'
    [B, S/4, S/4, K] as paddle tensors. ``maskiou_net``: an ExportedMaskIoU or None.
    """

    def __init__(self, path_prefix, num_threads=None):
        self.meta = ExportMeta.read(path_prefix)
        self.session = create_onnx_session(path_prefix + ONNX_SUFFIX, num_threads)
        self.input_name = self.session.get_inputs()[0].name
        self.maskiou_net = None
        if self.meta.maskiou:
            maskiou = create_onnx_session(path_prefix + MASKIOU_SUFFIX + ONNX_SUFFIX, num_threads)
            feed_name = maskiou.get_inputs()[0].name
            self.maskiou_net = ExportedMaskIoU(lambda masks: maskiou.run(None, {feed_name: masks})[0],
                                               self.meta.num_classes)
        logger.info('loaded ONNX %s from %s (onnxruntime, CPU)', self.meta.config, path_prefix)

    def __call__(self, x):
        array = x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})
        return {k: paddle.to_tensor(v) for k, v in zip(self.meta.outputs, outputs)}
