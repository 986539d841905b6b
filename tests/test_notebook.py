"""notebooks/yolact_aistudio.ipynb: committed without outputs, and every cell runs in QUICK mode.

The QUICK run plays AI Studio on the generated shapes set: its images and
annotations (relabelled with COCO's 80 categories, the shapes taking ids 1..4)
are zipped like dataset 7122 (val2017.zip, test2017.zip,
annotations_trainval2017.zip, image_info_test2017.zip; the val split plays
test-dev), and stand-in yolact_resnet50 weights written by the reference's
make_weights.py play the published .pth. It checks what the notebook leaves:
the mAP it prints against pycocotools run here on its results files, the
submission zips against the checker, the export.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REFERENCE_DIR, ROOT, needs_reference

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'yolact_aistudio.ipynb')


def test_committed_notebook_has_no_outputs():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert code and [c.get('outputs') for c in code] == [[]] * len(code), 'strip the outputs before committing'
    assert {c.get('execution_count') for c in code} == {None}
    assert [c for c in code if 'parameters' in c['metadata'].get('tags', [])], 'no cell tagged "parameters"'


def _coco_categories():
    from data.config import COCO_CLASSES, COCO_LABEL_MAP
    return [{'id': cat, 'name': COCO_CLASSES[label - 1], 'supercategory': 'thing'}
            for cat, label in COCO_LABEL_MAP]


def _fake_data7122(shapes, zips, annotations):
    """AI Studio's COCO zips made of the shapes set; writes the 80-category train annotations too."""
    os.makedirs(zips)
    os.makedirs(annotations)
    infos = {}
    for split in ('train', 'val'):
        with open(os.path.join(shapes, 'annotations', f'instances_{split}.json')) as f:
            info = json.load(f)
        info['categories'] = _coco_categories()
        infos[split] = info
    with open(os.path.join(annotations, 'instances_train2017.json'), 'w') as f:
        json.dump(infos['train'], f)
    val_images = sorted(os.listdir(os.path.join(shapes, 'val')))
    for name, folder in (('val2017.zip', 'val2017'), ('test2017.zip', 'test2017')):
        with zipfile.ZipFile(os.path.join(zips, name), 'w') as zf:
            for image in val_images:
                zf.write(os.path.join(shapes, 'val', image), f'{folder}/{image}')
    with zipfile.ZipFile(os.path.join(zips, 'annotations_trainval2017.zip'), 'w') as zf:
        zf.writestr('annotations/instances_val2017.json', json.dumps(infos['val']))
        zf.writestr('annotations/instances_train2017.json', json.dumps(infos['train']))
    test_dev = {'images': infos['val']['images'], 'categories': infos['val']['categories']}
    with zipfile.ZipFile(os.path.join(zips, 'image_info_test2017.zip'), 'w') as zf:
        zf.writestr('annotations/image_info_test-dev2017.json', json.dumps(test_dev))


def _recomputed_map(gt_file, results_dir):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        for kind, name in (('bbox', 'bbox_detections.json'), ('segm', 'mask_detections.json')):
            ev = COCOeval(gt, gt.loadRes(os.path.join(results_dir, name)), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats[kind] = ev.stats[:6]
    return stats


def _cell_text(cell):
    return ''.join(o.get('text', '') for o in cell.get('outputs', []) if o.get('output_type') == 'stream')


@needs_reference
def test_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
    import nbclient   # requirements-test.txt
    import nbformat
    shapes, work = tmp_path / 'shapes', tmp_path / 'work'
    subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_shapes_dataset.py'), '--out', str(shapes),
                    '--num_train', '4', '--num_val', '4'], check=True, capture_output=True)
    extra = tmp_path / 'extra'
    _fake_data7122(str(shapes), str(tmp_path / 'data7122'), str(extra))
    weights = tmp_path / 'data00001' / 'yolact_resnet50_54_800000.pth'
    weights.parent.mkdir()
    subprocess.run([sys.executable, os.path.join(REFERENCE_DIR, 'make_weights.py'), 'yolact_resnet50',
                    str(weights)], check=True, capture_output=True)

    with open(NOTEBOOK) as f:
        nb = nbformat.read(f, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
    coco = work / 'coco'
    overrides = dict(
        QUICK=True, PROJECT=ROOT, DATA7122=str(tmp_path / 'data7122'), COCO_ROOT=str(coco),
        WEIGHTS_PTH=str(weights), WORK=str(work), INSTALL=False, NUM_WORKERS=0, ALG='quick-test',
        FT_TRAIN_IMAGES=str(shapes / 'train'), FT_TRAIN_INFO=str(extra / 'instances_train2017.json'),
        FT_VALID_IMAGES=str(coco / 'val2017'), FT_VALID_INFO=str(coco / 'annotations' / 'instances_val2017.json'))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        '\n'.join(f'{k} = {v!r}' for k, v in overrides.items()), metadata={'tags': ['injected-parameters']}))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': ROOT}})
    client.execute()

    # Every cell ran; the notebook's printed mAP is what pycocotools computes from its results files.
    code_cells = [c for c in nb.cells if c.cell_type == 'code']
    assert all(c.execution_count for c in code_cells)
    eval_cell = next(c for c in code_cells if 'eval_val' in c.source)
    printed = {kind: [float(v) for v in re.findall(r'\b\w+=(-?[\d.]+)', line)]
               for kind, line in re.findall(r'^(bbox|segm) (AP=.*)$', _cell_text(eval_cell), re.M)}
    recomputed = _recomputed_map(str(coco / 'annotations' / 'instances_val2017.json'), str(work / 'results_val'))
    for kind in ('bbox', 'segm'):
        assert len(printed[kind]) == 6
        assert printed[kind] == pytest.approx(list(recomputed[kind]), abs=5e-5), kind
    with open(work / 'results_val' / 'mask_detections.json') as f:
        assert len(json.load(f)) > 0

    from utils.evaluation.submission import check_submission
    info = str(coco / 'annotations' / 'image_info_test-dev2017.json')
    for kind in ('bbox', 'segm'):
        zip_path = work / 'submission' / kind / 'detections_test-dev2017_quick-test_results.zip'
        report = check_submission(str(zip_path), info)
        assert report.ok and report.kind == kind, report.format()
    assert 'PASSED' in _cell_text(next(c for c in code_cells if 'check_submission.py' in c.source))
    assert (work / 'checkpoints').is_dir() and os.listdir(work / 'checkpoints')
    assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
               for c in code_cells for o in c.outputs)

    # The per-class AP table and figure, shown inline after the evaluation and the fine-tune's validation.
    def shown_png(cell):
        return [o for o in cell.outputs if o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})]
    train_cell = next(c for c in code_cells if "'train.py'" in c.source)
    for cell in (eval_cell, train_cell):
        assert re.search(r'^ class +\| +box AP \| mask AP \|$', _cell_text(cell), re.M), cell.source
        assert len(shown_png(cell)) == 1
    # Short schedule (scaled steps, logged), the best checkpoint kept and used for the saved predictions.
    # (batch 2: the steps are first scaled x4 to 1120000.., then to the 2 iterations)
    assert 'lr steps [1120000, 2400000, 2800000, 3000000] -> [0, 1, 1, 1], warm-up 500 -> 0' in _cell_text(train_cell)
    assert (work / 'checkpoints' / 'yolact_resnet50_best.pdparams').is_file()
    predictions = work / 'predictions'
    assert sorted(os.listdir(predictions)) == ['bbox_detections.json', 'image_info.json', 'mask_detections.json']
    with open(predictions / 'image_info.json') as f:
        listed = sorted(img['file_name'] for img in json.load(f)['images'])
    assert listed == sorted(os.listdir(work / 'samples'))
    assert sorted(os.listdir(work / 'labelme')) == [os.path.splitext(n)[0] + '.json' for n in listed]
    assert os.path.isfile(work / 'exported' / 'yolact_resnet50' / 'model.pdiparams')
