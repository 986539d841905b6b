"""The evaluation loop (utils/evaluation/loop.py) and the eval.py CLI.

Most tests use the small yolact_shapes config with random weights on a tiny
synthetic COCO-format dataset written by tools/make_shapes_dataset.py
(tests/eval_helpers.py); the model is not the point there. The loop's tests
drive it with a scripted predictor whose detections are known.
"""
import dataclasses
import json
import logging
import os
import shutil

import cv2
import numpy as np
import paddle
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

import eval as eval_script
from data.config import SHAPE_CLASSES, get_config
from tests.eval_helpers import (NUM_VAL, SIDE, cocoeval_stats, dataset_flags, gt_detections, rasterised, run_eval,
                                shapes, single_log, weights)  # noqa: F401 (fixtures)
from utils.errors import ConfigError, run_cli
from utils.evaluation import coco_eval
from utils.evaluation.loop import _reference_hash, evaluate, evaluation_order
from utils.predictor import Predictor
from utils.visual.media import ImageDetector
from utils.weights.loader import resolve_config


# ------------------------------------------------------------ the evaluation loop --
class _ScriptedPredictor:
    """A Predictor look-alike whose detections are looked up by the image id _IdImages put in the image."""

    def __init__(self, cfg, scripted):
        self.cfg, self.scripted = cfg, scripted

    def predict_preprocessed(self, x, width, height, max_num_detections=None):
        return self.scripted[int(x[0, 0, 0, 0])]


class _IdImages(paddle.io.Dataset):
    """COCOEvalImages look-alike whose 'image' carries its id, for a scripted model."""

    def __init__(self, coco, unreadable=()):
        self.coco = coco
        self.ids = coco.getImgIds()
        self.unreadable = set(unreadable)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        return (np.full((3, 2, 2), image_id, dtype=np.float32), image_id, info['height'], info['width'],
                image_id not in self.unreadable)


def _imperfect_detections(coco, label_map, seed=0):
    """Per image: ground truth with shifted masks and boxes, wrong classes and false positives."""
    rng = np.random.RandomState(seed)
    out = {}
    for image_id in coco.getImgIds():
        det = gt_detections(coco, image_id, label_map)
        n = len(det['scores'])
        shift = rng.randint(-3, 4, size=(n, 2))
        det['masks'] = np.stack([np.roll(m, tuple(s), axis=(0, 1)) for m, s in zip(det['masks'], shift)])
        det['boxes'] = np.clip(det['boxes'] + np.tile(shift[:, ::-1], 2), 0, SIDE)
        det['classes'] = np.where(rng.rand(n) < 0.2, (det['classes'] + 1) % len(SHAPE_CLASSES), det['classes'])
        det['scores'] = rng.uniform(0.1, 1.0, n)
        false_box = np.array([[10, 10, 50, 40]], dtype=np.float64)
        false_mask = np.zeros((1, SIDE, SIDE), dtype=np.float32)
        false_mask[0, 10:40, 10:50] = 1
        for key, value in (('classes', [0]), ('scores', [0.95]), ('boxes', false_box), ('masks', false_mask)):
            det[key] = np.concatenate([det[key], value])
        order = np.argsort(-det['scores'])
        out[image_id] = {k: v[order] for k, v in det.items()}
    return out


def test_evaluate_map_equals_cocoeval_on_the_written_files(shapes, tmp_path):
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    scripted = _imperfect_detections(coco, cfg.dataset.label_map_dict())
    summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco), str(tmp_path / 'results'),
                       num_workers=0, log_dir=str(tmp_path / 'logs'), progress=False)
    assert sorted(summary.image_ids) == sorted(coco.getImgIds()) and summary.skipped == []
    logged = single_log(str(tmp_path / 'logs'))
    for iou_type in ('bbox', 'segm'):
        expected = cocoeval_stats(shapes.valid_info, summary.files[iou_type], iou_type)
        assert [summary.results[iou_type][m] for m in coco_eval.METRICS] == expected
        assert [logged['results'][iou_type][m] for m in coco_eval.METRICS] == expected
        # A real score, neither perfect nor zero.
        assert 0.1 < expected[0] < 0.9


def test_per_class_ap_equals_cocoeval_of_each_category_alone(shapes, tmp_path):
    """Per-class AP (table, log JSON, PNG) against pycocotools run with params.catIds = [c] for each class."""
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    scripted = _imperfect_detections(coco, cfg.dataset.label_map_dict(), seed=1)
    # One class's detections all dropped: its AP is 0, not left out.
    dropped = cfg.dataset.label_map_dict()[coco.getCatIds()[-1]] - 1
    for det in scripted.values():
        keep = det['classes'] != dropped
        for key in det:
            det[key] = det[key][keep]
    log_dir = str(tmp_path / 'logs')
    summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco), str(tmp_path / 'results'),
                       num_workers=0, log_dir=log_dir, progress=False)
    logged = single_log(log_dir)
    assert logged['per_class'] == summary.per_class
    assert [row['category_id'] for row in summary.per_class] == sorted(coco.getCatIds())
    names = {c['id']: c['name'] for c in coco.loadCats(coco.getCatIds())}
    values = []
    for row in summary.per_class:
        assert row['name'] == names[row['category_id']]
        for iou_type in ('bbox', 'segm'):
            alone = cocoeval_stats(shapes.valid_info, summary.files[iou_type], iou_type,
                              category_ids=[row['category_id']])[0]
            assert row[iou_type] == pytest.approx(alone, abs=1e-12), (row, iou_type)
            values.append(alone)
    assert min(values) == 0.0 and 0.1 < max(values)   # real, different numbers
    # Their mean over classes is the overall AP, as COCOeval averages it.
    for iou_type in ('bbox', 'segm'):
        assert np.mean([row[iou_type] for row in summary.per_class]) == pytest.approx(
            summary.results[iou_type]['AP'], abs=1e-12)
    table = '\n'.join(logged['per_class_table'])
    for row in summary.per_class:
        assert f"{100 * row['segm']:7.2f}" in table.splitlines()[2 + summary.per_class.index(row)]
    plot = cv2.imread(logged['per_class_plot'])
    assert summary.plot_path == logged['per_class_plot'] and plot is not None and plot.std() > 10


def test_a_model_of_some_categories_is_scored_on_those(shapes, tmp_path, caplog):
    """A model fine-tuned with --class_names star,circle, evaluated on the full val file."""
    coco = COCO(shapes.valid_info)
    ids = {c['name']: c['id'] for c in coco.loadCats(coco.getCatIds())}
    subset = dataclasses.replace(shapes, class_names=('star', 'circle'),
                                 label_map=((ids['star'], 1), (ids['circle'], 2)))
    cfg = get_config('yolact_shapes', dataset=subset, num_classes=3)
    label_of = subset.label_map_dict()
    scripted = {}
    for image_id in coco.getImgIds():           # perfect on the two classes, nothing of the others
        det = gt_detections(coco, image_id, {cat: label_of.get(cat, 0) for cat in ids.values()})
        keep = det['classes'] >= 0
        scripted[image_id] = {k: v[keep] for k, v in det.items()}
    with caplog.at_level(logging.INFO, logger='utils.evaluation.loop'):
        summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco), str(tmp_path / 'r'),
                           num_workers=0, log_dir=str(tmp_path / 'logs'), progress=False)
    assert '2 categories; 2 other categories of the file not scored' in caplog.text
    for iou_type in ('bbox', 'segm'):
        expected = cocoeval_stats(shapes.valid_info, summary.files[iou_type], iou_type,
                             category_ids=[ids['star'], ids['circle']])
        assert [summary.results[iou_type][m] for m in coco_eval.METRICS] == expected
        assert expected[0] == pytest.approx(1.0)
        # Over every category of the file the two missing ones would halve it.
        assert cocoeval_stats(shapes.valid_info, summary.files[iou_type], iou_type)[0] == pytest.approx(0.5)


def test_background_writer_gives_the_sequential_files_byte_for_byte(shapes, tmp_path):
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    predictor = _ScriptedPredictor(cfg, _imperfect_detections(coco, cfg.dataset.label_map_dict()))
    files = {}
    for background in (False, True):
        summary = evaluate(predictor, _IdImages(coco), str(tmp_path / str(background)), num_workers=0,
                           compute_map=False, progress=False, background=background)
        files[background] = {k: open(path, 'rb').read() for k, path in summary.files.items()}
    assert files[True] == files[False] and len(files[True]['segm']) > 1000


def test_an_error_in_the_background_writer_stops_the_evaluation(shapes, tmp_path, monkeypatch):
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    predictor = _ScriptedPredictor(cfg, _imperfect_detections(coco, cfg.dataset.label_map_dict()))
    calls = []

    def add_then_fail(self, *args):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, 'No space left on device')

    monkeypatch.setattr(coco_eval.CocoResultsWriter, 'add', add_then_fail)
    with pytest.raises(OSError, match='No space left'):
        evaluate(predictor, _IdImages(coco), str(tmp_path), num_workers=0, compute_map=False, progress=False)
    assert os.listdir(tmp_path) == []        # nothing under the final names, no temporary file left
    assert len(calls) == 2                   # the writer stopped at the error


def test_evaluate_counts_and_reports_unreadable_images(shapes, tmp_path):
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    scripted = {i: gt_detections(coco, i, cfg.dataset.label_map_dict()) for i in coco.getImgIds()}
    bad = coco.getImgIds()[2]
    summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco, unreadable=[bad]), str(tmp_path / 'r'),
                       num_workers=0, log_dir=str(tmp_path / 'logs'), progress=False)
    assert summary.skipped == [bad]
    assert bad not in summary.image_ids and len(summary.image_ids) == NUM_VAL - 1
    logged = single_log(str(tmp_path / 'logs'))
    assert logged['skipped'] == [bad] and logged['num_images'] == NUM_VAL - 1
    # The mAP covers the images that were read: a perfect model scores 1 on them.
    assert summary.results['segm']['AP'] == pytest.approx(1.0)


def test_evaluate_writes_box_scores_with_boxes_and_mask_scores_with_masks(shapes, tmp_path):
    """YOLACT++ (rescore_mask): the reference's bbox results keep the box score, masks get the rescored one."""
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    scripted = {}
    for image_id in coco.getImgIds():
        det = gt_detections(coco, image_id, cfg.dataset.label_map_dict())
        det['mask_scores'] = det['scores'] * 0.5
        scripted[image_id] = det
    summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco), str(tmp_path), num_workers=0,
                       compute_map=False, progress=False)
    assert summary.results is None and summary.log_path is None
    with open(summary.files['bbox']) as f:
        bbox = json.load(f)
    with open(summary.files['segm']) as f:
        segm = json.load(f)
    expected = np.concatenate([scripted[i]['scores'] for i in coco.getImgIds()])
    np.testing.assert_allclose(sorted(r['score'] for r in bbox), sorted(expected))
    np.testing.assert_allclose(sorted(r['score'] for r in segm), sorted(expected * 0.5))


def test_evaluation_order_is_the_reference_hash_order():
    ids = [139, 285, 632, 724, 776, 785, 802, 872]
    order = evaluation_order(ids)
    assert sorted(order) == list(range(len(ids)))
    hashes = [_reference_hash(ids[i]) for i in order]
    assert hashes == sorted(hashes)
    assert evaluation_order(ids, max_images=3) == order[:3]


# ------------------------------------------------------------- eval.py CLI --
def test_cli_map_equals_cocoeval_on_its_json(shapes, weights, tmp_path):
    results_dir, log_dir = str(tmp_path / 'results'), str(tmp_path / 'logs')
    run_eval(['--trained_model', weights, *dataset_flags(shapes), '--results_dir', results_dir,
               '--log_dir', log_dir, '--num_workers', '2'])
    logged = single_log(log_dir)
    assert logged['config'] == 'yolact_shapes' and logged['num_images'] == NUM_VAL
    for iou_type, name in (('bbox', coco_eval.BBOX_FILE), ('segm', coco_eval.MASK_FILE)):
        path = os.path.join(results_dir, name)
        assert logged['result_files'][iou_type] == path
        expected = cocoeval_stats(shapes.valid_info, path, iou_type)
        assert [logged['results'][iou_type][m] for m in coco_eval.METRICS] == expected


def test_cli_max_images_evaluates_the_hash_ordered_subset(shapes, weights, tmp_path):
    log_dir = str(tmp_path / 'logs')
    run_eval(['--trained_model', weights, *dataset_flags(shapes), '--results_dir', str(tmp_path / 'r'),
               '--log_dir', log_dir, '--num_workers', '0', '--max_images', '3'])
    logged = single_log(log_dir)
    all_ids = COCO(shapes.valid_info).getImgIds()
    expected = [all_ids[i] for i in evaluation_order(all_ids, 3)]
    assert logged['image_ids'] == expected
    results_file = logged['result_files']['segm']
    assert [logged['results']['segm'][m] for m in coco_eval.METRICS] == \
        cocoeval_stats(shapes.valid_info, results_file, 'segm', image_ids=expected)


def test_cli_test_dev_mode_writes_loadable_json_for_every_image(shapes, weights, tmp_path):
    with open(shapes.valid_info) as f:
        full = json.load(f)
    # An image-info file like image_info_test-dev2017.json: images and categories, no annotations.
    info_file = str(tmp_path / 'image_info_test.json')
    with open(info_file, 'w') as f:
        json.dump({'images': full['images'], 'categories': full['categories']}, f)
    results_dir = str(tmp_path / 'results')
    run_eval(['--trained_model', weights, '--valid_images', shapes.valid_images, '--valid_info', info_file,
               '--output_coco_json', '--results_dir', results_dir, '--log_dir', str(tmp_path / 'logs'),
               '--num_workers', '0'])
    assert not os.path.exists(tmp_path / 'logs')          # no ground truth, no mAP
    listed = {img['id'] for img in full['images']}
    info = COCO(info_file)
    for name in (coco_eval.BBOX_FILE, coco_eval.MASK_FILE):
        results = info.loadRes(os.path.join(results_dir, name))
        assert {ann['image_id'] for ann in results.dataset['annotations']} == listed
        assert {ann['category_id'] for ann in results.dataset['annotations']} <= {c['id'] for c in full['categories']}


def test_cli_dataset_with_corrupt_image_is_counted(shapes, weights, tmp_path):
    images = str(tmp_path / 'images')
    shutil.copytree(shapes.valid_images, images)
    with open(os.path.join(images, '000002.jpg'), 'wb') as f:
        f.write(b'not a jpeg')
    log_dir = str(tmp_path / 'logs')
    run_eval(['--trained_model', weights, '--valid_images', images, '--valid_info', shapes.valid_info,
               '--results_dir', str(tmp_path / 'r'), '--log_dir', log_dir, '--num_workers', '2'])
    logged = single_log(log_dir)
    assert logged['skipped'] == [2] and logged['num_images'] == NUM_VAL - 1 and 2 not in logged['image_ids']


def test_cli_image_and_images_write_drawings(shapes, weights, tmp_path):
    src = os.path.join(shapes.valid_images, '000001.jpg')
    out = str(tmp_path / 'one.png')
    run_eval(['--trained_model', weights, '--image', f'{src}:{out}'])
    drawn, original = cv2.imread(out), cv2.imread(src)
    assert drawn.shape == original.shape and (drawn != original).any()

    folder = str(tmp_path / 'in')
    os.makedirs(folder)
    for name in ('000001.jpg', '000002.jpg'):
        shutil.copy(os.path.join(shapes.valid_images, name), folder)
    with open(os.path.join(folder, 'broken.jpg'), 'w') as f:
        f.write('text')
    out_dir = str(tmp_path / 'out')
    run_eval(['--trained_model', weights, '--images', f'{folder}:{out_dir}'])
    # The unreadable file is skipped; the same image drawn by --image and --images is the same picture.
    assert sorted(os.listdir(out_dir)) == ['000001.png', '000002.png']
    np.testing.assert_array_equal(drawn, cv2.imread(os.path.join(out_dir, '000001.png')))


def _write_video(shapes, path, num_frames):
    """An mp4 at ``path`` of the first ``num_frames`` shapes validation images; returns ``path``."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 10, (SIDE, SIDE))
    for name in sorted(os.listdir(shapes.valid_images))[:num_frames]:
        writer.write(cv2.imread(os.path.join(shapes.valid_images, name)))
    writer.release()
    return path


def test_cli_video_file_to_file(shapes, weights, tmp_path):
    src = _write_video(shapes, str(tmp_path / 'in.mp4'), 4)
    out = str(tmp_path / 'out.mp4')
    run_eval(['--trained_model', weights, '--video', f'{src}:{out}'])
    inputs, outputs = _video_frames(src), _video_frames(out)
    assert len(outputs) == len(inputs) == 4
    # Each output frame is its input frame's drawing (per-class colours, as for every video;
    # --top_k 5 by default), up to the video codec's loss: far closer to it than to the undrawn frame.
    detector = ImageDetector(Predictor(weights), max_drawn=5, class_color=True)
    drawings = [detector(frame).astype(np.float32) for frame in inputs]
    for i, (frame, written) in enumerate(zip(inputs, outputs)):
        to_drawings = [np.abs(written.astype(np.float32) - drawn).mean() for drawn in drawings]
        to_input = np.abs(written.astype(np.float32) - frame).mean()
        assert int(np.argmin(to_drawings)) == i and to_drawings[i] < to_input / 2, (i, to_drawings, to_input)


def _video_frames(path):
    capture = cv2.VideoCapture(path)
    assert capture.isOpened(), path
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_cli_images_saved_as_coco_results_and_labelme(shapes, weights, tmp_path):
    """--images DIR --output_coco_json --output_labelme: what Predictor detects, as files, no drawings."""
    folder = str(tmp_path / 'in')
    shutil.copytree(shapes.valid_images, folder)
    with open(os.path.join(folder, 'broken.jpg'), 'w') as f:
        f.write('text')
    results_dir, labelme_dir = str(tmp_path / 'results'), str(tmp_path / 'labelme')
    run_eval(['--trained_model', weights, '--images', folder, '--output_coco_json', '--results_dir', results_dir,
               '--output_labelme', labelme_dir, '--score_threshold', '0.3'])
    names = sorted(n for n in os.listdir(folder) if n != 'broken.jpg')
    assert sorted(os.listdir(results_dir)) == ['bbox_detections.json', 'image_info.json', 'mask_detections.json']

    # The image-info file: the folder's images (the unreadable one skipped), the model's classes.
    info = COCO(os.path.join(results_dir, 'image_info.json'))
    assert sorted(img['file_name'] for img in info.dataset['images']) == names
    assert [(c['id'], c['name']) for c in info.dataset['categories']] == list(enumerate(SHAPE_CLASSES, 1))
    boxes = info.loadRes(os.path.join(results_dir, coco_eval.BBOX_FILE))
    masks = info.loadRes(os.path.join(results_dir, coco_eval.MASK_FILE))

    predictor = Predictor(weights, score_threshold=0.3)
    total = traced_masks = 0
    for img in info.dataset['images']:
        image = cv2.imread(os.path.join(folder, img['file_name']))
        assert (img['height'], img['width']) == image.shape[:2]
        expected = predictor(image)
        box_records = boxes.loadAnns(boxes.getAnnIds(imgIds=img['id']))
        mask_records = masks.loadAnns(masks.getAnnIds(imgIds=img['id']))
        keep = [i for i, b in enumerate(expected['boxes']) if b[2] > b[0] and b[3] > b[1]]
        assert [r['category_id'] for r in box_records] == [int(expected['classes'][i]) + 1 for i in keep]
        np.testing.assert_allclose([r['score'] for r in box_records], expected['scores'][keep], rtol=1e-6)
        for record, i in zip(mask_records, keep):
            np.testing.assert_array_equal(mask_util.decode(record['segmentation']).astype(bool),
                                          expected['masks'][i])
        total += len(keep)

        # labelme: the same detections as polygons that trace their masks.
        with open(os.path.join(labelme_dir, os.path.splitext(img['file_name'])[0] + '.json')) as f:
            labelme = json.load(f)
        assert {k for k in labelme} >= {'version', 'flags', 'shapes', 'imagePath', 'imageData', 'imageHeight',
                                       'imageWidth'}
        assert labelme['imageData'] is None and (labelme['imageHeight'], labelme['imageWidth']) == image.shape[:2]
        assert os.path.samefile(os.path.join(labelme_dir, labelme['imagePath']),
                                os.path.join(folder, img['file_name']))
        assert {s['shape_type'] for s in labelme['shapes']} <= {'polygon'}
        # Shapes come in detection order, one per connected part of each mask (of 3 points or more).
        parts_of = [sum(len(c) >= 3 for c in cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL,
                                                             cv2.CHAIN_APPROX_SIMPLE)[0])
                    for m in expected['masks']]
        shapes_left = iter(labelme['shapes'])
        for i, (label, mask, n) in enumerate(zip(expected['labels'], expected['masks'], parts_of)):
            parts = [next(shapes_left) for _ in range(n)]
            assert {p['label'] for p in parts} <= {label}
            assert {p['group_id'] for p in parts} <= ({None} if n == 1 else {i})
            if mask.sum() > 100:
                traced = rasterised([p['points'] for p in parts], *mask.shape)
                assert (traced & mask).sum() / (traced | mask).sum() > 0.8, label
                traced_masks += 1
        assert next(shapes_left, None) is None
    assert total > 0 and traced_masks > 0
    assert sorted(os.listdir(labelme_dir)) == [os.path.splitext(n)[0] + '.json' for n in names]


def test_class_filter_keeps_the_named_classes(shapes, weights, tmp_path):
    image = os.path.join(shapes.valid_images, '000003.jpg')
    runs = {}
    for name, extra in (('all', []), ('some', ['--class_filter', 'star,circle'])):
        results_dir = str(tmp_path / name)
        run_eval(['--trained_model', weights, '--image', image, '--output_coco_json', '--results_dir',
                   results_dir, *extra])
        with open(os.path.join(results_dir, coco_eval.MASK_FILE)) as f:
            runs[name] = json.load(f)
    wanted = {SHAPE_CLASSES.index('star') + 1, SHAPE_CLASSES.index('circle') + 1}
    assert {r['category_id'] for r in runs['all']} - wanted          # the filter has something to drop
    assert runs['some'] == [r for r in runs['all'] if r['category_id'] in wanted] and runs['some']

    # A dataset evaluation scores the kept classes only.
    log_dir = str(tmp_path / 'logs')
    run_eval(['--trained_model', weights, *dataset_flags(shapes), '--results_dir', str(tmp_path / 'r'),
               '--log_dir', log_dir, '--num_workers', '0', '--class_filter', 'star,circle'])
    logged = single_log(log_dir)
    ids = {c['name']: c['id'] for c in COCO(shapes.valid_info).dataset['categories']}
    assert logged['category_ids'] == sorted([ids['star'], ids['circle']])
    assert [r['name'] for r in logged['per_class']] == sorted(['star', 'circle'], key=ids.get)
    with open(logged['result_files']['segm']) as f:
        assert {r['category_id'] for r in json.load(f)} <= {ids['star'], ids['circle']}

    # An unknown name: a one-line error naming it and the model's classes.
    code = run_cli(eval_script.main, ['--trained_model', weights, '--image', image, '--output_coco_json',
                                      '--results_dir', str(tmp_path / 'x'), '--class_filter', 'star,dog'])
    assert code == 1 and not os.path.exists(tmp_path / 'x')


def test_cli_video_frames_saved_as_coco_results(shapes, weights, tmp_path):
    src = _write_video(shapes, str(tmp_path / 'in.mp4'), 3)
    results_dir = str(tmp_path / 'results')
    run_eval(['--trained_model', weights, '--video', src, '--output_coco_json', '--results_dir', results_dir])
    info = COCO(os.path.join(results_dir, 'image_info.json'))
    assert [(img['id'], img['frame'], img['file_name']) for img in info.dataset['images']] == \
        [(1, 0, 'in.mp4'), (2, 1, 'in.mp4'), (3, 2, 'in.mp4')]
    records = info.loadRes(os.path.join(results_dir, coco_eval.MASK_FILE)).dataset['annotations']
    assert {r['image_id'] for r in records} == {1, 2, 3}


def test_output_labelme_needs_image_files(weights):
    with pytest.raises(SystemExit):
        eval_script.parse_args(['--trained_model', weights, '--video', 'in.mp4', '--output_labelme', 'x'])
    with pytest.raises(SystemExit):
        eval_script.parse_args(['--trained_model', weights, '--output_labelme', 'x'])


@pytest.mark.parametrize('flag, spec, error, message', [
    ('--video', '{tmp}/missing.mp4:{tmp}/out.mp4', FileNotFoundError, 'not found'),
    ('--video', '{tmp}/not_a_video.mp4:{tmp}/out.mp4', OSError, 'cannot open video'),
    ('--video', '{video}:{tmp}/no/such/folder/out.mp4', FileNotFoundError, 'output folder does not exist'),
    ('--image', '{image}:{tmp}/no/such/folder/out.png', FileNotFoundError, 'output folder does not exist'),
    ('--image', '{tmp}/not_a_video.mp4:{tmp}/out.png', OSError, 'cannot decode image file'),
    ('--images', '{tmp}/not_a_video.mp4:{tmp}/out', FileNotFoundError, 'is not a folder'),
])
def test_bad_input_and_output_paths_are_clear_errors(shapes, weights, tmp_path, flag, spec, error, message):
    (tmp_path / 'not_a_video.mp4').write_text('text')
    video = str(tmp_path / 'ok.mp4')
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), 10, (SIDE, SIDE))
    writer.write(np.zeros((SIDE, SIDE, 3), np.uint8))
    writer.release()
    spec = spec.format(tmp=tmp_path, video=video, image=os.path.join(shapes.valid_images, '000001.jpg'))
    with pytest.raises(error, match=message):
        eval_script.main(['--trained_model', weights, flag, spec])


def test_cli_reports_bad_input_with_exit_code_one(weights, tmp_path):
    assert run_cli(eval_script.main, ['--trained_model', weights, '--image', f'{tmp_path}/missing.png:out.png']) == 1
    no_config = tmp_path / 'no_config_in_name.pdparams'
    shutil.copy(weights, no_config)
    assert run_cli(eval_script.main, ['--trained_model', str(no_config)]) == 1


def test_cli_needs_a_model_and_one_mode(weights):
    with pytest.raises(SystemExit):
        eval_script.parse_args([])
    with pytest.raises(SystemExit):
        eval_script.parse_args(['--trained_model', weights, '--image', 'a.png', '--video', 'b.mp4'])
    args = eval_script.parse_args(['--trained_model', weights])
    assert (args.fast_nms, args.cross_class_nms, args.top_k, args.score_threshold) == (True, False, 5, 0.0)


def test_config_from_weights_name_and_override(shapes, weights):
    assert resolve_config(weights_path=weights).name == 'yolact_shapes'
    assert resolve_config('yolact_base', weights_path=weights).name == 'yolact_base'
    args = eval_script.parse_args(['--trained_model', weights, '--dataset', 'coco2017_testdev_dataset'])
    with pytest.raises(ConfigError, match='coco2017_testdev_dataset has 80 classes, the model 4'):
        eval_script.build_predictor(args)
