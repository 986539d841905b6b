"""COCO results files and COCO mAP.

Detections of one image (after ``layers.output_utils.PostProcess``) become
COCO result records the moment they are produced and are appended to two
JSON arrays on disk, so evaluating 5,000 or 20,288 images never holds more
than one image's full-size masks:

* ``bbox_detections.json``: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
  with ``bbox`` in pixels of the original image, floats;
* ``mask_detections.json``: ``{"image_id", "category_id", "segmentation": RLE, "score"}``
  with the RLE ``counts`` as a str (pycocotools gives bytes; JSON needs text).

Category ids are the dataset's own (label map inverted); YOLACT++ writes the
box score with boxes and the mask-IoU rescored score with masks, as the
reference does. :func:`evaluate_coco` runs pycocotools' COCOeval on those
files and returns AP, AP50, AP75, APs, APm, APl for ``bbox`` and ``segm``, each
category's AP and the precision-recall curves (:class:`CocoScores`).
"""
import contextlib
import dataclasses
import io
import json
import logging
import os
import time

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.coco import load_coco
from utils.errors import OutputError
from utils.files import AtomicFile

logger = logging.getLogger(__name__)

BBOX_FILE = 'bbox_detections.json'
MASK_FILE = 'mask_detections.json'

# COCOeval.stats[0:6] in order; the "maxDets=100" averages the reference reports.
METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
IOU_TYPES = ('bbox', 'segm')


def class_to_category(label_map):
    """{0-based class index: dataset category id} from a ``{category_id: 1-based label}`` map."""
    return {label - 1: category for category, label in label_map.items()}


def detection_records(image_id, classes, boxes, scores, masks, class_to_cat, mask_scores=None):
    """COCO result records for the detections of one image.

    Args:
        image_id: the dataset's image id.
        classes: [N] int, 0-based class indices (background removed).
        boxes: [N, 4] pixel (x1, y1, x2, y2) in the original image.
        scores: [N] box scores.
        masks: [N, H, W] full-image masks (0/1, any numeric or bool dtype).
        class_to_cat: {class index: category id}, see :func:`class_to_category`.
        mask_scores: [N] scores for the mask records (YOLACT++ mask-IoU rescoring);
            ``None`` uses ``scores``.

    Returns:
        (bbox_records, mask_records), two lists of dicts ready for ``json.dumps``.
        Detections whose box has no positive width and height are left out of
        both, as the reference intends: such a box carries no mask after
        cropping. (The reference tests ``w * h > 0``, which lets through a box
        lying wholly left of and above the image, where both are negative.)
        So are detections of a class missing from ``class_to_cat``.
    """
    classes = np.asarray(classes).astype(np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    mask_scores = scores if mask_scores is None else np.asarray(mask_scores, dtype=np.float64)
    # A class the dataset has no category for (a model evaluated on a subset of its classes) has no record.
    known = np.isin(classes, np.fromiter(class_to_cat, dtype=np.int64, count=len(class_to_cat)))
    keep = np.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & known)[0]
    if keep.size == 0:
        return [], []

    masks = np.asarray(masks)
    rles = encode_rle(masks if keep.size == len(masks) else masks[keep])

    bbox_records, mask_records = [], []
    for rle, i in zip(rles, keep):
        category = int(class_to_cat[int(classes[i])])
        x1, y1, x2, y2 = boxes[i]
        # Rounded to 0.1 px as the reference does, to keep the files small.
        xywh = [round(float(v) * 10) / 10 for v in (x1, y1, x2 - x1, y2 - y1)]
        bbox_records.append({'image_id': int(image_id), 'category_id': category,
                             'bbox': xywh, 'score': float(scores[i])})
        rle['counts'] = rle['counts'].decode('ascii')
        mask_records.append({'image_id': int(image_id), 'category_id': category,
                             'segmentation': rle, 'score': float(mask_scores[i])})
    return bbox_records, mask_records


def encode_rle(masks):
    """COCO compressed RLEs of [N, H, W] masks (nonzero = inside), equal to ``pycocotools.mask.encode``'s.

    COCO's RLE runs down the columns of the whole image, and a detection's
    mask covers a small block of it: the runs are computed from that block,
    each of its columns followed by one zero standing for the rows outside the
    block, and lengthened to the rows and columns they stand for; pycocotools
    compresses them. 100 masks at 640x480: 9 ms, against 55 ms for encoding
    every pixel (AMD EPYC, 2 cores, 2026-12-01).
    """
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        masks = masks != 0
    n, h, w = masks.shape
    columns, rows = masks.any(axis=1), masks.any(axis=2)          # [N, W], [N, H]
    uncompressed = []
    for i in range(n):
        used_columns, used_rows = np.flatnonzero(columns[i]), np.flatnonzero(rows[i])
        if used_columns.size == 0:
            uncompressed.append({'size': [h, w], 'counts': [h * w]})
            continue
        c0, c1 = int(used_columns[0]), int(used_columns[-1]) + 1
        r0, r1 = int(used_rows[0]), int(used_rows[-1]) + 1
        height = r1 - r0
        if height == h:
            flat = masks[i, :, c0:c1].T.ravel()                      # whole columns follow each other
        else:
            block = np.zeros((c1 - c0, height + 1), bool)            # a zero after each column: the gap
            block[:, :height] = masks[i, r0:r1, c0:c1].T
            flat = block.ravel()
        bounds = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]))
        runs = np.diff(bounds)
        if height < h:
            # Each gap stands for the h - height rows outside the block; the last one for the tail below.
            gap_runs = np.searchsorted(bounds, np.arange(height, flat.size, height + 1), side='right') - 1
            runs += np.bincount(gap_runs, minlength=runs.size) * (h - height - 1)
            runs[-1] -= h - height
        if flat[0]:
            runs = np.concatenate(([0], runs))                       # counts start with zeros
        runs[0] += c0 * h + r0
        tail = (h - r1) + (w - c1) * h
        if runs.size % 2:                                            # ends with zeros: lengthen them
            runs[-1] += tail
            if runs[-1] == 0:
                runs = runs[:-1]
        elif tail:
            runs = np.concatenate((runs, [tail]))
        uncompressed.append({'size': [h, w], 'counts': runs.tolist()})
    return mask_util.frPyObjects(uncompressed, h, w) if uncompressed else []


class ClosedOrDiscarded:
    """The writers' ``with`` protocol: :meth:`close` on success, :meth:`discard` on an exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.discard()


class JsonArrayWriter(ClosedOrDiscarded):
    """A JSON array written one record at a time, so memory does not grow with the file.

    Records stream into a utils.files.AtomicFile (a temporary file beside
    ``path``, unique to this writer); :meth:`close` completes the array and
    renames it to ``path`` in one atomic step. A run that dies or is killed
    midway therefore leaves no file under ``path`` (or the previous complete one), and concurrent runs
    writing the same ``path`` cannot interleave: the last to finish wins
    whole. :meth:`discard` (or leaving the ``with`` block on an exception)
    removes the temporary file.
    """

    def __init__(self, path):
        try:
            self._out = AtomicFile(path, 'w')
        except OSError as e:
            raise OutputError(f'cannot write results file {path!r}: {e.strerror}') from e
        self._file = self._out.file
        self.path = path
        self.count = 0
        self._file.write('[')

    def write(self, record):
        """Append one JSON-serialisable record."""
        self._file.write((',\n' if self.count else '\n') + json.dumps(record))
        self.count += 1

    def close(self):
        """Complete the array and move it to ``path``."""
        if self._file.closed:
            return
        try:
            self._file.write('\n]\n')
            self._out.commit()
        except OSError as e:
            self._out.discard()
            raise OutputError(f'cannot write results file {self.path!r}: {e.strerror}; nothing was written '
                              'under that name') from e

    def discard(self):
        """Drop the partial file; ``path`` keeps whatever it had before."""
        self._out.discard()


class CocoResultsWriter(ClosedOrDiscarded):
    """Streams detections into ``bbox_detections.json`` and ``mask_detections.json``.

    Use as a context manager; call :meth:`add` once per image right after
    post-processing so that the image's full-size masks can be freed.
    """

    def __init__(self, results_dir, class_to_cat, bbox_file=BBOX_FILE, mask_file=MASK_FILE):
        """class_to_cat: {0-based class index: category id}, see :func:`class_to_category`."""
        try:
            os.makedirs(results_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f'cannot create results directory {results_dir!r}: {e.strerror}') from e
        self.class_to_cat = dict(class_to_cat)
        self.bbox_path = os.path.join(results_dir, bbox_file)
        self.mask_path = os.path.join(results_dir, mask_file)
        self._bbox = JsonArrayWriter(self.bbox_path)
        try:
            self._mask = JsonArrayWriter(self.mask_path)
        except OSError:
            self._bbox.discard()
            raise
        self.num_images = 0

    @property
    def num_detections(self):
        return self._bbox.count

    def add(self, image_id, classes, boxes, scores, masks, mask_scores=None):
        """Encode and append one image's detections (arguments as :func:`detection_records`)."""
        bbox_records, mask_records = detection_records(
            image_id, classes, boxes, scores, masks, self.class_to_cat, mask_scores)
        for record in bbox_records:
            self._bbox.write(record)
        for record in mask_records:
            self._mask.write(record)
        self.num_images += 1

    def close(self):
        """Complete both files and move them into place."""
        self._bbox.close()
        self._mask.close()

    def discard(self):
        """Drop both partial files (an interrupted or failed evaluation)."""
        self._bbox.discard()
        self._mask.discard()


def load_results(coco_gt, results):
    """``coco_gt.loadRes`` that also accepts an empty result list.

    results: a results JSON path or a list of records. pycocotools cannot load
    an empty list (it inspects the first record); an image set without a single
    detection is still a valid result, scored 0.
    """
    if isinstance(results, str):
        with open(results) as f:
            results = json.load(f)
    if results:
        with _quiet():
            return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {'images': list(coco_gt.dataset['images']),
                     'categories': list(coco_gt.dataset.get('categories', [])),
                     'annotations': []}
    with _quiet():
        empty.createIndex()
    return empty


@dataclasses.dataclass
class CocoScores:
    """What COCOeval measured on a results file pair.

    metrics: {iou_type: {metric: value}} with the metrics of :data:`METRICS` as
        COCOeval reports them (fractions in [0, 1]; -1 where the ground truth
        has no object of that size).
    per_class: [{'category_id', 'name', 'bbox', 'segm'}], one row per scored
        category in increasing id order: its AP (:func:`per_category_ap`), -1
        for a category without ground truth.
    precision: {iou_type: [T, R, K] array}: COCOeval's interpolated precision
        at IoU threshold t, recall threshold r and category k (the order of
        ``per_class``), all areas, 100 detections; -1 where undefined.
    iou_thresholds: [T]; recall_thresholds: [R] (COCOeval's params).
    """
    metrics: dict
    per_class: list
    precision: dict
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray


def _all_areas_100_dets(evaluator):
    """(area index, maxDets index) of COCOeval's 'all' area range and 100 detections."""
    return evaluator.params.areaRngLbl.index('all'), evaluator.params.maxDets.index(100)


def per_category_ap(evaluator):
    """{category id: AP} of an accumulated COCOeval, as ``summarize`` averages AP for one category.

    AP at IoU 0.5:0.95, all areas, 100 detections: the mean of the
    precision array's entries for that category that are not -1 (-1 when
    all are, i.e. the category has no ground truth in the images scored).
    Equal to ``stats[0]`` of a COCOeval run with ``params.catIds = [id]``.
    """
    area, dets = _all_areas_100_dets(evaluator)
    precision = evaluator.eval['precision']                      # [T, R, K, A, M]
    out = {}
    for k, category in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, area, dets]
        defined = p[p > -1]
        out[int(category)] = float(defined.mean()) if defined.size else -1.0
    return out


def evaluate_coco(coco_gt, result_files, image_ids=None, category_ids=None):
    """COCO mAP, overall and per category, of results files against ground truth.

    Args:
        coco_gt: a pycocotools COCO object or an annotation file path.
        result_files: {'bbox': path, 'segm': path}; either may be absent.
        image_ids: evaluate on these images only (e.g. when ``--max_images`` was
            used); ``None`` means every image of the ground truth.
        category_ids: average over these categories only (a model of some of
            the file's categories: the others would count as missed, AP 0);
            ``None`` means every category of the ground truth.

    Returns:
        a :class:`CocoScores`.
    """
    if isinstance(coco_gt, str):
        coco_gt = load_coco(coco_gt)
    metrics, per_category, precision = {}, {}, {}
    params = None
    for iou_type in IOU_TYPES:
        if iou_type not in result_files:
            continue
        coco_dt = load_results(coco_gt, result_files[iou_type])
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        if category_ids is not None:
            evaluator.params.catIds = sorted(int(i) for i in category_ids)
        with _quiet():
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: float(v) for name, v in zip(METRICS, evaluator.stats[:len(METRICS)])}
        per_category[iou_type] = per_category_ap(evaluator)
        area, dets = _all_areas_100_dets(evaluator)
        precision[iou_type] = np.array(evaluator.eval['precision'][:, :, :, area, dets])
        params = evaluator.params
    categories = sorted(params.catIds) if params is not None else []
    per_class = [{'category_id': int(c), 'name': coco_gt.cats[c]['name'] if c in coco_gt.cats else str(c),
                  **{t: per_category[t][c] for t in per_category}} for c in categories]
    return CocoScores(metrics, per_class, precision,
                      np.array(params.iouThrs) if params is not None else np.zeros(0),
                      np.array(params.recThrs) if params is not None else np.zeros(0))


def _percent(v):
    return f'{100 * v:7.2f}' if v >= 0 else '    n/a'


def format_table(results):
    """The mAP table, in percent, one row per IoU type (``n/a``: no ground truth of that size)."""
    header = '      |' + '|'.join(f'{m:>7} ' for m in METRICS) + '|'
    sep = '-' * len(header)
    rows = [f' {t:<4} |' + '|'.join(_percent(results[t][m]) + ' ' for m in METRICS) + '|'
            for t in IOU_TYPES if t in results]
    return '\n'.join([header, sep] + rows + [sep])


def format_per_class_table(per_class):
    """Per-class box and mask AP (0.5:0.95), in percent, one row per category (``n/a``: no ground truth)."""
    width = max([len('class')] + [len(row['name']) for row in per_class])
    kinds = [t for t in IOU_TYPES if any(t in row for row in per_class)]
    names = {'bbox': 'box AP', 'segm': 'mask AP'}
    header = f' {"class":<{width}} |' + '|'.join(f'{names[t]:>8} ' for t in kinds) + '|'
    sep = '-' * len(header)
    rows = [f' {row["name"]:<{width}} |' + '|'.join(' ' + _percent(row[t]) + ' ' for t in kinds) + '|'
            for row in per_class]
    return '\n'.join([header, sep] + rows + [sep])


def write_json_atomic(path, obj, **dump_options):
    """Write ``obj`` as JSON to ``path`` in one step (utils.files.AtomicFile): a run that dies
    midway leaves ``path`` as it was (absent, or the previous complete file)."""
    with AtomicFile(path, 'w') as f:
        json.dump(obj, f, **dump_options)


def eval_log_path(log_dir, run_name):
    """A new ``<log_dir>/eval_<run_name>_<time>.json`` (two runs in the same second keep both logs)."""
    os.makedirs(log_dir, exist_ok=True)
    stem = os.path.join(log_dir, f"eval_{run_name}_{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = stem + '.json', 1
    while os.path.exists(path):
        path, n = f'{stem}_{n}.json', n + 1
    return path


def write_eval_log(scores, path, **info):
    """Save one evaluation's :class:`CocoScores` as the JSON ``path`` (see :func:`eval_log_path`).

    ``info`` (config, weights, dataset, image counts, ...) is stored next to the
    numbers so that a log alone says what was measured. Returns the path.
    """
    write_json_atomic(path, {'results': scores.metrics, 'table': format_table(scores.metrics).splitlines(),
                             'per_class': scores.per_class,
                             'per_class_table': format_per_class_table(scores.per_class).splitlines(),
                             **info}, indent=2)
    return path


@contextlib.contextmanager
def _quiet():
    """Send pycocotools' prints to the debug log instead of stdout."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            logger.debug('%s', buffer.getvalue().rstrip())
