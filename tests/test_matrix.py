"""Product matrix: every published config on every way a user runs it, compared with dygraph.

Paths: ``dygraph`` (``Predictor(..., dygraph=True)``, the reference of the
others, which must detect something), ``cached_export`` (``Predictor(...)``
on a CPU: the default of eval.py, Paddle Inference from the export cache,
which must be used, not fallen back from), ``e2e_paddle`` (tools/export_model.py: the whole
detector, run by Paddle Inference on the raw pixels as PaddleDetection's deploy code feeds it)
and ``e2e_onnx`` (``export_model.py --format onnx``, the same graph run by onnxruntime).

Weights: the reference's stand-in ``.pth`` for the config (make_weights, seed
0), the format of the published files. Input: the fixture image at a
SIDE x SIDE network input (the config with ``max_size=SIDE``, PLUS_SIDE for
YOLACT++; the graph has the same operators as at 550, only smaller). Detections must equal dygraph's:
same classes and pixel boxes in the same order, scores within 1e-5, masks
agreeing on 99.9% of the pixels.

Each config runs in its own child process (``python tests/test_matrix.py
CONFIG PATH...``), so a crash in native code (Paddle Inference, paddle2onnx,
onnxruntime) fails that config's test naming the path, and a crashed path is
skipped in a fresh child so it hides none of the config's other paths.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import needs_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLISHED = ('yolact_base', 'yolact_im700', 'yolact_resnet50', 'yolact_darknet53', 'yolact_plus_base',
             'yolact_plus_resnet50')
PATHS = ('dygraph', 'cached_export', 'e2e_paddle', 'e2e_onnx')
# As tests/test_train.py and test_journey.py: the smallest side the tests run the FPN and priors at.
SIDE = 128
# YOLACT++'s mask-IoU net (five 3x3 stride-2 convs, no padding) needs prototypes
# of at least 63 pixels, a side of 252: at 128 it has an empty output.
PLUS_SIDE = 256
# Two configs at a time: on 2 cores much of a child's time is single-threaded
# (tracing, paddle2onnx, weights files), so two children overlap well. The
# whole matrix takes 4 min 2 s of CPU (AMD EPYC, 2 cores, Paddle 3.3.1, 2026-12-07).
WORKERS = 2
# Marks a child's result lines among Paddle's own output on stdout.
TAG = 'MATRIX '


# --------------------------------------------------------------- child --
def _child(config_name, paths, workdir):
    """Run ``paths`` for one config; print a TAG line before each and one with its result."""
    import dataclasses

    import numpy as np

    from data import config as config_module
    from tests.conftest import make_weights_module, reference_npz
    from tools import export_model
    from utils.deploy.detector_export import inputs_for, run_onnx, run_paddle
    from utils.deploy.runners import StaticYolact
    from utils.predictor import Predictor
    from utils.runtime import select_device

    def report(path, status, detail=''):
        print(TAG + json.dumps({'path': path, 'status': status, 'detail': detail}), flush=True)

    # The published config at a small input; registered under its own name, so the weights'
    # file name resolves to it in every program as it would to the preset.
    preset = config_module.get_config(config_name)
    config_module.CONFIGS[config_name] = dataclasses.replace(preset, max_size=PLUS_SIDE if preset.use_maskiou else SIDE)
    select_device('cpu')
    weights = os.path.join(workdir, f'{config_name}_54_800000.pth')
    if not os.path.isfile(weights):
        mw = make_weights_module()
        mw.save_pth(mw.make_state_dict(mw.load_manifest(config_name), 0), weights + '.tmp')
        os.replace(weights + '.tmp', weights)
    image = reference_npz('forward_yolact_base')['input_bgr']
    expected = Predictor(weights, dygraph=True)(image)

    def cached_export():
        predictor = Predictor(weights)
        if not isinstance(predictor.net, StaticYolact):
            raise AssertionError(f'the default CPU path runs {type(predictor.net).__name__}, not the export')
        return predictor

    def exported(fmt):
        folder = os.path.join(workdir, fmt, config_name)
        if export_model.main(['--trained_model', weights, '--output_dir', folder, '--format', fmt]) != 0:
            raise AssertionError('export_model.py failed')
        run = run_paddle if fmt == 'paddle' else run_onnx

        def detect(bgr):
            bbox, bbox_num, mask, mask_score = run(folder, inputs_for([np.ascontiguousarray(bgr[:, :, ::-1])]))
            assert bbox_num.tolist() == [len(bbox)], f'bbox_num {bbox_num.tolist()} for {len(bbox)} rows'
            out = {'classes': bbox[:, 0].astype(np.int64), 'scores': bbox[:, 1], 'boxes': bbox[:, 2:],
                   'masks': mask.astype(bool)}
            if 'mask_scores' in expected:
                out['mask_scores'] = mask_score
            return out
        return detect

    def dygraph():
        # The reference of the other paths: computed above, it must detect something to compare.
        assert len(expected['classes']) > 0, 'no detections: the comparisons would prove nothing'
        return lambda _: expected

    runs = {'dygraph': dygraph, 'cached_export': cached_export,
            'e2e_paddle': lambda: exported('paddle'), 'e2e_onnx': lambda: exported('onnx')}
    for path in paths:
        report(path, 'start')
        try:
            got = runs[path]()(image)
            np.testing.assert_array_equal(got['classes'], expected['classes'], err_msg='classes')
            np.testing.assert_array_equal(got['boxes'], expected['boxes'], err_msg='boxes')
            np.testing.assert_allclose(got['scores'], expected['scores'], rtol=0, atol=1e-5, err_msg='scores')
            agreement = float((got['masks'] == expected['masks']).mean())
            assert agreement >= 0.999, f'masks agree on {agreement:.4%} of the pixels'
            if 'mask_scores' in expected:
                np.testing.assert_allclose(got['mask_scores'], expected['mask_scores'], rtol=0, atol=1e-5,
                                           err_msg='mask_scores')
        except Exception as e:  # noqa: BLE001 - any failure of a path is that path's result
            report(path, 'fail', f'{type(e).__name__}: {" ".join(str(e).split())[:400]}')
        else:
            worst = float(np.abs(got['scores'] - expected['scores']).max())
            report(path, 'ok', f'{len(expected["classes"])} detections, scores within {worst:.1e}, '
                               f'masks {agreement:.4%} equal')


# -------------------------------------------------------------- parent --
def _run_config(config_name, workdir):
    """{path: (status, detail)} for every path, relaunching the child past a path that crashed it."""
    env = dict(os.environ, YOLACT_CACHE=os.path.join(workdir, 'cache'), PYTHONPATH=ROOT)
    results, todo = {}, list(PATHS)
    while todo:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), config_name, workdir, *todo],
                               capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [json.loads(line[len(TAG):]) for line in child.stdout.splitlines() if line.startswith(TAG)]
        for line in lines:
            results[line['path']] = (line['status'], line['detail'])
        todo = [p for p in todo if results.get(p, ('start',))[0] == 'start']
        if todo:   # the child died in todo[0] (or before it)
            results[todo.pop(0)] = ('crash', _exit_cause(child.returncode, child.stderr))
        elif child.returncode != 0:
            results['exit'] = ('crash', _exit_cause(child.returncode, child.stderr))
    return results


def _exit_cause(returncode, stderr):
    if returncode < 0:
        return f'killed by {signal.Signals(-returncode).name}'
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f'exit status {returncode}' + (f': {lines[-1].strip()[:300]}' if lines else '')


onnx_missing = any(__import__('importlib').util.find_spec(m) is None for m in ('paddle2onnx', 'onnxruntime', 'torch'))


@pytest.fixture(scope='module')
def matrix(request, tmp_path_factory):
    """{config: Future of _run_config's results}: the selected configs, WORKERS at a time, started at once."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [item.callspec.params['config_name'] for item in request.session.items
                if item.module is request.module and hasattr(item, 'callspec')]
    with ThreadPoolExecutor(WORKERS) as pool:
        yield {name: pool.submit(_run_config, name, str(tmp_path_factory.mktemp(name))) for name in selected}


@needs_reference
@pytest.mark.skipif(onnx_missing, reason='needs paddle2onnx, onnxruntime and torch (requirements-test.txt)')
@pytest.mark.parametrize('config_name', PUBLISHED)
def test_every_path_of_a_published_config_detects_what_dygraph_does(config_name, matrix):
    results = matrix[config_name].result()
    table = '\n'.join(f'  {config_name} / {path}: {status} {detail}' for path, (status, detail) in results.items())
    print(table)
    failed = [path for path, (status, _) in results.items() if status != 'ok']
    assert not failed, f'{config_name}: {", ".join(failed)} failed\n{table}'


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    _child(sys.argv[1], sys.argv[3:], sys.argv[2])
