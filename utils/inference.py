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
:func:`export_yolact` switches the network's :class:`yolact.Resize` layers to
two matrix products while tracing (and back); the results agree with the op to
float rounding. :func:`cached_export` exports once per weights file, config and
Paddle version into a cache folder; :func:`export_onnx` writes an ONNX file
(paddle2onnx) run by :class:`OnnxYolact` (onnxruntime).
"""
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import paddle

from utils.compat import PADDLE_VERSION, enable_onednn, predictor_run
from utils.errors import ConfigError, MissingFileError, OutputError
from utils.runtime import dygraph_threads_restored, predictor_cpu_threads
from yolact import Resize

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

    Files are written in a temporary folder beside the output and then moved
    to their names, the metadata last: an interrupted export leaves no file
    under a final name.
    """
    with _staging_folder(path_prefix) as stage:
        meta = _save_static(net, cfg, os.path.join(stage, 'model'), batch_size)
        _move_export(os.path.join(stage, 'model'), path_prefix)
    logger.info('exported %s (%dx%d, batch %d) to %s', cfg.name, cfg.max_size, cfg.max_size, batch_size,
                path_prefix)
    return meta


def _save_static(net, cfg, path_prefix, batch_size, export_format='paddle'):
    """paddle.jit.save of the network (and mask-IoU net) plus the metadata file, in place."""
    net.eval()
    size = cfg.max_size
    with _resize_as_matmul(net):
        paddle.jit.save(_ForwardOutputs(net), path_prefix, input_spec=[
            paddle.static.InputSpec([batch_size, 3, size, size], 'float32', 'x')])
    has_maskiou = getattr(net, 'maskiou_net', None) is not None
    if has_maskiou:
        # The number of masks varies per image; the side is the prototypes' (138 at 550).
        paddle.jit.save(net.maskiou_net, path_prefix + MASKIOU_SUFFIX, input_spec=[
            paddle.static.InputSpec([None, 1, None, None], 'float32', 'masks')])
    meta = {'config': cfg.name, 'max_size': size, 'batch_size': batch_size, 'format': export_format,
            'num_classes': cfg.num_classes, 'class_names': list(cfg.dataset.class_names),
            'outputs': list(OUTPUT_KEYS), 'maskiou': has_maskiou}
    with open(path_prefix + META_SUFFIX, 'w') as f:
        json.dump(meta, f, indent=2)
    return meta


@contextlib.contextmanager
def _staging_folder(path_prefix):
    """A temporary folder beside ``path_prefix`` (same file system, so moves are atomic), removed on exit."""
    folder = os.path.dirname(os.path.abspath(path_prefix))
    try:
        os.makedirs(folder, exist_ok=True)
        stage = tempfile.mkdtemp(prefix='.export-', dir=folder)
    except OSError as e:
        raise OutputError(f'cannot write the export to {folder}: {e.strerror}') from e
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_export(source_prefix, path_prefix):
    """Move every ``<source_prefix>*`` file to ``<path_prefix>*``, the metadata file last."""
    folder, base = os.path.split(source_prefix)
    names = sorted(n for n in os.listdir(folder) if n.startswith(base))
    names.sort(key=lambda n: n.endswith(META_SUFFIX))
    for name in names:
        os.replace(os.path.join(folder, name), path_prefix + name[len(base):])


# paddle2onnx runs in a child process: on an operator it cannot convert at the
# requested opset it aborts the whole process (SIGABRT from C++), and it calls
# sys.exit on other failures. Its "[Paddle2ONNX]" lines name the problem.
_PADDLE2ONNX_CHILD = """
import inspect
import sys
import paddle2onnx
options = dict(opset_version=int(sys.argv[4]), auto_upgrade_opset=True)
# paddle2onnx 2.x (Paddle >= 3) lets us pick the optimiser; 1.x (Paddle 2.6's) has no choice.
if 'optimize_tool' in inspect.signature(paddle2onnx.export).parameters:
    options['optimize_tool'] = 'onnxoptimizer'
paddle2onnx.export(sys.argv[1], sys.argv[2], sys.argv[3], **options)
"""
# The lowest ONNX opset that has every operator YOLACT uses; paddle2onnx raises
# it when a graph needs more (DeformConv of YOLACT++'s DCNv2 needs 19).
ONNX_OPSET = 13
ONNX_SUFFIX = '.onnx'


def export_onnx(net, cfg, path_prefix, batch_size=1):
    """Save a Yolact network (eval mode) as ``<path_prefix>.onnx`` for onnxruntime, through paddle2onnx.

    Writes ``<path_prefix>.onnx`` (input ``x`` [B, 3, S, S] float32
    preprocessed, outputs in :data:`OUTPUT_KEYS` order), for YOLACT++
    ``<path_prefix>_maskiou.onnx``, and ``<path_prefix>.yolact.json``
    (``"format": "onnx"``); run them with :class:`OnnxYolact`. The network is
    first exported as by :func:`export_yolact` (bilinear resizes as
    MatMul), then converted; all in a temporary folder, moved into place at
    the end. Raises ConfigError when paddle2onnx is not installed or cannot
    convert the graph (the message gives paddle2onnx's reason).
    """
    if importlib.util.find_spec('paddle2onnx') is None:
        raise ConfigError('ONNX export needs paddle2onnx, which is not installed (pip install paddle2onnx)')
    if PADDLE_VERSION < (3, 0) and not _paddle2onnx_version().startswith('1.'):
        # paddle2onnx 2.x refuses to run on Paddle < 3; 1.x reads the .pdmodel programs of Paddle 2.6.
        raise ConfigError(f'paddle2onnx {_paddle2onnx_version()} needs Paddle >= 3 (this is {paddle.__version__}); '
                          'with Paddle 2.6 install paddle2onnx 1.x: pip install "paddle2onnx>=1.3,<2"')
    with _staging_folder(path_prefix) as stage:
        paddle_prefix = os.path.join(stage, 'paddle')
        meta = _save_static(net, cfg, paddle_prefix, batch_size, export_format='onnx')
        onnx_prefix = os.path.join(stage, 'model')
        _paddle2onnx(paddle_prefix, onnx_prefix + ONNX_SUFFIX, cfg.name)
        if meta['maskiou']:
            _paddle2onnx(paddle_prefix + MASKIOU_SUFFIX, onnx_prefix + MASKIOU_SUFFIX + ONNX_SUFFIX,
                         cfg.name + ' mask-IoU net')
        os.replace(paddle_prefix + META_SUFFIX, onnx_prefix + META_SUFFIX)
        _move_export(onnx_prefix, path_prefix)
    logger.info('exported %s as ONNX (%dx%d, batch %d) to %s%s', cfg.name, cfg.max_size, cfg.max_size,
                batch_size, path_prefix, ONNX_SUFFIX)
    return meta


def _paddle2onnx(paddle_prefix, onnx_path, what):
    """Convert one exported Paddle graph to ONNX in a child process; ConfigError if it fails."""
    command = [sys.executable, '-c', _PADDLE2ONNX_CHILD, _model_file(paddle_prefix),
               paddle_prefix + '.pdiparams', onnx_path, str(ONNX_OPSET)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.isfile(onnx_path):
        raise ConfigError(f'paddle2onnx {_paddle2onnx_version()} cannot convert {what} to ONNX: '
                          f'{_paddle2onnx_reason(result.stdout + result.stderr, result.returncode)}')


def _paddle2onnx_reason(output, returncode):
    """paddle2onnx's own messages from a failed conversion's output, on one line."""
    progress = ('Start parsing', 'Use opset_version', 'is exported as ONNX')
    lines = [line.strip() for line in _strip_ansi(output).splitlines() if line.strip()]
    messages = [re.sub(r'^(\[ERROR\])?\[Paddle2ONNX\]\s*', '', line) for line in lines
                if ('[Paddle2ONNX]' in line or '[ERROR]' in line or 'not supported' in line)
                and not any(p in line for p in progress)]
    if not messages:
        messages = [line for line in lines if 'error' in line.lower()][-1:] or [f'exit status {returncode}']
    return '; '.join(m.rstrip('.') for m in messages)


def _paddle2onnx_version():
    from importlib.metadata import version
    return version('paddle2onnx')


def _strip_ansi(text):
    """Text without the terminal colour codes paddle2onnx writes around its messages."""
    return re.sub(r'\x1b\[[0-9;]*m', '', text)


# Part of every cache key: bump it when the exported graph changes for the same weights and config.
CACHE_FORMAT = 1
_PARTIAL = '.partial-'


def default_cache_dir():
    """Where :func:`cached_export` keeps exports: ``$YOLACT_CACHE``, else ``~/.cache/yolact/exported``."""
    return os.environ.get('YOLACT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'yolact', 'exported')


def export_cache_key(cfg, weights_path, batch_size=1):
    """Hex key of an export: the weights file's content, the config, the class count, Paddle's version.

    The config is the frozen dataclass's repr, so any field (input size,
    anchors, head layout) changes the key; the weights enter by a SHA-256 of
    their bytes, not their name or date.
    """
    digest = hashlib.sha256()
    try:
        with open(weights_path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
    except FileNotFoundError as e:
        raise MissingFileError(f'weights file {weights_path!r} not found') from e
    parts = {'weights': digest.hexdigest(), 'config': repr(cfg), 'num_classes': cfg.num_classes,
             'paddle': paddle.__version__, 'batch_size': batch_size, 'format': CACHE_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_export(load_net, cfg, weights_path, cache_dir=None, batch_size=1):
    """The prefix of the cached export of ``weights_path`` for ``cfg``, exporting it on first use.

    Args:
        load_net: no arguments -> a ``Yolact`` for ``cfg`` with the weights of
            ``weights_path`` loaded; called only when the entry is missing, so a
            cache hit builds no network.
        cfg: its YolactConfig.
        weights_path: the file those weights came from (its bytes enter the key).
        cache_dir: default :func:`default_cache_dir`.
        batch_size: as for :func:`export_yolact`.
    Returns:
        ``<cache_dir>/<config>-<key>/<config>``, a prefix for :class:`StaticYolact`.

    An entry is exported into its own ``.partial-<host>-<pid>-*`` folder and
    renamed to its final name when complete, so a killed export leaves no
    entry, and of concurrent exporters of one key the first rename wins and
    the others discard their copies. Partial folders of dead processes on
    this host (and any older than a day) are removed on the next call.
    """
    cache_dir = cache_dir or default_cache_dir()
    key = export_cache_key(cfg, weights_path, batch_size)
    entry = os.path.join(cache_dir, f'{cfg.name}-{key[:24]}')
    prefix = os.path.join(entry, cfg.name)
    if os.path.isfile(prefix + META_SUFFIX):
        logger.info('using the cached export %s', entry)
        return prefix
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _remove_dead_partials(cache_dir)
        stage = tempfile.mkdtemp(prefix=f'{_PARTIAL}{socket.gethostname()}-{os.getpid()}-', dir=cache_dir)
    except OSError as e:
        raise OutputError(f'cannot write the export cache {cache_dir}: {e.strerror}') from e
    try:
        _save_static(load_net(), cfg, os.path.join(stage, cfg.name), batch_size)
        try:
            os.rename(stage, entry)
        except OSError:
            if not os.path.isfile(prefix + META_SUFFIX):
                raise
            logger.info('%s was exported concurrently; using that copy', entry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info('exported %s (%dx%d, batch %d) to the cache %s', cfg.name, cfg.max_size, cfg.max_size,
                batch_size, entry)
    return prefix


def _remove_dead_partials(cache_dir, max_age=24 * 3600):
    """Delete partial exports left by killed processes: this host's dead pids, or older than max_age s."""
    host = socket.gethostname()
    for name in os.listdir(cache_dir):
        if not name.startswith(_PARTIAL):
            continue
        path = os.path.join(cache_dir, name)
        owner_host, _, rest = name[len(_PARTIAL):].rpartition('-')[0].rpartition('-')
        pid = int(rest) if rest.isdigit() else None
        try:
            stale = time.time() - os.path.getmtime(path) > max_age
        except OSError:
            continue
        if stale or (owner_host == host and pid is not None and not _process_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _resize_as_matmul(net):
    """While tracing for export, ``net``'s Resize layers compute bilinear resizes as two matmuls.

    See :class:`yolact.Resize`; each layer's previous mode is restored on exit.
    Nothing outside ``net`` changes.
    """
    layers = [layer for layer in net.sublayers(include_self=True) if isinstance(layer, Resize)]
    previous = [layer.as_matmul for layer in layers]
    for layer in layers:
        layer.as_matmul = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.as_matmul = value


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
    raise MissingFileError(f'no {path_prefix}.json or {path_prefix}.pdmodel found')


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
        config.set_cpu_math_library_num_threads(predictor_cpu_threads(num_threads))
        if use_onednn:
            enable_onednn(config, onednn_cache_capacity)
    else:
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return inference.create_predictor(config)


def _run(predictor, x):
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
    [B, S/4, S/4, K], as paddle tensors on the predictor's device (no host
    copy on a GPU). ``maskiou_net`` is the exported mask-IoU net (YOLACT++) or None.
    """

    def __init__(self, path_prefix, device='cpu', num_threads=None, use_onednn=True,
                 use_tensorrt=False, gpu_id=0):
        self.meta = read_export_meta(path_prefix)
        options = dict(device=device, num_threads=num_threads, use_onednn=use_onednn,
                       use_tensorrt=use_tensorrt, gpu_id=gpu_id)
        self.predictor = create_predictor(path_prefix, **options)
        self.maskiou_net = None
        if self.meta['maskiou']:
            maskiou = create_predictor(path_prefix + MASKIOU_SUFFIX, onednn_cache_capacity=16, **options)
            self.maskiou_net = ExportedMaskIoU(lambda masks: _run(maskiou, masks)[0], self.meta['num_classes'],
                                               tensors=True)
        logger.info('loaded exported %s from %s (%s%s)', self.meta['config'], path_prefix, device,
                    ', oneDNN' if device == 'cpu' and use_onednn else '')

    def __call__(self, x):
        return dict(zip(self.meta['outputs'], _run(self.predictor, x)))


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
    """An ONNX export (:func:`export_onnx`) run by onnxruntime on the CPU, called like ``Yolact`` in eval mode.

    ``runner(x)`` with x [B, 3, S, S] float32 (paddle tensor or numpy, B as
    exported) returns the dict of :class:`StaticYolact`: 'loc' [B, P, 4],
    'conf' [B, P, C] (softmax), 'mask' [B, P, K], 'priors' [P, 4], 'proto'
    [B, S/4, S/4, K] as paddle tensors. ``maskiou_net``: an ExportedMaskIoU or None.
    """

    def __init__(self, path_prefix, num_threads=None):
        self.meta = read_export_meta(path_prefix)
        self.session = create_onnx_session(path_prefix + ONNX_SUFFIX, num_threads)
        self.input_name = self.session.get_inputs()[0].name
        self.maskiou_net = None
        if self.meta['maskiou']:
            maskiou = create_onnx_session(path_prefix + MASKIOU_SUFFIX + ONNX_SUFFIX, num_threads)
            feed_name = maskiou.get_inputs()[0].name
            self.maskiou_net = ExportedMaskIoU(lambda masks: maskiou.run(None, {feed_name: masks})[0],
                                               self.meta['num_classes'])
        logger.info('loaded ONNX %s from %s (onnxruntime, CPU)', self.meta['config'], path_prefix)

    def __call__(self, x):
        array = x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})
        return {k: paddle.to_tensor(v) for k, v in zip(self.meta['outputs'], outputs)}
