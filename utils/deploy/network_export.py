"""Export of the YOLACT network as a static graph with ``paddle.jit.save``, and the export's file layout.

Only the network is exported: ``Detect`` and ``postprocess`` stay in Python
and work unchanged on the outputs of :class:`utils.deploy.runners.StaticYolact`,
which returns the same dict as ``Yolact.forward`` in eval mode. An export
``<prefix>`` consists of

* ``<prefix>.json`` (or ``.pdmodel``) + ``<prefix>.pdiparams``: the network,
  input ``x`` [B, 3, S, S] float32 preprocessed, outputs in :data:`OUTPUT_KEYS` order
  (an ONNX export, utils.deploy.onnx_export: ``<prefix>.onnx`` instead);
* ``<prefix>_maskiou.*`` (YOLACT++ only): the mask-IoU net, [N, 1, h, w] prototype-sized masks -> [N, C-1];
* ``<prefix>.yolact.json``: which config and input size the export was made for.

On CPU Paddle Inference runs the graph with oneDNN, much faster than dygraph
(docs/performance.md and tools/benchmark.py give the measurements).
The network is traced with the rewrites of utils.deploy.graph_rewrites
(bilinear resizes as matrix products: Paddle 3.3's oneDNN executor cannot run
the ``bilinear_interp`` op of a PIR program, PaddlePaddle/Paddle#79749).
"""
import contextlib
import dataclasses
import json
import logging
import os
from typing import Tuple

import paddle

from utils.deploy.graph_rewrites import leaky_relu_as_maximum, resize_as_matmul
from utils.errors import ConfigError, MissingFileError
from utils.files import staging_folder

logger = logging.getLogger(__name__)

# Output order of the exported network (a static graph has positional outputs only).
OUTPUT_KEYS = ('loc', 'conf', 'mask', 'priors', 'proto')
META_SUFFIX = '.yolact.json'
MASKIOU_SUFFIX = '_maskiou'
ONNX_SUFFIX = '.onnx'


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


# The prefix of a network-only export inside its folder (tools/export_model.py --network_only DIR).
NETWORK_PREFIX = 'model'
# The file that marks a whole-detector export (utils/deploy/detector_export.py).
DETECTOR_CONFIG = 'infer_cfg.yml'


def network_export_prefix(path):
    """The prefix of a network-only export given its folder or its prefix.

    ``DIR`` (written by ``tools/export_model.py --network_only --output_dir DIR``)
    -> ``DIR/model``; a prefix is returned as it is. A whole-detector export's
    folder (``infer_cfg.yml``, no network metadata) is refused with one line:
    it runs without this project's post-processing (deploy/python/infer.py).
    """
    if not os.path.isdir(path):
        return path
    prefix = os.path.join(path, NETWORK_PREFIX)
    if not os.path.isfile(prefix + META_SUFFIX) and os.path.isfile(os.path.join(path, DETECTOR_CONFIG)):
        raise ConfigError(f'{path} is a whole-detector export ({DETECTOR_CONFIG}): run it with '
                          'deploy/python/infer.py; eval.py --inference_model and Predictor.from_exported take a '
                          'network export (tools/export_model.py --network_only)')
    return prefix


def model_file(path_prefix):
    """The graph file of an export: ``.json`` (PIR, Paddle >= 3) or ``.pdmodel`` (older programs)."""
    for ext in ('.json', '.pdmodel'):
        if os.path.isfile(path_prefix + ext):
            return path_prefix + ext
    raise MissingFileError(f'no {path_prefix}.json or {path_prefix}.pdmodel found')


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
    with export_staging_folder(path_prefix) as stage:
        meta = save_static(net, cfg, os.path.join(stage, 'model'), batch_size)
        move_export(os.path.join(stage, 'model'), path_prefix)
    logger.info('exported %s (%dx%d, batch %d) to %s', cfg.name, cfg.max_size, cfg.max_size, batch_size,
                path_prefix)
    return meta


def save_static(net, cfg, path_prefix, batch_size, export_format='paddle'):
    """paddle.jit.save of the network (and mask-IoU net) plus the metadata file, in place.

    export_format 'onnx' also traces LeakyReLU as a maximum (see
    utils.deploy.graph_rewrites.leaky_relu_as_maximum) for paddle2onnx.
    """
    net.eval()
    size = cfg.max_size
    leaky = leaky_relu_as_maximum(net) if export_format == 'onnx' else contextlib.nullcontext()
    with resize_as_matmul(net), leaky:
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


def export_staging_folder(path_prefix):
    """A utils.files.staging_folder beside ``path_prefix`` (moves from it are atomic), removed on exit."""
    return staging_folder(os.path.dirname(os.path.abspath(path_prefix)), '.export-', 'the export')


def move_export(source_prefix, path_prefix):
    """Move every ``<source_prefix>*`` file to ``<path_prefix>*``, the metadata file last."""
    folder, base = os.path.split(source_prefix)
    names = sorted(n for n in os.listdir(folder) if n.startswith(base))
    names.sort(key=lambda n: n.endswith(META_SUFFIX))
    for name in names:
        os.replace(os.path.join(folder, name), path_prefix + name[len(base):])
