"""Detections of images and video frames saved as data: COCO results files and labelme annotations.

``InferenceResults`` receives the Predictor output of each image (or frame)
and writes

* to ``results_dir``: ``bbox_detections.json`` and ``mask_detections.json``
  (utils.evaluation.coco_eval.CocoResultsWriter: boxes, RLE masks, scores) and
  ``image_info.json``, the COCO image-info file of the images seen (ids,
  file names, sizes; the categories are the model's classes, ids 1..C). The
  three together can be scored against ground truth with COCOeval, or the
  folder run again with ``eval.py --valid_images DIR --valid_info image_info.json``;
* to ``labelme_dir``: one labelme JSON per image, each mask traced into
  polygons, so that predictions can be corrected in labelme and trained on.

Every file appears complete under its name or not at all (temporary files
renamed into place).
"""
import logging
import os

import cv2
import numpy as np

from utils.evaluation.coco_eval import ClosedOrDiscarded, CocoResultsWriter, write_json_atomic
from utils.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

IMAGE_INFO_FILE = 'image_info.json'
# The labelme file format version written (labelme 5's; its reader accepts the shapes written here).
LABELME_VERSION = '5.2.1'


def class_indices(names, class_names):
    """0-based class indices of the comma-separated ``names`` (the --class_filter value).

    Raises ConfigError naming an unknown class and the model's classes.
    """
    wanted = [n.strip() for n in names.split(',') if n.strip()]
    unknown = [n for n in wanted if n not in class_names]
    if unknown or not wanted:
        problem = 'unknown class ' + ', '.join(map(repr, unknown)) if unknown else 'no class named'
        raise ConfigError(f"--class_filter: {problem}; the model's classes are {', '.join(class_names)}")
    return sorted({class_names.index(n) for n in wanted})


def keep_classes(out, classes):
    """A Predictor output (see Predictor.__call__) with only the detections of ``classes`` (0-based)."""
    keep = np.flatnonzero(np.isin(out['classes'], classes))
    return {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in out.items()}


def mask_polygons(mask, min_points=3):
    """The outer contours of a [H, W] mask as polygons: a list of [n, 2] float pixel (x, y) arrays.

    cv2.findContours (external contours, collinear points dropped): one
    polygon per connected part, through the centres of its boundary pixels.
    Parts of fewer than ``min_points`` points (a pixel or a line) are left out.
    """
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c[:, 0, :].astype(np.float64) for c in contours if len(c) >= min_points]


def labelme_record(out, image_path, json_path, height, width):
    """A labelme annotation (dict) of one image's detections.

    Each detection's mask becomes one ``polygon`` shape per connected part,
    labelled with its class name; the parts of one detection share a
    ``group_id`` (the detection's index), a single part has none (labelme's
    convention for one shape per instance). The score goes to ``description``.
    ``imagePath`` is relative to the JSON's folder, as labelme writes it; no image data is embedded.
    """
    shapes = []
    for i, (label, score, mask) in enumerate(zip(out['labels'], out['scores'], out['masks'])):
        polygons = mask_polygons(mask)
        for points in polygons:
            shapes.append({'label': label, 'points': points.tolist(),
                           'group_id': i if len(polygons) > 1 else None, 'description': f'score {float(score):.3f}',
                           'shape_type': 'polygon', 'flags': {}})
    return {'version': LABELME_VERSION, 'flags': {}, 'shapes': shapes,
            'imagePath': os.path.relpath(os.path.abspath(image_path), os.path.dirname(os.path.abspath(json_path))),
            'imageData': None, 'imageHeight': int(height), 'imageWidth': int(width)}


class InferenceResults(ClosedOrDiscarded):
    """COCO results files (and their image-info file) and/or labelme files of the images given to :meth:`add`.

    Args:
        class_names: the model's classes (category ids 1..C in the COCO files).
        results_dir: folder of the COCO files, or None.
        labelme_dir: folder of the labelme files, or None.
        image_root: the folder the images' ``file_name`` is relative to (--images IN_DIR);
            None: their base name.

    Use as a context manager: the COCO files are complete on a normal exit and
    discarded on an exception. Labelme files are written one by one.
    """

    def __init__(self, class_names, results_dir=None, labelme_dir=None, image_root=None):
        self.class_names = tuple(class_names)
        self.results_dir, self.labelme_dir, self.image_root = results_dir, labelme_dir, image_root
        self.images = []
        self.labelme_files = []
        self._labelme_names = set()
        self.coco = (CocoResultsWriter(results_dir, {c: c + 1 for c in range(len(self.class_names))})
                     if results_dir is not None else None)
        self.info_path = os.path.join(results_dir, IMAGE_INFO_FILE) if results_dir is not None else None
        if labelme_dir is not None:
            try:
                os.makedirs(labelme_dir, exist_ok=True)
            except OSError as e:
                if self.coco is not None:
                    self.coco.discard()
                raise OutputError(f'cannot create the labelme folder {labelme_dir!r}: {e.strerror}') from e

    def add(self, out, height, width, path=None, frame=None):
        """Record one image's detections (a Predictor output); its id is the count of images so far.

        path: the image file (images), or the video (with ``frame``, its 0-based index).
        """
        image_id = len(self.images) + 1
        if frame is None:
            name = os.path.relpath(path, self.image_root) if self.image_root else os.path.basename(path)
            entry = {'id': image_id, 'file_name': name, 'width': int(width), 'height': int(height)}
        else:
            entry = {'id': image_id, 'file_name': os.path.basename(str(path)), 'frame': int(frame),
                     'width': int(width), 'height': int(height)}
        self.images.append(entry)
        if self.coco is not None:
            self.coco.add(image_id, out['classes'], out['boxes'], out['scores'], out['masks'], out.get('mask_scores'))
        if self.labelme_dir is not None:
            json_path = self._labelme_path(path)
            try:
                write_json_atomic(json_path, labelme_record(out, path, json_path, height, width), indent=2)
            except OSError as e:
                raise OutputError(f'cannot write labelme file {json_path!r}: {e.strerror}') from e
            self.labelme_files.append(json_path)

    def _labelme_path(self, image_path):
        """<labelme_dir>/<image stem>.json (labelme's pairing); <name>.json when two images share a stem."""
        name = os.path.basename(image_path)
        stem = os.path.splitext(name)[0]
        chosen = stem if stem not in self._labelme_names else name
        if chosen != stem:
            logger.warning('%s: another image has the stem %r, its labelme file is %s.json', image_path, stem, name)
        self._labelme_names.add(chosen)
        return os.path.join(self.labelme_dir, chosen + '.json')

    def close(self):
        """Complete the COCO files and write the image-info file."""
        if self.coco is None:
            return
        self.coco.close()
        categories = [{'id': c + 1, 'name': n, 'supercategory': ''} for c, n in enumerate(self.class_names)]
        info = {'info': {'description': 'images run through eval.py',
                         'image_root': os.path.abspath(self.image_root) if self.image_root else None},
                'images': self.images, 'categories': categories}
        try:
            write_json_atomic(self.info_path, info)
        except OSError as e:
            raise OutputError(f'cannot write {self.info_path!r}: {e.strerror}') from e
        logger.info('%d detections of %d images written to %s, %s and %s', self.coco.num_detections,
                    len(self.images), self.coco.bbox_path, self.coco.mask_path, self.info_path)

    def discard(self):
        if self.coco is not None:
            self.coco.discard()
