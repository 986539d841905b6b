"""COCO evaluation-server submissions: packaging and checking.

The server (COCO detection challenge, test-dev2017) takes one zip per
evaluation type. Its upload format names the results file
``detections_test-dev2017_<alg>_results.json`` for boxes and for masks alike
(the type, bbox or segm, is chosen when uploading), inside a zip of the same
name with ``.zip``. Since both files must carry that same name, they are
written to two folders, ``<out_dir>/bbox/`` and ``<out_dir>/segm/``, rather
than with an infix the server's name check would refuse.

A results file is a JSON array of records
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (bbox, pixels)
or ``{"image_id", "category_id", "segmentation": {"size": [h, w], "counts": str}, "score"}``
(segm, COCO compressed RLE), as ``eval.py`` writes them
(``bbox_detections.json``, ``mask_detections.json``, see utils/evaluation/coco_eval.py).
The server evaluates at most 100 detections per image and only the 20,288
test-dev image ids (``image_info_test-dev2017.json``); ``test2017/`` holds
40,670 images, so results of the whole folder are filtered.
"""
import dataclasses
import io
import json
import logging
import math
import os
import re
import zipfile
from collections import defaultdict
from typing import List

from data.validation import load_annotations, rle_strings_valid
from utils.evaluation.coco_eval import BBOX_FILE, MASK_FILE
from utils.errors import ConfigError, DatasetError, MissingFileError, OutputError
from utils.files import AtomicFile

logger = logging.getLogger(__name__)

MAX_NUM_DETECTIONS = 100
TEST_SET = 'test-dev2017'
# Letters, digits and '-': an underscore would make <alg> ambiguous in the
# server's '_'-separated name fields.
_ALG_RE = re.compile(r'^[A-Za-z0-9-]+$')
KINDS = {'bbox': BBOX_FILE, 'segm': MASK_FILE}


def submission_name(alg_name, test_set=TEST_SET):
    """``detections_<test_set>_<alg>_results`` (no extension). Raises ConfigError for a bad ``alg_name``."""
    if not _ALG_RE.match(alg_name or ''):
        raise ConfigError(f'algorithm name {alg_name!r} for the COCO server must be letters, digits '
                          "and '-' only (no '_', no spaces)")
    return f'detections_{test_set}_{alg_name}_results'


def load_image_info(info_file):
    """(images {id: (height, width)}, category ids set) of a COCO image-info or annotation file.

    Read by data.validation.load_annotations (its errors for a missing or
    malformed file); an image entry without int id, height and width is a DatasetError.
    """
    info = load_annotations(info_file)
    try:
        images = {int(im['id']): (int(im['height']), int(im['width'])) for im in info['images']}
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f'{info_file}: not a COCO image-info file ({type(e).__name__}: {e})') from e
    return images, {c['id'] for c in info['categories']}


def iter_records(path):
    """The records of a results JSON array, one at a time.

    ``eval.py`` writes one record per line (utils/coco_eval.JsonArrayWriter),
    which is read line by line so that memory stays flat over millions of
    masks; any other layout is read whole with ``json.load``.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f'results file not found: {path}')
    yield from _records(lambda: open(path, encoding='utf-8'), path)


def _records(open_text, name):
    """Records of the JSON array in the text stream ``open_text()`` opens (see iter_records).

    Raises DatasetError naming ``name`` when it is not a JSON array (the
    elements are yielded as they are, dicts or not).
    """
    with open_text() as f:
        if f.readline().strip() == '[':
            yielded = 0
            for n, line in enumerate(f, start=2):
                line = line.strip().rstrip(',')
                if line == ']':
                    return
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    if yielded:
                        raise DatasetError(f'{name}, line {n}: not a results record ({e})') from e
                    break   # not one record per line: read it whole below
                yielded += 1
                yield record
            else:
                raise DatasetError(f'{name}: the JSON array is not closed (an interrupted evaluation?)')
    try:
        with open_text() as f:
            records = json.load(f)
    except ValueError as e:
        raise DatasetError(f'{name}: not a JSON array of results ({e})') from e
    if not isinstance(records, list):
        raise DatasetError(f'{name}: not a JSON array of results')
    yield from records


def _top_indices(scored, limit):
    """Indices of records to keep: per image the ``limit`` highest scores (ties: file order)."""
    keep = []
    for entries in scored.values():
        entries.sort(key=lambda e: (-e[0], e[1]))
        keep.extend(i for _, i in entries[:limit])
    return set(keep)


def write_submission(results_dir, alg_name, test_dev_info_file, out_dir, max_num_detections=MAX_NUM_DETECTIONS):
    """Write the two server zips from ``eval.py``'s results files.

    Args:
        results_dir: folder holding ``bbox_detections.json`` and/or ``mask_detections.json``.
        alg_name: the algorithm name in the file name (letters, digits, '-').
        test_dev_info_file: ``image_info_test-dev2017.json``; only its image ids are kept.
        out_dir: the zips go to ``out_dir/bbox/`` and ``out_dir/segm/``.
        max_num_detections: per image, the highest-scoring ones across classes are kept.

    Returns:
        {'bbox': SubmissionReport, 'segm': SubmissionReport} (a kind whose
        results file is absent is left out; neither present raises
        MissingFileError); each report's ``zip_path`` is the zip's upload path.
        Logs per kind how many records were kept, dropped as foreign image ids
        and dropped over the per-image limit. Each zip is written under a
        temporary name and checked (:func:`check_submission`, as its upload
        name); only a zip that passes every check is renamed to its upload
        name, one that fails is deleted.
    """
    name = submission_name(alg_name)
    images, _ = load_image_info(test_dev_info_file)
    present = {k: os.path.join(results_dir, f) for k, f in KINDS.items()
               if os.path.isfile(os.path.join(results_dir, f))}
    if not present:
        raise MissingFileError(f'no {BBOX_FILE} or {MASK_FILE} in {results_dir}')
    reports = {}
    for kind, src in present.items():
        scored, foreign = defaultdict(list), 0
        for i, rec in enumerate(iter_records(src)):
            image_id = int(rec['image_id'])
            if image_id in images:
                scored[image_id].append((float(rec['score']), i))
            else:
                foreign += 1
        total = sum(len(v) for v in scored.values())
        keep = _top_indices(scored, max_num_detections)
        folder = os.path.join(out_dir, kind)
        final = os.path.join(folder, name + '.zip')
        try:
            os.makedirs(folder, exist_ok=True)
            out = AtomicFile(final)
        except OSError as e:
            raise OutputError(f'cannot write to {folder}: {e.strerror}') from e
        try:
            with zipfile.ZipFile(out.file, 'w', zipfile.ZIP_DEFLATED) as zf, \
                    zf.open(name + '.json', 'w') as member:
                written = 0
                member.write(b'[')
                for i, rec in enumerate(iter_records(src)):
                    if i in keep:
                        member.write((b',\n' if written else b'\n') + json.dumps(rec).encode())
                        written += 1
                member.write(b'\n]\n')
            out.file.flush()
            # Checked under its temporary name: a zip that fails never appears under its upload name.
            report = check_submission(out.tmp_path, test_dev_info_file, max_num_detections, upload_path=final)
            if report.ok:
                out.commit()
        except OSError as e:
            raise OutputError(f'cannot write {final} (nothing kept): {e.strerror}') from e
        finally:
            out.discard()
        logger.info('%s: %d detections on %d of %d test-dev images; dropped %d of other images '
                    'and %d over %d per image', final, written, len(scored), len(images), foreign,
                    total - written, max_num_detections)
        if not report.ok:
            logger.warning('%s not written: it fails the check (%s)%s', final, ', '.join(report.failed()),
                           '; the file of that name is from an earlier run' if os.path.exists(final) else '')
        reports[kind] = report
    return reports


# ------------------------------------------------------------------ checking --
@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    message: str


@dataclasses.dataclass
class SubmissionReport:
    """What :func:`check_submission` found; ``ok`` when every check passed."""
    zip_path: str
    kind: str = ''
    checks: List[Check] = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return all(c.ok for c in self.checks)

    def failed(self):
        """Names of the failed checks."""
        return [c.name for c in self.checks if not c.ok]

    def add(self, name, ok, message):
        self.checks.append(Check(name, bool(ok), message))

    def format(self):
        """The report as text: one line per check, then the verdict."""
        lines = [f'{self.zip_path} ({self.kind or "unknown kind"})']
        lines += [f'  [{"ok" if c.ok else "FAIL"}] {c.name}: {c.message}' for c in self.checks]
        lines.append('PASSED' if self.ok else f'FAILED: {", ".join(self.failed())}')
        return '\n'.join(lines)


class _RleCheck:
    """Counts the segmentations that do not decode to their image's size, fed one at a time.

    The compressed strings are decoded in batches of BATCH, vectorised, by
    data.validation.rle_strings_valid: a full test-dev segm file holds ~2M,
    and memory stays flat.
    """
    BATCH = 50_000

    def __init__(self, sizes):
        self.sizes = sizes
        self.bad = 0
        self.examples = []
        self._strings, self._areas, self._owners = [], [], []

    def _report(self, image_id, problem):
        self.bad += 1
        if len(self.examples) < 3:
            self.examples.append(f'image {image_id}: {problem}')

    def add(self, image_id, rle):
        height, width = self.sizes[image_id]
        try:
            size = [int(v) for v in rle['size']]
        except (KeyError, TypeError, ValueError):
            self._report(image_id, 'no [height, width] size')
            return
        if size != [height, width]:
            self._report(image_id, f'size {size} != image {[height, width]}')
        elif not isinstance(rle.get('counts'), str):
            self._report(image_id, 'counts is not a compressed RLE string')
        else:
            self._strings.append(rle['counts'])
            self._areas.append(height * width)
            self._owners.append(image_id)
            if len(self._strings) >= self.BATCH:
                self.flush()

    def flush(self):
        for image_id, valid in zip(self._owners, rle_strings_valid(self._strings, self._areas)):
            if not valid:
                self._report(image_id, 'the runs do not cover the image exactly (malformed or of another size)')
        self._strings, self._areas, self._owners = [], [], []


def _finite(values):
    try:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values)
    except TypeError:
        return False


def check_submission(zip_path, test_dev_info_file, max_num_detections=MAX_NUM_DETECTIONS, upload_path=None):
    """Verify a server zip against the test-dev image-info file; returns a :class:`SubmissionReport`.

    upload_path: the path the zip will have (write_submission checks its
    temporary file as the upload name); default ``zip_path``.

    Checks, each reported by name: ``zip name`` (``detections_test-dev2017_<alg>_results.zip``),
    ``json name`` (one member, the same name with ``.json``), ``json`` (an array of
    bbox or of segm records), ``foreign ids`` (image ids not in the info file),
    ``coverage`` (test-dev images with no detection are counted, not failed),
    ``per-image limit`` (at most ``max_num_detections``), ``category ids`` (those of the
    info file's categories), ``scores`` (finite numbers), ``bbox`` (4 finite numbers,
    bbox kind) and ``segmentation`` (RLE decodable to the image's height x width, segm kind).
    """
    report = SubmissionReport(upload_path or zip_path)
    if not os.path.isfile(zip_path):
        raise MissingFileError(f'submission zip not found: {zip_path}')
    images, categories = load_image_info(test_dev_info_file)
    base = os.path.basename(upload_path or zip_path)
    stem = base[:-len('.zip')] if base.endswith('.zip') else base
    m = re.match(r'^detections_test-dev2017_([A-Za-z0-9-]+)_results$', stem)
    report.add('zip name', base.endswith('.zip') and m,
               base if m and base.endswith('.zip')
               else f'{base} is not detections_test-dev2017_<alg>_results.zip')
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [n for n in zf.namelist() if not n.endswith('/')]
            report.add('json name', members == [stem + '.json'],
                       f'contains {members}' + ('' if members == [stem + '.json'] else f', expected [{stem}.json]'))
            if not members:
                return report
            t = _Tally(images, categories)
            objects = t.count(_records(lambda: io.TextIOWrapper(zf.open(members[0]), encoding='utf-8'),
                                           members[0]))
    except zipfile.BadZipFile as e:
        report.add('json', False, f'not a zip file ({e})')
        return report
    except (DatasetError, UnicodeDecodeError) as e:
        report.add('json', False, f'not valid JSON ({e})')
        return report
    if not objects:
        report.add('json', False, 'not a JSON array of objects')
        return report
    report.kind = t.kind
    report.add('json', not t.incomplete and not t.mixed and t.records,
               f'{t.records} {t.kind} records' + (f', {t.incomplete} missing one of {sorted(t.required)}'
                                                  if t.incomplete else '')
               + (', bbox and segm records mixed' if t.mixed else '') + ('' if t.records else ', empty'))
    report.add('foreign ids', not t.foreign,
               f'{t.foreign} detections on {len(t.foreign_ids)} image ids not in the info file '
               f'(e.g. {sorted(t.foreign_ids, key=str)[:3]})' if t.foreign else 'every image id is in the info file')
    empty = len(images) - len(t.per_image)
    report.add('coverage', True, f'{len(t.per_image)} of {len(images)} images have detections, {empty} empty')
    over = {i: n for i, n in t.per_image.items() if n > max_num_detections}
    report.add('per-image limit', not over,
               f'{len(over)} images over {max_num_detections} detections (e.g. '
               + ', '.join(f'image {i}: {n}' for i, n in sorted(over.items())[:3]) + ')'
               if over else f'at most {max(t.per_image.values(), default=0)} per image')
    _check_category_ids(report, t, categories)
    report.add('scores', not t.bad_scores,
               f'{t.bad_scores} detections with a score that is not a finite number' if t.bad_scores
               else 'all finite')
    if t.kind == 'bbox':
        report.add('bbox', not t.bad_boxes,
                   f'{t.bad_boxes} boxes are not 4 finite numbers' if t.bad_boxes else 'all 4 finite numbers')
    else:
        report.add('segmentation', not t.rles.bad,
                   f'{t.rles.bad} masks do not decode to their image size ({"; ".join(t.rles.examples)})'
                   if t.rles.bad else 'every RLE decodes to its image size')
    return report


# The fewest distinct category ids from which contiguous class numbers are told apart from a model of few classes.
CONTIGUOUS_MIN_IDS = 10


def _check_category_ids(report, tally, categories):
    """The ``category ids`` check: every id one of the info file's, and not contiguous class numbers.

    Writing class numbers 1..N (the model's 1-based labels) instead of the
    dataset's category ids is a common mistake that COCO's gaps (its 80
    categories have ids 1..90) do not always reveal: a submission whose ids
    are all valid but all fall inside 1..N, while the info file's ids go
    beyond N, is refused too when it uses more than half of the N classes,
    and at least CONTIGUOUS_MIN_IDS of them (a model of all COCO's classes on
    test-dev uses ids above 80: sink, book, clock, ..., toothbrush; a few
    ids say nothing).
    """
    n = len(categories)
    top = max((c for c in categories if isinstance(c, int)), default=0)
    if tally.bad_cats:
        report.add('category ids', False,
                   f'{sum(tally.bad_cats.values())} detections with category ids not in the info file: '
                   f'{sorted(tally.bad_cats, key=str)[:5]}; ' + _likely_cause(set(tally.bad_cats), n, top))
        return
    used = tally.used_cats
    contiguous = (top > n and len(used) > n // 2 and len(used) >= CONTIGUOUS_MIN_IDS
                  and all(1 <= c <= n for c in used))
    if contiguous:
        report.add('category ids', False,
                   f'the {len(used)} category ids used all lie in 1..{n} while the info file\'s {n} categories '
                   f'span 1..{top}: contiguous class numbers written instead of the dataset\'s category ids '
                   f'(map each 1-based class through the label map, e.g. data.config COCO_LABEL_MAP)')
        return
    report.add('category ids', True, f'all within the {n} categories of the info file')


def _likely_cause(bad, n, top):
    """What usually produces the invalid category ids ``bad`` (the info file has ``n`` ids up to ``top``)."""
    numbers = {c for c in bad if isinstance(c, int) and not isinstance(c, bool)}
    if numbers != bad:
        return 'likely cause: ids that are not integers (text, lists, booleans); write each as a JSON integer'
    if 0 in numbers and all(0 <= c < n for c in numbers):
        return (f'likely cause: 0-based class indices (0..{n - 1}) written instead of the info file\'s category '
                'ids; map each class through the label map')
    if top > n and all(1 <= c <= n for c in numbers):
        return (f'likely cause: contiguous class numbers (1..{n}) written instead of the info file\'s category ids, '
                f'which span 1..{top} with gaps; map each class through the label map (data.config COCO_LABEL_MAP)')
    return ('likely cause: the model was trained on another dataset\'s categories, or the results belong to '
            'another info file')


class _Tally:
    """Counts over a results array's records, one record at a time (memory stays flat).

    kind: the first record's, 'segm' or 'bbox' ('bbox' for no record);
    records: all records; incomplete: those missing a required key (not
    checked further); mixed: those of the other kind; per_image {image_id:
    count}; foreign / foreign_ids: records on, and the ids of, images not in
    the info file; bad_cats {category_id: count}; used_cats: the valid category ids used; bad_scores; bad_boxes;
    rles: the _RleCheck of the segm masks.
    """

    def __init__(self, images, categories):
        self.images, self.categories = images, categories
        self.kind, self.required = None, None
        self.records = self.incomplete = self.mixed = self.foreign = self.bad_scores = self.bad_boxes = 0
        self.per_image, self.bad_cats, self.foreign_ids = defaultdict(int), defaultdict(int), set()
        self.used_cats = set()
        self.rles = _RleCheck(images)

    def count(self, records):
        """Count every record; False (and stop) at an element that is not a JSON object."""
        for r in records:
            if not isinstance(r, dict):
                return False
            self._add(r)
        self.rles.flush()
        self.kind = self.kind or 'bbox'
        return True

    def _add(self, r):
        if self.kind is None:
            self.kind = 'segm' if 'segmentation' in r else 'bbox'
            self.required = {'image_id', 'category_id', 'score', 'segmentation' if self.kind == 'segm' else 'bbox'}
        self.records += 1
        self.mixed += ('segmentation' in r) != (self.kind == 'segm')
        if not self.required <= r.keys():
            self.incomplete += 1
            return
        try:
            image_id = int(r['image_id'])
        except (TypeError, ValueError):
            image_id = None
        if image_id not in self.images:
            self.foreign += 1
            self.foreign_ids.add(_hashable(r['image_id']))
        else:
            self.per_image[image_id] += 1
            if self.kind == 'segm':
                self.rles.add(image_id, r['segmentation'])
        if r['category_id'] not in self.categories or isinstance(r['category_id'], bool):
            self.bad_cats[_hashable(r['category_id'])] += 1
        else:
            self.used_cats.add(r['category_id'])
        if not _finite([r['score']]):
            self.bad_scores += 1
        if self.kind == 'bbox' and not (isinstance(r['bbox'], list) and len(r['bbox']) == 4 and _finite(r['bbox'])):
            self.bad_boxes += 1


def _hashable(value):
    """A JSON id as a set or dict key (a list or dict given as an id becomes its text)."""
    return value if isinstance(value, (int, str)) else str(value)
