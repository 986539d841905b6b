"""The user's journey end to end, through the programs' main functions, as a user runs them:

published (stand-in) yolact_resnet50 .pth -> train.py fine-tunes it on a 4-class COCO-format set
with a short schedule (--max_iter scales the steps), validating and keeping the best checkpoint
-> eval.py scores its val split (no --class_names: the classes travel with the checkpoint), per class too
-> eval.py --images saves the detections as COCO results and labelme files, which score like the
dataset evaluation's -> eval.py --image draws shape names -> tools/export_model.py -> the exported
whole detector gives the dygraph model's detections and names; so does a network export
(eval.py --inference_model, Predictor.from_exported).

The set's category ids are 10, 20, 30, 40 (not 1..4), so the results files must map the
model's classes back to the set's own ids. A 128-pixel yolact_resnet50 keeps it small.
"""
import dataclasses
import json
import logging
import os

import cv2
import numpy as np
import paddle
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import eval as eval_script
import train
from data.config import CONFIGS, SHAPE_CLASSES, get_config
from tests.conftest import make_weights_module, needs_reference
from tools import export_model
from tools.make_shapes_dataset import make_shapes_dataset
from utils.evaluation import coco_eval
from utils.visual import media
from utils.training.checkpoint import latest_checkpoint
from utils.weights.loader import sidecar_paths
from utils.errors import run_cli
from utils.deploy.detector_export import CONFIG_FILE, inputs_for, run_paddle
from utils.deploy.export_cache import default_cache_dir
from utils.deploy.network_export import export_yolact
from utils.weights.loader import load_model
from utils.predictor import Predictor
from yolact import Yolact

CONFIG = 'journey_resnet50_128'
SIDE = 128


def _shift_category_ids(info_file, factor=10):
    """Rewrite a COCO file with category ids multiplied by ``factor``."""
    with open(info_file) as f:
        info = json.load(f)
    for category in info['categories']:
        category['id'] *= factor
    for annotation in info['annotations']:
        annotation['category_id'] *= factor
    with open(info_file, 'w') as f:
        json.dump(info, f)


@pytest.fixture
def journey_config():
    CONFIGS[CONFIG] = dataclasses.replace(get_config('yolact_resnet50', max_size=SIDE, lr_warmup_until=2),
                                          name=CONFIG)
    yield CONFIGS[CONFIG]
    del CONFIGS[CONFIG]


@needs_reference
def test_convert_finetune_evaluate_draw_export(journey_config, tmp_path, monkeypatch, caplog):
    pytest.importorskip('torch')
    shapes = make_shapes_dataset(str(tmp_path / 'shapes'), num_train=4, num_val=3, size=SIDE, seed=0)
    _shift_category_ids(shapes.train_info)
    _shift_category_ids(shapes.valid_info)
    mw = make_weights_module()
    published = str(tmp_path / 'yolact_resnet50_54_800000.pth')
    mw.save_pth(mw.make_state_dict(mw.load_manifest('yolact_resnet50'), 0), published, legacy=True)

    # 1. Fine-tune the published weights on the 4 shapes: a short schedule, validated, the best kept.
    weights_dir = str(tmp_path / 'weights')
    caplog.set_level(logging.INFO)
    assert run_cli(train.main, [
        '--config', CONFIG, '--trained_model', published, '--batch_size', '2', '--no_autoscale',
        '--max_iter', '4', '--lr', '1e-4', '--num_workers', '0', '--validation_epoch', '1', '--keep_best',
        '--train_images', shapes.train_images, '--train_info', shapes.train_info,
        '--valid_images', shapes.valid_images, '--valid_info', shapes.valid_info,
        '--save_folder', weights_dir, '--log_folder', str(tmp_path / 'logs')]) == 0
    assert any('lr steps [280000, 600000, 700000, 750000] -> [1, 3, 3, 3], warm-up 2 -> 1' in r.getMessage()
               for r in caplog.records)
    checkpoint = latest_checkpoint(weights_dir, CONFIG)
    with open(sidecar_paths(checkpoint)[1]) as f:
        assert json.load(f)['class_names'] == list(SHAPE_CLASSES)
    best = os.path.join(weights_dir, f'{CONFIG}_best.pdparams')
    [validation_log] = [n for n in os.listdir(tmp_path / 'logs') if n.startswith('eval_') and n.endswith('.json')]
    with open(sidecar_paths(best)[1]) as f, open(tmp_path / 'logs' / validation_log) as g:
        assert json.load(f)['mask_AP'] == json.load(g)['results']['segm']['AP']

    # 2. Evaluate on the val split: classes from the checkpoint, category ids from the set.
    results_dir, log_dir = str(tmp_path / 'results'), str(tmp_path / 'eval_logs')
    val_flags = ['--valid_images', shapes.valid_images, '--valid_info', shapes.valid_info, '--num_workers', '0']
    assert run_cli(eval_script.main, ['--trained_model', checkpoint, '--results_dir', results_dir,
                                      '--log_dir', log_dir, '--dygraph', *val_flags]) == 0
    with open(os.path.join(results_dir, coco_eval.BBOX_FILE)) as f:
        dygraph_records = json.load(f)
    assert dygraph_records and {r['category_id'] for r in dygraph_records} <= {10, 20, 30, 40}
    [log_name] = [n for n in os.listdir(log_dir) if n.startswith('eval_') and n.endswith('.json')]
    with open(os.path.join(log_dir, log_name)) as f:
        logged = json.load(f)['results']
    gt = COCO(shapes.valid_info)
    for iou_type, name in (('bbox', coco_eval.BBOX_FILE), ('segm', coco_eval.MASK_FILE)):
        e = COCOeval(gt, gt.loadRes(os.path.join(results_dir, name)), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
        assert [logged[iou_type][m] for m in coco_eval.METRICS] == list(e.stats[:6])
    with open(os.path.join(log_dir, log_name)) as f:
        log = json.load(f)
    assert [(r['category_id'], r['name']) for r in log['per_class']] == [(10, 'circle'), (20, 'square'),
                                                                        (30, 'triangle'), (40, 'star')]
    assert os.path.isfile(log['per_class_plot'])

    # 2b. The checkpoint runs on the val folder as plain images, saved as data: COCO results and labelme files.
    saved, labelme_dir = str(tmp_path / 'saved'), str(tmp_path / 'labelme')
    assert run_cli(eval_script.main, ['--trained_model', checkpoint, '--images', shapes.valid_images,
                                      '--output_coco_json', '--results_dir', saved, '--output_labelme', labelme_dir,
                                      '--dygraph']) == 0
    # Its COCO results (ids from their image-info file, categories by name) are the dataset
    # evaluation's, image for image.
    with open(os.path.join(saved, 'image_info.json')) as f:
        saved_info = json.load(f)
    file_of = {img['id']: img['file_name'] for img in saved_info['images']}
    class_of = {c['id']: c['name'] for c in saved_info['categories']}
    gt_id = {img['file_name']: img['id'] for img in gt.dataset['images']}
    gt_category = {c['name']: c['id'] for c in gt.dataset['categories']}
    for name in (coco_eval.BBOX_FILE, coco_eval.MASK_FILE):
        with open(os.path.join(saved, name)) as f:
            from_images = [dict(r, image_id=gt_id[file_of[r['image_id']]],
                                category_id=gt_category[class_of[r['category_id']]]) for r in json.load(f)]
        with open(os.path.join(results_dir, name)) as f:
            from_dataset = json.load(f)
        def key(r):
            return r['image_id'], -r['score']
        from_images, from_dataset = sorted(from_images, key=key), sorted(from_dataset, key=key)
        assert [(r['image_id'], r['category_id']) for r in from_images] == \
            [(r['image_id'], r['category_id']) for r in from_dataset]
        np.testing.assert_allclose([r['score'] for r in from_images], [r['score'] for r in from_dataset], atol=1e-5)
    assert sorted(os.listdir(labelme_dir)) == sorted(os.path.splitext(n)[0] + '.json' for n in gt_id)

    # 3. Draw one image: the labels drawn are the shapes' names.
    drawn_labels = []
    original_draw = media.draw_detections

    def recording_draw(image, classes, scores, boxes, masks, labels, **options):
        drawn_labels.extend(labels[:options['max_drawn']])
        return original_draw(image, classes, scores, boxes, masks, labels, **options)

    monkeypatch.setattr(media, 'draw_detections', recording_draw)
    image = os.path.join(shapes.valid_images, sorted(os.listdir(shapes.valid_images))[0])
    drawn = str(tmp_path / 'drawn.png')
    assert run_cli(eval_script.main, ['--trained_model', checkpoint, '--image', f'{image}:{drawn}']) == 0
    assert drawn_labels and set(drawn_labels) <= set(SHAPE_CLASSES)
    assert cv2.imread(drawn).shape == cv2.imread(image).shape

    # 4. Export; the exported whole detector detects what the dygraph model does, with the same names.
    folder = str(tmp_path / 'exported' / 'shapes_model')
    assert run_cli(export_model.main, ['--trained_model', checkpoint, '--output_dir', folder]) == 0
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        assert '\n'.join(f'- {json.dumps(name)}' for name in SHAPE_CLASSES) in f.read()   # label_list
    bgr = cv2.imread(image)
    dygraph = Predictor(checkpoint, dygraph=True)(bgr)
    assert set(dygraph['labels']) <= set(SHAPE_CLASSES)
    bbox, bbox_num, _, _ = run_paddle(folder, inputs_for([np.ascontiguousarray(bgr[:, :, ::-1])]))
    assert bbox_num.tolist() == [len(dygraph['classes'])]
    np.testing.assert_array_equal(bbox[:, 0], dygraph['classes'])
    np.testing.assert_array_equal(bbox[:, 2:], dygraph['boxes'])
    np.testing.assert_allclose(bbox[:, 1], dygraph['scores'], rtol=0, atol=1e-5)
    # The network export that eval.py --inference_model runs (the one the CPU default caches).
    prefix = str(tmp_path / 'exported' / 'network')
    network_cfg, network = load_model(checkpoint)
    export_yolact(network, network_cfg, prefix)
    # Predictor's CPU default (the cached export step 3's eval.py --image made, reused) and the explicit export.
    for exported in (Predictor(checkpoint)(bgr), Predictor.from_exported(prefix)(bgr)):
        assert dygraph['labels'] == exported['labels']
        np.testing.assert_array_equal(exported['classes'], dygraph['classes'])
        np.testing.assert_array_equal(exported['boxes'], dygraph['boxes'])
        np.testing.assert_allclose(exported['scores'], dygraph['scores'], rtol=0, atol=1e-5)
    assert len([n for n in os.listdir(default_cache_dir()) if n.startswith(CONFIG + '-')]) == 1

    exported_results = str(tmp_path / 'exported_results')
    assert run_cli(eval_script.main, ['--inference_model', prefix, '--results_dir', exported_results,
                                      '--log_dir', log_dir, *val_flags]) == 0
    with open(os.path.join(exported_results, coco_eval.BBOX_FILE)) as f:
        exported_records = json.load(f)
    assert [(r['image_id'], r['category_id']) for r in exported_records] == \
        [(r['image_id'], r['category_id']) for r in dygraph_records]
    np.testing.assert_allclose([r['score'] for r in exported_records], [r['score'] for r in dygraph_records],
                               rtol=0, atol=1e-5)


def test_weights_without_their_record_keep_their_class_count(tmp_path):
    """A fine-tuned .pdparams copied without its JSON: the class count is read from the weights."""
    cfg = get_config('yolact_shapes')
    cfg = dataclasses.replace(cfg, num_classes=3, dataset=dataclasses.replace(cfg.dataset, class_names=('a', 'b')))
    path = str(tmp_path / 'yolact_shapes_3_30.pdparams')
    paddle.save(Yolact.from_config(cfg).state_dict(), path)
    predictor = Predictor(path)
    assert predictor.cfg.num_classes == 3 and predictor.class_names == ('class_1', 'class_2')
