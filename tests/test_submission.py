"""COCO-server submission packaging and checking (utils/evaluation/submission.py, tools/*_submission.py)."""
import importlib.util
import json
import logging
import os
import zipfile

import numpy as np
import pycocotools.mask as mask_util
import pytest

from tests.conftest import ROOT
from utils.errors import ConfigError, MissingFileError, run_cli
from utils.evaluation.submission import check_submission, submission_name, write_submission

NAME = 'detections_test-dev2017_myalg_results'
CATEGORIES = [{'id': c, 'name': f'c{c}'} for c in (1, 2, 3, 90)]
ALL_IDS = list(range(1000, 1030))       # a test2017-like folder: 30 images
TEST_DEV = ALL_IDS[::3] + ALL_IDS[1::3]  # 20 of them are test-dev
CROWDED = TEST_DEV[0]                   # 150 detections


def _size(image_id):
    return (40 + image_id % 7, 50 + image_id % 5)


@pytest.fixture
def info_file(tmp_path):
    path = tmp_path / 'image_info_test-dev2017.json'
    images = [{'id': i, 'file_name': f'{i}.jpg', 'height': _size(i)[0], 'width': _size(i)[1]} for i in TEST_DEV]
    path.write_text(json.dumps({'images': images, 'categories': CATEGORIES}))
    return str(path)


def _records(image_id, n, rng, first_score=0.0):
    h, w = _size(image_id)
    boxes, masks = [], []
    for k in range(n):
        m = np.zeros((h, w), np.uint8, order='F')
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        m[y:y + 8, x:x + 9] = 1
        rle = mask_util.encode(m)
        rle['counts'] = rle['counts'].decode('ascii')
        cat = CATEGORIES[k % len(CATEGORIES)]['id']
        score = first_score + k / 1000
        boxes.append({'image_id': image_id, 'category_id': cat, 'bbox': [float(x), float(y), 9.0, 8.0],
                      'score': score})
        masks.append({'image_id': image_id, 'category_id': cat, 'segmentation': rle, 'score': score})
    return boxes, masks


def _write_results(folder, per_image):
    """eval.py-style results files (one record per line) for {image_id: count}; returns (boxes, masks)."""
    rng = np.random.default_rng(0)
    boxes, masks = [], []
    for image_id, n in per_image.items():
        b, m = _records(image_id, n, rng)
        boxes += b
        masks += m
    os.makedirs(folder, exist_ok=True)
    for name, recs in (('bbox_detections.json', boxes), ('mask_detections.json', masks)):
        with open(os.path.join(folder, name), 'w') as f:
            f.write('[' + ''.join((',\n' if i else '\n') + json.dumps(r) for i, r in enumerate(recs)) + '\n]\n')
    return boxes, masks


def _zip(path, records, member=None):
    stem = os.path.basename(path)[:-len('.zip')]
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr(member or stem + '.json', json.dumps(records))
    return str(path)


def _read_zip(path):
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == [os.path.basename(path)[:-4] + '.json']
        return json.loads(zf.read(zf.namelist()[0]))


def test_write_submission_filters_to_test_dev_and_top_100(tmp_path, info_file, caplog):
    # Detections on all 30 images of the folder (the 10 foreign ones too); 150 on one test-dev image.
    per_image = {i: 3 for i in ALL_IDS}
    per_image[CROWDED] = 150
    boxes, _ = _write_results(tmp_path / 'results', per_image)
    with caplog.at_level(logging.INFO, logger='utils.evaluation.submission'):
        reports = write_submission(str(tmp_path / 'results'), 'myalg', info_file, str(tmp_path / 'out'))
    assert all(r.ok for r in reports.values())
    paths = {kind: r.zip_path for kind, r in reports.items()}
    assert paths == {'bbox': str(tmp_path / 'out' / 'bbox' / (NAME + '.zip')),
                     'segm': str(tmp_path / 'out' / 'segm' / (NAME + '.zip'))}
    assert sorted(os.listdir(tmp_path / 'out' / 'bbox')) == [NAME + '.zip']   # no temporary left
    for kind, path in paths.items():
        recs = _read_zip(path)
        assert {r['image_id'] for r in recs} == set(TEST_DEV)
        crowded = [r for r in recs if r['image_id'] == CROWDED]
        # The 100 highest of the scores k/1000, k = 0..149: k = 50..149.
        assert sorted(round(r['score'] * 1000) for r in crowded) == list(range(50, 150))
        assert len(recs) == 100 + 3 * 19
        assert ('segmentation' in recs[0]) == (kind == 'segm')
        report = check_submission(path, info_file)
        assert report.ok, report.format()
        assert report.kind == kind
    # Dropped: 10 foreign images x 3, and 50 over the limit, said in the log.
    assert 'dropped 30 of other images and 50 over 100 per image' in caplog.text


def _good(rng):
    boxes, masks = [], []
    for image_id in TEST_DEV[:15]:
        b, m = _records(image_id, 4, rng, first_score=0.5)
        boxes += b
        masks += m
    return boxes, masks


def _spoil(kind, records, how):
    """Make ``records`` bad in exactly one way; returns the name of the check that must fail."""
    r = records[5]
    if how == 'foreign':
        r['image_id'] = ALL_IDS[2]          # in the test2017 folder, not in test-dev
        return 'foreign ids'
    if how == 'category0':
        r['category_id'] = 0
        return 'category ids'
    if how == 'nan':
        r['score'] = float('nan')
        return 'scores'
    if how == 'crowded':
        extra = _records(TEST_DEV[0], 150, np.random.default_rng(1))[0 if kind == 'bbox' else 1]
        records += extra
        return 'per-image limit'
    if how == 'wrong_size' and kind == 'segm':
        h, w = _size(r['image_id'])
        m = np.zeros((h + 3, w), np.uint8, order='F')
        m[2:6, 2:6] = 1
        rle = mask_util.encode(m)
        # Claims the image's size, but the runs cover (h + 3) x w pixels.
        r['segmentation'] = {'size': [h, w], 'counts': rle['counts'].decode('ascii')}
        return 'segmentation'
    if how == 'wrong_size':
        r['bbox'] = [1.0, 2.0, float('inf'), 3.0]
        return 'bbox'
    raise AssertionError(how)


@pytest.mark.parametrize('kind', ['bbox', 'segm'])
@pytest.mark.parametrize('how', ['foreign', 'category0', 'nan', 'crowded', 'wrong_size'])
def test_check_submission_names_each_bad_detection(tmp_path, info_file, kind, how):
    boxes, masks = _good(np.random.default_rng(0))
    records = boxes if kind == 'bbox' else masks
    good = check_submission(_zip(tmp_path / (NAME + '.zip'), records), info_file)
    assert good.ok, good.format()
    expected = _spoil(kind, records, how)
    report = check_submission(_zip(tmp_path / (NAME + '.zip'), records), info_file)
    assert report.failed() == [expected], report.format()
    assert f'[FAIL] {expected}:' in report.format()


def test_check_submission_streams_the_zip(tmp_path, info_file, monkeypatch):
    """A server zip as make_submission writes it is checked record by record, RLEs in small batches."""
    _write_results(tmp_path / 'results', {i: 3 for i in ALL_IDS})
    zips = {kind: r.zip_path for kind, r in
            write_submission(str(tmp_path / 'results'), 'myalg', info_file, str(tmp_path / 'out')).items()}
    monkeypatch.setattr('utils.evaluation.submission._RleCheck.BATCH', 4)
    load = json.load
    monkeypatch.setattr('json.load', lambda f, **k: load(f, **k) if getattr(f, 'name', None) == info_file
                        else pytest.fail('a results file was loaded whole'))
    for kind in ('bbox', 'segm'):
        report = check_submission(zips[kind], info_file)
        assert report.ok and report.kind == kind, report.format()
    # A bad mask in a later batch is still found and counted once.
    member = NAME + '.json'
    with zipfile.ZipFile(zips['segm']) as zf:
        lines = zf.read(member).decode().split('\n')
    record = json.loads(lines[30].rstrip(','))
    record['segmentation']['counts'] = record['segmentation']['counts'][:-2]
    lines[30] = json.dumps(record) + ','
    spoiled = str(tmp_path / NAME) + '.zip'
    with zipfile.ZipFile(spoiled, 'w') as zf:
        zf.writestr(member, '\n'.join(lines))
    report = check_submission(spoiled, info_file)
    assert report.failed() == ['segmentation'] and '1 masks do not decode' in report.format(), report.format()


def test_check_submission_counts_empty_images(tmp_path, info_file):
    _, masks = _good(np.random.default_rng(0))
    report = check_submission(_zip(tmp_path / (NAME + '.zip'), masks), info_file)
    assert report.ok
    assert '15 of 20 images have detections, 5 empty' in report.format()


def test_check_submission_names(tmp_path, info_file):
    boxes, _ = _good(np.random.default_rng(0))
    bad_zip = check_submission(_zip(tmp_path / 'detections_test-dev2017_my_alg_bbox.zip', boxes), info_file)
    assert bad_zip.failed() == ['zip name']
    bad_member = check_submission(_zip(tmp_path / (NAME + '.zip'), boxes, member='results.json'), info_file)
    assert bad_member.failed() == ['json name']


def test_alg_name_and_missing_inputs(tmp_path, info_file):
    assert submission_name('yolact-base') == 'detections_test-dev2017_yolact-base_results'
    with pytest.raises(ConfigError, match='my_alg'):
        submission_name('my_alg')
    with pytest.raises(MissingFileError, match='bbox_detections.json'):
        write_submission(str(tmp_path), 'myalg', info_file, str(tmp_path / 'out'))
    with pytest.raises(MissingFileError, match='nope.json'):
        check_submission(_zip(tmp_path / (NAME + '.zip'), []), str(tmp_path / 'nope.json'))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exit_status(tmp_path, info_file, capsys):
    _write_results(tmp_path / 'results', {i: 2 for i in ALL_IDS})
    make = _tool('make_submission')
    assert run_cli(make.main, ['--results_dir', str(tmp_path / 'results'), '--alg', 'myalg',
                               '--info', info_file, '--out_dir', str(tmp_path / 'out')]) == 0
    assert capsys.readouterr().out.count('PASSED') == 2
    check = _tool('check_submission')
    good = str(tmp_path / 'out' / 'segm' / (NAME + '.zip'))
    assert run_cli(check.main, [good, '--info', info_file]) == 0
    boxes, _ = _good(np.random.default_rng(0))
    boxes[0]['category_id'] = 0
    bad = _zip(tmp_path / (NAME + '.zip'), boxes)
    assert run_cli(check.main, [good, bad, '--info', info_file]) == 1
    out = capsys.readouterr().out
    assert '[FAIL] category ids' in out and 'FAILED: category ids' in out
    assert run_cli(check.main, [str(tmp_path / 'missing.zip'), '--info', info_file]) == 1
    assert 'missing.zip' in capsys.readouterr().err


@pytest.mark.parametrize('how', ['other images', 'bad category'])
def test_a_submission_that_fails_its_check_is_not_left_under_its_upload_name(tmp_path, info_file, capsys, how):
    """A zip that fails its check (results of another image set, or detections the server refuses) is reported
    FAILED (exit 1) and never left under its upload name; a zip that passes is written."""
    out = tmp_path / 'out'
    if how == 'other images':
        _write_results(tmp_path / 'results', {i: 2 for i in ALL_IDS if i not in TEST_DEV})
    else:
        boxes, masks = _write_results(tmp_path / 'results', {i: 2 for i in TEST_DEV})
        boxes[0]['category_id'] = 0
        with open(tmp_path / 'results' / 'bbox_detections.json', 'w') as f:
            json.dump(boxes, f)
    earlier = out / 'segm' / (NAME + '.zip')
    make = _tool('make_submission')
    status = run_cli(make.main, ['--results_dir', str(tmp_path / 'results'), '--alg', 'myalg',
                                 '--info', info_file, '--out_dir', str(out)])
    assert status == 1
    printed = capsys.readouterr().out
    assert 'FAILED' in printed and '(not written)' in printed
    if how == 'other images':
        assert os.listdir(out / 'bbox') == [] and os.listdir(out / 'segm') == []   # no temporary left either
        assert not earlier.exists()
    else:
        # The segm zip passed and is written; the bbox one failed: nothing under its name.
        assert os.listdir(out / 'bbox') == [] and os.listdir(out / 'segm') == [NAME + '.zip']
        assert check_submission(str(earlier), info_file).ok


@pytest.fixture
def coco_info_file(tmp_path):
    """A test-dev-like info file with COCO's 80 category ids (1..90 with gaps)."""
    from data.config import COCO_LABEL_MAP
    path = tmp_path / 'image_info_test-dev2017.json'
    images = [{'id': i, 'file_name': f'{i}.jpg', 'height': _size(i)[0], 'width': _size(i)[1]} for i in TEST_DEV]
    path.write_text(json.dumps({'images': images, 'categories': [{'id': c, 'name': f'c{c}'} for c, _ in COCO_LABEL_MAP]}))
    return str(path)


def _boxes_with_categories(category_ids):
    return [{'image_id': TEST_DEV[k % len(TEST_DEV)], 'category_id': c, 'bbox': [1.0, 2.0, 5.0, 6.0], 'score': 0.5}
            for k, c in enumerate(category_ids)]


def test_contiguous_category_ids_are_named_even_when_every_id_is_valid(tmp_path, coco_info_file):
    """Results with class numbers 1..80 (or 0..79) instead of COCO's ids fail, with the likely cause named, even
    when each number happens to be a COCO id; COCO's own ids and a model of a few classes pass."""
    from data.config import COCO_LABEL_MAP
    coco_ids = [c for c, _ in COCO_LABEL_MAP]
    zip_path = str(tmp_path / (NAME + '.zip'))
    # Classes 1..80 whose number is also a COCO id (11 of COCO's ids in 1..80 are missing: 12, 26, ...).
    valid_contiguous = [c for c in range(1, 81) if c in coco_ids]
    report = check_submission(_zip(zip_path, _boxes_with_categories(valid_contiguous)), coco_info_file)
    assert report.failed() == ['category ids'], report.format()
    assert 'all lie in 1..80' in report.format() and 'span 1..90' in report.format()
    assert 'contiguous class numbers' in report.format()

    report = check_submission(_zip(zip_path, _boxes_with_categories(range(1, 81))), coco_info_file)
    assert report.failed() == ['category ids'] and 'likely cause: contiguous class numbers' in report.format()
    report = check_submission(_zip(zip_path, _boxes_with_categories(range(0, 80))), coco_info_file)
    assert report.failed() == ['category ids'] and 'likely cause: 0-based class indices' in report.format()

    # COCO's own ids pass; so does a model of a few classes.
    assert check_submission(_zip(zip_path, _boxes_with_categories(coco_ids)), coco_info_file).ok
    assert check_submission(_zip(zip_path, _boxes_with_categories([1, 3, 18])), coco_info_file).ok
