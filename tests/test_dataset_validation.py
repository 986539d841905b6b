"""Dataset validation (data/validation.py), hang-free loading errors, the quiet Paddle import, empty-GT loss."""
import collections
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import paddle
import pytest
from pycocotools import mask as mask_utils

from data import validation as V
from data.coco import COCODetection, COCOEvalImages, SampleError, check_batches, detection_collate, read_image
from data.config import get_config
from layers.modules.multibox_loss import MultiBoxLoss
from tests.conftest import ROOT
from tools.make_shapes_dataset import make_shapes_dataset
from data.transforms import BaseTransform
from utils.errors import DatasetError, MissingFileError, UnreadableFileError

SIDE = 64
# A subprocess that hangs is killed after this many seconds; a clean run takes
# about 10 s with 2 worker processes on a loaded 2-core AMD EPYC (2026-12-01).
HANG_TIMEOUT = 120


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=6, num_val=2, size=SIDE, seed=0)


@pytest.fixture
def dataset(shapes, tmp_path):
    """A writable copy of the train split: (image folder, json dict)."""
    image_dir = str(tmp_path / 'images')
    shutil.copytree(shapes.train_images, image_dir)
    with open(shapes.train_info) as f:
        return image_dir, json.load(f)


def write_json(info, path):
    with open(path, 'w') as f:
        json.dump(info, f)
    return str(path)


def _rle_other_size(ann, info, image_dir):
    ann['segmentation']['size'] = [SIDE + 1, SIDE]


def _rle_truncated(ann, info, image_dir):
    ann['segmentation']['counts'] = ann['segmentation']['counts'][:-2]


def _duplicate_image(ann, info, image_dir):
    info['images'].append(dict(info['images'][-1], file_name='other.jpg'))
    return info['images'][-1]['id']


def _missing_file(ann, info, image_dir):
    image = next(im for im in info['images'] if im['id'] == ann['image_id'])
    os.remove(os.path.join(image_dir, image['file_name']))
    return image['id']


# (reason, corruption of the first annotation (or of the file); returns the id to
# be named when it is not the annotation's).
CORRUPTIONS = {
    'unknown image_id': (V.UNKNOWN_IMAGE, lambda a, i, d: a.update(image_id=9999)),
    'list image_id': (V.UNKNOWN_IMAGE, lambda a, i, d: a.update(image_id=[1])),
    'unknown category': (V.UNKNOWN_CATEGORY, lambda a, i, d: a.update(category_id=77)),
    'string bbox': (V.BAD_BBOX, lambda a, i, d: a.update(bbox=['1', 2, 3, 4])),
    'RLE with string size': (V.RLE_WRONG_SIZE, lambda a, i, d: a['segmentation'].update(size='64x64')),
    'short polygon': (V.SHORT_POLYGON, lambda a, i, d: a.update(segmentation=[[10, 10, 20, 20]])),
    'empty polygon': (V.SHORT_POLYGON, lambda a, i, d: a.update(segmentation=[[]])),
    'empty segmentation': (V.EMPTY_SEGMENTATION, lambda a, i, d: a.update(segmentation=[])),
    'no segmentation': (V.EMPTY_SEGMENTATION, lambda a, i, d: a.__delitem__('segmentation')),
    'odd polygon': (V.BAD_POLYGON, lambda a, i, d: a.update(segmentation=[[10, 10, 20, 20, 30, 10, 5]])),
    'NaN polygon': (V.BAD_POLYGON, lambda a, i, d: a.update(segmentation=[[10, 10, 20, float('nan'), 30, 10]])),
    'zero-width bbox': (V.BAD_BBOX, lambda a, i, d: a.update(bbox=[1, 2, 0, 5])),
    'NaN bbox': (V.BAD_BBOX, lambda a, i, d: a.update(bbox=[1, float('nan'), 4, 5])),
    'three-number bbox': (V.BAD_BBOX, lambda a, i, d: a.update(bbox=[1, 2, 5])),
    'crowd with bad bbox': (V.BAD_BBOX, lambda a, i, d: a.update(iscrowd=1, bbox=[1, 2, 4, -1])),
    'iscrowd 2': (V.BAD_ISCROWD, lambda a, i, d: a.update(iscrowd=2)),
    'RLE of the wrong size': (V.RLE_WRONG_SIZE, _rle_other_size),
    'truncated RLE': (V.BAD_RLE, _rle_truncated),
    'duplicate annotation id': (V.BAD_ANNOTATION, lambda a, i, d: i['annotations'].append(dict(a))),
    'duplicate image id': (V.DUPLICATE_IMAGE, _duplicate_image),
    'missing image file': (V.MISSING_FILE, _missing_file),
}


@pytest.mark.parametrize('kind', list(CORRUPTIONS))
def test_each_bad_entry_is_counted_named_skipped_or_refused(kind, dataset, tmp_path, caplog):
    image_dir, info = dataset
    reason, corrupt = CORRUPTIONS[kind]
    ann = info['annotations'][0]
    named = corrupt(ann, info, image_dir) or ann['id']
    info_file = write_json(info, tmp_path / 'bad.json')

    with caplog.at_level(logging.WARNING, logger='data.validation'):
        report = V.validate_coco(info_file, image_dir, check_files=True)
    assert report.counts == {reason: 1} and report.examples == {reason: [named]}
    warnings = [r.getMessage() for r in caplog.records if r.name == 'data.validation']
    assert len(warnings) == 1 and reason in warnings[0] and str(named) in warnings[0] and info_file in warnings[0]

    kept_anns = report.data['annotations']
    if reason in V.IMAGE_REASONS:
        assert [im['id'] for im in report.data['images']].count(named) == (reason == V.DUPLICATE_IMAGE)
        lost = [a for a in info['annotations'] if a['image_id'] == named] if reason == V.MISSING_FILE else []
    else:
        lost = [info['annotations'][-1] if reason == V.BAD_ANNOTATION else ann]
    assert [a['id'] for a in kept_anns] == [a['id'] for a in info['annotations'] if not any(a is b for b in lost)]

    with pytest.raises(DatasetError, match=re.escape(reason)) as err:
        V.validate_coco(info_file, image_dir, check_files=True, strict=True)
    assert str(named) in str(err.value) and info_file in str(err.value)
    with pytest.raises(DatasetError, match=re.escape(reason)):
        COCODetection(image_dir, info_file, strict=True)

    # The datasets index the cleaned data: every remaining sample loads.
    ds = COCODetection(image_dir, info_file)
    for index in range(len(ds)):
        img, (target, masks, num_crowds) = ds[index]
        assert len(target) == len(masks) > num_crowds
    transform = BaseTransform(32, get_config('yolact_base').backbone.transform)
    eval_ds = COCOEvalImages(image_dir, info_file, transform)
    oks = [eval_ds[index][4] for index in range(len(eval_ds))]
    assert oks.count(False) == (reason == V.MISSING_FILE)


def test_label_map_limits_the_categories_without_calling_the_others_bad(dataset, tmp_path, caplog):
    """Classes chosen with --class_names: other categories' annotations are ignored, even with --strict."""
    image_dir, info = dataset
    info['annotations'][0]['bbox'] = [0, 0, -1, 5]      # a bad entry of an ignored category is not reported
    info['annotations'][0]['category_id'] = 3
    info_file = write_json(info, tmp_path / 'a.json')
    others = collections.Counter(a['category_id'] for a in info['annotations'] if a['category_id'] not in (1, 2))
    assert others
    with caplog.at_level(logging.INFO, logger='data.validation'):
        report = V.validate_coco(info_file, label_map={1: 1, 2: 2}, strict=True)
    assert report.ok and report.unselected == dict(others)
    assert [r.levelname for r in caplog.records] == ['INFO']
    assert f'{sum(others.values())} annotations of {len(others)} categories outside the classes ignored' \
        in caplog.text
    assert {a['category_id'] for a in report.data['annotations']} == {1, 2}
    # A category id that is not even a number is still a bad entry, named.
    info['annotations'][1]['category_id'] = [1]
    report = V.validate_coco(write_json(info, tmp_path / 'b.json'), label_map={1: 1, 2: 2})
    assert report.counts == {V.UNKNOWN_CATEGORY: 1} and report.examples[V.UNKNOWN_CATEGORY] == [
        info['annotations'][1]['id']]
    ds = COCODetection(image_dir, info_file, label_map={1: 1, 2: 2})
    assert all(set(ds[i][1][0][:, 4].tolist()) <= {0, 1} for i in range(len(ds)))


def test_several_reasons_give_one_warning_with_counts_and_first_ids(dataset, tmp_path, caplog):
    image_dir, info = dataset
    for ann in info['annotations'][:7]:
        ann['image_id'] = 10_000 + ann['id']
    info['annotations'][8]['bbox'] = [0, 0, 0, 0]
    info_file = write_json(info, tmp_path / 'many.json')
    with caplog.at_level(logging.WARNING, logger='data.validation'):
        report = V.validate_coco(info_file)
    assert report.counts == {V.UNKNOWN_IMAGE: 7, V.BAD_BBOX: 1}
    assert report.examples[V.UNKNOWN_IMAGE] == [a['id'] for a in info['annotations'][:V.MAX_EXAMPLES]]
    (message,) = [r.getMessage() for r in caplog.records if r.name == 'data.validation']
    assert f'{V.UNKNOWN_IMAGE}: 7' in message and ', ...' in message and f'{V.BAD_BBOX}: 1' in message


def test_clean_file_passes_untouched(shapes, caplog):
    with caplog.at_level(logging.WARNING, logger='data.validation'):
        report = V.validate_coco(shapes.train_info, shapes.train_images, check_files=True, strict=True)
    with open(shapes.train_info) as f:
        assert report.ok and report.data == json.load(f)
    assert not caplog.records


def test_missing_and_malformed_annotation_files(dataset, tmp_path):
    image_dir, info = dataset
    missing = str(tmp_path / 'nope.json')
    for build in (lambda f: V.validate_coco(f), lambda f: COCODetection(image_dir, f),
                  lambda f: COCOEvalImages(image_dir, f, None)):
        with pytest.raises(MissingFileError, match=re.escape(missing)):
            build(missing)

    truncated = tmp_path / 'truncated.json'
    truncated.write_text(json.dumps(info)[:500])
    with pytest.raises(DatasetError, match=re.escape(str(truncated)) + '.*line 1 column 501'):
        COCODetection(image_dir, str(truncated))

    for name, content in (('list.json', []), ('no_images.json', {'categories': info['categories']}),
                          ('no_categories.json', {'images': info['images']}),
                          ('bad_category.json', dict(info, categories=[{'name': 'x'}])),
                          ('bad_annotations.json', dict(info, annotations={}))):
        path = write_json(content, tmp_path / name)
        with pytest.raises(DatasetError, match=re.escape(path)):
            V.load_annotations(path)

    image_info = dict(info)
    del image_info['annotations']
    report = V.validate_coco(write_json(image_info, tmp_path / 'image_info.json'), strict=True)
    assert report.ok and 'annotations' not in report.data


def test_bad_image_entries(dataset, tmp_path):
    image_dir, info = dataset
    info['images'][0]['width'] = 0
    info['images'][1]['height'] = 64.5
    del info['images'][2]['file_name']
    dropped = {im['id'] for im in info['images'][:3]}
    report = V.validate_coco(write_json(info, tmp_path / 'i.json'))
    assert report.counts == {V.BAD_IMAGE: 3} and set(report.examples[V.BAD_IMAGE]) == dropped
    # Their annotations go with them without being counted again.
    assert all(a['image_id'] not in dropped for a in report.data['annotations'])


def _with_exif_orientation(path, orientation):
    """Insert an EXIF block with ``orientation`` (6: shown turned 90 degrees clockwise) into a JPEG file."""
    with open(path, 'rb') as f:
        data = f.read()
    ifd = struct.pack('<H', 1) + struct.pack('<HHII', 0x0112, 3, 1, orientation) + struct.pack('<I', 0)
    exif = b'Exif\x00\x00' + b'II*\x00' + struct.pack('<I', 8) + ifd
    with open(path, 'wb') as f:
        f.write(data[:2] + b'\xff\xe1' + struct.pack('>H', len(exif) + 2) + exif + data[2:])


def test_a_sideways_photo_annotated_as_stored_is_read_as_stored(dataset, tmp_path, caplog):
    """EXIF orientation is applied (the reference's cv2.imread) unless the annotations fit only the stored pixels."""
    image_dir, info = dataset
    image = info['images'][0]
    image['width'], image['height'] = 60, 40
    path = os.path.join(image_dir, image['file_name'])
    stored = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    cv2.imwrite(path, stored)
    _with_exif_orientation(path, 6)
    assert read_image(path).shape == (60, 40, 3)                   # shown upright
    np.testing.assert_array_equal(read_image(path, (40, 60)), cv2.imread(path, cv2.IMREAD_COLOR
                                                                          | cv2.IMREAD_IGNORE_ORIENTATION))
    with pytest.raises(UnreadableFileError, match=re.escape(f'{path} is 40x60 but its info file says 50x50')):
        read_image(path, (50, 50))
    for ann in info['annotations']:
        if ann['image_id'] == image['id']:
            ann['segmentation'] = [[5, 5, 30, 5, 30, 20, 5, 20]]
            ann['bbox'] = [5, 5, 25, 15]
    info_file = write_json(info, tmp_path / 'a.json')
    train = COCODetection(image_dir, info_file)
    img, target, masks, height, width, _ = train.pull_item(train.ids.index(image['id']))
    assert img.shape == (3, 40, 60) and masks.shape[1:] == (40, 60) and (height, width) == (40, 60)
    # Evaluation: the image is scored at the info file's size; one that fits neither way is skipped, named.
    transform = BaseTransform(32, get_config('yolact_base').backbone.transform)
    evaluation = COCOEvalImages(image_dir, info_file, transform)
    assert evaluation[evaluation.ids.index(image['id'])][2:] == (40, 60, True)
    image['width'] = 61
    evaluation = COCOEvalImages(image_dir, write_json(info, tmp_path / 'b.json'), transform)
    with caplog.at_level(logging.WARNING):
        assert evaluation[evaluation.ids.index(image['id'])][4] is False
    assert f'{path} is 40x60 but its info file says 61x40' in caplog.text


def test_rle_string_decoder_agrees_with_pycocotools():
    rs = np.random.RandomState(0)
    for _ in range(50):
        h, w = rs.randint(1, 200, 2)
        m = np.asfortranarray((rs.rand(h, w) > rs.rand()).astype(np.uint8))
        rle = mask_utils.encode(m)
        runs, owner, malformed = V.decode_rle_strings([rle['counts'].decode()])
        assert not malformed[0] and (owner == 0).all()
        assert runs.sum() == h * w and (runs >= 0).all()
        # Runs alternate background / foreground, starting with background.
        assert runs[1::2].sum() == m.sum()
        back = mask_utils.decode(mask_utils.frPyObjects({'size': [int(h), int(w)], 'counts': runs.tolist()},
                                                        int(h), int(w)))
        np.testing.assert_array_equal(back, m)
    assert V.decode_rle_strings(['0' * 3 + 'x\x7f', 'a'])[2].tolist() == [True, True]


# ------------------------------------------------------- errors in DataLoader workers --
LOADER_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {root!r})
    from utils.runtime import quiet_paddle_import
    quiet_paddle_import()
    import paddle
    from data.coco import COCODetection, COCOEvalImages, check_batches, detection_collate, eval_collate
    from data.config import get_config
    from data.transforms import BaseTransform, SSDAugmentation
    from utils.errors import run_cli

    class FailOn:
        """A transform (BaseTransform or SSDAugmentation) that raises on images of one height (0: never)."""
        def __init__(self, transform, height):
            self.transform, self.height, self.max_size = transform, height, getattr(transform, 'max_size', 0)
        def __call__(self, img, *rest):
            if img.shape[0] == self.height:
                raise ValueError('transform failed')
            return self.transform(img, *rest)

    def main(argv):
        kind, image_dir, info_file, workers, fail_height = argv
        cfg = get_config('yolact_base', max_size=32)
        if kind == 'train':
            ds = COCODetection(image_dir, info_file, FailOn(SSDAugmentation.from_config(cfg), int(fail_height)))
            collate = detection_collate
        else:
            ds = COCOEvalImages(image_dir, info_file, FailOn(BaseTransform.from_config(cfg), int(fail_height)))
            collate = eval_collate
        {delete}
        loader = paddle.io.DataLoader(ds, batch_size=1, num_workers=int(workers), collate_fn=collate)
        for epoch in range(2):
            for batch in check_batches(loader):
                pass
        print('no error')
        return 0

    if __name__ == '__main__':
        raise SystemExit(run_cli(main, sys.argv[1:]))
''')


@pytest.mark.parametrize('kind,workers', [('train', 0), ('train', 2), ('eval', 0)])
def test_loading_error_in_data_loader_ends_the_program_naming_the_image(kind, workers, dataset, tmp_path):
    """A failing transform (perhaps a bug) stops training and evaluation with one line naming the image, no hang."""
    image_dir, info = dataset
    info_file = write_json(info, tmp_path / 'ok.json')
    script = tmp_path / 'run.py'
    script.write_text(LOADER_SCRIPT.format(root=ROOT, delete=''))
    done = subprocess.run([sys.executable, str(script), kind, image_dir, info_file, str(workers), str(SIDE)],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    # Every shapes image has the failing height: the first one loaded is named.
    assert re.match(rf'error: cannot load image \d+ \({re.escape(image_dir)}/\S+\): ValueError: transform failed',
                    last), last
    assert 'Traceback' in done.stderr  # a transform failure may be a bug: its traceback is logged
    assert 'no error' not in done.stdout and 'Blocking queue' not in done.stderr


@pytest.mark.parametrize('workers', [0, 2])
def test_unreadable_training_images_are_skipped_with_a_warning_naming_them(workers, dataset, tmp_path):
    """A file deleted after validation and a corrupt one: training goes on with the next images."""
    image_dir, info = dataset
    info_file = write_json(info, tmp_path / 'ok.json')
    deleted, corrupt = (os.path.join(image_dir, info['images'][i]['file_name']) for i in (3, 5))
    with open(corrupt, 'wb') as f:
        f.write(b'not a jpeg')
    script = tmp_path / 'run.py'
    script.write_text(LOADER_SCRIPT.format(root=ROOT, delete=f'import os; os.remove({deleted!r})'))
    done = subprocess.run([sys.executable, str(script), 'train', image_dir, info_file, str(workers), '0'],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0 and 'no error' in done.stdout, done.stderr[-3000:]
    # Two epochs: each file is named once per epoch.
    assert done.stderr.count(f'skipping image {info["images"][3]["id"]}: image file not found: {deleted}') == 2
    assert done.stderr.count(f'skipping image {info["images"][5]["id"]}: cannot decode image file (corrupt or '
                             f'not an image): {corrupt}') == 2, done.stderr[-3000:]


def test_sample_error_survives_the_loader_as_the_batch(dataset, tmp_path):
    image_dir, info = dataset
    ds = COCODetection(image_dir, write_json(info, tmp_path / 'ok.json'))
    # Image ids[1] gets a height its transform fails on.
    victim = ds.coco.imgs[ds.ids[1]]
    cv2.imwrite(os.path.join(image_dir, victim['file_name']), np.zeros((SIDE + 3, SIDE, 3), np.uint8))
    victim['height'] = SIDE + 3

    def transform(img, *rest):
        if img.shape[0] == SIDE + 3:
            raise ValueError('transform failed')
        return (np.ascontiguousarray(img.transpose(2, 0, 1)),) + rest

    ds.transform = transform
    batches = list(paddle.io.DataLoader(ds, batch_size=2, num_workers=0, collate_fn=detection_collate))
    assert isinstance(batches[0][0], SampleError) and batches[0][0].image_id == ds.ids[1]
    assert isinstance(batches[1][0], paddle.Tensor)


def test_unbatchable_samples_become_an_error_batch(dataset, tmp_path):
    image_dir, info = dataset
    ds = COCODetection(image_dir, write_json(info, tmp_path / 'ok.json'))
    (img, rest), other = ds[0], ds[1]
    batch = detection_collate([(img[:, :-1], rest), other])  # images of unequal sizes
    assert isinstance(batch[0], SampleError)
    with pytest.raises(DatasetError, match='cannot batch the samples: ValueError'):
        list(check_batches([batch]))


# ----------------------------------------------------------- Paddle's ccache warning --
QUIET_SCRIPT = textwrap.dedent('''
    import multiprocessing, sys
    sys.path.insert(0, {root!r})
    if sys.argv[1] == 'quiet':
        from utils.runtime import quiet_paddle_import
        quiet_paddle_import()
    import numpy as np
    import paddle

    class Zeros(paddle.io.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, index):
            return np.zeros(3, np.float32)

    if __name__ == '__main__':
        # As in paddle.distributed.spawn's trainers: loader workers are spawned, importing paddle anew.
        multiprocessing.set_start_method('spawn')
        loader = paddle.io.DataLoader(Zeros(), batch_size=2, num_workers=2)
        for epoch in range(2):
            for batch in loader:
                pass
        print('done')
''')


def test_ccache_warning_is_silenced_in_spawned_loader_workers(tmp_path):
    script = tmp_path / 'quiet.py'
    script.write_text(QUIET_SCRIPT.format(root=ROOT))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}

    def stderr_of(mode):
        done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                              timeout=HANG_TIMEOUT, env=env)
        assert done.stdout.strip() == 'done', done.stderr[-2000:]
        return done.stderr

    assert 'No ccache found' not in stderr_of('quiet')
    if shutil.which('ccache') is None:
        # Without the call: the main process and each of the 2 x 2 workers.
        assert stderr_of('loud').count('No ccache found') == 5


# ------------------------------------------------------------ empty ground truth --
def test_empty_ground_truth_gives_positive_conf_loss_and_zero_box_and_mask_loss():
    """mmdetection's YOLACT head test: images without objects train the background class only."""
    cfg = get_config('yolact_shapes')
    rs = np.random.RandomState(0)
    batch, num_priors, k, proto_side = 2, 60, 8, 12
    centers = rs.uniform(0.1, 0.9, (num_priors, 2))
    priors = np.concatenate([centers, rs.uniform(0.05, 0.4, (num_priors, 2))], axis=1)
    tensor = lambda *shape: paddle.to_tensor(rs.randn(*shape).astype(np.float32))  # noqa: E731
    predictions = {'loc': tensor(batch, num_priors, 4), 'conf': tensor(batch, num_priors, cfg.num_classes),
                   'mask': tensor(batch, num_priors, k), 'priors': paddle.to_tensor(priors.astype(np.float32)),
                   'proto': tensor(batch, proto_side, proto_side, k),
                   'segm': tensor(batch, cfg.num_classes - 1, proto_side, proto_side)}
    targets = [paddle.zeros([0, 5]) for _ in range(batch)]
    masks = [paddle.zeros([0, 48, 48]) for _ in range(batch)]
    losses = MultiBoxLoss.from_config(cfg)(None, predictions, targets, masks, [0] * batch)
    values = {name: float(v) for name, v in losses.items()}
    assert np.isfinite(list(values.values())).all(), values
    assert values['loss_conf'] > 0 and values['loss_box'] == 0 and values['loss_mask'] == 0, values
