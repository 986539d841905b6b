"""The standalone runner deploy/python/infer.py, run as a program from a folder that holds only it and an export.

The folder is what a user copies to a serving machine: nothing of this project is importable
there. Its detections (COCO results JSON, RLE masks decoded with pycocotools) are compared with
the project's own Predictor (dygraph network, Detect, PostProcess) for the same weights:
yolact_shapes with trained-like random weights (tools/benchmark.py's benchmark_weights) on
synthetic images, a folder and a short video, and yolact_base with the seed-0 stand-in weights
on the reference fixture's image against the reference's final detections (post_*).
"""
import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import paddle
import pycocotools.mask as mask_util
import pytest

from tests.conftest import ROOT, needs_reference, reference_npz, reference_params
from data.config import get_config
from layers.compat import PADDLE_VERSION
from tools.benchmark import benchmark_weights
from utils.deploy.detector_export import export_detector
from utils.predictor import Predictor
from yolact import Yolact

RUNNER = os.path.join(ROOT, 'deploy', 'python', 'infer.py')
# What the runner may import: the standard library modules it uses, and its four dependencies.
ALLOWED_IMPORTS = {'argparse', 'json', 'os', 'sys', 'tempfile', 'time', 'cv2', 'numpy', 'yaml', 'paddle', 'onnxruntime'}
onnx_missing = (PADDLE_VERSION < (3, 0) or importlib.util.find_spec('paddle2onnx') is None
                or importlib.util.find_spec('onnxruntime') is None)
needs_onnx = pytest.mark.skipif(onnx_missing, reason='ONNX export needs Paddle >= 3 with paddle2onnx 2.x and '
                                                     'onnxruntime (requirements-onnx.txt)')


def _image(height, width, seed):
    """A BGR uint8 image of smooth colour blobs and noise (many detections with benchmark_weights)."""
    rng = np.random.RandomState(seed)
    small = rng.uniform(0, 255, (max(2, height // 20), max(2, width // 20), 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """(Predictor, {'paddle': export folder, 'onnx': export folder}) of one yolact_shapes network."""
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    benchmark_weights(net, 0)
    net.eval()
    base = tmp_path_factory.mktemp('runner_exports')
    exports = {'paddle': str(base / 'paddle')}
    export_detector(net, cfg, exports['paddle'])
    if not onnx_missing:
        exports['onnx'] = str(base / 'onnx')
        export_detector(net, cfg, exports['onnx'], export_format='onnx')
    return Predictor.from_network(cfg, net), exports


def serving_folder(tmp_path, export_dir):
    """A folder holding only infer.py and the export (in ``model/``)."""
    folder = tmp_path / 'serve'
    folder.mkdir()
    shutil.copy(RUNNER, folder / 'infer.py')
    shutil.copytree(export_dir, folder / 'model')
    return folder


def run_runner(folder, *args):
    """``python infer.py --model_dir model ARGS`` in ``folder``, with no PYTHONPATH: the finished process."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, 'infer.py', '--model_dir', 'model', '--cpu_threads', '1', *args],
                          cwd=str(folder), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600)


def ran(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def results_by_image(out_dir):
    """{image_id: {'boxes': [n, 4] x1 y1 x2 y2, 'classes', 'scores', 'masks' [n, H, W] bool, 'mask_scores'}}."""
    with open(os.path.join(out_dir, 'bbox_detections.json')) as f:
        boxes = json.load(f)
    with open(os.path.join(out_dir, 'mask_detections.json')) as f:
        masks = json.load(f)
    assert len(boxes) == len(masks)
    found = {}
    for b, m in zip(boxes, masks):
        assert (b['image_id'], b['category_id']) == (m['image_id'], m['category_id'])
        entry = found.setdefault(b['image_id'], {'boxes': [], 'classes': [], 'scores': [], 'masks': [],
                                                 'mask_scores': []})
        x, y, w, h = b['bbox']
        entry['boxes'].append([x, y, x + w, y + h])
        entry['classes'].append(b['category_id'])
        entry['scores'].append(b['score'])
        entry['masks'].append(mask_util.decode(m['segmentation']).astype(bool))
        entry['mask_scores'].append(m['score'])
    return {k: {n: np.array(v) for n, v in e.items()} for k, e in found.items()}


def assert_same(found, expected, category_ids=None):
    """The runner's detections of one image against a Predictor's result (or the reference's post_*)."""
    classes = expected['classes'] if category_ids is None else np.asarray(category_ids)[expected['classes']]
    np.testing.assert_array_equal(found['classes'], classes, err_msg='classes')
    np.testing.assert_allclose(found['scores'], expected['scores'], rtol=0, atol=1e-5, err_msg='scores')
    np.testing.assert_allclose(found['boxes'], expected['boxes'], rtol=0, atol=1e-3, err_msg='boxes')
    agreement = float((found['masks'] == expected['masks']).mean())
    assert agreement >= 0.999, f'masks agree on {agreement:.4%} of the pixels'
    if 'mask_scores' in expected:
        np.testing.assert_allclose(found['mask_scores'], expected['mask_scores'], rtol=0, atol=1e-5)


def test_runner_imports_only_its_dependencies():
    with open(RUNNER) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, 'relative import'
            imported.add(node.module.split('.')[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def test_rle_is_pycocotools_encoding():
    spec = importlib.util.spec_from_file_location('deploy_runner', RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rng = np.random.RandomState(0)
    masks = [rng.rand(37, 23) < 0.5, np.zeros((5, 7), bool), np.ones((6, 4), bool), np.zeros((480, 640), bool)]
    masks[3][100:300, 33:600] = True
    masks[3][0, :] = True
    for mask in masks:
        expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert runner.rle_encode(mask) == {'size': list(expected['size']), 'counts': expected['counts'].decode()}


def test_image_against_predictor(shapes, tmp_path):
    predictor, exports = shapes
    folder = serving_folder(tmp_path, exports['paddle'])
    image = _image(120, 160, 1)
    cv2.imwrite(str(folder / 'photo.png'), image)
    proc = ran(run_runner(folder, '--image_file', 'photo.png', '--threshold', '0', '--output_dir', 'out'))
    found = results_by_image(folder / 'out')
    assert list(found) == [0], 'image_id of a file name without a number: its position'
    expected = predictor(image)
    assert len(expected['classes']) > 10
    assert_same(found[0], expected)
    drawn = cv2.imread(str(folder / 'out' / 'photo.png'))
    assert drawn.shape == image.shape and (drawn != image).any()
    assert 'model' in proc.stdout and 'ms per image' in proc.stdout


def test_folder_with_annotations(shapes, tmp_path):
    """A folder of two sizes and one unreadable file (skipped, named); ids from a COCO annotation file."""
    predictor, exports = shapes
    folder = serving_folder(tmp_path, exports['paddle'])
    images = {'a.jpg': _image(90, 200, 2), 'b.png': _image(130, 110, 3)}
    (folder / 'photos').mkdir()
    for name, image in images.items():
        cv2.imwrite(str(folder / 'photos' / name), image)
        images[name] = cv2.imread(str(folder / 'photos' / name))   # what the runner reads (JPEG is lossy)
    (folder / 'photos' / 'broken.jpg').write_bytes(b'not an image')
    (folder / 'photos' / 'notes.txt').write_text('not an image either')
    names = predictor.class_names
    category_ids = [10 + 2 * i for i in range(len(names))]
    coco = {'images': [{'id': 7, 'file_name': 'a.jpg'}, {'id': 9, 'file_name': 'b.png'},
                       {'id': 11, 'file_name': 'broken.jpg'}],
            'categories': [{'id': c, 'name': n} for c, n in zip(category_ids, names)]}
    (folder / 'instances.json').write_text(json.dumps(coco))
    expected = {name: predictor(image) for name, image in images.items()}
    threshold = float(np.median(np.concatenate([e['scores'] for e in expected.values()])))
    proc = ran(run_runner(folder, '--image_dir', 'photos', '--threshold', repr(threshold), '--output_dir', 'out',
                          '--annotations', 'instances.json'))
    assert 'broken.jpg' in proc.stderr and 'notes.txt' not in proc.stderr + proc.stdout
    found = results_by_image(folder / 'out')
    assert sorted(found) == [7, 9]
    for image_id, name in ((7, 'a.jpg'), (9, 'b.png')):
        keep = expected[name]['scores'] >= threshold
        assert_same(found[image_id], {k: v[keep] for k, v in expected[name].items() if k != 'labels'}, category_ids)
        assert os.path.isfile(folder / 'out' / name)
    assert not os.path.exists(folder / 'out' / 'broken.jpg')


def test_batch_of_two_with_a_short_last_batch(shapes, tmp_path):
    """An export for batches of 2 on 3 images of different sizes: padded batches, the fill image dropped."""
    predictor, _ = shapes
    export_detector(predictor.net, predictor.cfg, str(tmp_path / 'export_b2'), batch_size=2)
    folder = serving_folder(tmp_path, str(tmp_path / 'export_b2'))
    (folder / 'photos').mkdir()
    images = {}
    for i, (h, w) in enumerate(((100, 150), (140, 90), (80, 120))):
        images[f'{i + 1}.png'] = _image(h, w, 20 + i)
        cv2.imwrite(str(folder / 'photos' / f'{i + 1}.png'), images[f'{i + 1}.png'])
    proc = ran(run_runner(folder, '--image_dir', 'photos', '--threshold', '0', '--output_dir', 'out', '--no_draw'))
    assert 'batch 2' in proc.stdout
    found = results_by_image(folder / 'out')
    assert sorted(found) == [1, 2, 3], 'image_id: the number of the file name'
    for image_id in (1, 2, 3):
        assert_same(found[image_id], predictor(images[f'{image_id}.png']))


@needs_onnx
def test_video_with_onnx(shapes, tmp_path):
    predictor, exports = shapes
    folder = serving_folder(tmp_path, exports['onnx'])
    assert not os.path.exists(folder / 'model' / 'model.pdiparams')
    writer = cv2.VideoWriter(str(folder / 'clip.avi'), cv2.VideoWriter_fourcc(*'MJPG'), 5, (144, 96))
    for seed in range(3):
        writer.write(_image(96, 144, 10 + seed))
    writer.release()
    capture = cv2.VideoCapture(str(folder / 'clip.avi'))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame)
        ok, frame = capture.read()
    capture.release()
    assert len(frames) == 3
    ran(run_runner(folder, '--video_file', 'clip.avi', '--threshold', '0', '--output_dir', 'out'))
    found = results_by_image(folder / 'out')
    assert sorted(found) == [0, 1, 2]
    for index, frame in enumerate(frames):
        assert_same(found[index], predictor(frame))
    drawn = cv2.VideoCapture(str(folder / 'out' / 'clip.mp4'))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    drawn.release()
    assert [n for n in os.listdir(folder / 'out') if n.startswith('.')] == []


@needs_reference
def test_reference_detections(tmp_path):
    """yolact_base, seed-0 stand-in weights: the runner returns the reference's final detections."""
    cfg = get_config('yolact_base')
    net = Yolact.from_config(cfg)
    net.set_state_dict({k: paddle.to_tensor(v) for k, v in reference_params(net, cfg).items()})
    net.eval()
    export_detector(net, cfg, str(tmp_path / 'export'))
    folder = serving_folder(tmp_path, str(tmp_path / 'export'))
    ref = reference_npz('forward_yolact_base')
    cv2.imwrite(str(folder / 'image.png'), ref['input_bgr'])
    ran(run_runner(folder, '--image_file', 'image.png', '--threshold', '0', '--output_dir', 'out', '--no_draw'))
    found = results_by_image(folder / 'out')[0]
    width = ref['input_bgr'].shape[1]
    expected = {'classes': ref['post_classes'], 'scores': ref['post_scores'], 'boxes': ref['post_boxes'],
                'masks': np.unpackbits(ref['post_masks_packed'], axis=-1)[..., :width].astype(bool)}
    assert_same(found, expected)
    assert os.listdir(folder / 'out') == ['bbox_detections.json', 'mask_detections.json'] or \
        sorted(os.listdir(folder / 'out')) == ['bbox_detections.json', 'mask_detections.json']


def test_bad_input_one_line(shapes, tmp_path):
    _, exports = shapes
    folder = serving_folder(tmp_path, exports['paddle'])
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    (folder / 'file').write_text('a file where a folder is wanted')
    cv2.imwrite(str(folder / 'ok.png'), _image(40, 50, 0))
    cases = [
        (['--image_file', 'broken.jpg'], 'broken.jpg: not a readable image'),
        (['--image_file', 'missing.jpg'], 'missing.jpg: no such file'),
        (['--image_dir', 'nowhere'], 'nowhere: no such folder'),
        (['--video_file', 'broken.jpg'], 'broken.jpg: not a readable video'),
        (['--image_file', 'ok.png', '--output_dir', 'file/out'], 'file/out: output folder not writable'),
        (['--image_file', 'ok.png', '--output_dir', 'out', '--precision', 'fp16'],
         '--precision fp16 is for --device gpu'),
        (['--image_file', 'ok.png', '--output_dir', 'out', '--batch_size', '2'], 'exported for batch_size 1'),
        (['--image_file', 'ok.png', '--output_dir', 'out', '--annotations', 'file'], 'file: not a readable COCO'),
    ]
    for args, message in cases:
        proc = run_runner(folder, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
    (folder / 'model' / 'infer_cfg.yml').write_text('Preprocess:\n- type: Magic\nlabel_list: [a]\n')
    proc = run_runner(folder, '--image_file', 'ok.png', '--output_dir', 'out')
    assert proc.returncode == 1 and "infer_cfg.yml: Preprocess op 'Magic'" in proc.stderr.strip()
    assert not os.path.exists(folder / 'out') and not os.path.exists(folder / 'output'), 'a refused run creates nothing'


def test_bf16_refused_without_cpu_support(monkeypatch):
    spec = importlib.util.spec_from_file_location('deploy_runner', RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    monkeypatch.setattr(runner, 'cpu_has_bf16', lambda: False)
    with pytest.raises(runner.RunnerError, match='neither avx512_bf16 nor amx_bf16'):
        runner.check_precision('cpu', 'bf16', 'paddle')
    monkeypatch.setattr(runner, 'cpu_has_bf16', lambda: True)
    runner.check_precision('cpu', 'bf16', 'paddle')
    with pytest.raises(runner.RunnerError, match='needs the Paddle model'):
        runner.check_precision('cpu', 'bf16', 'onnx')
