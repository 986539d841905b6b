"""The network exported for Paddle Inference (utils/deploy/network_export.py, utils/deploy/runners.py).

The exported yolact_shapes and a YOLACT++-style model against dygraph, eval.py
on an exported model, and yolact_base with the reference's seed-0 weights
against dygraph and the reference on the fixture input.
"""
import json
import os

import cv2
import numpy as np
import paddle

import eval as eval_script
from data.config import get_config
from layers.functions import Detect
from layers.output_utils import PostProcess
from tests.conftest import needs_reference, reference_npz, reference_params
from tests.eval_helpers import dataset_flags, run_eval, shapes, weights  # noqa: F401 (fixtures)
from tests.test_detect import EXPORTED_SCORE_ATOL
from tools import benchmark as benchmark_tool
from tools import export_model
from utils.deploy.network_export import export_yolact
from utils.deploy.runners import StaticYolact
from utils.errors import run_cli
from utils.evaluation import coco_eval
from yolact import Yolact


def test_network_export_and_static_shapes_model_match_dygraph(shapes, weights, tmp_path):
    folder = str(tmp_path / 'exported')
    assert export_model.main(['--trained_model', weights, '--output_dir', folder, '--network_only']) == 0
    prefix = os.path.join(folder, 'model')
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
    for label, model in (('dygraph', ['--trained_model', weights]), ('exported', ['--inference_model', folder])):
        results_dir = str(tmp_path / label)
        run_eval([*model, *dataset_flags(shapes), '--results_dir', results_dir, '--output_coco_json',
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


def test_inference_model_refuses_a_whole_detector_export_in_one_line(weights, tmp_path, capsys):
    """eval.py --inference_model takes a network export; a whole-detector export's folder is named and refused."""
    folder = tmp_path / 'detector'
    folder.mkdir()
    (folder / 'infer_cfg.yml').write_text('mode: paddle\n')
    image = str(tmp_path / 'x.png')
    cv2.imwrite(image, np.zeros((32, 32, 3), np.uint8))
    assert run_cli(eval_script.main, ['--inference_model', str(folder), '--image', image]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'whole-detector export' in err[0] and str(folder) in err[0], err
