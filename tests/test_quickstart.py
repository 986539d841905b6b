"""The README's main job, in its short CI variant, end to end in a fresh process.

tools/quickstart.py --quick writes 16 shapes images, trains yolact_shapes on
them from scratch (250 steps of 16 images; on a CPU with two cores in two
data-parallel processes, so the distributed path runs too), scores the same
images with pycocotools, writes the COCO results files and draws detections.
Learning 16 images by heart is the honest bar for so short a run: the test
asks for box AP >= MIN_BOX_AP and mask AP >= MIN_MASK_AP; a pipeline that does
not learn (or mis-maps classes, boxes or masks) stays near 0.
"""
import json
import os
import subprocess
import sys

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import ROOT

MIN_MASK_AP = 0.4
MIN_BOX_AP = 0.5


@pytest.fixture(scope='module')
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('quickstart')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'quickstart.py'), '--quick', '--out', str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quickstart_learns_and_reports_map(quickstart_run):
    out, stdout = quickstart_run
    with open(out / 'summary.json') as f:
        summary = json.load(f)
    assert summary['mask_AP'] >= MIN_MASK_AP, summary
    assert summary['box_AP'] >= MIN_BOX_AP, summary
    assert f"mask AP {summary['mask_AP']:.3f}" in stdout


def test_quickstart_map_is_cocoeval_of_its_json(quickstart_run):
    """pycocotools, run here on the files the quickstart wrote, gives the AP it printed."""
    out, _ = quickstart_run
    with open(out / 'summary.json') as f:
        summary = json.load(f)
    gt = COCO(str(out / 'shapes' / 'annotations' / 'instances_train.json'))
    for iou_type, name, key in (('segm', 'mask_detections.json', 'mask_AP'), ('bbox', 'bbox_detections.json', 'box_AP')):
        evaluator = COCOeval(gt, gt.loadRes(str(out / 'results' / name)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(summary[key], abs=1e-9)


def test_quickstart_draws_images(quickstart_run):
    out, _ = quickstart_run
    drawn = sorted(os.listdir(out / 'drawn'))
    assert len(drawn) == 6 and all(name.endswith('.png') for name in drawn)


def test_quickstart_output_explains_itself_and_keeps_the_launcher_quiet(quickstart_run):
    out, stdout = quickstart_run
    assert stdout.count('B box, C confidence, M mask, S semantic segmentation') == 1
    if os.cpu_count() >= 2:      # two training processes through paddle.distributed.launch, their lines on stdout
        assert '|| B: ' in stdout and 'ETA: 0:00:00' not in stdout
        assert 'LAUNCH INFO' not in stdout
        with open(out / 'logs' / 'launch.log') as f:
            assert 'LAUNCH INFO' in f.read()
        assert str(out / 'logs' / 'launch.log') in stdout
