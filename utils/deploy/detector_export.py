"""Export the whole detector (layers.detector_graph.DetectorGraph) in PaddleDetection's deploy layout.

``export_detector(net, cfg, DIR)`` writes

* ``DIR/infer_cfg.yml``: PaddleDetection's deploy config (arch, Preprocess,
  label_list, mask: true, ...) plus this project's fields (config, input_size,
  top_k and the thresholds the graph was built with, output names);
* ``format='paddle'``: ``DIR/model.pdiparams`` and ``DIR/model.json`` (Paddle
  >= 3, PIR) or ``DIR/model.pdmodel`` (Paddle 2.6), for Paddle Inference;
* ``format='onnx'``: ``DIR/model.onnx`` (paddle2onnx), for onnxruntime.

Inputs ``image`` [B, 3, H, W] float32 RGB 0..255, ``im_shape`` [B, 2],
``scale_factor`` [B, 2]; outputs ``bbox`` [N, 6], ``bbox_num`` [B] int32,
``mask`` [N, H0, W0], ``mask_score`` [N] (see DetectorGraph). Everything is
written into a staging folder beside DIR and renamed to DIR at the end, so a
failed export leaves nothing under DIR; an existing DIR is replaced only when
it holds an earlier export (an ``infer_cfg.yml``).

:func:`run_paddle` and :func:`run_onnx` run an export on numpy inputs (tests,
tools/benchmark.py); the standalone runner deploy/python/infer.py needs none
of this project.
"""
import json
import logging
import os
import shutil

import numpy as np
import paddle

from layers.detector_graph import OUTPUTS, DetectorGraph
from utils.deploy import onnx_export
from utils.deploy.graph_rewrites import leaky_relu_as_maximum, resize_as_matmul
from utils.deploy.network_export import model_file as network_model_file
from utils.deploy.runners import create_onnx_session, create_predictor
from utils.errors import ConfigError, OutputError
from utils.files import staging_folder

logger = logging.getLogger(__name__)

CONFIG_FILE = 'infer_cfg.yml'
MODEL_PREFIX = 'model'
FORMATS = ('paddle', 'onnx')
INPUTS = ('image', 'im_shape', 'scale_factor')
# PaddleDetection's deploy/python/infer.py and deploy/third_engine/onnx/infer.py accept an arch only
# when one of their SUPPORT_MODELS names is a substring; 'SSD' is in both sets. The arch is not
# 'SOLOv2', 'PicoDet' or 'CLRNet', so infer.py runs its generic Detector, which reads output 2 as
# the masks because of `mask: true`.
ARCH = 'YOLACT_SSD'
# Only uint8 -> float32 (NormalizeImage with is_scale false and norm_type none changes no value) and
# HWC -> CHW: the resize and the normalisation are inside the graph (PyTorch's sample positions).
PREPROCESS = (
    {'type': 'NormalizeImage', 'mean': [0.0, 0.0, 0.0], 'std': [1.0, 1.0, 1.0], 'is_scale': False,
     'norm_type': 'none'},
    {'type': 'Permute'},
)


def export_detector(net, cfg, output_dir, export_format='paddle', batch_size=1, mask_dtype='int32',
                    max_detections=None, score_threshold=0.0, use_fast_nms=True, use_cross_class_nms=False,
                    draw_threshold=0.5):
    """Write the whole-detector export of ``net`` (eval mode, weights loaded) for ``cfg`` into ``output_dir``.

    Args:
        export_format: 'paddle' (Paddle Inference) or 'onnx' (onnxruntime, through paddle2onnx).
        batch_size: B, fixed in the graph (each image's detections are computed separately).
        mask_dtype: 'int32' (PaddleDetection's) or 'uint8'.
        max_detections: at most this many detections per image (default: the
            config's max_num_detections); bounds the [N, H0, W0] mask output.
        score_threshold: the graph drops detections scoring <= it (default 0: none).
        use_fast_nms, use_cross_class_nms: as eval.py's --fast_nms / --cross_class_nms;
            traditional NMS is refused (ConfigError).
        draw_threshold: the yml's score threshold for drawing (clients' display only).
    Returns:
        the dict written to infer_cfg.yml.
    Raises:
        ConfigError (traditional NMS, no paddle2onnx, an op paddle2onnx cannot
        convert), OutputError (output_dir cannot be written or is not an export).
    """
    if export_format not in FORMATS:
        raise ConfigError(f'export format must be one of {FORMATS}, got {export_format!r}')
    if export_format == 'onnx':
        onnx_export.require_paddle2onnx()
    overrides = dict(mask_dtype=mask_dtype, score_threshold=score_threshold)
    if max_detections is not None:
        overrides['max_num_detections'] = max_detections
    try:
        graph = DetectorGraph.from_config(net, cfg, use_fast_nms=use_fast_nms,
                                          use_cross_class_nms=use_cross_class_nms, **overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    graph.eval()
    output_dir = os.path.abspath(output_dir)
    _check_replaceable(output_dir)
    parent = os.path.dirname(output_dir)
    with staging_folder(parent, '.' + os.path.basename(output_dir) + '.export-', 'the export') as stage:
        folder = os.path.join(stage, 'out')
        os.makedirs(folder)
        if export_format == 'paddle':
            _save_graph(graph, net, os.path.join(folder, MODEL_PREFIX), batch_size, onnx=False)
        else:
            work = os.path.join(stage, 'paddle')
            os.makedirs(work)
            _save_graph(graph, net, os.path.join(work, MODEL_PREFIX), batch_size, onnx=True)
            onnx_path = os.path.join(folder, MODEL_PREFIX + '.onnx')
            onnx_export._paddle2onnx(os.path.join(work, MODEL_PREFIX), onnx_path, cfg.name)
            _name_onnx_outputs(onnx_path)
        info = infer_config(graph, cfg, export_format, batch_size, draw_threshold)
        with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
            f.write(to_yaml(info))
        _replace_folder(folder, output_dir, stage)
    logger.info('exported the whole %s detector (%s, batch %d, input %dx%d) to %s', cfg.name, export_format,
                batch_size, cfg.max_size, cfg.max_size, output_dir)
    return info


def _save_graph(graph, net, path_prefix, batch_size, onnx):
    """paddle.jit.save of the graph: resizes as matrix products (Paddle#79749); for ONNX LeakyReLU as maximum."""
    leaky = leaky_relu_as_maximum(net) if onnx else _nothing()
    with resize_as_matmul(net), leaky:
        paddle.jit.save(graph, path_prefix, input_spec=[
            paddle.static.InputSpec([batch_size, 3, None, None], 'float32', 'image'),
            paddle.static.InputSpec([batch_size, 2], 'float32', 'im_shape'),
            paddle.static.InputSpec([batch_size, 2], 'float32', 'scale_factor')])


def _name_onnx_outputs(path):
    """Rename the ONNX graph's outputs (paddle2onnx's fetch_name_0, ...) to OUTPUTS, in place.

    Clients that bind outputs by name (Triton's config.pbtxt, onnxruntime's
    output_names) then use the contract's names.
    """
    import onnx

    model = onnx.load(path)
    mapping = {output.name: name for output, name in zip(model.graph.output, OUTPUTS)}
    for node in model.graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name in mapping:
                    field[i] = mapping[name]
    for output in model.graph.output:
        output.name = mapping[output.name]
    onnx.save(model, path)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def infer_config(graph, cfg, export_format, batch_size, draw_threshold=0.5):
    """The infer_cfg.yml of an export, as a dict (PaddleDetection's keys first, then ours)."""
    return {
        'mode': 'paddle',
        'draw_threshold': float(draw_threshold),
        'metric': 'COCO',
        'use_dynamic_shape': True,
        'arch': ARCH,
        'min_subgraph_size': 3,
        'mask': True,
        'Preprocess': [dict(op) for op in PREPROCESS],
        'label_list': list(cfg.dataset.class_names),
        'config': cfg.name,
        'input_size': int(cfg.max_size),
        'batch_size': int(batch_size),
        'format': export_format,
        'top_k': int(graph.top_k),
        'conf_thresh': float(graph.conf_thresh),
        'nms_thresh': float(graph.nms_thresh),
        'max_num_detections': int(graph.max_num_detections),
        'score_threshold': float(graph.score_threshold),
        'mask_threshold': float(graph.mask_threshold),
        'nms': 'cross_class' if graph.cross_class else 'fast',
        'rescore_mask': bool(graph.rescore_mask),
        'rescore_bbox': bool(graph.rescore_bbox),
        'mask_dtype': graph.mask_dtype,
        'inputs': list(INPUTS),
        'outputs': list(OUTPUTS),
    }


def to_yaml(data):
    """Block-style YAML of a dict of scalars, lists of scalars and lists of flat dicts (no PyYAML needed).

    Strings are JSON-quoted (a JSON string is a valid YAML double-quoted scalar).
    """
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f'{key}:')
            for item in value:
                first = True
                for k, v in item.items():
                    lines.append(f'{"- " if first else "  "}{k}: {_scalar(v)}')
                    first = False
        elif isinstance(value, list):
            lines.append(f'{key}:')
            lines.extend(f'- {_scalar(v)}' for v in value)
        else:
            lines.append(f'{key}: {_scalar(value)}')
    return '\n'.join(lines) + '\n'


def _scalar(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return '[' + ', '.join(_scalar(v) for v in value) + ']'
    return json.dumps(str(value))


def _check_replaceable(output_dir):
    """OutputError when output_dir exists and is not an earlier export (nothing of the user's is replaced)."""
    if os.path.isfile(output_dir):
        raise OutputError(f'cannot write the export to {output_dir}: it is a file')
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(
            os.path.join(output_dir, CONFIG_FILE)):
        raise OutputError(f'cannot write the export to {output_dir}: the folder holds other files '
                          f'(no {CONFIG_FILE}); choose a new or empty folder')


def _replace_folder(folder, output_dir, stage):
    """Rename the finished ``folder`` to ``output_dir``; an earlier export there is moved aside, then removed."""
    old = None
    if os.path.isdir(output_dir):
        old = os.path.join(stage, 'previous')
        os.rename(output_dir, old)
    try:
        os.rename(folder, output_dir)
    except OSError:
        if old is not None:
            os.rename(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ runners --
def model_file(output_dir):
    """The graph file of a Paddle export: model.json (PIR) or model.pdmodel."""
    return network_model_file(os.path.join(output_dir, MODEL_PREFIX))


def inputs_for(images, batch_size=None):
    """PaddleDetection's inputs for a list of [H, W, 3] uint8 RGB images (create_inputs' padding).

    Returns {'image': [B, 3, Hmax, Wmax] float32 zero-padded bottom/right,
    'im_shape': [B, 2] float32, 'scale_factor': [B, 2] float32 ones}.
    """
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    image = np.zeros((len(images), 3, height, width), np.float32)
    for i, im in enumerate(images):
        image[i, :, :im.shape[0], :im.shape[1]] = im.transpose(2, 0, 1)
    return {'image': image, 'im_shape': np.array([im.shape[:2] for im in images], np.float32),
            'scale_factor': np.ones((len(images), 2), np.float32)}


def run_paddle(output_dir, inputs, num_threads=None, use_onednn=True):
    """Run a Paddle export on ``inputs`` (:func:`inputs_for`); its outputs as numpy arrays in OUTPUTS order."""
    predictor = create_paddle_predictor(output_dir, num_threads, use_onednn)
    return predict(predictor, inputs)


def create_paddle_predictor(output_dir, num_threads=None, use_onednn=True):
    """A Paddle Inference CPU predictor for the export in output_dir (utils.deploy.runners.create_predictor's options)."""
    return create_predictor(os.path.join(output_dir, MODEL_PREFIX), num_threads=num_threads,
                                      use_onednn=use_onednn, onednn_cache_capacity=10)


def predict(predictor, inputs):
    """One run of a predictor of this export on numpy inputs -> numpy outputs in OUTPUTS order."""
    for name in predictor.get_input_names():
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(inputs[name]))
    predictor.run()
    return [predictor.get_output_handle(name).copy_to_cpu() for name in predictor.get_output_names()]


def run_onnx(output_dir, inputs, num_threads=None):
    """Run an ONNX export on ``inputs`` with onnxruntime; its outputs as numpy arrays in OUTPUTS order."""
    session = create_onnx_session(os.path.join(output_dir, MODEL_PREFIX + '.onnx'), num_threads)
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})
