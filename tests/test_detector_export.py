"""The whole-detector export (tools/export_model.py): PaddleDetection's contract, run by Paddle Inference and onnxruntime.

The small tests use yolact_shapes with trained-like random weights (tools/benchmark.py's
benchmark_weights: confident classes, many detections) on synthetic images and compare with
the Python path (Predictor: dygraph network, Detect, PostProcess). The reference tests run
yolact_base and yolact_plus_resnet50 with the seed-0 stand-in weights on the fixture image,
raw RGB pixels in, against the reference's final detections (post_*).
"""
import importlib.util
import os

import numpy as np
import paddle
import pytest

from tests.conftest import needs_reference, reference_npz, reference_params
from data.config import get_config
from layers.compat import PADDLE_VERSION
from tools import benchmark as benchmark_tool
from tools import export_model
from utils.deploy import detector_export
from utils.deploy.detector_export import CONFIG_FILE, export_detector, inputs_for, run_onnx, run_paddle
from utils.errors import EXIT_USER_ERROR, ConfigError, run_cli
from utils.predictor import Predictor
from yolact import Yolact

# paddle2onnx 2.x reads only Paddle >= 3 programs; CI's Paddle 2.6 venv has no paddle2onnx 1.x.
onnx_missing = (PADDLE_VERSION < (3, 0) or importlib.util.find_spec('paddle2onnx') is None
                or importlib.util.find_spec('onnxruntime') is None)
needs_onnx = pytest.mark.skipif(onnx_missing, reason='ONNX export needs Paddle >= 3 with paddle2onnx 2.x and '
                                                     'onnxruntime (requirements-onnx.txt)')
# The [B, 3, H, W] image of PaddleDetection's clients: RGB 0..255.
SIZES = ((120, 160), (90, 200))


def _shapes_net(**overrides):
    cfg = get_config('yolact_shapes', **overrides)
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, 0)
    net.eval()
    return cfg, net


def _image(height, width, seed):
    """A BGR uint8 image of smooth colour blobs (many detections with benchmark_weights)."""
    import cv2

    rng = np.random.RandomState(seed)
    small = rng.uniform(0, 255, (max(2, height // 20), max(2, width // 20), 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _rgb(bgr):
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _rows(outputs, index):
    """Image ``index``'s rows of a batch's outputs: (bbox, mask, mask_score)."""
    bbox, bbox_num, mask, mask_score = outputs
    start = int(bbox_num[:index].sum())
    end = start + int(bbox_num[index])
    return bbox[start:end], mask[start:end], mask_score[start:end]


def assert_same_detections(bbox, mask, mask_score, expected, height, width):
    """An export's rows of one image against a Predictor's result (or the reference's post_*)."""
    np.testing.assert_array_equal(bbox[:, 0].astype(np.int64), expected['classes'], err_msg='classes')
    np.testing.assert_allclose(bbox[:, 1], expected['scores'], rtol=0, atol=1e-5, err_msg='scores')
    np.testing.assert_array_equal(bbox[:, 2:], expected['boxes'], err_msg='boxes')
    own = mask[:, :height, :width]
    agreement = float((own.astype(bool) == expected['masks']).mean())
    assert agreement >= 0.999, f'masks agree on {agreement:.4%} of the pixels'
    if 'mask_scores' in expected:
        np.testing.assert_allclose(mask_score, expected['mask_scores'], rtol=0, atol=1e-5, err_msg='mask_scores')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """yolact_shapes: the network, its Paddle export (batch 1) and the Python path's detections."""
    cfg, net = _shapes_net()
    folder = str(tmp_path_factory.mktemp('e2e') / 'paddle')
    export_detector(net, cfg, folder)
    image = _image(*SIZES[0], seed=1)
    expected = Predictor.from_network(cfg, net)(image)
    assert len(expected['classes']) > 10, 'too few detections for the comparison to prove anything'
    return cfg, net, folder, image, expected


# ---------------------------------------------------------------- contract --
def test_infer_cfg_yml_is_paddledetections_mask_model_contract(shapes):
    yaml = pytest.importorskip('yaml', reason='PyYAML (requirements-test.txt) reads the yml as PaddleDetection does')
    cfg, _, folder, _, _ = shapes
    # Paddle 2.6 writes a program (.pdmodel) and the parameters' names (.pdiparams.info), as PaddleDetection's 2.x exports.
    graph = ['model.json'] if PADDLE_VERSION >= (3, 0) else ['model.pdmodel', 'model.pdiparams.info']
    assert sorted(os.listdir(folder)) == sorted([CONFIG_FILE, 'model.pdiparams'] + graph)
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        info = yaml.safe_load(f)
    assert info['mode'] == 'paddle' and info['metric'] == 'COCO' and info['mask'] is True
    assert info['draw_threshold'] == 0.5 and info['use_dynamic_shape'] is True and info['min_subgraph_size'] == 3
    # PaddleDetection's infer.py: one of its SUPPORT_MODELS must be a substring; SOLOv2/PicoDet/CLRNet
    # select other detector classes, which would not read output 2 as masks.
    assert 'SSD' in info['arch'] and info['arch'] not in ('SOLOv2', 'PicoDet', 'CLRNet', 'RCNN')
    assert info['Preprocess'] == [{'type': 'NormalizeImage', 'mean': [0.0, 0.0, 0.0], 'std': [1.0, 1.0, 1.0],
                                   'is_scale': False, 'norm_type': 'none'}, {'type': 'Permute'}]
    assert info['label_list'] == list(cfg.dataset.class_names)
    assert (info['config'], info['input_size'], info['batch_size'], info['format']) == (cfg.name, cfg.max_size, 1,
                                                                                        'paddle')
    assert (info['top_k'], info['conf_thresh'], info['nms_thresh'], info['max_num_detections']) == \
        (cfg.nms_top_k, cfg.nms_conf_thresh, cfg.nms_thresh, cfg.max_num_detections)
    assert (info['score_threshold'], info['mask_threshold'], info['nms'], info['mask_dtype']) == \
        (0.0, 0.5, 'fast', 'int32')
    assert info['inputs'] == ['image', 'im_shape', 'scale_factor']
    assert info['outputs'] == ['bbox', 'bbox_num', 'mask', 'mask_score']


def test_paddle_export_inputs_outputs_and_detections_are_the_python_paths(shapes):
    cfg, _, folder, image, expected = shapes
    predictor = detector_export.create_paddle_predictor(folder)
    assert predictor.get_input_names() == ['image', 'im_shape', 'scale_factor']
    assert len(predictor.get_output_names()) == 4
    height, width = image.shape[:2]
    outputs = detector_export.predict(predictor, inputs_for([_rgb(image)]))
    bbox, bbox_num, mask, mask_score = outputs
    n = len(expected['classes'])
    assert bbox.dtype == np.float32 and bbox.shape == (n, 6)
    assert bbox_num.dtype == np.int32 and bbox_num.tolist() == [n]
    assert mask.dtype == np.int32 and mask.shape == (n, height, width)
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert mask_score.dtype == np.float32 and mask_score.shape == (n,)
    np.testing.assert_array_equal(mask_score, bbox[:, 1])       # YOLACT: no rescoring
    assert_same_detections(bbox, mask, mask_score, expected, height, width)


@needs_onnx
def test_onnx_export_inputs_outputs_and_detections_are_the_python_paths(shapes, tmp_path):
    cfg, net, _, image, expected = shapes
    folder = str(tmp_path / 'onnx')
    export_detector(net, cfg, folder, 'onnx')
    assert sorted(os.listdir(folder)) == [CONFIG_FILE, 'model.onnx']
    import onnxruntime

    session = onnxruntime.InferenceSession(os.path.join(folder, 'model.onnx'), providers=['CPUExecutionProvider'])
    assert [(i.name, i.type, i.shape[0], i.shape[1]) for i in session.get_inputs()] == [
        ('image', 'tensor(float)', 1, 3), ('im_shape', 'tensor(float)', 1, 2), ('scale_factor', 'tensor(float)', 1, 2)]
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ('bbox', 'tensor(float)'), ('bbox_num', 'tensor(int32)'), ('mask', 'tensor(int32)'),
        ('mask_score', 'tensor(float)')]
    height, width = image.shape[:2]
    bbox, bbox_num, mask, mask_score = run_onnx(folder, inputs_for([_rgb(image)]))
    assert bbox_num.tolist() == [len(expected['classes'])] and mask.shape[1:] == (height, width)
    assert_same_detections(bbox, mask, mask_score, expected, height, width)


def test_a_batch_of_two_sizes_gives_each_image_its_own_detections(shapes, tmp_path):
    cfg, net, _, _, _ = shapes
    images = [_image(*size, seed=i + 1) for i, size in enumerate(SIZES)]
    folder = str(tmp_path / 'batch2')
    export_detector(net, cfg, folder, batch_size=2)
    inputs = inputs_for([_rgb(im) for im in images])
    assert inputs['image'].shape == (2, 3, max(s[0] for s in SIZES), max(s[1] for s in SIZES))
    outputs = run_paddle(folder, inputs)
    height, width = inputs['image'].shape[2:]
    assert outputs[1].dtype == np.int32 and outputs[2].shape[1:] == (height, width)
    python_path = Predictor.from_network(cfg, net)
    for index, image in enumerate(images):
        expected = python_path(image)
        bbox, mask, mask_score = _rows(outputs, index)
        h, w = image.shape[:2]
        assert len(bbox) == len(expected['classes']) > 0
        assert_same_detections(bbox, mask, mask_score, expected, h, w)
        # Outside an image's own size: -1, PaddleDetection's convention for a batch.
        assert (mask[:, h:, :] == -1).all() and (mask[:, :, w:] == -1).all()


def test_an_image_without_detections_gets_one_padding_row(tmp_path):
    # No anchor scores above a confidence threshold of 1.
    cfg, net = _shapes_net(nms_conf_thresh=1.0)
    folder = str(tmp_path / 'none')
    export_detector(net, cfg, folder, batch_size=2)
    images = [_rgb(_image(*size, seed=i)) for i, size in enumerate(SIZES)]
    bbox, bbox_num, mask, mask_score = run_paddle(folder, inputs_for(images))
    np.testing.assert_array_equal(bbox, [[-1, 0, 0, 0, 0, 0]] * 2)
    assert bbox_num.tolist() == [1, 1] and mask_score.tolist() == [0, 0]
    assert mask.shape == (2, max(s[0] for s in SIZES), max(s[1] for s in SIZES))
    for index, (h, w) in enumerate(SIZES):
        assert (mask[index, :h, :w] == 0).all()
    assert Predictor.from_network(cfg, net)(_image(*SIZES[0], seed=0))['classes'].size == 0


def test_uint8_masks_and_a_cap_on_detections(shapes, tmp_path):
    cfg, net, _, image, expected = shapes
    folder = str(tmp_path / 'small')
    info = export_detector(net, cfg, folder, mask_dtype='uint8', max_detections=5, score_threshold=0.2)
    assert (info['mask_dtype'], info['max_num_detections'], info['score_threshold']) == ('uint8', 5, 0.2)
    bbox, bbox_num, mask, _ = run_paddle(folder, inputs_for([_rgb(image)]))
    keep = np.flatnonzero(expected['scores'][:5] > 0.2)
    assert mask.dtype == np.uint8 and bbox_num.tolist() == [keep.size] and 0 < keep.size <= 5
    capped = {k: v[keep] for k, v in expected.items() if isinstance(v, np.ndarray)}
    assert_same_detections(bbox, mask, bbox[:, 1], capped, *image.shape[:2])


# --------------------------------------------------------------- bad input --
def _one_line(capsys, argv):
    assert run_cli(export_model.main, argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


@pytest.fixture(scope='module')
def shapes_weights(tmp_path_factory):
    _, net = _shapes_net()
    path = str(tmp_path_factory.mktemp('weights') / 'yolact_shapes_1_10.pdparams')
    paddle.save(net.state_dict(), path)
    return path


def test_bad_exports_are_one_line_errors_and_leave_nothing(capsys, shapes_weights, tmp_path, monkeypatch):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    line = _one_line(capsys, ['--trained_model', shapes_weights, '--output_dir', str(blocker / 'out')])
    assert 'cannot write the export' in line
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep me')
    line = _one_line(capsys, ['--trained_model', shapes_weights, '--output_dir', str(mine)])
    assert 'holds other files' in line and os.listdir(mine) == ['notes.txt']
    line = _one_line(capsys, ['--trained_model', shapes_weights, '--output_dir', str(tmp_path / 'nms'),
                              '--fast_nms', 'false'])
    assert 'traditional NMS cannot be exported' in line
    # paddle2onnx missing: refused before any work.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'paddle2onnx' else real_find_spec(name, *a))
    line = _one_line(capsys, ['--trained_model', shapes_weights, '--output_dir', str(tmp_path / 'onnx'),
                              '--format', 'onnx'])
    assert 'needs paddle2onnx' in line
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'mine']


def test_a_conversion_that_fails_leaves_no_export_and_keeps_the_previous_one(shapes, tmp_path, monkeypatch):
    cfg, net, _, _, _ = shapes
    folder = tmp_path / 'out'
    export_detector(net, cfg, str(folder), max_detections=3)

    def fail(paddle_prefix, onnx_path, what):
        with open(onnx_path, 'w') as f:
            f.write('half')
        raise ConfigError(f'paddle2onnx cannot convert {what} to ONNX: simulated')

    monkeypatch.setattr(detector_export.onnx_export, 'require_paddle2onnx', lambda: None)
    monkeypatch.setattr(detector_export.onnx_export, '_paddle2onnx', fail)
    with pytest.raises(ConfigError, match='simulated'):
        export_detector(net, cfg, str(folder), 'onnx')
    assert sorted(os.listdir(tmp_path)) == ['out']
    with open(folder / CONFIG_FILE) as f:
        lines = f.read().splitlines()
    assert 'format: "paddle"' in lines and 'max_num_detections: 3' in lines


# --------------------------------------------------------------- reference --
@needs_reference
@pytest.mark.parametrize('config_name', ['yolact_base', 'yolact_plus_resnet50'])
def test_exports_return_the_reference_detections(config_name, tmp_path):
    """Paddle Inference and onnxruntime on the fixture image, raw pixels in, against the reference's post_*."""
    cfg = get_config(config_name)
    net = Yolact.from_config(cfg)
    net.set_state_dict({k: paddle.to_tensor(v) for k, v in reference_params(net, cfg).items()})
    net.eval()
    ref = reference_npz(f'forward_{config_name}')
    height, width = ref['input_bgr'].shape[:2]
    expected = {'classes': ref['post_classes'], 'scores': ref['post_scores'], 'boxes': ref['post_boxes'],
                'masks': np.unpackbits(ref['post_masks_packed'], axis=-1)[..., :width].astype(bool)}
    if 'post_mask_scores' in ref:
        expected['mask_scores'] = ref['post_mask_scores']
    inputs = inputs_for([_rgb(ref['input_bgr'])])
    runs = {'paddle': run_paddle}
    if not onnx_missing:
        runs['onnx'] = run_onnx
    for fmt, run in runs.items():
        folder = str(tmp_path / fmt)
        export_detector(net, cfg, folder, fmt)
        bbox, bbox_num, mask, mask_score = run(folder, inputs)
        assert bbox_num.tolist() == [len(expected['classes'])], fmt
        assert_same_detections(bbox, mask, mask_score, expected, height, width)
