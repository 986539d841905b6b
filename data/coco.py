"""COCO-format datasets: training samples with instance masks, evaluation images, batching.

Both datasets return numpy arrays (cheap to pass out of DataLoader worker
processes); ``detection_collate`` batches training samples.

Ground-truth conventions (what the loss expects):
  * boxes are point form (x1, y1, x2, y2) relative to the image side;
  * labels are 0-based: ``label_map[category_id] - 1``;
  * crowd regions (``iscrowd``) are the LAST ``num_crowds`` rows of an image's
    targets and masks. They carry their class like any row; the loss tells them
    apart by ``num_crowds`` only and uses them to ignore anchors, not to train.
"""
import contextlib
import io
import json
import logging
import os

import cv2
import numpy as np
from paddle.io import Dataset
from pycocotools.coco import COCO

from data.config import DatasetConfig
from utils.errors import ConfigError, DatasetError, MissingFileError, UnreadableFileError

logger = logging.getLogger(__name__)


def image_file(image_dir, file_name):
    """Path of an image listed in a COCO info file.

    COCO 2014 names images ``COCO_val2014_000000000042.jpg`` while the download
    scripts store them as ``000000000042.jpg``, as the 2017 files are named; the
    reference strips the prefix the same way.
    """
    if file_name.startswith('COCO'):
        file_name = file_name.split('_')[-1]
    return os.path.join(image_dir, file_name)


def read_image(path):
    """[H, W, 3] BGR uint8. Raises MissingFileError / UnreadableFileError (both OSError) naming ``path``."""
    if not os.path.isfile(path):
        raise MissingFileError(f'image file not found: {path}')
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UnreadableFileError(f'cannot decode image file (corrupt or not an image): {path}')
    return img


def load_coco(info_file):
    """pycocotools' COCO index of ``info_file``, its progress messages sent to the log."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco = COCO(info_file)
    logger.debug('%s: %s', info_file, out.getvalue().strip())
    return coco


def _sorted_label_map(coco):
    """{category_id: 1-based label} in increasing category id order.

    For COCO's 80 categories this is exactly the reference's COCO_LABEL_MAP.
    """
    return {cat: i + 1 for i, cat in enumerate(sorted(coco.getCatIds()))}


def classes_from_categories(categories, class_names=None, source=''):
    """(class_names, label_map) for a COCO-format set, as data.config.DatasetConfig wants them.

    categories: the annotation file's ``categories`` list. Without
    ``class_names`` every category is a class, in increasing id order; with it
    (a sequence, or comma-separated names) only those, in that order, matched by name.
    label_map is ((category_id, 1-based label), ...). ``source`` names the file in errors.
    """
    categories = sorted(categories, key=lambda c: c['id'])
    if not categories:
        raise DatasetError(f'{source} lists no categories')
    if class_names is None:
        return tuple(c['name'] for c in categories), tuple((c['id'], i + 1) for i, c in enumerate(categories))
    if isinstance(class_names, str):
        class_names = class_names.split(',')
    names = tuple(n.strip() for n in class_names)
    id_of = {c['name']: c['id'] for c in categories}
    unknown = [n for n in names if n not in id_of]
    if unknown:
        raise ConfigError(f'class names {unknown} are not categories of {source} (it has {sorted(id_of)})')
    return names, tuple((id_of[n], i + 1) for i, n in enumerate(names))


def read_info_file(info_file):
    """The parsed JSON of a COCO annotation/info file; MissingFileError / DatasetError naming it."""
    if not info_file or not os.path.isfile(info_file):
        raise MissingFileError(f'annotation file not found: {info_file!r}')
    try:
        with open(info_file) as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f'{info_file}: not a valid JSON annotation file ({err})') from err
    if not isinstance(info, dict) or not isinstance(info.get('images'), list):
        raise DatasetError(f'{info_file}: not a COCO annotation file (no "images" list)')
    return info


def custom_dataset(info_file, class_names=None, model_classes=None, **paths):
    """A DatasetConfig for COCO-format files whose classes come from ``info_file``'s categories.

    Args:
        info_file: the annotation file whose categories define the classes
            (training: the training file; evaluation: the evaluated one).
        class_names: the classes, in label order, matched by name to the
            categories (a sequence or comma-separated; the --class_names flag).
        model_classes: the class names of the model being evaluated. When
            every category of the file is one of them, categories map to the
            model's classes by name (a model evaluated on its own val split,
            or a COCO model on a subset of COCO's classes).
        **paths: train_images, train_info, valid_images, valid_info.
    Without either, every category is a class, in increasing id order.
    ``has_gt`` is whether ``info_file`` has annotations (a test-dev image-info file has none).
    """
    info = read_info_file(info_file)
    categories = info.get('categories') or []
    model_classes = tuple(model_classes or ())
    if class_names is None and categories and all(c.get('name') in model_classes for c in categories):
        names = model_classes
        label_map = tuple(sorted((c['id'], model_classes.index(c['name']) + 1) for c in categories))
    else:
        names, label_map = classes_from_categories(categories, class_names, info_file)
    return DatasetConfig(name=os.path.basename(info_file), class_names=names, label_map=label_map,
                         has_gt='annotations' in info, **paths)


class COCODetection(Dataset):
    """Images with their boxes, classes and instance masks, for training.

    image_path: folder of the images; info_file: COCO instances json.
    transform: ``SSDAugmentation`` (or any callable with its signature
        ``(image, masks, boxes, labels, num_crowds) -> same``), or None for the raw data.
    label_map: {category_id: 1-based label}; None numbers the file's categories
        in increasing id order.
    has_gt: False for info files without annotations (e.g. test-dev); every
        image is then listed, with empty targets.

    With ground truth, only images with at least one non-crowd annotation are
    listed: an image of crowd regions alone gives the loss no positive example.
    (The reference lists every annotated image.)
    """

    def __init__(self, image_path, info_file, transform=None, label_map=None, has_gt=True):
        self.root = image_path
        self.coco = load_coco(info_file)
        self.transform = transform
        self.label_map = _sorted_label_map(self.coco) if label_map is None else dict(label_map)
        self.has_gt = has_gt
        if has_gt:
            self.ids = [img_id for img_id, anns in self.coco.imgToAnns.items()
                        if any(not ann.get('iscrowd', 0) for ann in anns)]
        else:
            self.ids = list(self.coco.imgs.keys())

    @classmethod
    def from_config(cls, cfg, transform=None, train=True):
        """The training (``train=True``) or validation split of ``cfg.dataset``."""
        ds = cfg.dataset
        if train:
            return cls(ds.train_images, ds.train_info, transform, ds.label_map_dict())
        return cls(ds.valid_images, ds.valid_info, transform, ds.label_map_dict(), ds.has_gt)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        """(img [3, S, S] float32, (target [n, 5] float32, masks [n, S, S] uint8, num_crowds)).

        target rows are (x1, y1, x2, y2, label), boxes relative. Without a
        transform, img is the raw [3, H, W] BGR uint8 image and masks [n, H, W].
        """
        img, target, masks, _, _, num_crowds = self.pull_item(index)
        return img, (target, masks, num_crowds)

    def pull_item(self, index):
        """(img, target [n, 5], masks, height, width, num_crowds) of image ``index``.

        height/width are the original image's. With ground truth, if the
        augmentation leaves no non-crowd object (e.g. every box became too small),
        the following images are tried in turn (the reference draws a random one).
        """
        for offset in range(len(self.ids)):
            sample = self._load(self.ids[(index + offset) % len(self.ids)])
            target, num_crowds = sample[1], sample[5]
            if not self.has_gt or len(target) > num_crowds:
                return sample
            logger.debug('augmentation left image %d without objects; using the next image',
                         self.ids[(index + offset) % len(self.ids)])
        raise RuntimeError('the augmentation removed every object of every image')

    def _annotations(self, img_id):
        """Annotations of an image with bounding boxes, non-crowd first, crowd last."""
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if 'bbox' in a] if self.has_gt else []
        crowd = [a for a in anns if a.get('iscrowd', 0)]
        return [a for a in anns if not a.get('iscrowd', 0)] + crowd, len(crowd)

    def _load(self, img_id):
        path = image_file(self.root, self.coco.imgs[img_id]['file_name'])
        img = read_image(path)
        height, width, _ = img.shape
        anns, num_crowds = self._annotations(img_id)

        info = self.coco.imgs[img_id]
        if anns and (info.get('height'), info.get('width')) != (height, width):
            raise ValueError(f'{path} is {width}x{height} but its info file says '
                             f"{info.get('width')}x{info.get('height')}; its masks would not fit")
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns \
            else np.zeros((0, height, width), dtype=np.uint8)
        xywh = np.array([a['bbox'] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) \
            / np.array([width, height, width, height], dtype=np.float32)
        labels = np.array([self.label_map[a['category_id']] - 1 for a in anns], dtype=np.int64)

        if self.transform is None:
            img = np.ascontiguousarray(img.transpose(2, 0, 1))
        else:
            img, masks, boxes, labels, num_crowds = self.transform(img, masks, boxes, labels, num_crowds)
        target = np.concatenate([boxes, labels[:, None].astype(np.float32)], axis=1).astype(np.float32)
        return img, target, masks, height, width, num_crowds

    def pull_image(self, index):
        """The original [H, W, 3] BGR uint8 image ``index``."""
        return read_image(image_file(self.root, self.coco.imgs[self.ids[index]]['file_name']))

    def pull_anno(self, index):
        """The COCO annotation dicts of image ``index``."""
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))


def detection_collate(batch):
    """Batch ``COCODetection`` samples whose object counts differ.

    Returns (images [B, 3, S, S] float32, targets: B arrays [n_i, 5] float32,
    masks: B arrays [n_i, S, S] float32, num_crowds: B ints). Numpy arrays: the
    DataLoader hands them to the main process and turns them into paddle tensors.
    """
    images = np.stack([img for img, _ in batch])
    targets = [target.astype(np.float32) for _, (target, _, _) in batch]
    masks = [m.astype(np.float32) for _, (_, m, _) in batch]
    num_crowds = [int(n) for _, (_, _, n) in batch]
    return images, targets, masks, num_crowds


class COCOEvalImages(Dataset):
    """The images of a COCO info file, preprocessed, for evaluation in DataLoader workers.

    Yields (img [3, S, S] float32, image_id, height, width, ok). A missing or
    unreadable image yields ok=False with a zero image and the size the info file
    gives (0 if absent), is logged, and is counted by the caller, so one bad file
    does not end a long evaluation.

    image_path: folder of the images; info_file: COCO json (annotations optional,
    e.g. test-dev's image_info file); transform: ``BaseTransform``.
    has_gt: list only images with annotations when the file has any, the image
    set the reference evaluates; False lists every image.
    """

    def __init__(self, image_path, info_file, transform, has_gt=True):
        self.root = image_path
        self.coco = load_coco(info_file)
        self.transform = transform
        self.ids = list(self.coco.imgToAnns.keys()) if has_gt else []
        if not self.ids:
            self.ids = list(self.coco.imgs.keys())

    @classmethod
    def from_config(cls, cfg, transform):
        ds = cfg.dataset
        return cls(ds.valid_images, ds.valid_info, transform, ds.has_gt)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        path = image_file(self.root, info['file_name'])
        try:
            img = read_image(path)
        except OSError as err:
            logger.warning('skipping image %s: %s', img_id, err)
            side = self.transform.max_size
            return (np.zeros((3, side, side), dtype=np.float32), img_id,
                    int(info.get('height', 0)), int(info.get('width', 0)), False)
        return self.transform(img), img_id, img.shape[0], img.shape[1], True
