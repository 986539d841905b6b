"""eval.py, COCO results files and mAP, drawing, the exported (Paddle Inference) path.

Most tests use the small yolact_shapes config with random weights on a tiny
synthetic COCO-format dataset written by tools/make_shapes_dataset.py; the
model is not the point there. One test exports yolact_base with the
reference's seed-0 weights and checks it against dygraph on the fixture input.
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
from pycocotools.cocoeval import COCOeval

import eval as eval_script
from data.config import COLORS, SHAPE_CLASSES, get_config
from layers.functions import Detect
from layers.output_utils import PostProcess
from utils.errors import ConfigError, run_cli
from utils.evaluation.loop import _reference_hash, evaluate, evaluation_order
from utils.weights.loader import resolve_config
from utils.predictor import Predictor
from tests.conftest import needs_reference, reference_npz, reference_params
from tests.test_detect import EXPORTED_SCORE_ATOL
from tools import benchmark as benchmark_tool
from tools import export_model
from tools.make_shapes_dataset import make_shapes_dataset
from utils.evaluation import coco_eval
from utils.visual.drawing import detection_color, draw_detections
from utils.visual.media import ImageDetector
from utils.deploy.network_export import export_yolact
from utils.deploy.runners import StaticYolact
from layers.interpolate import interpolation_matrix
from yolact import Yolact

NUM_VAL = 6
SIDE = 128


# ------------------------------------------------------------------ fixtures --
@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """DatasetConfig of NUM_VAL validation images (no training images)."""
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=0, num_val=NUM_VAL,
                               size=SIDE, seed=0)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A yolact_shapes .pdparams with random weights, named so eval.py infers the config.

    The weights have trained-like statistics (tools/benchmark.py), so every
    image gets confident detections to write and draw.
    """
    net = Yolact.from_config(get_config('yolact_shapes'))
    benchmark_tool.benchmark_weights(net, seed=0)
    path = str(tmp_path_factory.mktemp('weights') / 'yolact_shapes_1_100.pdparams')
    paddle.save(net.state_dict(), path)
    return path


def _dataset_flags(ds):
    return ['--valid_images', ds.valid_images, '--valid_info', ds.valid_info]


def _run_eval(argv):
    code = eval_script.main(argv)
    assert code == 0
    return code


def _single_log(log_dir):
    logs = [os.path.join(log_dir, n) for n in os.listdir(log_dir) if n.startswith('eval_') and n.endswith('.json')]
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return json.load(f)


def _cocoeval(gt_file, results_file, iou_type, image_ids=None, category_ids=None):
    """COCOeval.stats[:6] computed independently of utils.evaluation.coco_eval."""
    gt = COCO(gt_file)
    dt = gt.loadRes(results_file)
    e = COCOeval(gt, dt, iou_type)
    if image_ids is not None:
        e.params.imgIds = sorted(image_ids)
    if category_ids is not None:
        e.params.catIds = sorted(category_ids)
    e.evaluate()
    e.accumulate()
    e.summarize()
    return [float(v) for v in e.stats[:6]]


def _gt_detections(coco, image_id, label_of):
    """The ground truth of an image as PostProcess-style numpy detections (perfect model)."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    boxes = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                      for a in anns], dtype=np.float64)
    return {'classes': np.array([label_of[a['category_id']] - 1 for a in anns]),
            'scores': np.linspace(0.9, 0.6, len(anns)), 'boxes': boxes,
            'masks': np.stack([coco.annToMask(a) for a in anns]).astype(np.float32)}


# ------------------------------------------------------- results + COCOeval --
def test_ground_truth_as_detections_scores_ap_one(shapes, tmp_path):
    coco = COCO(shapes.valid_info)
    label_map = {i + 1: i + 1 for i in range(len(SHAPE_CLASSES))}
    with coco_eval.CocoResultsWriter(str(tmp_path), coco_eval.class_to_category(label_map)) as writer:
        for image_id in coco.getImgIds():
            det = _gt_detections(coco, image_id, label_map)
            writer.add(image_id, det['classes'], det['boxes'], det['scores'], det['masks'])
    assert writer.num_images == NUM_VAL
    assert writer.num_detections == len(coco.getAnnIds())
    results = coco_eval.evaluate_coco(shapes.valid_info, {'bbox': writer.bbox_path, 'segm': writer.mask_path}).metrics
    for iou_type in ('bbox', 'segm'):
        assert results[iou_type]['AP'] == pytest.approx(1.0)
        assert results[iou_type]['AP50'] == pytest.approx(1.0)
        assert results[iou_type]['AP75'] == pytest.approx(1.0)


def test_rle_encoding_equals_pycocotools():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    masks = rng.random((12, h, w)) < 0.3
    masks[:6] &= np.pad(np.ones((10, 12), bool), ((5, h - 15), (7, w - 19)))[None]   # box-like bands
    masks[6] = False                              # empty
    masks[7] = True                               # full
    masks[8] = False
    masks[8, :, -1] = True                        # the last column only
    masks[9] = False
    masks[9, 0, 0] = True                         # the first pixel only
    masks[10] = False
    masks[10, -1, -1] = True                      # the last pixel only
    masks[11, 3:9, :] = rng.random((6, w)) < 0.5  # every column, some rows
    expected = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert coco_eval.encode_rle(masks) == expected
    assert coco_eval.encode_rle(masks.astype(np.float32)) == expected
    for trial in range(500):
        # Random blocks of random density in small images: every edge case of the block arithmetic.
        h, w = rng.integers(1, 12, 2)
        masks = np.zeros((3, h, w), bool)
        for k in range(3):
            (r0, r1), (c0, c1) = sorted(rng.integers(0, h + 1, 2)), sorted(rng.integers(0, w + 1, 2))
            masks[k, r0:r1, c0:c1] = rng.random((r1 - r0, c1 - c0)) < rng.random()
        expected = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        assert coco_eval.encode_rle(masks) == expected, masks


def test_records_map_categories_back_and_encode_rle_as_text():
    masks = np.zeros((3, 20, 30), dtype=np.float32)
    masks[0, 2:6, 3:9] = 1
    masks[1, 10:15, 0:4] = 1
    boxes = np.array([[3, 2, 9, 6], [0, 10, 4, 15], [5, 5, 5, 9]])   # the last one has no width
    class_to_cat = coco_eval.class_to_category({7: 1, 42: 2})
    bbox, segm = coco_eval.detection_records(5, [1, 0, 0], boxes, [0.9, 0.8, 0.7], masks, class_to_cat,
                                             mask_scores=[0.5, 0.4, 0.3])
    assert [r['category_id'] for r in bbox] == [42, 7]
    assert bbox[0]['bbox'] == [3.0, 2.0, 6.0, 4.0] and all(isinstance(v, float) for v in bbox[0]['bbox'])
    assert [r['score'] for r in bbox] == [0.9, 0.8]
    # YOLACT++: masks carry the rescored mask score, boxes the box score.
    assert [r['score'] for r in segm] == [0.5, 0.4]
    assert isinstance(segm[0]['segmentation']['counts'], str)
    decoded = mask_util.decode({'size': segm[0]['segmentation']['size'],
                                'counts': segm[0]['segmentation']['counts'].encode()})
    np.testing.assert_array_equal(decoded, masks[0])
    json.dumps(bbox + segm)


def test_empty_results_score_zero(shapes, tmp_path):
    with coco_eval.CocoResultsWriter(str(tmp_path), {0: 1}) as writer:
        pass
    with open(writer.bbox_path) as f:
        assert json.load(f) == []
    results = coco_eval.evaluate_coco(shapes.valid_info, {'bbox': writer.bbox_path, 'segm': writer.mask_path}).metrics
    assert results['bbox']['AP'] == 0.0 and results['segm']['AP'] == 0.0


def test_unwritable_results_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(OSError, match='cannot create results directory'):
        coco_eval.CocoResultsWriter(str(blocker / 'results'), {0: 1})


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
        det = _gt_detections(coco, image_id, label_map)
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
    logged = _single_log(str(tmp_path / 'logs'))
    for iou_type in ('bbox', 'segm'):
        expected = _cocoeval(shapes.valid_info, summary.files[iou_type], iou_type)
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
    logged = _single_log(log_dir)
    assert logged['per_class'] == summary.per_class
    assert [row['category_id'] for row in summary.per_class] == sorted(coco.getCatIds())
    names = {c['id']: c['name'] for c in coco.loadCats(coco.getCatIds())}
    values = []
    for row in summary.per_class:
        assert row['name'] == names[row['category_id']]
        for iou_type in ('bbox', 'segm'):
            alone = _cocoeval(shapes.valid_info, summary.files[iou_type], iou_type,
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


def test_per_class_ap_of_a_category_without_ground_truth_is_not_available(tmp_path):
    """A category with no object in the images scored: -1 (n/a), as pycocotools' summarize gives it."""
    mask = np.zeros((20, 20), np.uint8)
    mask[2:10, 2:10] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle['counts'] = rle['counts'].decode()
    gt = {'images': [{'id': 1, 'width': 20, 'height': 20, 'file_name': 'a.png'}],
          'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [2, 2, 8, 8], 'area': 64,
                           'iscrowd': 0, 'segmentation': rle}]}
    gt_file = str(tmp_path / 'gt.json')
    with open(gt_file, 'w') as f:
        json.dump(gt, f)
    results_file = str(tmp_path / 'dt.json')
    with open(results_file, 'w') as f:
        json.dump([{'image_id': 1, 'category_id': c, 'bbox': [2, 2, 8, 8], 'score': 0.9} for c in (1, 2)], f)
    scores = coco_eval.evaluate_coco(gt_file, {'bbox': results_file})
    assert [(r['name'], r['bbox']) for r in scores.per_class] == [('a', pytest.approx(1.0)), ('b', -1.0)]
    assert _cocoeval(gt_file, results_file, 'bbox', category_ids=[2])[0] == -1.0
    assert 'n/a' in coco_eval.format_per_class_table(scores.per_class).splitlines()[3]


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
        det = _gt_detections(coco, image_id, {cat: label_of.get(cat, 0) for cat in ids.values()})
        keep = det['classes'] >= 0
        scripted[image_id] = {k: v[keep] for k, v in det.items()}
    with caplog.at_level(logging.INFO, logger='utils.evaluation.loop'):
        summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco), str(tmp_path / 'r'),
                           num_workers=0, log_dir=str(tmp_path / 'logs'), progress=False)
    assert '2 categories; 2 other categories of the file not scored' in caplog.text
    for iou_type in ('bbox', 'segm'):
        expected = _cocoeval(shapes.valid_info, summary.files[iou_type], iou_type,
                             category_ids=[ids['star'], ids['circle']])
        assert [summary.results[iou_type][m] for m in coco_eval.METRICS] == expected
        assert expected[0] == pytest.approx(1.0)
        # Over every category of the file the two missing ones would halve it.
        assert _cocoeval(shapes.valid_info, summary.files[iou_type], iou_type)[0] == pytest.approx(0.5)


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
    scripted = {i: _gt_detections(coco, i, cfg.dataset.label_map_dict()) for i in coco.getImgIds()}
    bad = coco.getImgIds()[2]
    summary = evaluate(_ScriptedPredictor(cfg, scripted), _IdImages(coco, unreadable=[bad]), str(tmp_path / 'r'),
                       num_workers=0, log_dir=str(tmp_path / 'logs'), progress=False)
    assert summary.skipped == [bad]
    assert bad not in summary.image_ids and len(summary.image_ids) == NUM_VAL - 1
    logged = _single_log(str(tmp_path / 'logs'))
    assert logged['skipped'] == [bad] and logged['num_images'] == NUM_VAL - 1
    # The mAP covers the images that were read: a perfect model scores 1 on them.
    assert summary.results['segm']['AP'] == pytest.approx(1.0)


def test_evaluate_writes_box_scores_with_boxes_and_mask_scores_with_masks(shapes, tmp_path):
    """YOLACT++ (rescore_mask): the reference's bbox results keep the box score, masks get the rescored one."""
    coco = COCO(shapes.valid_info)
    cfg = get_config('yolact_shapes', dataset=shapes)
    scripted = {}
    for image_id in coco.getImgIds():
        det = _gt_detections(coco, image_id, cfg.dataset.label_map_dict())
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


def test_config_takes_the_classes_a_checkpoint_recorded(tmp_path):
    path = str(tmp_path / 'yolact_resnet50_3_500.pdparams')
    open(path, 'w').close()
    with open(str(tmp_path / 'yolact_resnet50_3_500.json'), 'w') as f:
        json.dump({'num_classes': 3, 'class_names': ['cat', 'dog']}, f)
    cfg = resolve_config(weights_path=path)
    assert cfg.name == 'yolact_resnet50' and cfg.num_classes == 3
    assert cfg.dataset.class_names == ('cat', 'dog')


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
    _run_eval(['--trained_model', weights, *_dataset_flags(shapes), '--results_dir', results_dir,
               '--log_dir', log_dir, '--num_workers', '2'])
    logged = _single_log(log_dir)
    assert logged['config'] == 'yolact_shapes' and logged['num_images'] == NUM_VAL
    for iou_type, name in (('bbox', coco_eval.BBOX_FILE), ('segm', coco_eval.MASK_FILE)):
        path = os.path.join(results_dir, name)
        assert logged['result_files'][iou_type] == path
        expected = _cocoeval(shapes.valid_info, path, iou_type)
        assert [logged['results'][iou_type][m] for m in coco_eval.METRICS] == expected


def test_cli_max_images_evaluates_the_hash_ordered_subset(shapes, weights, tmp_path):
    log_dir = str(tmp_path / 'logs')
    _run_eval(['--trained_model', weights, *_dataset_flags(shapes), '--results_dir', str(tmp_path / 'r'),
               '--log_dir', log_dir, '--num_workers', '0', '--max_images', '3'])
    logged = _single_log(log_dir)
    all_ids = COCO(shapes.valid_info).getImgIds()
    expected = [all_ids[i] for i in evaluation_order(all_ids, 3)]
    assert logged['image_ids'] == expected
    results_file = logged['result_files']['segm']
    assert [logged['results']['segm'][m] for m in coco_eval.METRICS] == \
        _cocoeval(shapes.valid_info, results_file, 'segm', image_ids=expected)


def test_cli_test_dev_mode_writes_loadable_json_for_every_image(shapes, weights, tmp_path):
    with open(shapes.valid_info) as f:
        full = json.load(f)
    # An image-info file like image_info_test-dev2017.json: images and categories, no annotations.
    info_file = str(tmp_path / 'image_info_test.json')
    with open(info_file, 'w') as f:
        json.dump({'images': full['images'], 'categories': full['categories']}, f)
    results_dir = str(tmp_path / 'results')
    _run_eval(['--trained_model', weights, '--valid_images', shapes.valid_images, '--valid_info', info_file,
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
    _run_eval(['--trained_model', weights, '--valid_images', images, '--valid_info', shapes.valid_info,
               '--results_dir', str(tmp_path / 'r'), '--log_dir', log_dir, '--num_workers', '2'])
    logged = _single_log(log_dir)
    assert logged['skipped'] == [2] and logged['num_images'] == NUM_VAL - 1 and 2 not in logged['image_ids']


def test_cli_image_and_images_write_drawings(shapes, weights, tmp_path):
    src = os.path.join(shapes.valid_images, '000001.jpg')
    out = str(tmp_path / 'one.png')
    _run_eval(['--trained_model', weights, '--image', f'{src}:{out}'])
    drawn, original = cv2.imread(out), cv2.imread(src)
    assert drawn.shape == original.shape and (drawn != original).any()

    folder = str(tmp_path / 'in')
    os.makedirs(folder)
    for name in ('000001.jpg', '000002.jpg'):
        shutil.copy(os.path.join(shapes.valid_images, name), folder)
    with open(os.path.join(folder, 'broken.jpg'), 'w') as f:
        f.write('text')
    out_dir = str(tmp_path / 'out')
    _run_eval(['--trained_model', weights, '--images', f'{folder}:{out_dir}'])
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
    _run_eval(['--trained_model', weights, '--video', f'{src}:{out}'])
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


def _rasterised(polygons, height, width):
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(p)).astype(np.int32) for p in polygons], 1)
    return canvas.astype(bool)


def test_cli_images_saved_as_coco_results_and_labelme(shapes, weights, tmp_path):
    """--images DIR --output_coco_json --output_labelme: what Predictor detects, as files, no drawings."""
    folder = str(tmp_path / 'in')
    shutil.copytree(shapes.valid_images, folder)
    with open(os.path.join(folder, 'broken.jpg'), 'w') as f:
        f.write('text')
    results_dir, labelme_dir = str(tmp_path / 'results'), str(tmp_path / 'labelme')
    _run_eval(['--trained_model', weights, '--images', folder, '--output_coco_json', '--results_dir', results_dir,
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
                traced = _rasterised([p['points'] for p in parts], *mask.shape)
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
        _run_eval(['--trained_model', weights, '--image', image, '--output_coco_json', '--results_dir',
                   results_dir, *extra])
        with open(os.path.join(results_dir, coco_eval.MASK_FILE)) as f:
            runs[name] = json.load(f)
    wanted = {SHAPE_CLASSES.index('star') + 1, SHAPE_CLASSES.index('circle') + 1}
    assert {r['category_id'] for r in runs['all']} - wanted          # the filter has something to drop
    assert runs['some'] == [r for r in runs['all'] if r['category_id'] in wanted] and runs['some']

    # A dataset evaluation scores the kept classes only.
    log_dir = str(tmp_path / 'logs')
    _run_eval(['--trained_model', weights, *_dataset_flags(shapes), '--results_dir', str(tmp_path / 'r'),
               '--log_dir', log_dir, '--num_workers', '0', '--class_filter', 'star,circle'])
    logged = _single_log(log_dir)
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
    _run_eval(['--trained_model', weights, '--video', src, '--output_coco_json', '--results_dir', results_dir])
    info = COCO(os.path.join(results_dir, 'image_info.json'))
    assert [(img['id'], img['frame'], img['file_name']) for img in info.dataset['images']] == \
        [(1, 0, 'in.mp4'), (2, 1, 'in.mp4'), (3, 2, 'in.mp4')]
    records = info.loadRes(os.path.join(results_dir, coco_eval.MASK_FILE)).dataset['annotations']
    assert {r['image_id'] for r in records} == {1, 2, 3}


def test_mask_polygons_and_labelme_groups_of_a_two_part_mask(tmp_path):
    from utils.evaluation.results import labelme_record, mask_polygons
    mask = np.zeros((40, 60), bool)
    mask[5:20, 5:25] = True
    mask[25:35, 40:55] = True
    mask[38, 2] = True                                    # a single pixel: no polygon
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    assert (_rasterised(polygons, 40, 60) == (mask & ~np.eye(40, 60, k=-36, dtype=bool))).all()
    one = np.zeros((40, 60), bool)
    one[10:30, 10:30] = True
    out = {'labels': ['a', 'b'], 'scores': np.array([0.9, 0.5]), 'masks': np.stack([mask, one])}
    record = labelme_record(out, str(tmp_path / 'img' / 'x.png'), str(tmp_path / 'lm' / 'x.json'), 40, 60)
    assert [(s['label'], s['group_id']) for s in record['shapes']] == [('a', 0), ('a', 0), ('b', None)]
    assert record['imagePath'] == os.path.join('..', 'img', 'x.png')
    assert record['shapes'][2]['description'] == 'score 0.500'


def test_inference_results_are_all_or_nothing(tmp_path):
    from utils.evaluation.results import IMAGE_INFO_FILE, InferenceResults
    out = {'classes': np.array([0]), 'scores': np.array([0.9]), 'boxes': np.array([[1, 1, 5, 5]]),
           'masks': np.ones((1, 8, 8), bool), 'labels': ['a']}
    with pytest.raises(RuntimeError):
        with InferenceResults(['a'], str(tmp_path / 'r')) as results:
            results.add(out, 8, 8, str(tmp_path / 'x.png'))
            raise RuntimeError('stopped midway')
    assert os.listdir(tmp_path / 'r') == []
    with InferenceResults(['a'], str(tmp_path / 'r')) as results:
        results.add(out, 8, 8, str(tmp_path / 'x.png'))
    assert sorted(os.listdir(tmp_path / 'r')) == sorted([coco_eval.BBOX_FILE, coco_eval.MASK_FILE, IMAGE_INFO_FILE])


def test_output_labelme_needs_image_files(weights):
    with pytest.raises(SystemExit):
        eval_script.parse_args(['--trained_model', weights, '--video', 'in.mp4', '--output_labelme', 'x'])
    with pytest.raises(SystemExit):
        eval_script.parse_args(['--trained_model', weights, '--output_labelme', 'x'])


def test_drawing_assembles_only_the_top_k_masks_it_draws(shapes, weights):
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    net.set_state_dict(paddle.load(weights))
    net.eval()
    image = cv2.imread(os.path.join(shapes.valid_images, '000003.jpg'))
    predictor = Predictor.from_network(cfg, net, score_threshold=0.3)
    x = predictor.transform(paddle.to_tensor(image[None]))
    full = predictor.predict_preprocessed(x, SIDE, SIDE)
    top = predictor.predict_preprocessed(x, SIDE, SIDE, max_num_detections=5)
    assert len(full['scores']) > 5 and len(top['scores']) == 5
    for key in full:
        np.testing.assert_array_equal(top[key], full[key][:5], err_msg=key)


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


# ------------------------------------------------------------------ drawing --
def test_draw_detections_reference_colours_and_order():
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 40, 60), dtype=np.float32)
    masks[0, 5:20, 5:30] = 1
    masks[1, 10:30, 20:50] = 1
    boxes = np.array([[5, 5, 30, 20], [20, 10, 50, 30]])
    out = draw_detections(image, np.array([3, 1]), np.array([0.9, 0.8]), boxes, masks, ['star', 'square'],
                          draw_boxes=False, draw_text=False)
    alpha = 0.45

    def blended(*colors):
        value = np.full(3, 100 / 255.0, dtype=np.float32)
        for color in colors:
            value = value * (1 - alpha) + np.asarray(color, dtype=np.float32) / 255.0 * alpha
        return (value * 255).astype(np.uint8)

    # Per instance: detection j gets COLORS[j * 5], BGR; the first (best) is blended last, on top.
    assert detection_color(1) == tuple(reversed(COLORS[5]))
    np.testing.assert_array_equal(out[6, 6], blended(detection_color(0)))
    np.testing.assert_array_equal(out[25, 45], blended(detection_color(1)))
    np.testing.assert_array_equal(out[15, 25], blended(detection_color(1), detection_color(0)))
    np.testing.assert_array_equal(out[35, 5], image[35, 5])

    by_class = draw_detections(image, np.array([3, 1]), np.array([0.9, 0.8]), boxes, masks, ['star', 'square'],
                               draw_boxes=False, draw_text=False, class_color=True)
    np.testing.assert_array_equal(by_class[6, 6], blended(detection_color(3)))


def test_draw_detections_threshold_top_k_boxes_and_text():
    image = np.zeros((80, 120, 3), dtype=np.uint8)
    boxes = np.array([[10, 30, 60, 70], [70, 40, 110, 75], [0, 0, 5, 5]])
    scores = np.array([0.9, 0.5, 0.3])
    out = draw_detections(image, np.array([0, 1, 2]), scores, boxes, None, list(SHAPE_CLASSES[:3]), max_drawn=5,
                          score_threshold=0.4)
    assert tuple(out[50, 10]) == detection_color(0)          # left edge of the first box
    assert tuple(out[60, 110]) == detection_color(1)
    assert not out[:6, :6].any()                              # below the threshold: not drawn
    assert out[18:30, 10:60].any()                            # the label above the first box
    only_one = draw_detections(image, np.array([0, 1, 2]), scores, boxes, None, list(SHAPE_CLASSES[:3]), max_drawn=1)
    assert not only_one[60, 110].any()


# ----------------------------------------------------- exported model, tools --
def test_interpolation_matrix_matches_paddle_bilinear():
    x = paddle.rand([2, 3, 35, 18])
    expected = paddle.nn.functional.interpolate(x, size=(69, 35), mode='bilinear', align_corners=False)
    rows, cols = interpolation_matrix(35, 69), interpolation_matrix(18, 35)
    np.testing.assert_allclose(rows @ x.numpy() @ cols.T, expected.numpy(), rtol=0, atol=2e-6)


def test_export_tool_and_static_shapes_model_match_dygraph(shapes, weights, tmp_path):
    prefix = str(tmp_path / 'exported' / 'shapes')
    assert export_model.main(['--trained_model', weights, '--output', prefix]) == 0
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    net.set_state_dict(paddle.load(weights))
    net.eval()
    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    with paddle.no_grad():
        expected = net(x)
    got = StaticYolact(prefix)(x)
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-4, err_msg=key)

    # eval.py on the exported model writes the same detections as on the weights.
    runs = {}
    for label, model in (('dygraph', ['--trained_model', weights]), ('exported', ['--inference_model', prefix])):
        results_dir = str(tmp_path / label)
        _run_eval([*model, *_dataset_flags(shapes), '--results_dir', results_dir, '--output_coco_json',
                   '--num_workers', '0'])
        with open(os.path.join(results_dir, coco_eval.MASK_FILE)) as f:
            runs[label] = json.load(f)
    assert [(r['image_id'], r['category_id']) for r in runs['exported']] == \
        [(r['image_id'], r['category_id']) for r in runs['dygraph']]
    np.testing.assert_allclose([r['score'] for r in runs['exported']], [r['score'] for r in runs['dygraph']],
                               rtol=0, atol=1e-5)


def test_exported_mask_iou_net_rescores_like_dygraph(tmp_path):
    """YOLACT++ rescoring through the exported mask-IoU net (a small YOLACT++-style config)."""
    plus = get_config('yolact_plus_base')
    cfg = get_config('yolact_shapes', max_size=550, use_maskiou=True, maskiou_net=plus.maskiou_net,
                     rescore_mask=True)
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, seed=1)
    net.eval()
    prefix = str(tmp_path / 'plus')
    export_yolact(net, cfg, prefix)
    static = StaticYolact(prefix)
    assert static.maskiou_net is not None

    x = paddle.rand([1, 3, cfg.max_size, cfg.max_size])
    detect = Detect.from_config(cfg)
    with paddle.no_grad():
        outs = [PostProcess(rescore_mask=True)(detect(model(x))[0], 200, 150, maskiou_net=model.maskiou_net)
                for model in (net, static)]
    assert outs[0]['mask_scores'].shape[0] == cfg.max_num_detections
    np.testing.assert_array_equal(outs[1]['classes'], outs[0]['classes'])
    np.testing.assert_allclose(outs[1]['mask_scores'], outs[0]['mask_scores'], rtol=0, atol=1e-5)
    # No detections: the exported net is not even run.
    assert static.maskiou_net(paddle.zeros([0, 1, 138, 138])).shape == [0, cfg.num_classes - 1]


@needs_reference
def test_exported_yolact_base_equals_dygraph_on_reference_fixture(tmp_path):
    """ResNet-101, seed-0 weights: raw outputs and detections, exported vs dygraph vs the reference."""
    cfg = get_config('yolact_base')
    net = Yolact.from_config(cfg)
    net.set_state_dict(reference_params(net, cfg))
    net.eval()
    ref = reference_npz('forward_yolact_base')
    x = paddle.to_tensor(ref['x'])
    with paddle.no_grad():
        dygraph = net(x)
    prefix = str(tmp_path / 'yolact_base')
    export_yolact(net, cfg, prefix)
    exported = StaticYolact(prefix)(ref['x'])

    for key in ('loc', 'conf', 'mask', 'priors', 'proto'):
        np.testing.assert_allclose(exported[key].numpy(), dygraph[key].numpy(), rtol=0, atol=1e-4, err_msg=key)

    detect = Detect.from_config(cfg)
    dets = [detect(p)[0] for p in (dygraph, exported)]
    h, w = ref['input_bgr'].shape[:2]
    scale = np.float32([w, h, w, h])
    for det in dets:
        # The reference's detections, in its order (the anchor identified by its coefficients);
        # det_box holds the pixel boxes the reference's postprocess wrote into it in place.
        np.testing.assert_array_equal(det['classes'].numpy(), ref['det_class'])
        np.testing.assert_allclose(det['scores'].numpy(), ref['det_score'], rtol=0, atol=EXPORTED_SCORE_ATOL)
        np.testing.assert_allclose(det['coeffs'].numpy(), ref['det_mask'], rtol=0, atol=1e-5)
        pixel_boxes = np.clip(det['boxes'].numpy() * scale, 0, scale)
        np.testing.assert_allclose(pixel_boxes, ref['det_box'], rtol=0, atol=2e-4)

    posts = [PostProcess()(det, w, h) for det in dets]
    reference_masks = np.unpackbits(ref['post_masks_packed'], axis=-1)[..., :w].astype(bool)
    for post in posts:
        np.testing.assert_array_equal(post['classes'], ref['post_classes'])
        np.testing.assert_array_equal(post['boxes'], ref['post_boxes'])
        np.testing.assert_array_equal(post['masks'], reference_masks)
    np.testing.assert_array_equal(posts[1]['masks'], posts[0]['masks'])


def test_benchmark_tool_times_every_stage(tmp_path):
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, seed=0)
    net.eval()
    prefix = str(tmp_path / 'shapes')
    export_yolact(net, cfg, prefix)
    image = benchmark_tool.synthetic_image(str(tmp_path / 'image.jpg'), width=160, height=120)
    chains = {'exported': Predictor.from_exported(prefix), 'dygraph': Predictor.from_network(cfg, net)}
    medians = benchmark_tool.benchmark(chains, cfg, image, runs=2, warmup=1)
    for label in ('exported', 'dygraph'):
        assert set(medians[label]) == set(benchmark_tool.STAGES) | {'total'}
        assert all(v > 0 for v in medians[label].values())
        assert medians[label]['total'] >= medians[label]['network']
    # Trained-like random weights: Detect keeps the full number of detections.
    with paddle.no_grad():
        det = Detect.from_config(cfg)(net(paddle.rand([1, 3, cfg.max_size, cfg.max_size])))[0]
    assert det['scores'].shape[0] == cfg.max_num_detections

