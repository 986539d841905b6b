"""The convolutions of CPU training through oneDNN's direct convolution (a Paddle custom op).

Paddle's dygraph convolution on the CPU is im2col + MKL GEMM, and dygraph
reaches none of the oneDNN kernels the Paddle wheel ships. For the 3x3 convs
of a training step that is 1.4-2.1x the time of oneDNN's direct convolution,
which PyTorch uses (Intel Xeon, 1 thread, forward + backward, batch 2:
256 -> 256 channels at 69x69 246 ms against 166 ms; 64 -> 64 at 138x138
128 ms against 60 ms).

``cpu_ops.cc`` (beside this file) is the op ``cpu_conv2d``: conv + bias on
Paddle's own ``libdnnl.so.3``. It is compiled once per Paddle version, on
first use, into ``$YOLACT_CACHE/ops`` (default ``~/.cache/yolact/ops``), with
the oneDNN headers of the pip package ``onednn-devel-cpu-gomp`` (pinned in
requirements-cpu-ops.txt, which tools/setup.sh installs).

The model (yolact.py, backbone.py) computes plain convolutions and knows
nothing of this module: :func:`use_cpu_training_convolutions` swaps it in
from the training side (the Trainer, tools/benchmark.py --train), replacing
the ``forward`` and ``convolve`` of the network's ``backbone.Conv2D`` layers,
as export switches the network's Resize layers.

:func:`conv2d` takes the op only while training on the CPU: dygraph,
float32, gradients being recorded for an input, groups 1 and a kernel
larger than 1x1 (a 1x1 conv is a plain GEMM in Paddle, faster than
oneDNN's with its layout reorders). Everything else, inference and exports
included, is ``F.conv2d``. The two agree to float rounding
(tests/test_cpu_ops.py). The op is an optimisation: when it cannot be built
or loaded (no compiler, no headers, a Paddle without ``libdnnl.so.3``, a
read-only or full cache folder) one warning names the cause and training
goes on with ``F.conv2d``; a built op that no longer loads is rebuilt.
"""
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time

import paddle
import paddle.nn.functional as F

from backbone import Conv2D

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_ops.cc')
# requirements-cpu-ops.txt pins it (oneDNN 3.2's headers; oneDNN keeps its ABI within a major version).
HEADERS_PACKAGE = 'onednn-devel-cpu-gomp'
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIREMENTS = os.path.join(_ROOT, 'requirements-cpu-ops.txt')
INSTALL_HINT = f'pip install --no-deps -r {REQUIREMENTS}'
_MODULE_NAME = 'yolact_cpu_ops'


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` for NCHW tensors.

    Args:
        x: [B, C, H, W].
        weight: [O, C / groups, kh, kw].
        bias: [O] (any shape of O values) or None.
        stride, padding, dilation: an int or a pair (symmetric padding).
    Returns:
        [B, O, H', W'].

    While training on the CPU: ``cpu_conv2d``. Otherwise ``F.conv2d``; on the
    CPU with a batch of more than one, its bias is added by
    :func:`add_channel_bias` instead of Paddle's broadcast.
    """
    pairs = [_pair(v) for v in (stride, padding, dilation)]
    if None not in pairs and _trains_on_cpu(x, weight) and groups == 1 and weight.shape[2] * weight.shape[3] > 1:
        ops = load_ops()
        if ops is not None:
            b = paddle.zeros([weight.shape[0]], weight.dtype) if bias is None else bias.reshape([-1])
            return ops.cpu_conv2d(x, weight, b, *pairs, not x.stop_gradient)
    # Paddle's conv broadcasts its bias over [B, C, H, W], an order of magnitude slower on the CPU than
    # add_channel_bias for B > 1 (2x256x69x69: 22 ms against 1.1 ms, AMD EPYC, 2026-11-21). For B = 1 the
    # broadcast is the faster; static graphs (tools/export_model.py) and GPUs keep the plain conv, whose
    # conv + add passes fuse.
    if bias is None or x.shape[0] == 1 or not paddle.in_dynamic_mode() or not x.place.is_cpu_place():
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return add_channel_bias(
        F.conv2d(x, weight, None, stride=stride, padding=padding, dilation=dilation, groups=groups), bias)


def add_channel_bias(x, bias):
    """x [B, C, H, W] + bias (C values, any shape) per channel, through a [B, C, H*W] + [C, 1] add on the CPU.

    Paddle 3.3.1's CPU add broadcasting a [1, C, 1, 1] tensor over the middle
    axes is slow; broadcasting over the last axis is not (1 thread, 2x256x69x69:
    12.8 ms broadcast, 7.9-10.2 ms with the bias expanded to full size first,
    5.4-5.8 ms this way; with the bias's gradient, forward + backward 41, 27 and
    14 ms). Same sums, so the same result. For CPU tensors (:func:`conv2d` calls it on the CPU only).
    """
    b, c, h, w = x.shape
    return (x.reshape([b, c, h * w]) + bias.reshape([c, 1])).reshape([b, c, h, w])


def use_cpu_training_convolutions(net):
    """Route the convolutions of ``net``'s ``backbone.Conv2D`` layers through :func:`conv2d`.

    Replaces each such layer's ``forward`` (its own kernel and bias) and
    ``convolve`` (a computed kernel: a frozen BatchNorm folded in, the fused
    heads) by :func:`conv2d` with the layer's geometry: the oneDNN op while
    training on the CPU, ``F.conv2d`` otherwise, so the same network also
    validates and runs on a GPU unchanged. Other layers keep theirs (the
    deformable convolution's offset conv is a plain ``nn.Conv2D``).

    Returns a function that restores the layers' own methods.
    """
    layers = [layer for layer in net.sublayers(include_self=True)
              if isinstance(layer, Conv2D) and layer._data_format == 'NCHW' and layer._padding_mode == 'zeros']
    for layer in layers:
        layer.forward = functools.partial(_forward, layer)
        layer.convolve = functools.partial(_convolve, layer)

    def restore():
        for layer in layers:
            for name in ('forward', 'convolve'):
                layer.__dict__.pop(name, None)
    return restore


@contextlib.contextmanager
def cpu_training_convolutions(net):
    """:func:`use_cpu_training_convolutions` for the ``with`` block; the layers' own methods after it."""
    restore = use_cpu_training_convolutions(net)
    try:
        yield net
    finally:
        restore()


def _forward(layer, x):
    return conv2d(x, layer.weight, layer.bias, layer._stride, layer._padding, layer._dilation, layer._groups)


def _convolve(layer, x, weight, bias):
    return conv2d(x, weight, bias, layer._stride, layer._padding, layer._dilation, layer._groups)


def _trains_on_cpu(*tensors):
    """Dygraph with gradients recorded for one of ``tensors``, all float32 on the CPU."""
    return (paddle.in_dynamic_mode() and paddle.is_grad_enabled()
            and not all(t.stop_gradient for t in tensors)
            and all(t.place.is_cpu_place() and t.dtype == paddle.float32 for t in tensors))


def _pair(value):
    """[a, b] from an int or a pair; None for anything else (asymmetric or string padding)."""
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def ops_cache_dir():
    """``$YOLACT_CACHE/ops``, else ``~/.cache/yolact/ops``: where the compiled op is kept."""
    root = os.environ.get('YOLACT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'yolact')
    return os.path.join(root, 'ops')


@functools.lru_cache(maxsize=None)
def load_ops():
    """The compiled module (its op ``cpu_conv2d``), or None (warned once).

    Built on the first call of a Paddle version (about 10 s on a 2-core AMD EPYC), loaded from the
    cache after that. A file lock lets concurrent processes (data-parallel
    training) wait for one build.
    """
    try:
        return _build_and_load()
    except OpUnavailable as e:
        logger.warning("CPU training uses Paddle's own convolution (1.2-1.5x slower): %s", e)
        return None


class OpUnavailable(Exception):
    """Why the op cannot be built or loaded here."""


def _build_and_load():
    if not sys.platform.startswith('linux'):
        raise OpUnavailable(f'the op is built on Linux only, not {sys.platform}')
    libdnnl = os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libdnnl.so.3')
    if not os.path.isfile(libdnnl):
        raise OpUnavailable(f'this Paddle has no {libdnnl}')
    if shutil.which(os.environ.get('CXX', 'c++')) is None and shutil.which('g++') is None:
        raise OpUnavailable('no C++ compiler (c++ or g++) on PATH')
    include = _headers()
    cache = ops_cache_dir()
    build_dir, key = build_folder()
    try:
        os.makedirs(build_dir, exist_ok=True)
        with _locked(build_dir + '.lock'):
            return _build_or_load(build_dir, include, libdnnl, key)
    except OSError as e:   # the cache folder's: read-only, full, not a folder ... (the compiler's are OpUnavailable)
        raise OpUnavailable(f'the op cache folder {cache} cannot be written ({e.strerror or e}); '
                            'set YOLACT_CACHE to a writable folder') from None


def build_folder():
    """(the op's build folder in :func:`ops_cache_dir`, its key): one per source and Paddle build."""
    with open(SOURCE, 'rb') as f:
        source = f.read()
    key = hashlib.sha256(source + paddle.__version__.encode() + paddle.version.commit.encode()).hexdigest()[:16]
    return os.path.join(ops_cache_dir(), f'cpu_ops-{paddle.__version__}-{key}'), key


def _build_or_load(build_dir, include, libdnnl, key):
    """The module from ``build_dir``, built first when it is not; a damaged build is rebuilt once.

    ``done`` records the built libraries' SHA-256: a library that differs (a truncated write, a full
    disk) is never loaded, since loading one can kill the process (SIGBUS under Paddle 2.6); a build
    that matches but no longer loads (a changed system library) is rebuilt too.
    """
    done = os.path.join(build_dir, 'done')
    built = os.path.isfile(done)
    problem = _damage(build_dir, done) if built else None
    if problem is not None:
        logger.warning('the oneDNN convolution op in %s is damaged (%s): building it again', build_dir, problem)
        built = _clear(build_dir)
    start = time.time()
    if not built:
        logger.info('building the oneDNN convolution op in %s (once per Paddle version)', build_dir)
    try:
        module = _compile(build_dir, include, libdnnl)
    except OpUnavailable as e:
        if not built:
            raise
        # The compiler's up-to-date check does not see why a build stopped loading: the folder goes.
        logger.warning('the oneDNN convolution op in %s does not load (%s): building it again', build_dir, e)
        built = _clear(build_dir)
        start = time.time()
        module = _compile(build_dir, include, libdnnl)
    if not built:
        record = {'paddle': paddle.__version__, 'key': key, 'libraries': _library_digests(build_dir)}
        with open(done, 'w') as f:
            json.dump(record, f, indent=1)
        logger.info('oneDNN convolution op built in %.1f s', time.time() - start)
    return module


def _library_digests(build_dir):
    """{path relative to build_dir: SHA-256} of every shared library below ``build_dir``."""
    digests = {}
    for folder, _, names in os.walk(build_dir):
        for name in sorted(names):
            if name.endswith('.so'):
                path = os.path.join(folder, name)
                with open(path, 'rb') as f:
                    digests[os.path.relpath(path, build_dir)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _damage(build_dir, done):
    """What is wrong with a finished build (a short phrase), or None when its libraries are as built."""
    try:
        with open(done) as f:
            expected = json.load(f)['libraries']
    except (OSError, ValueError, KeyError, TypeError):
        return 'its record of the built libraries is missing or unreadable'
    found = _library_digests(build_dir)
    if not expected or found != expected:
        changed = sorted(set(expected) ^ set(found) | {k for k in expected if found.get(k) != expected[k]})
        return f"{', '.join(changed) or 'no library'} differs from what was built"
    return None


def _clear(build_dir):
    """Empty ``build_dir`` for a new build; returns False (nothing is built there now)."""
    shutil.rmtree(build_dir)
    os.makedirs(build_dir)
    return False


def _headers():
    """The include folder of oneDNN's headers (the pip package HEADERS_PACKAGE)."""
    from importlib import metadata

    try:
        files = metadata.files(HEADERS_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise OpUnavailable(f'the oneDNN headers are not installed ({INSTALL_HINT})') from None
    hpp = [f for f in files if str(f).replace('\\', '/').endswith('oneapi/dnnl/dnnl.hpp')]
    if not hpp:
        raise OpUnavailable(f'{HEADERS_PACKAGE} holds no oneapi/dnnl/dnnl.hpp ({INSTALL_HINT})')
    return os.path.dirname(os.path.dirname(os.path.dirname(str(hpp[0].locate()))))


@functools.lru_cache(maxsize=None)
def _compile(build_dir, include, libdnnl):
    """paddle.utils.cpp_extension.load of SOURCE (compiles only when the build is missing or stale).

    Once per process: Paddle 2.6's second load of a registered op returns a module without it.
    """
    from paddle.utils.cpp_extension import load

    log_path = os.path.join(build_dir, 'build.log')
    with _output_to(log_path):      # an OSError opening the log is the cache folder's (see _build_and_load)
        try:
            return load(name=_MODULE_NAME, sources=[SOURCE], build_directory=build_dir, verbose=False,
                        extra_cxx_cflags=['-O2', '-I' + include],
                        extra_ldflags=[libdnnl, '-Wl,-rpath,' + os.path.dirname(libdnnl)])
        except Exception as e:  # the compiler's or the loader's failure, whatever its type: say it, train on
            failure = f'{type(e).__name__}: {e}'
    raise OpUnavailable(f'building {SOURCE} failed ({failure}); see {log_path}')


@contextlib.contextmanager
def _output_to(path):
    """Send this process's stdout and stderr (file descriptors, so the compiler's too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, 'a') as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def _locked(path):
    import fcntl

    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
