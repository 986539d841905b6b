"""Exported (static) YOLACT networks: export with ``paddle.jit.save``, run with Paddle Inference.

Only the network is exported: ``Detect`` and ``postprocess`` stay in Python
and work unchanged on the outputs of :class:`StaticYolact`, which returns the
same dict as ``Yolact.forward`` in eval mode. An export ``<prefix>`` consists of

* ``<prefix>.json`` (or ``.pdmodel``) + ``<prefix>.pdiparams``: the network,
  input ``x`` [B, 3, S, S] float32 preprocessed, outputs in :data:`OUTPUT_KEYS` order;
* ``<prefix>_maskiou.*`` (YOLACT++ only): the mask-IoU net, [N, 1, h, w] prototype-sized masks -> [N, C-1];
* ``<prefix>.yolact.json``: which config and input size the export was made for.

On CPU Paddle Inference runs the graph with oneDNN, much faster than dygraph
(README "Speed and deployment" and tools/benchmark.py give the measurements).

Paddle 3.3's oneDNN executor cannot run the ``bilinear_interp`` op of a PIR
program (PaddlePaddle/Paddle#79749), which YOLACT's FPN and ProtoNet use, so
:func:`export_yolact` switches the network's :class:`yolact.Resize` layers to
two matrix products while tracing (and back); the results agree with the op to
float rounding. :func:`cached_export` exports once per weights file, config and
Paddle version into a cache folder; :func:`export_onnx` writes an ONNX file
(paddle2onnx) run by :class:`OnnxYolact` (onnxruntime).
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Tuple

import numpy as np
import paddle

from layers.compat import PADDLE_VERSION, enable_onednn, predictor_run
from utils.errors import ConfigError, MissingFileError, OutputError
from utils.files import atomic_write, staging_folder
from utils.weights.loader import require_weights_file
from utils.runtime import dygraph_threads_restored, predictor_cpu_threads
from yolact import Resize

logger = logging.getLogger(__name__)

# Output order of the exported network (a static graph has positional outputs only).
OUTPUT_KEYS = ('loc', 'conf', 'mask', 'priors', 'proto')
META_SUFFIX = '.yolact.json'
MASKIOU_SUFFIX = '_maskiou'


@dataclasses.dataclass(frozen=True)
class ExportMeta:
    """``<prefix>.yolact.json``, what an export records beside its graph (written and read only here).

    config: the config name; max_size: S of the [batch_size, 3, S, S] input;
    format: 'paddle' or 'onnx'; num_classes: with background; class_names: the
    C - 1 names; outputs: the graph's outputs in order (:data:`OUTPUT_KEYS`);
    maskiou: whether a ``<prefix>_maskiou`` mask-IoU net goes with it.
    """
    config: str
    max_size: int
    batch_size: int
    format: str
    num_classes: int
    class_names: Tuple[str, ...]
    outputs: Tuple[str, ...]
    maskiou: bool

    def write(self, path_prefix):
        data = dataclasses.asdict(self)
        data.update(class_names=list(self.class_names), outputs=list(self.outputs))
        with open(path_prefix + META_SUFFIX, 'w') as f:
            json.dump(data, f, indent=2)

    @classmethod
    def read(cls, path_prefix):
        """The metadata of the export ``path_prefix``; MissingFileError when there is none."""
        path = path_prefix + META_SUFFIX
        if not os.path.isfile(path):
            raise MissingFileError(f'{path!r} not found: is {path_prefix!r} the prefix of a model '
                                   'written by tools/export_model.py?')
        with open(path) as f:
            data = json.load(f)
        data.update(class_names=tuple(data['class_names']), outputs=tuple(data['outputs']))
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


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
        the ExportMeta written to ``<path_prefix>.yolact.json``.

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
    leaky = _leaky_relu_as_maximum(net) if export_format == 'onnx' else contextlib.nullcontext()
    with _resize_as_matmul(net), leaky:
        paddle.jit.save(_ForwardOutputs(net), path_prefix, input_spec=[
            paddle.static.InputSpec([batch_size, 3, size, size], 'float32', 'x')])
    has_maskiou = getattr(net, 'maskiou_net', None) is not None
    if has_maskiou:
        # The number of masks varies per image; the side is the prototypes' (138 at 550).
        paddle.jit.save(net.maskiou_net, path_prefix + MASKIOU_SUFFIX, input_spec=[
            paddle.static.InputSpec([None, 1, None, None], 'float32', 'masks')])
    meta = ExportMeta(config=cfg.name, max_size=size, batch_size=batch_size, format=export_format,
                      num_classes=cfg.num_classes, class_names=tuple(cfg.dataset.class_names),
                      outputs=OUTPUT_KEYS, maskiou=has_maskiou)
    meta.write(path_prefix)
    return meta


def _staging_folder(path_prefix):
    """A utils.files.staging_folder beside ``path_prefix`` (moves from it are atomic), removed on exit."""
    return staging_folder(os.path.dirname(os.path.abspath(path_prefix)), '.export-', 'the export')


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
        if meta.maskiou:
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


# Part of every cache key: bump it when the exported graph, the predictor's
# options or the check of a new entry change for the same weights and config
# (2: entries carry a file list and passed the child-process check).
CACHE_FORMAT = 2
_PARTIAL = '.partial-'
# In an entry: every file's size, mtime and SHA-256, written when it is complete.
FILES_SUFFIX = '.files.json'
# Beside an entry's name: the verdict of an export that failed its check.
FAILED_SUFFIX = '.failed.json'
# The first-use check runs the export in a child process; a hang there is a failure too.
CHECK_TIMEOUT = 900


def default_cache_dir():
    """Where :func:`cached_export` keeps exports: ``$YOLACT_CACHE``, else ``~/.cache/yolact/exported``."""
    return os.environ.get('YOLACT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'yolact', 'exported')


def export_cache_key(cfg, weights_path, batch_size=1):
    """Hex key of an export: the weights file's content, the config, the class count, Paddle's version.

    The config is the frozen dataclass's repr, so any field (input size,
    anchors, head layout) changes the key; the weights enter by a SHA-256 of
    their bytes, not their name or date.
    """
    parts = {'weights': _sha256(require_weights_file(weights_path)), 'config': repr(cfg),
             'num_classes': cfg.num_classes,
             'paddle': paddle.__version__, 'batch_size': batch_size, 'format': CACHE_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def cached_export(load_net, cfg, weights_path, cache_dir=None, batch_size=1):
    """The prefix of the cached export of ``weights_path`` for ``cfg``, exporting it on first use; or None.

    Args:
        load_net: no arguments -> a ``Yolact`` for ``cfg`` with the weights of
            ``weights_path`` loaded; called only when the entry is missing, so a
            cache hit builds no network. The caller may call it again for the
            same network (e.g. ``functools.cache``d) when None is returned.
        cfg: its YolactConfig.
        weights_path: the file those weights came from (its bytes enter the key).
        cache_dir: default :func:`default_cache_dir`.
        batch_size: as for :func:`export_yolact`.
    Returns:
        ``<cache_dir>/<config>-<key>/<config>``, a prefix for :class:`StaticYolact`;
        None when the export failed its check: run the dygraph network instead
        (a warning names the cause).

    A new export becomes an entry only after it has proven itself
    (:func:`check_export`: Paddle Inference runs it in a child process, so a
    crash there cannot take this process down, on a fixed input, against the
    network it came from). A failed check is remembered in
    ``<entry>.failed.json`` and not repeated; the key holds Paddle's version,
    so another Paddle checks again. An entry records every file's size and
    SHA-256 (``<config>.files.json``): a damaged entry (truncated, edited,
    missing file) is found on the next use and exported again.

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
    failed = _read_verdict(entry + FAILED_SUFFIX)
    if failed is not None:
        _warn_check_failed(cfg, failed, entry + FAILED_SUFFIX)
        return None
    if os.path.lexists(entry):
        problem = _entry_problem(prefix)
        if problem is None:
            logger.info('using the cached export %s', entry)
            return prefix
        logger.warning('the cached export %s is damaged (%s); exporting it again', entry, problem)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _remove_dead_partials(cache_dir)
    except OSError as e:
        raise OutputError(f'cannot write the export cache {cache_dir}: {e.strerror}') from e
    with staging_folder(cache_dir, f'{_PARTIAL}{socket.gethostname()}-{os.getpid()}-', 'the export cache') as stage:
        net = load_net()
        stage_prefix = os.path.join(stage, cfg.name)
        _save_static(net, cfg, stage_prefix, batch_size)
        cause = check_export(net, stage_prefix)
        if cause is not None:
            _write_verdict(entry + FAILED_SUFFIX, cause)
            _warn_check_failed(cfg, {'cause': cause}, entry + FAILED_SUFFIX)
            return None
        _write_file_list(stage_prefix)
        if os.path.lexists(entry):
            _discard(entry, cache_dir)
        try:
            os.rename(stage, entry)
        except OSError:
            if _entry_problem(prefix) is not None:
                raise
            logger.info('%s was exported concurrently; using that copy', entry)
    logger.info('exported %s (%dx%d, batch %d) to the cache %s', cfg.name, cfg.max_size, cfg.max_size,
                batch_size, entry)
    return prefix


def _warn_check_failed(cfg, verdict, path):
    logger.warning('the Paddle Inference export of %s failed its check on Paddle %s (%s): running the dygraph '
                   'network instead, slower on a CPU (verdict kept in %s; another Paddle version checks again)',
                   cfg.name, paddle.__version__, verdict.get('cause', 'no cause recorded'), path)


def _write_verdict(path, cause):
    """Write a failed check's verdict atomically."""
    verdict = {'cause': cause, 'paddle': paddle.__version__, 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}
    atomic_write(path, json.dumps(verdict, indent=2))


def _read_verdict(path):
    """A failed check's verdict dict, or None (none, or unreadable: then the check runs again)."""
    try:
        with open(path) as f:
            verdict = json.load(f)
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) else None


def _write_file_list(path_prefix):
    """Record size, mtime and SHA-256 of every file of the export ``path_prefix`` in its FILES_SUFFIX file."""
    folder = os.path.dirname(path_prefix)
    files = {}
    for name in sorted(os.listdir(folder)):
        stat = os.stat(os.path.join(folder, name))
        files[name] = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
                       'sha256': _sha256(os.path.join(folder, name))}
    with open(path_prefix + FILES_SUFFIX, 'w') as f:
        json.dump(files, f, indent=1)


def _entry_problem(path_prefix):
    """What is wrong with the cache entry of ``path_prefix`` (a short phrase), or None when it is intact.

    Sizes are compared on every use; a file's SHA-256 only when its mtime
    differs from the recorded one, so an intact entry costs no reading.
    """
    folder = os.path.dirname(path_prefix)
    try:
        with open(path_prefix + FILES_SUFFIX) as f:
            files = json.load(f)
        if not isinstance(files, dict) or not files:
            raise ValueError
    except (OSError, ValueError):
        return f'no valid {os.path.basename(path_prefix) + FILES_SUFFIX}'
    for name, record in files.items():
        path = os.path.join(folder, name)
        try:
            stat = os.stat(path)
            if stat.st_size != record['size']:
                return f'{name} has {stat.st_size} bytes, {record["size"]} were written'
            if stat.st_mtime_ns != record['mtime_ns'] and _sha256(path) != record['sha256']:
                return f'{name} was modified'
        except FileNotFoundError:
            return f'{name} is missing'
        except (OSError, KeyError, TypeError) as e:
            return f'{name} cannot be checked ({e})'
    return None


def _discard(entry, cache_dir):
    """Remove a damaged entry: renamed to a partial name first, so no reader sees it half-deleted."""
    doomed = tempfile.mkdtemp(prefix=f'{_PARTIAL}{socket.gethostname()}-{os.getpid()}-', dir=cache_dir)
    try:
        os.rename(entry, os.path.join(doomed, 'entry'))
    except OSError:
        pass   # another process replaced or removed it first
    shutil.rmtree(doomed, ignore_errors=True)


# The check of a new export, run in a child process (argv: project root, export prefix,
# .npz of the input and the expected outputs); see check_export.
_CHECK_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from utils.deploy.inference import _compare_export_outputs
problem = _compare_export_outputs(sys.argv[2], sys.argv[3])
if problem:
    print(problem)
    sys.exit(3)
"""
# utils/deploy/inference.py -> the project root.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_export(net, path_prefix):
    """Run the export ``path_prefix`` of ``net`` in a child process on a fixed input; None if it agrees.

    The child creates the CPU predictor the way :class:`StaticYolact` does by
    default (oneDNN) and compares its outputs, and the mask-IoU net's, with
    ``net``'s on the same input. Returns the cause of a failure as a short
    phrase: a crash (the signal), an error (its last line), a timeout, or the
    first output that differs.
    """
    meta = ExportMeta.read(path_prefix)
    rng = np.random.RandomState(0)
    size = meta.max_size
    arrays = {'x': rng.standard_normal([meta.batch_size, 3, size, size]).astype(np.float32)}
    with paddle.no_grad():
        out = net(paddle.to_tensor(arrays['x']))
        arrays.update({f'out_{k}': out[k].numpy() for k in meta.outputs})
        if meta.maskiou:
            side = arrays['out_proto'].shape[1]
            arrays['masks'] = (rng.rand(2, 1, side, side) > 0.5).astype(np.float32)
            arrays['out_maskiou'] = net.maskiou_net(paddle.to_tensor(arrays['masks'])).numpy()
    with tempfile.TemporaryDirectory(prefix='.check-', dir=os.path.dirname(path_prefix)) as folder:
        inputs = os.path.join(folder, 'check.npz')
        np.savez(inputs, **arrays)
        command = [sys.executable, '-c', _CHECK_CHILD, _PROJECT_ROOT, path_prefix, inputs]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f'Paddle Inference did not finish within {CHECK_TIMEOUT} s'
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        return f'Paddle Inference crashed with {_signal_name(-result.returncode)} running the export'
    if result.returncode == 3 and result.stdout.strip():
        return result.stdout.strip().splitlines()[-1]
    lines = [line.strip() for line in _strip_ansi(result.stdout + result.stderr).splitlines() if line.strip()]
    last = lines[-1][:300] if lines else f'exit status {result.returncode}'
    return f'Paddle Inference failed running the export: {last}'


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f'signal {number}'


def _compare_export_outputs(path_prefix, inputs_path):
    """In check_export's child: the first output of the export that differs from the expected one, or None.

    Agreement: every value finite and within 1e-3 x (1 + the output's largest
    magnitude). Float reordering in oneDNN's kernels moves YOLACT's outputs by
    ~1e-5; a broken graph (a wrong fusion, a lost attribute) by far more.
    """
    with np.load(inputs_path) as z:
        arrays = {k: z[k] for k in z.files}
    runner = StaticYolact(path_prefix)
    got = {k: v.numpy() for k, v in runner(arrays['x']).items()}
    if runner.maskiou_net is not None:
        got['maskiou'] = runner.maskiou_net(paddle.to_tensor(arrays['masks'])).numpy()
    for key in sorted(k[len('out_'):] for k in arrays if k.startswith('out_')):
        expected, value = arrays['out_' + key], got.get(key)
        if value is None or value.shape != expected.shape:
            return f'output {key} has shape {None if value is None else value.shape}, expected {expected.shape}'
        bound = 1e-3 * (1 + float(np.abs(expected).max(initial=0)))
        if not np.isfinite(value).all():
            return f'output {key} is not finite'
        worst = float(np.abs(value - expected).max(initial=0))
        if worst > bound:
            return f'output {key} differs from dygraph by {worst:.3g} (allowed {bound:.3g})'
    return None


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


class _MaximumLeakyReLU(paddle.nn.Layer):
    """LeakyReLU with a slope in [0, 1] as ``maximum(x, slope * x)``: no leaky_relu op in the graph."""

    def __init__(self, negative_slope):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return paddle.maximum(x, x * self.negative_slope)


@contextlib.contextmanager
def _leaky_relu_as_maximum(net):
    """While tracing for ONNX, ``net``'s LeakyReLU layers are replaced by :class:`_MaximumLeakyReLU` (and back).

    paddle2onnx 2.1 reads the leaky_relu op's negative_slope, a double in
    Paddle 3.3's programs, as a float: the ONNX LeakyRelu nodes got alpha NaN
    or 0.014 instead of 0.1 (DarkNet-53: every output NaN). Max and Mul carry
    the slope as a tensor. Nothing outside ``net`` changes.
    """
    swapped = []
    for parent in net.sublayers(include_self=True):
        for name, child in parent.named_children():
            # LeakyReLU keeps its slope in a private attribute; it has no public accessor.
            if isinstance(child, paddle.nn.LeakyReLU) and 0 <= child._negative_slope <= 1:
                swapped.append((parent, name, child))
    for parent, name, child in swapped:
        setattr(parent, name, _MaximumLeakyReLU(child._negative_slope))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _model_file(path_prefix):
    """The graph file of an export: ``.json`` (PIR, Paddle >= 3) or ``.pdmodel`` (older programs)."""
    for ext in ('.json', '.pdmodel'):
        if os.path.isfile(path_prefix + ext):
            return path_prefix + ext
    raise MissingFileError(f'no {path_prefix}.json or {path_prefix}.pdmodel found')


# Paddle 3.3's oneDNN pass fusing conv2d + activation reads leaky_relu's
# negative_slope as a float attribute, but the op holds a double: building the
# fused op dereferences a null attribute (SIGSEGV in FusedConv2dOp::Build while
# the predictor is created). DarkNet-53's conv + BN + LeakyReLU(0.1) blocks hit
# it. Graphs with leaky_relu skip that pass only, so the other configs keep
# every fusion. Paddle runs its oneDNN CPU passes even without enable_onednn().
# The pass is listed as ``conv_activation_onednn_fuse_pass`` (its log name is
# ``conv_activation_mkldnn_fuse_pass``, which delete_pass does not match).
_LEAKY_RELU_CRASHING_PASSES = ('conv_activation_onednn_fuse_pass',)


def _crashing_cpu_passes(path_prefix):
    """The CPU passes to delete for the graph of ``path_prefix`` (see _LEAKY_RELU_CRASHING_PASSES).

    Looks for the op's name in the graph file (a PIR ``.json`` or a ``.pdmodel``
    protobuf both store op names as plain text).
    """
    with open(_model_file(path_prefix), 'rb') as f:
        return _LEAKY_RELU_CRASHING_PASSES if b'leaky_relu' in f.read() else ()


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
        for name in _crashing_cpu_passes(path_prefix):
            config.delete_pass(name)
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
        self.meta = ExportMeta.read(path_prefix)
        options = dict(device=device, num_threads=num_threads, use_onednn=use_onednn,
                       use_tensorrt=use_tensorrt, gpu_id=gpu_id)
        self.predictor = create_predictor(path_prefix, **options)
        self.maskiou_net = None
        if self.meta.maskiou:
            maskiou = create_predictor(path_prefix + MASKIOU_SUFFIX, onednn_cache_capacity=16, **options)
            self.maskiou_net = ExportedMaskIoU(lambda masks: _run(maskiou, masks)[0], self.meta.num_classes,
                                               tensors=True)
        logger.info('loaded exported %s from %s (%s%s)', self.meta.config, path_prefix, device,
                    ', oneDNN' if device == 'cpu' and use_onednn else '')

    def __call__(self, x):
        return dict(zip(self.meta.outputs, _run(self.predictor, x)))


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
