#!/usr/bin/env python3
"""Run an exported YOLACT / YOLACT++ detector on images, a folder or a video: the serving-machine runner.

One file, nothing of the YOLACT project imported: copy it beside an export made by
``tools/export_model.py`` and run it with Paddle Inference (``model.json`` or ``model.pdmodel`` +
``model.pdiparams``) or onnxruntime (``model.onnx``). Needs numpy, opencv-python, PyYAML and
paddlepaddle or onnxruntime.

    python infer.py --model_dir EXPORT --image_file dog.jpg
    python infer.py --model_dir EXPORT --image_dir photos/ --output_dir out/ --threshold 0.3
    python infer.py --model_dir EXPORT --video_file street.mp4 --device gpu --precision fp16
    python infer.py --model_dir EXPORT --image_dir val/ --threshold 0 --annotations instances_val.json

The export is the whole detector in PaddleDetection's contract for mask models (docs/deploy.md):
inputs ``image`` [B, 3, H, W] float32 (after the yml's Preprocess), ``im_shape`` [B, 2] and
``scale_factor`` [B, 2]; outputs, by position, ``bbox`` [N, 6] (class, score, x1, y1, x2, y2 in
original pixels), ``bbox_num`` [B], ``mask`` [N, H, W] 0/1 at the original size (-1 outside an
image's own size in a batch) and, when present, ``mask_score`` [N] (YOLACT++'s rescored mask score,
used for the mask results). Rows of class -1 pad images with no detection and are dropped here.

Writes to ``--output_dir``: each image with its detections drawn (same file name), the video with
its detections drawn, and COCO results ``bbox_detections.json`` and ``mask_detections.json``
(segmentations as COCO compressed RLE, encoded here in numpy: no pycocotools needed). Detections
with a score of at least ``--threshold`` (default: the yml's draw_threshold) are drawn and written;
use ``--threshold 0`` for an evaluation. ``image_id`` and ``category_id`` come from ``--annotations``
(a COCO annotation file: image file name -> id, class name -> category id) when given; otherwise
image_id is the file name's number (``000000000139.jpg`` -> 139) or the image's position in the
run, the frame number for a video, and category_id is the 0-based class of ``bbox``.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import yaml

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
# Paddle 3.3's oneDNN pass fusing conv2d + activation dereferences a null attribute on leaky_relu
# (a double there, read as a float) and kills the process while the predictor is built; graphs with
# leaky_relu (DarkNet-53) run without that one pass. Both spellings: 3.x's name and 2.6's.
LEAKY_RELU_CRASHING_PASSES = ('conv_activation_onednn_fuse_pass', 'conv_activation_mkldnn_fuse_pass')
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')


class RunnerError(Exception):
    """A user-facing problem: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------
# infer_cfg.yml and preprocessing (PaddleDetection's deploy ops, same parameters and semantics)


class Resize:
    """Resize to target_size [h, w] (keep_ratio: the short side to min(target), the long side at most max(target))."""

    def __init__(self, target_size, keep_ratio=True, interp=cv2.INTER_LINEAR):
        self.target_size = [target_size, target_size] if isinstance(target_size, int) else list(target_size)
        self.keep_ratio = keep_ratio
        self.interp = interp

    def __call__(self, im, info):
        h, w = im.shape[:2]
        if self.keep_ratio:
            scale = min(self.target_size) / min(h, w)
            if np.round(scale * max(h, w)) > max(self.target_size):
                scale = max(self.target_size) / max(h, w)
            sy = sx = scale
        else:
            sy, sx = self.target_size[0] / h, self.target_size[1] / w
        im = cv2.resize(im, None, None, fx=sx, fy=sy, interpolation=self.interp)
        info['im_shape'] = np.array(im.shape[:2], dtype=np.float32)
        info['scale_factor'] = np.array([sy, sx], dtype=np.float32)
        return im, info


class NormalizeImage:
    """float32; optionally / 255; then (x - mean) / std per channel (norm_type 'mean_std') or nothing ('none')."""

    def __init__(self, mean, std, is_scale=True, norm_type='mean_std'):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.is_scale = is_scale
        self.norm_type = norm_type

    def __call__(self, im, info):
        im = im.astype(np.float32)
        if self.is_scale:
            im *= 1.0 / 255.0
        if self.norm_type == 'mean_std':
            im = (im - self.mean) / self.std
        return im, info


class Permute:
    """HWC -> CHW."""

    def __call__(self, im, info):
        return np.ascontiguousarray(im.transpose(2, 0, 1)), info


class PadStride:
    """Zero-pad a CHW image at the bottom/right to multiples of ``stride`` (0: nothing)."""

    def __init__(self, stride=0):
        self.stride = stride

    def __call__(self, im, info):
        if self.stride <= 0:
            return im, info
        c, h, w = im.shape
        ph, pw = int(np.ceil(h / self.stride) * self.stride), int(np.ceil(w / self.stride) * self.stride)
        out = np.zeros((c, ph, pw), dtype=np.float32)
        out[:, :h, :w] = im
        return out, info


class Pad:
    """Pad an HWC image at the bottom/right to ``size`` [h, w] with ``fill_value``."""

    def __init__(self, size, fill_value=(114.0, 114.0, 114.0)):
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.fill_value = fill_value

    def __call__(self, im, info):
        h, w = im.shape[:2]
        out = np.empty((self.size[0], self.size[1], im.shape[2]), dtype=np.float32)
        out[...] = np.asarray(self.fill_value, dtype=np.float32)
        out[:h, :w] = im
        return out, info


PREPROCESS_OPS = {op.__name__: op for op in (Resize, NormalizeImage, Permute, PadStride, Pad)}


class ExportConfig:
    """What the runner reads from ``DIR/infer_cfg.yml``: the preprocessing, class names, thresholds, batch size."""

    def __init__(self, model_dir):
        path = os.path.join(model_dir, 'infer_cfg.yml')
        if not os.path.isfile(path):
            raise RunnerError(f'{path}: not found (a model folder written by tools/export_model.py has it)')
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise RunnerError(f'{path}: not readable as YAML ({_first_line(e)})') from None
        if not isinstance(cfg, dict):
            raise RunnerError(f'{path}: not a mapping of settings')
        missing = [k for k in ('Preprocess', 'label_list') if k not in cfg]
        if missing:
            raise RunnerError(f'{path}: missing {", ".join(missing)}')
        self.path = path
        self.label_list = [str(name) for name in cfg['label_list']]
        self.draw_threshold = float(cfg.get('draw_threshold', 0.5))
        self.mask = bool(cfg.get('mask', False))
        self.batch_size = cfg.get('batch_size')
        self.arch = cfg.get('arch', '')
        self.ops = []
        for entry in cfg['Preprocess'] or []:
            entry = dict(entry)
            name = entry.pop('type', None)
            if name not in PREPROCESS_OPS:
                raise RunnerError(f'{path}: Preprocess op {name!r} is not one this runner implements '
                                  f'({", ".join(PREPROCESS_OPS)})')
            try:
                self.ops.append(PREPROCESS_OPS[name](**entry))
            except TypeError as e:
                raise RunnerError(f'{path}: Preprocess op {name}: {e}') from None

    def preprocess(self, image_rgb):
        """RGB uint8 [H, W, 3] -> (CHW float32 image, im_shape [2], scale_factor [2])."""
        info = {'im_shape': np.array(image_rgb.shape[:2], dtype=np.float32),
                'scale_factor': np.array([1.0, 1.0], dtype=np.float32)}
        im = image_rgb
        for op in self.ops:
            im, info = op(im, info)
        if im.ndim != 3 or im.shape[0] not in (1, 3):
            raise RunnerError(f'{self.path}: Preprocess must end with a CHW image (a Permute op), '
                              f'got shape {list(im.shape)}')
        return im.astype(np.float32, copy=False), info['im_shape'], info['scale_factor']


def make_batch(items):
    """PaddleDetection's batching: images zero-padded at the bottom/right to the largest H and W.

    items: [(CHW float32, im_shape [2], scale_factor [2])] -> {'image' [B, C, H, W], 'im_shape' [B, 2],
    'scale_factor' [B, 2]}, all float32.
    """
    h = max(im.shape[1] for im, _, _ in items)
    w = max(im.shape[2] for im, _, _ in items)
    image = np.zeros((len(items), items[0][0].shape[0], h, w), dtype=np.float32)
    for i, (im, _, _) in enumerate(items):
        image[i, :, :im.shape[1], :im.shape[2]] = im
    return {'image': image,
            'im_shape': np.stack([s for _, s, _ in items]).astype(np.float32),
            'scale_factor': np.stack([f for _, _, f in items]).astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# Engines: Paddle Inference and onnxruntime, both returning the outputs as numpy arrays in order


def cpu_has_bf16():
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (what oneDNN's bf16 kernels need)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def check_precision(device, precision, engine):
    """One line refusing a precision this device/engine cannot run; None when it can."""
    if precision == 'bf16':
        if device != 'cpu':
            raise RunnerError('--precision bf16 is for --device cpu (oneDNN bfloat16); on a GPU use fp16')
        if engine != 'paddle':
            raise RunnerError('--precision bf16 needs the Paddle model (model.json/model.pdmodel): '
                              'onnxruntime has no bfloat16 CPU path for this graph')
        if not cpu_has_bf16():
            raise RunnerError('--precision bf16: this CPU has neither avx512_bf16 nor amx_bf16 '
                              '(oneDNN would emulate bfloat16 slower than fp32); use fp32')
    if precision == 'fp16':
        if device != 'gpu':
            raise RunnerError('--precision fp16 is for --device gpu (TensorRT); on a CPU use fp32 or bf16')
        if engine != 'paddle':
            raise RunnerError('--precision fp16 needs the Paddle model (TensorRT through Paddle Inference)')


class PaddleEngine:
    """Paddle Inference predictor for ``DIR/model.json`` (Paddle 3, PIR) or ``DIR/model.pdmodel``.

    Config notes for Paddle 3.x (docs/deploy.md): ``enable_memory_optim()`` is not called (it breaks PIR
    predictors, PaddlePaddle/Paddle#75496); oneDNN runs the graph on the CPU (the export has no
    interpolation op, which oneDNN cannot run in a PIR program, PaddlePaddle/Paddle#79749).
    """

    def __init__(self, model_file, params_file, device='cpu', precision='fp32', threads=None, batch_size=1,
                 min_subgraph_size=3, onednn=True):
        try:
            from paddle import inference
        except ImportError:
            raise RunnerError(f'{model_file}: running it needs paddlepaddle (pip install paddlepaddle), '
                              'or export with --format onnx and install onnxruntime') from None
        config = inference.Config(model_file, params_file)
        if device == 'gpu':
            config.enable_use_gpu(256, 0)
            if precision == 'fp16':
                config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=batch_size,
                                              min_subgraph_size=min_subgraph_size,
                                              precision_mode=inference.PrecisionType.Half,
                                              use_static=False, use_calib_mode=False)
                config.set_trt_dynamic_shape_info(
                    {'image': [batch_size, 3, 32, 32], 'im_shape': [batch_size, 2], 'scale_factor': [batch_size, 2]},
                    {'image': [batch_size, 3, 2048, 2048], 'im_shape': [batch_size, 2],
                     'scale_factor': [batch_size, 2]},
                    {'image': [batch_size, 3, 640, 640], 'im_shape': [batch_size, 2],
                     'scale_factor': [batch_size, 2]})
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
            if onednn or precision == 'bf16':
                # Images of different sizes give oneDNN kernels of different shapes: keep a few.
                if hasattr(config, 'enable_onednn'):
                    config.enable_onednn()
                    config.set_onednn_cache_capacity(10)
                    if precision == 'bf16':
                        config.enable_onednn_bfloat16()
                else:
                    config.enable_mkldnn()
                    config.set_mkldnn_cache_capacity(10)
                    if precision == 'bf16':
                        config.enable_mkldnn_bfloat16()
            with open(model_file, 'rb') as f:
                if b'leaky_relu' in f.read():
                    for name in LEAKY_RELU_CRASHING_PASSES:
                        config.delete_pass(name)
        config.switch_ir_optim(True)
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.input_names = list(self.predictor.get_input_names())

    def __call__(self, inputs):
        for name in self.input_names:
            if name not in inputs:
                raise RunnerError(f'the model wants an input {name!r}, which this runner does not make '
                                  '(it makes image, im_shape, scale_factor)')
            self.predictor.get_input_handle(name).copy_from_cpu(inputs[name])
        self.predictor.run()
        return [self.predictor.get_output_handle(name).copy_to_cpu() for name in self.predictor.get_output_names()]


class OnnxEngine:
    """onnxruntime session for ``DIR/model.onnx`` (CPU; CUDA with --device gpu when onnxruntime-gpu has it)."""

    def __init__(self, onnx_file, device='cpu', threads=None):
        try:
            import onnxruntime
        except ImportError:
            raise RunnerError(f'{onnx_file}: running it needs onnxruntime (pip install onnxruntime)') from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        providers = ['CPUExecutionProvider']
        if device == 'gpu':
            if 'CUDAExecutionProvider' not in onnxruntime.get_available_providers():
                raise RunnerError('--device gpu: this onnxruntime has no CUDAExecutionProvider '
                                  '(pip install onnxruntime-gpu)')
            providers.insert(0, 'CUDAExecutionProvider')
        try:
            self.session = onnxruntime.InferenceSession(onnx_file, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise RunnerError(f'{onnx_file}: onnxruntime cannot load it ({_first_line(e)})') from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs):
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise RunnerError(f'the model wants inputs {missing}, which this runner does not make')
        return self.session.run(None, {n: inputs[n] for n in self.input_names})


def choose_engine(model_dir, engine):
    """('paddle', (graph file, params file)) or ('onnx', (onnx file,)) for the model in ``model_dir``.

    engine 'auto': the Paddle model when the folder has one, else model.onnx.
    """
    params = os.path.join(model_dir, 'model.pdiparams')
    graph = next((g for g in (os.path.join(model_dir, n) for n in ('model.json', 'model.pdmodel'))
                  if os.path.isfile(g)), None)
    onnx_file = os.path.join(model_dir, 'model.onnx')
    has_paddle = graph is not None and os.path.isfile(params)
    if engine == 'paddle' or (engine == 'auto' and has_paddle):
        if not has_paddle:
            raise RunnerError(f'{model_dir}: no model.json/model.pdmodel + model.pdiparams '
                              '(an ONNX export runs with --engine onnx)')
        return 'paddle', (graph, params)
    if not os.path.isfile(onnx_file):
        raise RunnerError(f'{model_dir}: no model.onnx and no model.json/model.pdmodel + model.pdiparams')
    return 'onnx', (onnx_file,)


# ----------------------------------------------------------------------------------------------
# Outputs -> per-image detections


def split_detections(outputs, sizes, threshold):
    """Per-image detections from the graph's outputs, padding rows (class -1) and scores < threshold dropped.

    outputs: [bbox [N, 6], bbox_num [B], mask [N, H, W] (optional), mask_score [N] (optional)].
    sizes: [(h, w)] original size of each image of the batch (masks are cut to it).
    Returns one dict per image: 'classes' [n] int, 'scores' [n], 'boxes' [n, 4] float (x1, y1, x2, y2),
    'masks' [n, h, w] bool or None, 'mask_scores' [n] (the box scores when the model has none).
    """
    bbox, bbox_num = np.asarray(outputs[0]), np.asarray(outputs[1]).reshape(-1)
    masks = outputs[2] if len(outputs) > 2 else None
    mask_scores = np.asarray(outputs[3]).reshape(-1) if len(outputs) > 3 else None
    if len(bbox_num) != len(sizes) or bbox.ndim != 2 or bbox.shape[1] != 6 or bbox_num.sum() != len(bbox):
        raise RunnerError(f'the model returned {len(bbox_num)} image counts and bbox of shape {list(bbox.shape)} '
                          f'for a batch of {len(sizes)}: not a detector export of this contract')
    results, start = [], 0
    for (h, w), count in zip(sizes, bbox_num.tolist()):
        rows = slice(start, start + int(count))
        start += int(count)
        keep = (bbox[rows, 0] >= 0) & (bbox[rows, 1] >= threshold)
        det = {'classes': bbox[rows, 0][keep].astype(np.int64), 'scores': bbox[rows, 1][keep].astype(np.float32),
               'boxes': bbox[rows, 2:6][keep].astype(np.float32), 'masks': None}
        det['mask_scores'] = mask_scores[rows][keep].astype(np.float32) if mask_scores is not None else det['scores']
        if masks is not None:
            # Thresholded before the rows are selected: a copy of the selected int32 masks would
            # cost 4x the memory of the bool ones (100 masks at 1920x1080: 829 MB against 207 MB).
            own = np.asarray(masks[rows])[:, :h, :w] > 0
            det['masks'] = own if keep.all() else own[keep]
        results.append(det)
    return results


# ----------------------------------------------------------------------------------------------
# COCO results (RLE in numpy, byte-identical to pycocotools' encode)


def rle_encode(mask):
    """COCO compressed RLE of a [H, W] 0/1 mask: {'size': [H, W], 'counts': str}, as pycocotools encodes it.

    Runs are counted in column-major order starting with a run of zeros; the counts are written as
    pycocotools' rleToString does: each count (from the third on, minus the count two before it)
    in 5-bit groups, low first, 0x20 marking a continuation, offset by 48.
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1f
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {'size': [int(h), int(w)], 'counts': ''.join(chars)}


class CocoIds:
    """image_id and category_id of the results: from a COCO annotation file, or from file names and classes."""

    def __init__(self, label_list, annotations=None):
        self.by_file, self.category = None, None
        if annotations:
            try:
                with open(annotations) as f:
                    coco = json.load(f)
                self.by_file = {os.path.basename(im['file_name']): int(im['id']) for im in coco['images']}
                by_name = {c['name']: int(c['id']) for c in coco['categories']}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RunnerError(f'{annotations}: not a readable COCO annotation file ({_first_line(e)})') from None
            unknown = [n for n in label_list if n not in by_name]
            if unknown:
                raise RunnerError(f'{annotations}: has no category named {unknown[0]!r} (a class of the model)')
            self.category = [by_name[n] for n in label_list]

    def image_id(self, name, position):
        """The id of image file ``name`` (``position``: its index in the run, or the frame number)."""
        if self.by_file is not None:
            if os.path.basename(name) not in self.by_file:
                raise RunnerError(f'{name}: not an image of the --annotations file')
            return self.by_file[os.path.basename(name)]
        stem = os.path.splitext(os.path.basename(name))[0]
        return int(stem) if stem.isdigit() else position

    def category_id(self, cls):
        return self.category[cls] if self.category is not None else int(cls)


def coco_results(det, image_id, ids):
    """(bbox results, mask results) of one image in COCO's results format (bbox as x, y, w, h)."""
    boxes, masks = [], []
    for j in range(len(det['classes'])):
        x1, y1, x2, y2 = (float(v) for v in det['boxes'][j])
        category = ids.category_id(int(det['classes'][j]))
        boxes.append({'image_id': image_id, 'category_id': category, 'bbox': [x1, y1, x2 - x1, y2 - y1],
                      'score': float(det['scores'][j])})
        if det['masks'] is not None:
            masks.append({'image_id': image_id, 'category_id': category, 'segmentation': rle_encode(det['masks'][j]),
                          'score': float(det['mask_scores'][j])})
    return boxes, masks


# ----------------------------------------------------------------------------------------------
# Drawing


def class_color(cls):
    """A BGR colour per class: hues spread by the golden ratio."""
    hue = int((cls * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw(image_bgr, det, labels, alpha=0.45):
    """A copy of ``image_bgr`` with masks blended in, 1 px boxes and 'name score' labels; best detection on top."""
    out = image_bgr.copy()
    order = range(len(det['classes']) - 1, -1, -1)
    if det['masks'] is not None:
        for j in order:
            color = np.array(class_color(int(det['classes'][j])), dtype=np.float32)
            m = det['masks'][j]
            out[m] = (out[m].astype(np.float32) * (1 - alpha) + color * alpha).astype(np.uint8)
    for j in order:
        cls = int(det['classes'][j])
        color = class_color(cls)
        x1, y1, x2, y2 = (int(v) for v in det['boxes'][j])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 1)
        name = labels[cls] if 0 <= cls < len(labels) else str(cls)
        text = f'{name} {det["scores"][j]:.2f}'
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(y1 - th - base, 0)
        cv2.rectangle(out, (x1, top), (x1 + tw, top + th + base), color, -1)
        cv2.putText(out, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


# ----------------------------------------------------------------------------------------------
# Files: inputs checked first, outputs written under a temporary name and renamed


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def atomic_write(path, data):
    """Write bytes to ``path`` through a temporary file in the same folder (no half-written file under the name)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output_dir(path):
    """Prove, before any work, that ``path`` can be created and written; creates nothing.

    Probes the folder, or its nearest existing parent when it does not exist yet, with a temporary file.
    """
    probe_dir = os.path.abspath(path)
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise RunnerError(f'{path}: output folder not writable ({probe_dir} is a file)')
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-check-', dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunnerError(f'{path}: output folder not writable ({e.strerror or _first_line(e)})') from None


def list_images(image_file, image_dir):
    """The image paths to run: the one file, or the folder's images sorted by name."""
    if image_file:
        if not os.path.isfile(image_file):
            raise RunnerError(f'{image_file}: no such file')
        return [image_file]
    if not os.path.isdir(image_dir):
        raise RunnerError(f'{image_dir}: no such folder')
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise RunnerError(f'{image_dir}: no images ({", ".join(IMAGE_EXTENSIONS)})')
    return [os.path.join(image_dir, n) for n in names]


def read_image(path):
    """BGR uint8 [H, W, 3], or None when the file is not a readable image."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return image


# ----------------------------------------------------------------------------------------------
# The run


class Runner:
    """One run over images or a video: preprocess, model, detections drawn and collected as COCO results.

    Everything cheap is checked before the model loads: the yml, the precision, the batch size, the
    ids of --annotations, that the output folder can be written.
    """

    def __init__(self, args):
        self.cfg = ExportConfig(args.model_dir)
        self.threshold = self.cfg.draw_threshold if args.threshold is None else args.threshold
        model_batch = self.cfg.batch_size
        if args.batch_size is not None and model_batch and args.batch_size != model_batch:
            raise RunnerError(f'--batch_size {args.batch_size}: {self.cfg.path} was exported for batch_size '
                              f'{model_batch} (export again with --batch_size {args.batch_size})')
        self.batch_size = int(model_batch or args.batch_size or 1)
        self.engine_name, files = choose_engine(args.model_dir, args.engine)
        check_precision(args.device, args.precision, self.engine_name)
        self.ids = CocoIds(self.cfg.label_list, args.annotations)
        self.output_dir = args.output_dir
        check_output_dir(self.output_dir)
        if self.engine_name == 'paddle':
            self.engine = PaddleEngine(files[0], files[1], args.device, args.precision, args.cpu_threads,
                                       self.batch_size, onednn=not args.no_onednn)
        else:
            self.engine = OnnxEngine(files[0], args.device, args.cpu_threads)
        self.draw = not args.no_draw
        self.bbox_results, self.mask_results = [], []
        self.model_times = []

    def detect(self, images_bgr):
        """Detections of a list of at most batch_size BGR images (a short batch is filled with its last image)."""
        items = [self.cfg.preprocess(cv2.cvtColor(im, cv2.COLOR_BGR2RGB)) for im in images_bgr]
        items += [items[-1]] * (self.batch_size - len(items))
        inputs = make_batch(items)
        start = time.perf_counter()
        outputs = self.engine(inputs)
        self.model_times.append(time.perf_counter() - start)
        sizes = [im.shape[:2] for im in images_bgr] + [images_bgr[-1].shape[:2]] * (self.batch_size - len(images_bgr))
        return split_detections(outputs, sizes, self.threshold)[:len(images_bgr)]

    def add_results(self, det, image_id):
        boxes, masks = coco_results(det, image_id, self.ids)
        self.bbox_results += boxes
        self.mask_results += masks

    def run_images(self, paths):
        """Detect, draw and collect results for image files, batch by batch; unreadable ones skipped (named)."""
        # Every id first: a name missing from --annotations stops the run before the first model run.
        image_ids = {path: self.ids.image_id(path, i) for i, path in enumerate(paths)}
        done, pending = 0, []
        for index, path in enumerate(paths):
            image = read_image(path)
            if image is None:
                if len(paths) == 1:
                    raise RunnerError(f'{path}: not a readable image')
                print(f'skipped {path}: not a readable image', file=sys.stderr)
            else:
                pending.append((path, image))
            if pending and (len(pending) == self.batch_size or index == len(paths) - 1):
                for (name, image), det in zip(pending, self.detect([im for _, im in pending])):
                    self.add_results(det, image_ids[name])
                    if self.draw:
                        ok, encoded = cv2.imencode(os.path.splitext(name)[1] or '.png',
                                                   draw(image, det, self.cfg.label_list))
                        if ok:
                            atomic_write(os.path.join(self.output_dir, os.path.basename(name)), encoded.tobytes())
                    print(f'{name}: {len(det["classes"])} detections')
                    done += 1
                pending = []
        return done

    def run_video(self, path):
        if not os.path.isfile(path):
            raise RunnerError(f'{path}: no such file')
        # FFmpeg's own messages about a file it cannot decode: the one line below says it.
        os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')
        capture = cv2.VideoCapture(path)
        ok, frame = capture.read()
        if not ok:
            capture.release()
            raise RunnerError(f'{path}: not a readable video')
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        h, w = frame.shape[:2]
        out_path = os.path.join(self.output_dir, os.path.splitext(os.path.basename(path))[0] + '.mp4')
        tmp_path = os.path.join(self.output_dir, '.' + os.path.basename(out_path) + '.partial.mp4')
        if self.draw:
            os.makedirs(self.output_dir, exist_ok=True)
        writer = cv2.VideoWriter(tmp_path, cv2.VideoWriter_fourcc(*'mp4v'), fps, (w, h)) if self.draw else None
        if writer is not None and not writer.isOpened():
            capture.release()
            raise RunnerError(f'{out_path}: OpenCV cannot write an mp4v video here')
        index, pending = 0, [frame]
        try:
            while pending:
                while len(pending) < self.batch_size:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    pending.append(frame)
                for frame, det in zip(pending, self.detect(pending)):
                    self.add_results(det, index)
                    if writer is not None:
                        writer.write(draw(frame, det, self.cfg.label_list))
                    index += 1
                ok, frame = capture.read()
                pending = [frame] if ok else []
            if writer is not None:
                writer.release()
                writer = None
                os.replace(tmp_path, out_path)
        finally:
            capture.release()
            if writer is not None:
                writer.release()
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        print(f'{path}: {index} frames')
        return index

    def write_results(self):
        atomic_write(os.path.join(self.output_dir, 'bbox_detections.json'), json.dumps(self.bbox_results).encode())
        if self.cfg.mask:
            atomic_write(os.path.join(self.output_dir, 'mask_detections.json'), json.dumps(self.mask_results).encode())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--model_dir', required=True, help='export folder: infer_cfg.yml + the Paddle model or model.onnx')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--image_file', help='one image')
    src.add_argument('--image_dir', help='a folder of images (%s)' % ', '.join(IMAGE_EXTENSIONS))
    src.add_argument('--video_file', help='a video (written back with detections drawn, as .mp4)')
    p.add_argument('--output_dir', default='output', help='drawn images/video and COCO results (default: output)')
    p.add_argument('--threshold', type=float, default=None,
                   help="lowest score drawn and written (default: the yml's draw_threshold; 0 for an evaluation)")
    p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
    p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                   help='bf16: oneDNN bfloat16 on a CPU with AVX512-BF16 or AMX; fp16: TensorRT on a GPU')
    p.add_argument('--engine', choices=('auto', 'paddle', 'onnx'), default='auto',
                   help='auto: the Paddle model when the folder has one, else model.onnx')
    p.add_argument('--batch_size', type=int, default=None,
                   help="images per model run (default and only choice: the yml's batch_size, fixed at export)")
    p.add_argument('--cpu_threads', type=int, default=None, help='CPU threads (default: all cores)')
    p.add_argument('--annotations', default=None,
                   help='COCO annotation file giving the results their image_id and category_id')
    p.add_argument('--no_draw', action='store_true', help='write only the COCO results')
    p.add_argument('--no_onednn', action='store_true', help='CPU: Paddle Inference without oneDNN (fp32 only)')
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error('--batch_size must be at least 1')
    if args.no_onednn and args.precision == 'bf16':
        p.error('--precision bf16 runs on oneDNN: drop --no_onednn')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        paths = None if args.video_file else list_images(args.image_file, args.image_dir)
        if args.image_file and read_image(args.image_file) is None:
            raise RunnerError(f'{args.image_file}: not a readable image')
        if args.video_file and not os.path.isfile(args.video_file):
            raise RunnerError(f'{args.video_file}: no such file')
        runner = Runner(args)
        start = time.perf_counter()
        count = runner.run_video(args.video_file) if args.video_file else runner.run_images(paths)
        runner.write_results()
    except RunnerError as e:
        print(f'infer.py: error: {e}', file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    times = runner.model_times[1:] or runner.model_times
    print(f'{count} {"frames" if args.video_file else "images"} in {total:.2f} s; model '
          f'{1000 * np.mean(times) / runner.batch_size:.1f} ms per image '
          f'({runner.engine_name}, {args.device}, {args.precision}, batch {runner.batch_size}'
          f'{", first run excluded" if len(runner.model_times) > 1 else ""}); '
          f'results in {os.path.abspath(args.output_dir)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
