"""COCO-format datasets: training samples with instance masks, evaluation images, batching.

Both datasets return numpy arrays (cheap to pass out of DataLoader worker
processes); ``detection_collate`` batches training samples.

Both index the annotation file through data.validation: bad entries are
dropped (one warning) or, with ``strict``, stop construction with a
DatasetError, so pycocotools never sees them.

Loading errors and the DataLoader: an exception raised in ``__getitem__`` or
in the collate function never reaches the main process cleanly in Paddle 3.3.
With 0 workers the loader's fetch thread dies without closing its queue and
the main process waits forever; with worker processes the worker's traceback
is printed and the main process gets a bare SystemError "Blocking queue is
killed because the data reader raises an exception". So neither
``__getitem__`` nor ``detection_collate`` raises: a sample that fails to load
becomes a :class:`SampleError` record (image id, path, message, traceback),
the collate passes it on as the batch, and :func:`check_batches`, wrapped
around the loader in the main process, raises it as a DatasetError naming the
image. An image file that cannot be read (gone since validation, which
checks only that files exist, corrupt, or of another size than its info
entry says) is skipped with a warning naming it: training takes the next
image in its place (deterministically, so a resumed run sees the same
stream), evaluation yields ``ok=False`` and does not score it. Any other
error (e.g. a failing transform: perhaps a bug) stops the run.

Ground-truth conventions (what the loss expects):
  * boxes are point form (x1, y1, x2, y2) relative to the image side;
  * labels are 0-based: ``label_map[category_id] - 1``;
  * crowd regions (``iscrowd``) are the LAST ``num_crowds`` rows of an image's
    targets and masks. They carry their class like any row; the loss tells them
    apart by ``num_crowds`` only and uses them to ignore anchors, not to train.
"""
import contextlib
import io
import logging
import os
import traceback

import numpy as np
from paddle.io import Dataset
from pycocotools.coco import COCO

from data.config import DatasetConfig
from data.images import DEFAULT_MAX_PIXELS, read_image
from data.validation import image_file, load_annotations, validate_coco
from utils.errors import ConfigError, DatasetError, UnreadableFileError, YolactError

logger = logging.getLogger(__name__)

__all__ = ['COCODetection', 'COCOEvalImages', 'SampleError', 'check_batches', 'classes_from_categories',
           'detection_collate', 'eval_collate', 'image_file', 'load_coco', 'read_image']


def load_coco(info_file, data=None):
    """pycocotools' COCO index of ``info_file`` (or of its already loaded json dict ``data``).

    Its progress messages go to the log.
    """
    with contextlib.redirect_stdout(io.StringIO()) as out:
        if data is None:
            coco = COCO(info_file)
        else:
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
    logger.debug('%s: %s', info_file, out.getvalue().strip())
    return coco


class SampleError:
    """What a dataset returns, instead of raising, for a sample it failed to load.

    Carried through the DataLoader (picklable, and kept as is by Paddle's batch
    flattening since it is not a sequence) to the main process, where
    :func:`check_batches` raises it. image_id / path name the image (None when batching failed); message is
    the exception's ``Type: text``; details its traceback in the loading process,
    kept (empty for file errors: a missing or undecodable image is the user's
    input, not a bug) so that a failing transform still shows where it failed.
    """

    def __init__(self, image_id, path, message, details=''):
        self.image_id, self.path, self.message, self.details = image_id, path, message, details

    @classmethod
    def from_exception(cls, image_id, path, err):
        details = '' if isinstance(err, OSError) else \
            ''.join(traceback.format_exception(type(err), err, err.__traceback__))
        # The user's input (a missing or corrupt file) says what is wrong by itself; anything else names its type.
        message = str(err) if isinstance(err, YolactError) else f'{type(err).__name__}: {err}'
        return cls(image_id, path, message, details)

    def exception(self):
        """The DatasetError to raise in the main process."""
        if self.path is None:  # the samples loaded but could not be batched
            return DatasetError(f'cannot batch the samples: {self.message}')
        return DatasetError(f'cannot load image {self.image_id} ({self.path}): {self.message}')

    def __repr__(self):
        return f'SampleError({self.image_id!r}, {self.path!r}, {self.message!r})'


def check_batches(batches):
    """Yield the batches of a DataLoader over these datasets; raise DatasetError at a failed sample.

    batches: any iterable of batches made by ``detection_collate`` or
    ``eval_collate``, e.g. ``paddle.io.DataLoader(..., collate_fn=detection_collate)``.
    An error other than a file error logs its loading traceback first (it may be a bug).
    """
    for batch in batches:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], SampleError):
            error = batch[0]
            if error.details:
                logger.error('loading image %s failed in the data loader:\n%s', error.image_id, error.details)
            raise error.exception()
        yield batch


def _error_batch(batch):
    """[the first SampleError of ``batch``, a 1-element array], or None.

    Paddle's DataLoader only carries sequences and mappings as batches, and
    with 0 workers pairs each batch's structure with the next arrays it
    queued, which a batch without any array desynchronises: hence the array.
    """
    for sample in batch:
        if isinstance(sample, SampleError):
            return [sample, np.zeros(1, dtype=np.uint8)]
    return None


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


def check_category_names(categories, source):
    """Raise DatasetError naming the ids unless every category has its own name.

    Classes are matched to categories by name (training file -> model ->
    evaluated file), so two categories of one name would silently merge or
    swap classes and write detections under the wrong category id.
    """
    ids_of = {}
    for cat in categories:
        name = cat.get('name')
        if not isinstance(name, str):
            raise DatasetError(f'{source}: category {cat["id"]} has no name')
        ids_of.setdefault(name, []).append(cat['id'])
    shared = {name: ids for name, ids in ids_of.items() if len(ids) > 1}
    if shared:
        listed = '; '.join(f'{name!r}: ids {", ".join(map(str, ids))}' for name, ids in sorted(shared.items()))
        raise DatasetError(f'{source}: categories share a name ({listed}); give each category its own name')


def custom_dataset_config(info_file, class_names=None, model_classes=None, **paths):
    """A DatasetConfig for COCO-format files whose classes come from ``info_file``'s categories.

    Args:
        info_file: the annotation file whose categories define the classes
            (training: the training file; evaluation: the evaluated one).
        class_names: the classes, in label order, matched by name to the
            categories (a sequence or comma-separated; the --class_names flag).
        model_classes: the class names of the model being evaluated. When
            every category of the file is one of them, categories map to the
            model's classes by name (a model evaluated on its own val split,
            or a COCO model on a subset of COCO's classes). When every one of
            them is a category of the file, they are the classes, matched by
            name, and the other categories are ignored (a model fine-tuned
            with --class_names, evaluated on the full val file).
        **paths: train_images, train_info, valid_images, valid_info.
    Without either, every category is a class, in increasing id order.
    ``has_gt`` is whether ``info_file`` has annotations (a test-dev image-info file has none).
    """
    info = load_annotations(info_file)
    categories = info.get('categories') or []
    check_category_names(categories, info_file)
    model_classes = tuple(model_classes or ())
    if class_names is None and categories and all(c.get('name') in model_classes for c in categories):
        names = model_classes
        label_map = tuple(sorted((c['id'], model_classes.index(c['name']) + 1) for c in categories))
    elif class_names is None and model_classes and set(model_classes) <= {c.get('name') for c in categories}:
        names, label_map = classes_from_categories(categories, model_classes, info_file)
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
    strict: a bad annotation-file entry raises DatasetError instead of being
        skipped with a warning (see data.validation).
    check_files: drop (or, with strict, refuse) images whose file is missing.
    include_background: list every image of the file, also those without a
        (non-crowd) annotation, as negatives: all their anchors are background.
    max_pixels: images whose header declares more pixels are skipped like
        unreadable ones (data.images.read_image; None: no cap).

    Only images with at least one non-crowd annotation are listed unless
    ``include_background``: an image of crowd regions alone gives the loss no
    positive example. (The reference lists every annotated image.)
    """

    def __init__(self, image_path, info_file, transform=None, label_map=None, strict=False, check_files=True,
                 include_background=False, max_pixels=DEFAULT_MAX_PIXELS):
        self.root = image_path
        self.max_pixels = max_pixels
        self.validation = validate_coco(info_file, image_path, label_map, check_files=check_files, strict=strict)
        self.coco = load_coco(info_file, self.validation.data)
        self.transform = transform
        self.label_map = _sorted_label_map(self.coco) if label_map is None else dict(label_map)
        self.include_background = include_background
        if include_background:
            self.ids = list(self.coco.imgs.keys())
        else:
            self.ids = [img_id for img_id, anns in self.coco.imgToAnns.items()
                        if any(not ann.get('iscrowd', 0) for ann in anns)]

    @classmethod
    def from_config(cls, cfg, transform=None, strict=False, include_background=False,
                    max_pixels=DEFAULT_MAX_PIXELS):
        """The training split of ``cfg.dataset``."""
        ds = cfg.dataset
        return cls(ds.train_images, ds.train_info, transform, ds.label_map_dict(), strict=strict,
                   include_background=include_background, max_pixels=max_pixels)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        """(img [3, S, S] float32, (target [n, 5] float32, masks [n, S, S] uint8, num_crowds)).

        target rows are (x1, y1, x2, y2, label), boxes relative. Without a
        transform, img is the raw [3, H, W] BGR uint8 image and masks [n, H, W].
        Any error while loading or transforming returns a :class:`SampleError`
        instead (see the module docstring); ``pull_item`` raises it.
        """
        try:
            img, target, masks, _, _, num_crowds = self.pull_item(index)
        except Exception as err:  # noqa: BLE001 -- raised in the main process by check_batches
            img_id = self.ids[index]
            return SampleError.from_exception(img_id, image_file(self.root, self.coco.imgs[img_id]['file_name']),
                                              err)
        return img, (target, masks, num_crowds)

    def pull_item(self, index):
        """(img, target [n, 5], masks, height, width, num_crowds) of image ``index``.

        height/width are the original image's. If the image file cannot be read
        (logged as a warning), or the augmentation leaves no non-crowd object
        (e.g. every box became too small), the following images are tried in
        turn (the reference draws a random one); with ``include_background``
        such an image is kept, as a negative.
        """
        unreadable = 0
        for offset in range(len(self.ids)):
            img_id = self.ids[(index + offset) % len(self.ids)]
            try:
                sample = self._load(img_id)
            except OSError as err:     # MissingFileError, UnreadableFileError: the file named
                logger.warning('skipping image %s: %s', img_id, err)
                unreadable += 1
                continue
            target, num_crowds = sample[1], sample[5]
            if self.include_background or len(target) > num_crowds:
                return sample
            logger.debug('augmentation left image %d without objects; using the next image', img_id)
        if unreadable == len(self.ids):
            raise UnreadableFileError(f'none of the {len(self.ids)} images in {self.root} can be read')
        raise RuntimeError('the augmentation removed every object of every image')

    def _annotations(self, img_id):
        """Annotations of an image with bounding boxes, non-crowd first, crowd last."""
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if 'bbox' in a]
        crowd = [a for a in anns if a.get('iscrowd', 0)]
        return [a for a in anns if not a.get('iscrowd', 0)] + crowd, len(crowd)

    def _load(self, img_id):
        info = self.coco.imgs[img_id]
        anns, num_crowds = self._annotations(img_id)
        img = read_image(image_file(self.root, info['file_name']), (info['height'], info['width']) if anns else None,
                         max_pixels=self.max_pixels)
        height, width, _ = img.shape
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

def detection_collate(batch):
    """Batch ``COCODetection`` samples whose object counts differ.

    Returns (images [B, 3, S, S] float32, targets: B arrays [n_i, 5] float32,
    masks: B arrays [n_i, S, S] float32, num_crowds: B ints). Numpy arrays: the
    DataLoader hands them to the main process and turns them into paddle tensors.
    A batch with a :class:`SampleError` is [that error] (the first), for check_batches.
    """
    error = _error_batch(batch)
    if error is not None:
        return error
    try:
        images = np.stack([img for img, _ in batch])
        targets = [target.astype(np.float32) for _, (target, _, _) in batch]
        masks = [m.astype(np.float32) for _, (_, m, _) in batch]
        num_crowds = [int(n) for _, (_, _, n) in batch]
    except Exception as err:  # noqa: BLE001 -- e.g. a transform giving unequal sizes; raised by check_batches
        return _error_batch([SampleError.from_exception(None, None, err)])
    return images, targets, masks, num_crowds


def eval_collate(batch):
    """collate_fn for ``COCOEvalImages`` batches of one: the sample itself, not stacked.

    (img [3, S, S], image_id, height, width, ok); [SampleError] for a failed sample, for check_batches.
    """
    error = _error_batch(batch)
    return batch[0] if error is None else error


class COCOEvalImages(Dataset):
    """The images of a COCO info file, preprocessed, for evaluation in DataLoader workers.

    Yields (img [3, S, S] float32, image_id, height, width, ok). A missing or
    unreadable image yields ok=False with a zero image and the size the info file
    gives, is logged, and is counted by the caller, so one bad file does not end
    a long evaluation. Any other error (e.g. in the transform) yields a
    :class:`SampleError`, which :func:`check_batches` raises in the main process.

    image_path: folder of the images; info_file: COCO json (annotations optional,
    e.g. test-dev's image_info file); transform: ``BaseTransform``.
    has_gt: list only images with annotations when the file has any, the image
    set the reference evaluates; False lists every image.
    strict: a bad annotation-file entry raises DatasetError instead of being
    skipped with a warning (see data.validation). Image files are not checked
    up front: unreadable ones are skipped as above, and so are images above
    ``max_pixels`` (data.images.read_image; None: no cap).
    """

    def __init__(self, image_path, info_file, transform, has_gt=True, strict=False, max_pixels=DEFAULT_MAX_PIXELS):
        self.root = image_path
        self.max_pixels = max_pixels
        self.validation = validate_coco(info_file, image_path, strict=strict)
        self.coco = load_coco(info_file, self.validation.data)
        self.transform = transform
        self.ids = list(self.coco.imgToAnns.keys()) if has_gt else []
        if not self.ids:
            self.ids = list(self.coco.imgs.keys())

    @classmethod
    def from_config(cls, cfg, transform, strict=False, max_pixels=DEFAULT_MAX_PIXELS):
        ds = cfg.dataset
        return cls(ds.valid_images, ds.valid_info, transform, ds.has_gt, strict=strict, max_pixels=max_pixels)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        path = image_file(self.root, info['file_name'])
        try:
            # Detections are scored (and RLE-encoded for the server) at the info file's size.
            img = read_image(path, (info['height'], info['width']), max_pixels=self.max_pixels)
        except OSError as err:
            logger.warning('skipping image %s: %s', img_id, err)
            side = self.transform.max_size
            return (np.zeros((3, side, side), dtype=np.float32), img_id, info['height'], info['width'], False)
        try:
            return self.transform(img), img_id, img.shape[0], img.shape[1], True
        except Exception as err:  # noqa: BLE001 -- raised in the main process by check_batches
            return SampleError.from_exception(img_id, path, err)
