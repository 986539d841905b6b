"""ONNX export of the YOLACT network through paddle2onnx, run by utils.deploy.runners.OnnxYolact (onnxruntime).

The network is first exported as by utils.deploy.network_export (bilinear
resizes as MatMul, LeakyReLU as Max), then converted by paddle2onnx in a
child process.
"""
import importlib.util
import logging
import os
import re
import subprocess
import sys

import paddle

from layers.compat import PADDLE_VERSION
from utils.deploy.child_process import strip_ansi
from utils.deploy.network_export import (MASKIOU_SUFFIX, META_SUFFIX, ONNX_SUFFIX, export_staging_folder,
                                         model_file, move_export, save_static)
from utils.errors import ConfigError

logger = logging.getLogger(__name__)

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


def export_onnx(net, cfg, path_prefix, batch_size=1):
    """Save a Yolact network (eval mode) as ``<path_prefix>.onnx`` for onnxruntime, through paddle2onnx.

    Writes ``<path_prefix>.onnx`` (input ``x`` [B, 3, S, S] float32
    preprocessed, outputs in OUTPUT_KEYS order), for YOLACT++
    ``<path_prefix>_maskiou.onnx``, and ``<path_prefix>.yolact.json``
    (``"format": "onnx"``); run them with utils.deploy.runners.OnnxYolact. The
    network is first exported as by utils.deploy.network_export.export_yolact
    (bilinear resizes as MatMul), then converted; all in a temporary folder,
    moved into place at the end. Raises ConfigError when paddle2onnx is not
    installed or cannot convert the graph (the message gives paddle2onnx's reason).
    """
    require_paddle2onnx()
    with export_staging_folder(path_prefix) as stage:
        paddle_prefix = os.path.join(stage, 'paddle')
        meta = save_static(net, cfg, paddle_prefix, batch_size, export_format='onnx')
        onnx_prefix = os.path.join(stage, 'model')
        _paddle2onnx(paddle_prefix, onnx_prefix + ONNX_SUFFIX, cfg.name)
        if meta.maskiou:
            _paddle2onnx(paddle_prefix + MASKIOU_SUFFIX, onnx_prefix + MASKIOU_SUFFIX + ONNX_SUFFIX,
                         cfg.name + ' mask-IoU net')
        os.replace(paddle_prefix + META_SUFFIX, onnx_prefix + META_SUFFIX)
        move_export(onnx_prefix, path_prefix)
    logger.info('exported %s as ONNX (%dx%d, batch %d) to %s%s', cfg.name, cfg.max_size, cfg.max_size,
                batch_size, path_prefix, ONNX_SUFFIX)
    return meta


def require_paddle2onnx():
    """ConfigError when paddle2onnx is missing or does not fit this Paddle; checked before any export work."""
    if importlib.util.find_spec('paddle2onnx') is None:
        raise ConfigError('ONNX export needs paddle2onnx, which is not installed (pip install paddle2onnx)')
    if PADDLE_VERSION < (3, 0) and not paddle2onnx_version().startswith('1.'):
        # paddle2onnx 2.x refuses to run on Paddle < 3; 1.x reads the .pdmodel programs of Paddle 2.6.
        raise ConfigError(f'paddle2onnx {paddle2onnx_version()} needs Paddle >= 3 (this is {paddle.__version__}); '
                          'with Paddle 2.6 install paddle2onnx 1.x: pip install "paddle2onnx>=1.3,<2"')


def _paddle2onnx(paddle_prefix, onnx_path, what):
    """Convert one exported Paddle graph to ONNX in a child process; ConfigError if it fails."""
    command = [sys.executable, '-c', _PADDLE2ONNX_CHILD, model_file(paddle_prefix),
               paddle_prefix + '.pdiparams', onnx_path, str(ONNX_OPSET)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.isfile(onnx_path):
        raise ConfigError(f'paddle2onnx {paddle2onnx_version()} cannot convert {what} to ONNX: '
                          f'{_paddle2onnx_reason(result.stdout + result.stderr, result.returncode)}')


def _paddle2onnx_reason(output, returncode):
    """paddle2onnx's own messages from a failed conversion's output, on one line."""
    progress = ('Start parsing', 'Use opset_version', 'is exported as ONNX')
    lines = [line.strip() for line in strip_ansi(output).splitlines() if line.strip()]
    messages = [re.sub(r'^(\[ERROR\])?\[Paddle2ONNX\]\s*', '', line) for line in lines
                if ('[Paddle2ONNX]' in line or '[ERROR]' in line or 'not supported' in line)
                and not any(p in line for p in progress)]
    if not messages:
        messages = [line for line in lines if 'error' in line.lower()][-1:] or [f'exit status {returncode}']
    return '; '.join(m.rstrip('.') for m in messages)


def paddle2onnx_version():
    """The installed paddle2onnx's version string."""
    from importlib.metadata import version
    return version('paddle2onnx')
