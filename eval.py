"""Evaluate YOLACT / YOLACT++: COCO mAP, results files for the COCO server, detections drawn on
images and videos. The flags are the reference eval.py's.

COCO val2017 mAP (the config is read from the weights' file name; .pth files are converted on the fly):
    python eval.py --trained_model weights/yolact_base_54_800000.pth

test-dev results for the evaluation server (results/bbox_detections.json, results/mask_detections.json):
    python eval.py --trained_model weights/yolact_base_54_800000.pth \\
        --dataset coco2017_testdev_dataset --output_coco_json

Your own COCO-format data (no code edits; classes from the annotation file):
    python eval.py --trained_model weights/yolact_resnet50_12_3000.pdparams \\
        --valid_images data/mine/val --valid_info data/mine/annotations/val.json

Images, a folder, a video (a camera: --video 0), drawn:
    python eval.py --trained_model weights/yolact_base_54_800000.pth --score_threshold 0.15 --top_k 15 \\
        --image my_image.png:out.png
    python eval.py ... --images in_folder:out_folder
    python eval.py ... --video in.mp4:out.mp4

The fast path on CPU: export once, then run the static model through Paddle Inference (oneDNN):
    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output exported/yolact_base
    python eval.py --inference_model exported/yolact_base --images in_folder:out_folder

Dataset evaluation streams: DataLoader workers decode and preprocess images
while the network runs, and each image's detections are RLE-encoded and
appended to the results files right after post-processing, so memory does
not grow with the dataset. Unreadable images are skipped, named in the log
and counted in the summary. mAP is pycocotools' COCOeval on the files
written; the table is printed and saved under --log_dir.
"""
import argparse
import dataclasses
import json
import logging
import os
import queue
import threading
import time

import cv2
import numpy as np
import paddle
from tqdm import tqdm

from data.coco import COCOEvalImages, classes_from_categories, read_image
from data.config import DATASETS, DatasetConfig, config_name_from_weights, get_config
from layers.functions import Detect
from layers.output_utils import postprocess
from utils import coco_eval
from utils.augmentations import BaseTransform, FastBaseTransform
from utils.checkpoint import load_weights, sidecar_paths
from utils.convert import convert_checkpoint
from utils.drawing import draw_detections
from utils.inference import StaticYolact, read_export_meta
from utils.runtime import select_device
from yolact import Yolact

logger = logging.getLogger('eval')

# The reference skips the first iterations in its FPS: they include one-time setup.
WARMUP_ITERATIONS = 2
# Frames decoded ahead of the network in video mode.
VIDEO_QUEUE_SIZE = 8
ESCAPE_KEY = 27


def str2bool(value):
    if value.lower() in ('yes', 'true', 't', 'y', '1'):
        return True
    if value.lower() in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'boolean value expected, got {value!r}')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='YOLACT evaluation: COCO mAP, COCO results JSON, drawn images and '
                                            'videos', epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group('model')
    model.add_argument('--trained_model', default=None,
                       help='weights: a reference .pth (converted on the fly) or a .pdparams, named '
                            '<config>_<epoch>_<iteration> so that the config can be read from the name')
    model.add_argument('--config', default=None,
                       help='config name (e.g. yolact_base); overrides the one read from the weights or '
                            'the exported model')
    model.add_argument('--inference_model', default=None, metavar='PREFIX',
                       help='run an exported static model (tools/export_model.py) through Paddle Inference '
                            'instead of dygraph: oneDNN on CPU, CUDA on GPU; replaces --trained_model')
    model.add_argument('--tensorrt', action='store_true',
                       help='with --inference_model on GPU: run supported subgraphs with TensorRT')
    model.add_argument('--device', default=None, choices=('cpu', 'gpu'),
                       help='where the network runs (default: gpu when Paddle has CUDA and a GPU is visible)')

    data = p.add_argument_group('dataset evaluation (the default mode)')
    data.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                      help="dataset to evaluate instead of the config's, e.g. coco2017_dataset, "
                           'coco2017_testdev_dataset (no ground truth: only writes the results files)')
    data.add_argument('--valid_images', default=None, help='custom COCO-format dataset: image folder')
    data.add_argument('--valid_info', default=None,
                      help='custom COCO-format dataset: annotation file (an image-info file without '
                           'annotations, like test-dev, only writes the results files)')
    data.add_argument('--class_names', default=None,
                      help='custom dataset: comma-separated class names in the order the model was trained '
                           'with, matched to the category names of --valid_info (default: every category '
                           'in increasing id order, as train.py does)')
    data.add_argument('--max_images', default=-1, type=int,
                      help='evaluate at most this many images (-1: all), chosen by the reference\'s '
                           'deterministic image-id hash, so the subset matches the reference\'s')
    data.add_argument('--output_coco_json', action='store_true',
                      help='only write bbox_detections.json and mask_detections.json to --results_dir, '
                           'without computing mAP (for the COCO evaluation server)')
    data.add_argument('--results_dir', default='results',
                      help='folder of bbox_detections.json and mask_detections.json (always written by a '
                           'dataset evaluation, so that mAP can be recomputed from them)')
    data.add_argument('--log_dir', default='logs', help='folder of the saved mAP tables (eval_*.json)')
    data.add_argument('--num_workers', default=2, type=int,
                      help='DataLoader processes decoding and preprocessing images (0: in this process)')
    data.add_argument('--benchmark', action='store_true',
                      help='time the dataset images (data wait, network, detect, postprocess) without '
                           'writing results or computing mAP')

    detection = p.add_argument_group('detection')
    detection.add_argument('--score_threshold', default=0.0, type=float,
                           help='drop detections whose score is not above this (mAP, results files and drawing)')
    detection.add_argument('--top_k', default=5, type=int,
                           help='draw at most this many detections per image or frame (drawing only; '
                                'mAP uses every detection, as the reference does)')
    detection.add_argument('--fast_nms', default=True, type=str2bool,
                           help='Fast NMS (true, the default) or traditional greedy NMS (false)')
    detection.add_argument('--cross_class_nms', default=False, type=str2bool,
                           help='suppress overlapping boxes across classes (Fast NMS only)')

    display = p.add_argument_group('images and videos')
    display.add_argument('--image', default=None, metavar='IN[:OUT]',
                         help='detect in one image; write the drawing to OUT, or show it in a window')
    display.add_argument('--images', default=None, metavar='IN_DIR:OUT_DIR',
                         help='detect in every image of IN_DIR; drawings go to OUT_DIR/<name>.png')
    display.add_argument('--video', default=None, metavar='IN[:OUT]',
                         help='detect in a video file or a camera (a number: its index); write OUT (mp4), '
                              'or show it in a window (Esc stops)')
    display.add_argument('--display_masks', default=True, type=str2bool, help='draw the masks')
    display.add_argument('--display_bboxes', default=True, type=str2bool, help='draw the boxes')
    display.add_argument('--display_text', default=True, type=str2bool, help='draw class names')
    display.add_argument('--display_scores', default=True, type=str2bool,
                         help='draw the score after the class name')
    args = p.parse_args(argv)

    if (args.trained_model is None) == (args.inference_model is None):
        p.error('give exactly one of --trained_model and --inference_model')
    if args.tensorrt and args.inference_model is None:
        p.error('--tensorrt needs --inference_model')
    modes = [m for m in ('image', 'images', 'video') if getattr(args, m) is not None]
    if len(modes) > 1 or (modes and (args.benchmark or args.output_coco_json)):
        p.error('choose one mode: --image, --images, --video, --benchmark or a dataset evaluation')
    if args.dataset is not None and (args.valid_images or args.valid_info):
        p.error('give either --dataset or --valid_images/--valid_info')
    if args.class_names and not args.valid_info:
        p.error('--class_names belongs to a custom dataset (--valid_info)')
    return args


# ---------------------------------------------------------------- model --
def resolve_config(args):
    """The config of this run: preset (flag, export metadata or weights name), dataset, classes."""
    if args.config is not None:
        name = args.config
    elif args.inference_model is not None:
        name = read_export_meta(args.inference_model)['config']
    else:
        name = config_name_from_weights(args.trained_model)
        logger.info('config %s (from the file name; --config overrides)', name)
    cfg = get_config(name)

    if args.dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=DATASETS[args.dataset])
    elif args.valid_images or args.valid_info:
        dataset = custom_dataset(args.valid_images, args.valid_info, args.class_names)
        cfg = dataclasses.replace(cfg, dataset=dataset, num_classes=len(dataset.class_names) + 1)
    elif args.trained_model is not None:
        cfg = _classes_from_checkpoint(cfg, args.trained_model)
    return cfg


def custom_dataset(image_dir, info_file, class_names=None):
    """A DatasetConfig for a COCO-format evaluation set.

    Class names and the category id -> label map come from the annotation
    file's categories in increasing id order (train.py's rule), or follow
    ``class_names`` (comma-separated) matched to the category names. Without
    an ``annotations`` list (an image-info file) there is no ground truth.
    """
    if not image_dir or not info_file:
        raise ValueError('a custom dataset needs both --valid_images and --valid_info')
    with open(info_file) as f:
        info = json.load(f)
    names, label_map = classes_from_categories(info.get('categories', []), class_names, info_file)
    return DatasetConfig(name=os.path.basename(info_file), valid_images=image_dir, valid_info=info_file,
                         has_gt='annotations' in info, class_names=names, label_map=label_map)


def _classes_from_checkpoint(cfg, weights_path):
    """cfg with the classes a train.py checkpoint recorded, when they differ from the preset's.

    A model fine-tuned on custom data keeps its preset's name (and file name)
    but not its class count; the checkpoint's JSON knows both.
    """
    state_path = sidecar_paths(weights_path)[1]
    if not weights_path.endswith('.pdparams') or not os.path.isfile(state_path):
        return cfg
    with open(state_path) as f:
        state = json.load(f)
    names = tuple(state.get('class_names') or ())
    if not names or (state.get('num_classes') == cfg.num_classes and names == cfg.dataset.class_names):
        return cfg
    logger.info('%d classes from %s', len(names), state_path)
    dataset = dataclasses.replace(cfg.dataset, class_names=names, label_map=None)
    return dataclasses.replace(cfg, dataset=dataset, num_classes=len(names) + 1)


def build_network(args, cfg, device):
    """The network in eval mode: dygraph Yolact with loaded weights, or an exported model.

    Both are called the same way (x [1, 3, S, S] -> raw output dict) and
    have a ``maskiou_net`` attribute (None without YOLACT++ rescoring).
    """
    if args.inference_model is not None:
        net = StaticYolact(args.inference_model, device=device, use_tensorrt=args.tensorrt)
        exported = (net.max_size, net.meta['num_classes'])
        if exported != (cfg.max_size, cfg.num_classes):
            raise ValueError(f'{args.inference_model} was exported for {net.max_size}x{net.max_size} inputs and '
                             f"{net.meta['num_classes']} classes; config {cfg.name} with this dataset has "
                             f'{cfg.max_size} and {cfg.num_classes}')
        return net
    net = Yolact.from_config(cfg)
    load_trained_model(net, args.trained_model, cfg)
    net.eval()
    return net


def load_trained_model(net, path, cfg):
    """Load .pth (reference checkpoint, converted strictly) or .pdparams weights into ``net``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'weights file not found: {path}')
    if path.endswith('.pth'):
        params, report = convert_checkpoint(path, cfg)
        net.set_state_dict(params)
        logger.info('%s', report.summary())
    else:
        load_weights(net, path)
        logger.info('loaded %s', path)


def first_detections(det, k):
    """The k best detections of a Detect output (its rows are sorted by score, best first)."""
    return {key: value if key == 'proto' else value[:k] for key, value in det.items()}


@paddle.no_grad()
def detect_image(net, detect, cfg, x, width, height, score_threshold=0.0, max_detections=None):
    """Detections of one preprocessed image at its original size.

    Args:
        net: dygraph Yolact or StaticYolact; detect: a Detect.
        x: [1, 3, S, S] float32 network input.
        width, height: the original image size.
        max_detections: assemble only the masks of this many best detections
            (drawing shows --top_k; the reference assembles all, then drops
            the rest, which gives the same picture); None: all.
    Returns:
        postprocess's numpy dict: 'classes' [N], 'scores' [N] (box scores),
        'boxes' [N, 4] int pixel x1, y1, x2, y2, 'masks' [N, H, W] bool,
        'mask_scores' [N] with YOLACT++ rescoring.
    """
    det = detect(net(x))[0]
    if max_detections is not None:
        det = first_detections(det, max_detections)
    return postprocess(det, width, height, maskiou_net=net.maskiou_net, rescore_bbox=cfg.rescore_bbox,
                       rescore_mask=cfg.rescore_mask, score_threshold=score_threshold)


# ------------------------------------------------------ dataset evaluation --
@dataclasses.dataclass
class EvalSummary:
    """What a dataset evaluation did.

    results: {'bbox'|'segm': {metric: value}} (COCOeval fractions) or None when
    mAP was not computed; image_ids: the images scored; skipped: ids of
    unreadable images; files: {'bbox'|'segm': results file}; log_path: the
    saved table; seconds: wall time of the image loop.
    """
    results: dict
    image_ids: list
    skipped: list
    files: dict
    log_path: str
    seconds: float


def _reference_hash(image_id):
    """The reference eval.py's integer hash of an image id, for a deterministic image order."""
    x = (((image_id >> 16) ^ image_id) * 0x045d9f3b) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x045d9f3b) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & 0xFFFFFFFF


def evaluation_order(image_ids, max_images=-1):
    """Dataset indices in the reference's evaluation order, cut to ``max_images`` (-1: all).

    The reference sorts images by a hash of their id, so --max_images takes
    the same subset in every run and Python version.
    """
    order = sorted(range(len(image_ids)), key=lambda i: _reference_hash(int(image_ids[i])))
    return order if max_images < 0 else order[:max_images]


def _single(batch):
    """collate_fn for batches of one: the sample itself, not stacked."""
    return batch[0]


def _loader(dataset, indices, num_workers):
    """A DataLoader yielding one (img tensor [3, S, S], image_id, height, width, ok) at a time."""
    return paddle.io.DataLoader(paddle.io.Subset(dataset, indices), batch_size=1, shuffle=False,
                                num_workers=num_workers, collate_fn=_single)


def evaluate(net, detect, cfg, dataset, results_dir, max_images=-1, score_threshold=0.0, num_workers=2,
             compute_map=True, log_dir='logs', progress=True):
    """Run a dataset and stream its detections into COCO results files; optionally score them.

    Args:
        net, detect, cfg: see :func:`detect_image`.
        dataset: a data.coco.COCOEvalImages over ``cfg.dataset`` (its ``coco``
            is the ground truth when ``compute_map``).
        results_dir: where bbox_detections.json and mask_detections.json go.
        max_images: at most this many images (-1: all), see :func:`evaluation_order`.
        compute_map: run COCOeval on the files written (needs ground truth);
            the table is printed, logged and saved under ``log_dir``.
    Returns:
        an :class:`EvalSummary`.
    """
    indices = evaluation_order(dataset.ids, max_images)
    class_to_cat = coco_eval.class_to_category(cfg.dataset.label_map_dict())
    scored, skipped = [], []
    start = time.perf_counter()
    with coco_eval.CocoResultsWriter(results_dir, class_to_cat) as writer, \
            tqdm(total=len(indices), unit='img', desc='Evaluating', disable=not progress) as bar:
        for img, image_id, height, width, ok in _loader(dataset, indices, num_workers):
            bar.update()
            if not ok:
                # The worker logged the file and the reason.
                skipped.append(int(image_id))
                bar.set_postfix(skipped=len(skipped))
                continue
            out = detect_image(net, detect, cfg, img.unsqueeze(0), width, height, score_threshold)
            writer.add(image_id, out['classes'], out['boxes'], out['scores'], out['masks'],
                       out.get('mask_scores'))
            scored.append(int(image_id))
    seconds = time.perf_counter() - start
    files = {'bbox': writer.bbox_path, 'segm': writer.mask_path}
    logger.info('%d images in %.1f s (%.2f img/s); %d detections written to %s and %s',
                len(scored), seconds, len(scored) / max(seconds, 1e-9), writer.num_detections, *files.values())
    if skipped:
        logger.warning('%d unreadable image(s) skipped and not scored (ids %s)', len(skipped),
                       ', '.join(map(str, skipped[:20])) + (' ...' if len(skipped) > 20 else ''))

    results = log_path = None
    if compute_map:
        results = coco_eval.evaluate_coco(dataset.coco, files, image_ids=scored)
        table = coco_eval.format_table(results)
        logger.info('mAP (COCOeval, %d images) of %s:\n%s', len(scored), cfg.name, table)
        log_path = coco_eval.write_eval_log(
            results, log_dir, cfg.name, config=cfg.name, dataset=cfg.dataset.name,
            annotations=cfg.dataset.valid_info, num_images=len(scored), skipped=skipped,
            image_ids=scored, result_files=files)
        logger.info('saved %s', log_path)
    return EvalSummary(results, scored, skipped, files, log_path, seconds)


def benchmark(net, detect, cfg, dataset, max_images=-1, score_threshold=0.0, num_workers=2, progress=True):
    """Per-stage times over dataset images, as the reference's --benchmark (nothing is written).

    Returns {stage: mean seconds} for 'data' (waiting for the next decoded and
    preprocessed image), 'network', 'detect', 'postprocess' and 'total', over
    the images after the first WARMUP_ITERATIONS.
    """
    indices = evaluation_order(dataset.ids, max_images)
    times = {k: [] for k in ('data', 'network', 'detect', 'postprocess', 'total')}
    loader = iter(_loader(dataset, indices, num_workers))
    with paddle.no_grad():
        for it in tqdm(range(len(indices)), unit='img', desc='Benchmark', disable=not progress):
            t0 = time.perf_counter()
            img, _, height, width, ok = next(loader)
            if not ok:
                continue
            t1 = time.perf_counter()
            preds = net(img.unsqueeze(0))
            _synchronize()
            t2 = time.perf_counter()
            det = detect(preds)[0]
            _synchronize()
            t3 = time.perf_counter()
            postprocess(det, width, height, maskiou_net=net.maskiou_net, rescore_bbox=cfg.rescore_bbox,
                        rescore_mask=cfg.rescore_mask, score_threshold=score_threshold)
            t4 = time.perf_counter()
            if it >= WARMUP_ITERATIONS:
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[key].append(value)
    if not times['total']:
        raise ValueError(f'--benchmark needs more than {WARMUP_ITERATIONS} readable images')
    means = {k: float(np.mean(v)) for k, v in times.items()}
    logger.info('benchmark of %s over %d images (after %d warm-up):\n%s\nAverage: %.2f fps, %.1f ms',
                cfg.name, len(times['total']), WARMUP_ITERATIONS,
                '\n'.join(f'  {k:<12} {1000 * v:8.1f} ms' for k, v in means.items()),
                1 / means['total'], 1000 * means['total'])
    return means


def _synchronize():
    """Wait for queued GPU work so that stage times are real (no-op on CPU)."""
    if paddle.device.is_compiled_with_cuda() and 'gpu' in paddle.device.get_device():
        paddle.device.synchronize()


# ------------------------------------------------------ images and videos --
def split_io_spec(spec, what):
    """'IN[:OUT]' -> (IN, OUT or None), where IN exists (a path may itself contain ':').

    Camera indices (digits) are accepted as IN for videos.
    """
    if os.path.exists(spec) or (what == 'video' and spec.isdigit()):
        return spec, None
    for i, char in enumerate(spec):
        if char == ':' and (os.path.exists(spec[:i]) or (what == 'video' and spec[:i].isdigit())):
            return spec[:i], spec[i + 1:] or None
    raise FileNotFoundError(f'--{what}: input {spec.split(":")[0]!r} not found (expected IN[:OUT])')


class ImageDetector:
    """BGR image in, drawn BGR image out: preprocessing, network, detection, drawing."""

    def __init__(self, net, detect, cfg, args, class_color=False):
        self.net, self.detect, self.cfg = net, detect, cfg
        self.transform = FastBaseTransform.from_config(cfg)
        self.score_threshold = args.score_threshold
        self.top_k = args.top_k
        self.class_color = class_color
        self.draw_options = dict(top_k=args.top_k, score_threshold=args.score_threshold,
                                 draw_masks=args.display_masks, draw_boxes=args.display_bboxes,
                                 draw_text=args.display_text, draw_scores=args.display_scores)

    @paddle.no_grad()
    def __call__(self, image):
        height, width = image.shape[:2]
        x = self.transform(paddle.to_tensor(np.ascontiguousarray(image)[None]))
        out = detect_image(self.net, self.detect, self.cfg, x, width, height, self.score_threshold,
                           max_detections=self.top_k)
        return draw_detections(image, out['classes'], out['scores'], out['boxes'], out['masks'],
                               self.cfg.dataset.class_names, class_color=self.class_color, **self.draw_options)


def _write_image(path, image):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'output folder does not exist: {folder}')
    if not cv2.imwrite(path, image):
        raise OSError(f'cannot write image {path!r} (unwritable, or an extension OpenCV does not know)')


def _show(title, image, wait_ms):
    """Show an image in a window; returns the key pressed. A clear error without a display."""
    try:
        cv2.imshow(title, image)
        return cv2.waitKey(wait_ms)
    except cv2.error as e:
        raise RuntimeError('cannot open a window here (no display?); give an output path, IN:OUT') from e


def eval_image(detector, in_path, out_path=None):
    """Detect in one image; write the drawing to ``out_path`` or show it."""
    drawn = detector(read_image(in_path))
    if out_path is None:
        _show(in_path, drawn, 0)
    else:
        _write_image(out_path, drawn)
        logger.info('%s -> %s', in_path, out_path)


def eval_images(detector, in_dir, out_dir, progress=True):
    """Detect in every file of ``in_dir`` (sorted); drawings go to ``out_dir/<stem>.png``.

    Unreadable files are skipped with a warning naming them. Returns
    (written paths, skipped input paths).
    """
    if not os.path.isdir(in_dir):
        raise NotADirectoryError(f'--images: {in_dir!r} is not a folder')
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f'cannot create output folder {out_dir!r}: {e.strerror}') from e
    names = sorted(n for n in os.listdir(in_dir) if os.path.isfile(os.path.join(in_dir, n)))
    written, skipped = [], []
    for name in tqdm(names, unit='img', desc='Images', disable=not progress):
        in_path = os.path.join(in_dir, name)
        try:
            image = read_image(in_path)
        except OSError as e:
            logger.warning('skipping %s', e)
            skipped.append(in_path)
            continue
        out_path = os.path.join(out_dir, os.path.splitext(name)[0] + '.png')
        _write_image(out_path, detector(image))
        written.append(out_path)
    logger.info('%d drawn images in %s%s', len(written), out_dir,
                f'; {len(skipped)} unreadable file(s) skipped' if skipped else '')
    return written, skipped


def _read_frames(capture, frames, stop):
    """Decode frames into the queue until the video ends (None marks the end) or ``stop`` is set."""
    while not stop.is_set():
        ok, frame = capture.read()
        frames.put(frame if ok else None)
        if not ok:
            return


def eval_video(detector, source, out_path=None, progress=True):
    """Detect in a video file or camera; write an mp4 to ``out_path`` or show the frames (Esc stops).

    Frames are decoded in a background thread while the network runs.
    Returns the number of frames processed.
    """
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise OSError(f'cannot open video {source!r} (missing file, unsupported codec or no such camera)')
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    width = round(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = round(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = round(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    writer = None
    if out_path is not None:
        folder = os.path.dirname(os.path.abspath(out_path))
        if not os.path.isdir(folder):
            capture.release()
            raise FileNotFoundError(f'output folder does not exist: {folder}')
        writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*'mp4v'), fps, (width, height))
        if not writer.isOpened():
            capture.release()
            raise OSError(f'cannot write video {out_path!r} (unwritable path or unsupported container)')

    frames, stop = queue.Queue(maxsize=VIDEO_QUEUE_SIZE), threading.Event()
    reader = threading.Thread(target=_read_frames, args=(capture, frames, stop), daemon=True)
    reader.start()
    count = 0
    try:
        with tqdm(total=total if total > 0 else None, unit='frame', desc='Video', disable=not progress) as bar:
            while True:
                frame = frames.get()
                if frame is None:
                    break
                drawn = detector(frame)
                if writer is not None:
                    writer.write(drawn)
                elif _show(str(source), drawn, 1) == ESCAPE_KEY:
                    break
                count += 1
                bar.update()
    except KeyboardInterrupt:
        logger.info('stopped after %d frames', count)
    finally:
        stop.set()
        # Unblock the reader if it waits on a full queue, then let it finish.
        while reader.is_alive():
            try:
                frames.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)
        capture.release()
        if writer is not None:
            writer.release()
        else:
            cv2.destroyAllWindows()
    logger.info('%d frames%s', count, f' written to {out_path}' if out_path else '')
    return count


# ------------------------------------------------------------------ main --
def main(argv=None):
    """Run the mode the flags select; returns the process exit code (1 on bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S', force=True)
    try:
        return run(args)
    except (OSError, ValueError, RuntimeError) as e:
        # Missing or unreadable files, mismatched weights: one clear line, no traceback.
        logger.error('error: %s', e)
        return 1


def run(args):
    """main() after argument parsing; raises on bad input."""
    device = select_device(args.device)

    cfg = resolve_config(args)
    net = build_network(args, cfg, device)
    detect = Detect.from_config(cfg, use_fast_nms=args.fast_nms, use_cross_class_nms=args.cross_class_nms)

    if args.image is not None:
        eval_image(ImageDetector(net, detect, cfg, args), *split_io_spec(args.image, 'image'))
        return 0
    if args.images is not None:
        in_dir, out_dir = split_io_spec(args.images, 'images')
        if out_dir is None:
            raise ValueError('--images needs IN_DIR:OUT_DIR')
        eval_images(ImageDetector(net, detect, cfg, args), in_dir, out_dir)
        return 0
    if args.video is not None:
        # Per-class colours keep an object's colour stable from frame to frame.
        eval_video(ImageDetector(net, detect, cfg, args, class_color=True), *split_io_spec(args.video, 'video'))
        return 0

    ds = cfg.dataset
    if not ds.valid_info or not os.path.isfile(ds.valid_info):
        raise FileNotFoundError(f'annotation file of {ds.name!r} not found: {ds.valid_info!r} '
                                '(see --dataset, --valid_images/--valid_info)')
    dataset = COCOEvalImages(ds.valid_images, ds.valid_info, BaseTransform.from_config(cfg), has_gt=ds.has_gt)
    if args.benchmark:
        benchmark(net, detect, cfg, dataset, args.max_images, args.score_threshold, args.num_workers)
        return 0
    compute_map = ds.has_gt and not args.output_coco_json
    if not ds.has_gt and not args.output_coco_json:
        logger.info('%s has no ground truth: writing the results files only', ds.name)
    evaluate(net, detect, cfg, dataset, args.results_dir, args.max_images, args.score_threshold,
             args.num_workers, compute_map=compute_map, log_dir=args.log_dir)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
