"""One pass over a COCO-format annotation (or image-info) file before any batch is loaded.

Users bring messy datasets; pycocotools and the DataLoader turn a single bad
entry into a raw traceback or a hang. :func:`validate_coco` reads the file,
drops every entry the pipeline cannot use and returns the cleaned data, which
the datasets in data/coco.py index instead of the file, so pycocotools never
sees a bad entry.

What is checked (one reason string per kind, the keys of ``report.counts``):

* the file exists (else MissingFileError) and is a JSON object with ``images``
  and ``categories`` lists (``annotations`` optional: image-info files such as
  test-dev's); anything else is a DatasetError naming the file;
* images: an int ``id`` not seen before (``DUPLICATE_IMAGE``: the first entry
  is kept), a ``file_name`` string and positive integer ``width``/``height``
  (``BAD_IMAGE``), and with ``check_files`` that the file exists
  (``MISSING_FILE``). A dropped image takes its annotations with it;
* annotations: a dict with an id not seen before (``BAD_ANNOTATION``), an
  ``image_id`` of a listed image (``UNKNOWN_IMAGE``), a listed ``category_id``
  (``UNKNOWN_CATEGORY``), a bbox of 4 finite numbers with width and height > 0
  (``BAD_BBOX``), ``iscrowd`` 0 or 1 (``BAD_ISCROWD``), and a segmentation that
  is a non-empty list of polygons (``EMPTY_SEGMENTATION``), each an even number
  >= 6 of finite numbers (``SHORT_POLYGON``, ``BAD_POLYGON``), or an RLE dict
  whose ``size`` is the image's [height, width] (``RLE_WRONG_SIZE``) and whose
  ``counts`` (a list, or COCO's compressed string) are runs adding up to
  height * width (``BAD_RLE``). pycocotools' decoder does not bound-check the
  runs, so a bad RLE would crash it or write out of bounds: the counts are
  checked without decoding any mask.

By default bad entries are skipped with ONE warning listing counts by reason and
the first ids; ``strict=True`` raises DatasetError with the same summary.

With a label map (classes chosen with --class_names, or a model's classes),
annotations of the listed categories it leaves out are not bad entries: they
are dropped and counted in ``report.unselected``, logged on one info line.
"""
import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from utils.errors import DatasetError, MissingFileError

logger = logging.getLogger(__name__)

DUPLICATE_IMAGE = 'duplicate image id'
BAD_IMAGE = 'image entry without an int id, a file_name and positive int width/height'
MISSING_FILE = 'missing image file'
BAD_ANNOTATION = 'annotation entry that is not a dict with a new id'
UNKNOWN_IMAGE = 'unknown image_id'
UNKNOWN_CATEGORY = 'unknown category_id'
BAD_BBOX = 'bbox not 4 finite numbers with w, h > 0'
BAD_ISCROWD = 'iscrowd not 0/1'
EMPTY_SEGMENTATION = 'empty segmentation'
SHORT_POLYGON = 'polygon with fewer than 3 points'
BAD_POLYGON = 'polygon of odd length or non-finite numbers'
RLE_WRONG_SIZE = 'RLE of the wrong size'
BAD_RLE = 'RLE counts that do not decode to the image size'

IMAGE_REASONS = (DUPLICATE_IMAGE, BAD_IMAGE, MISSING_FILE)
# Ids listed per reason in the summary.
MAX_EXAMPLES = 5


@dataclass
class ValidationReport:
    """The outcome of :func:`check_coco`.

    counts: {reason: number of dropped entries}; examples: {reason: the first
    MAX_EXAMPLES image ids (image reasons) or annotation ids (annotation
    reasons)}; data: the cleaned json dict (bad entries, the annotations of
    dropped images and those of categories outside the label map removed;
    other keys untouched); unselected: {category_id: number of its
    annotations dropped for being outside the label map}.
    """
    source: str
    data: dict
    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    unselected: dict = field(default_factory=dict)

    @property
    def ok(self):
        return not self.counts

    def add(self, reason, entry_id):
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < MAX_EXAMPLES:
            ids.append(entry_id)

    def summary(self):
        """One line: the file, then per reason its count and first ids."""
        if self.ok:
            return f'{self.source}: no bad entries'
        parts = []
        for reason, count in self.counts.items():
            kind = 'image' if reason in IMAGE_REASONS else 'annotation'
            ids = ', '.join(map(str, self.examples[reason])) + (', ...' if count > MAX_EXAMPLES else '')
            parts.append(f'{reason}: {count} ({kind} {ids})')
        return f'{self.source}: ' + '; '.join(parts)


def load_annotations(info_file):
    """The json dict of a COCO annotation or image-info file.

    Raises MissingFileError when it does not exist and DatasetError (naming the
    file, and the position for malformed JSON) when it is not a JSON object
    with ``images`` and ``categories`` lists.
    """
    if not os.path.isfile(info_file):
        raise MissingFileError(f'annotation file not found: {info_file}')
    try:
        with open(info_file, 'rb') as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f'{info_file} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}') \
            from None
    except UnicodeDecodeError as err:
        raise DatasetError(f'{info_file} is not UTF-8 JSON: {err}') from None
    if not isinstance(data, dict):
        raise DatasetError(f'{info_file}: a COCO file is a JSON object, not {type(data).__name__}')
    for key in ('images', 'categories'):
        if not isinstance(data.get(key), list):
            raise DatasetError(f'{info_file} has no {key!r} list (not a COCO-format file?)')
    if 'annotations' in data and not isinstance(data['annotations'], list):
        raise DatasetError(f"{info_file}: 'annotations' is not a list")
    for cat in data['categories']:
        if not (isinstance(cat, dict) and _is_int(cat.get('id'))):
            raise DatasetError(f'{info_file}: category entry without an int id: {str(cat)[:80]}')
    return data


def image_file(image_dir, file_name):
    """Path of an image listed in a COCO info file.

    COCO 2014 names images ``COCO_val2014_000000000042.jpg`` while the download
    scripts store them as ``000000000042.jpg``, as the 2017 files are named; the
    reference strips the prefix the same way.
    """
    if file_name.startswith('COCO'):
        file_name = file_name.split('_')[-1]
    return os.path.join(image_dir, file_name)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value):
    return _is_int(value) and value > 0


def _finite_sum(values):
    """True when ``values`` are numbers whose sum is finite (NaN and inf propagate through the sum)."""
    try:
        return math.isfinite(sum(values))
    except TypeError:
        return False


# Longest run of one compressed-RLE count: 7 characters hold 35 bits, more than
# any uint32 run; longer groups are malformed (and bounding them keeps the sums
# below int64 overflow).
_MAX_RLE_GROUP = 7


def decode_rle_strings(strings):
    """Run lengths of COCO compressed RLE strings, decoded together without pycocotools.

    Returns (runs int64 [R], owner int64 [R] index of each run's string,
    malformed bool [len(strings)]). Each run is a little-endian group of 6-bit
    characters (value = char - 48): 5 data bits, 0x20 says the group goes on,
    the last character's 0x10 bit is the sign; runs after the second are
    stored as the difference from the run two places before. Vectorised over
    all strings at once, as a per-string Python loop would be slow on a large file.
    """
    lengths = np.array([len(c) for c in strings], dtype=np.int64)
    malformed = np.array([not c.isascii() for c in strings], dtype=bool) | (lengths == 0)
    joined = ''.join(c if c.isascii() else '0' * len(c) for c in strings)
    chars = np.frombuffer(joined.encode('ascii'), dtype=np.uint8).astype(np.int16) - 48
    if len(chars) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), malformed
    nonempty = np.flatnonzero(lengths)
    string_start = (np.cumsum(lengths) - lengths)[nonempty]
    last_char = string_start + lengths[nonempty] - 1
    bad_char = (chars < 0) | (chars > 63)
    bad_char[last_char] |= (chars[last_char] & 0x20) != 0
    malformed[nonempty] |= np.add.reduceat(bad_char, string_start) > 0
    chars[bad_char] = 0

    # A group ends at a character without the continuation bit or at the end of its string.
    is_end = (chars & 0x20) == 0
    is_end[last_char] = True
    ends = np.flatnonzero(is_end)
    starts = np.concatenate([[0], ends[:-1] + 1])
    size = ends - starts + 1
    owner = np.repeat(nonempty, np.diff(np.searchsorted(ends, np.append(string_start, len(chars)))))
    malformed[owner[size > _MAX_RLE_GROUP]] = True
    # Groups are at most _MAX_RLE_GROUP characters: one pass per character place.
    runs = np.zeros(len(ends), dtype=np.int64)
    for k in range(_MAX_RLE_GROUP):
        has = size > k
        runs[has] |= (chars[starts[has] + k] & 0x1f).astype(np.int64) << (5 * k)
    negative = (chars[ends] & 0x10) != 0
    runs[negative] -= np.int64(1) << (5 * np.minimum(size, _MAX_RLE_GROUP)[negative])

    # Undo the differences: within each string, runs 1, 3, 5, ... and runs 2, 4, 6, ...
    # are running sums (run 0 stands alone). ``lagged[i] = runs[i] + lagged[i - 2]``
    # over the whole array; a string's chain is then a difference of two of its terms.
    first_run = np.searchsorted(owner, np.arange(len(strings)))
    index = np.arange(len(runs)) - first_run[owner]
    lagged = np.empty_like(runs)
    lagged[0::2] = np.cumsum(runs[0::2])
    lagged[1::2] = np.cumsum(runs[1::2])
    before_chain = first_run[owner] - np.where(index % 2, 1, 0)  # two places before the chain's first run
    base = np.where(before_chain >= 0, lagged[np.maximum(before_chain, 0)], 0)
    runs = np.where(index == 0, runs, lagged - base)
    return runs, owner, malformed


def rle_strings_valid(strings, areas):
    """bool [N]: each compressed RLE string decodes to non-negative runs adding up to its ``areas`` (h * w)."""
    if not strings:
        return np.zeros(0, dtype=bool)
    runs, owner, malformed = decode_rle_strings(strings)
    n = len(strings)
    negative = np.bincount(owner, weights=runs < 0, minlength=n) > 0
    # Sums in float64 are exact below 2**53; valid totals are image areas.
    totals = np.bincount(owner, weights=runs.astype(np.float64), minlength=n)
    return ~malformed & ~negative & (totals == np.asarray(areas, dtype=np.float64))


# _segmentation_problem's answer for compressed RLE strings: checked together afterwards.
_CHECK_RLE_STRING = 'compressed RLE to check'


def _segmentation_problem(seg, height, width):
    """The reason ``seg`` is unusable for an image of height x width, or None."""
    if isinstance(seg, dict):
        size, counts = seg.get('size'), seg.get('counts')
        # Compared item by item: a list per annotation would wake the garbage collector.
        if not (isinstance(size, list) and len(size) == 2 and size[0] == height and size[1] == width):
            return RLE_WRONG_SIZE
        if isinstance(counts, str):
            return _CHECK_RLE_STRING
        if not (isinstance(counts, list) and counts and all(_is_int(c) for c in counts)
                and min(counts) >= 0 and sum(counts) == height * width):
            return BAD_RLE
        return None
    if not isinstance(seg, list) or not seg:
        return EMPTY_SEGMENTATION
    for polygon in seg:
        if not isinstance(polygon, list):
            return BAD_POLYGON
        if len(polygon) < 6:
            return SHORT_POLYGON
        if len(polygon) % 2 or not _finite_sum(polygon):
            return BAD_POLYGON
    return None


def _annotation_problem(ann, images, categories):
    """The reason annotation ``ann`` (a dict with an id) is unusable, or None."""
    image = images.get(ann.get('image_id')) if _is_int(ann.get('image_id')) else None
    if image is None:
        return UNKNOWN_IMAGE
    category = ann.get('category_id')
    if not _is_int(category) or category not in categories:
        return UNKNOWN_CATEGORY
    bbox = ann.get('bbox')
    if not (isinstance(bbox, list) and len(bbox) == 4 and _finite_sum(bbox) and bbox[2] > 0 and bbox[3] > 0):
        return BAD_BBOX
    if ann.get('iscrowd', 0) not in (0, 1):
        return BAD_ISCROWD
    return _segmentation_problem(ann.get('segmentation'), image['height'], image['width'])


def check_coco(data, source='', image_dir=None, label_map=None, check_files=False):
    """The :class:`ValidationReport` of a loaded COCO json dict (see the module docstring); logs nothing.

    data: as :func:`load_annotations` returns it (it is not modified).
    image_dir: the images' folder (used with check_files). label_map:
    {category_id: label} or pairs; only its keys matter. check_files: drop
    images whose file is missing (training); evaluation counts unreadable
    images itself.
    """
    report = ValidationReport(source, dict(data))
    label_map = None if label_map is None else set(dict(label_map))
    categories = {c['id'] for c in data['categories']}

    images, kept_images, dropped_images = {}, [], set()
    for index, img in enumerate(data['images']):
        img_id = img.get('id') if isinstance(img, dict) else None
        if _is_int(img_id) and img_id in images:
            report.add(DUPLICATE_IMAGE, img_id)
            continue
        if not (_is_int(img_id) and isinstance(img.get('file_name'), str)
                and _positive_int(img.get('width')) and _positive_int(img.get('height'))):
            report.add(BAD_IMAGE, img_id if _is_int(img_id) else f'#{index}')
            if _is_int(img_id):
                dropped_images.add(img_id)
            continue
        if check_files and not os.path.isfile(image_file(image_dir, img['file_name'])):
            report.add(MISSING_FILE, img_id)
            dropped_images.add(img_id)
            continue
        images[img_id] = img
        kept_images.append(img)
    report.data['images'] = kept_images

    if 'annotations' in data:
        kept, ann_ids, rle_strings = [], set(), []
        for index, ann in enumerate(data['annotations']):
            ann_id = ann.get('id') if isinstance(ann, dict) else None
            if not _is_int(ann_id) or ann_id in ann_ids:
                report.add(BAD_ANNOTATION, ann_id if _is_int(ann_id) else f'#{index}')
                continue
            ann_ids.add(ann_id)
            if _is_int(ann.get('image_id')) and ann['image_id'] in dropped_images:
                continue  # counted with its image
            category = ann.get('category_id')
            if label_map is not None and _is_int(category) and category in categories and category not in label_map:
                # Not a class being trained or scored: dropped unchecked.
                report.unselected[category] = report.unselected.get(category, 0) + 1
                continue
            reason = _annotation_problem(ann, images, categories)
            if reason == _CHECK_RLE_STRING:
                rle_strings.append(len(kept))
            elif reason is not None:
                report.add(reason, ann_id)
                continue
            kept.append(ann)
        if rle_strings:
            valid = rle_strings_valid([kept[i]['segmentation']['counts'] for i in rle_strings],
                                      [images[kept[i]['image_id']]['height'] * images[kept[i]['image_id']]['width']
                                       for i in rle_strings])
            bad = {rle_strings[j] for j in np.flatnonzero(~valid)}
            for i in sorted(bad):
                report.add(BAD_RLE, kept[i]['id'])
            kept = [ann for i, ann in enumerate(kept) if i not in bad]
        report.data['annotations'] = kept
    return report


def validate_coco(info_file, image_dir=None, label_map=None, check_files=False, strict=False):
    """Load and check a COCO annotation/info file; the :class:`ValidationReport` with the cleaned data.

    Bad entries are dropped with one logged warning (``report.summary()``), or
    with ``strict`` raise DatasetError with that summary. Raises
    MissingFileError / DatasetError for a missing or malformed file (see
    :func:`load_annotations`). Other arguments as :func:`check_coco`.
    """
    data = load_annotations(info_file)
    report = check_coco(data, info_file, image_dir, label_map, check_files)
    listed = [img for img in data['images'] if isinstance(img, dict) and isinstance(img.get('file_name'), str)]
    if check_files and listed and report.counts.get(MISSING_FILE, 0) == len(listed):
        raise MissingFileError(f'none of the {len(listed)} images of {info_file} is in {image_dir} (e.g. '
                               f'{image_file(image_dir, listed[0]["file_name"])} does not exist): '
                               'is it the right image folder?')
    if report.unselected:
        ids = sorted(report.unselected)
        logger.info('%s: %d annotations of %d categories outside the classes ignored (category ids %s)',
                    info_file, sum(report.unselected.values()), len(ids),
                    ', '.join(map(str, ids[:10])) + (' ...' if len(ids) > 10 else ''))
    if not report.ok:
        if strict:
            raise DatasetError(f'bad entries in {report.summary()}')
        logger.warning('skipping bad entries of %s', report.summary())
    return report
