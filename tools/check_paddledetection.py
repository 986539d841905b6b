"""Run PaddleDetection's deploy clients, unchanged, on whole-detector exports; compare with the reference.

    python tools/check_paddledetection.py --paddledetection PATH EXPORT_DIR [EXPORT_DIR ...]

Each EXPORT_DIR is a folder written by tools/export_model.py (Paddle or ONNX); its infer_cfg.yml
names the config, and the image of ``<reference>/forward_<config>.npz`` (``input_bgr``, written
to PNG) is run by every client that can read the export:

- ``ppdet infer.py``: PaddleDetection's deploy/python/infer.py ``Detector`` (Paddle exports), on the
  CPU as its program runs it (no oneDNN) and with ``enable_mkldnn=True``; its program is also run
  as a command, which must exit 0 and write the drawn image;
- ``ppdet onnx``: PaddleDetection's deploy/third_engine/onnx/infer.py (ONNX exports): its
  ``predict_image`` with its own ``PredictConfig``, ``Compose`` preprocessing and onnxruntime
  session (the session's outputs are recorded on their way to it), and the program as a command,
  whose printed rows must equal the recorded ones;
- ``our runner``: this repository's deploy/python/infer.py, as a command (its COCO results);
- ``Paddle Inference`` / ``onnxruntime``: the export fed directly (CPU; Paddle with and without oneDNN).

Every client's detections are compared with the reference's final detections (``post_*``): the
number of detections, classes, boxes (pixels), scores, masks (share of equal pixels) and, for
YOLACT++, the rescored mask scores. Targets: same classes, boxes within 1 px, scores within 1e-5,
masks >= 99.9 % of pixels equal. Prints a Markdown table; exit status 1 when a client misses a target
or fails.

Each client runs in a child process of this tool (PaddleDetection's two infer.py and preprocess.py
share module names, and its deploy code changes global Paddle state). PaddleDetection's
deploy/python imports imgaug (which needs numpy < 2), scipy and Pillow: ``--client_path`` adds
folders holding them to the clients' PYTHONPATH. PaddleDetection's Detector calls
``Config.enable_memory_optim()``, which breaks some Paddle 3.x PIR predictors
(PaddlePaddle/Paddle#75496): a client that fails is reported with its error's last line.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REFERENCE = os.environ.get('YOLACT_REFERENCE_DIR', os.path.join(os.path.dirname(ROOT), 'shared', 'reference'))
TARGETS = {'box': 1.0, 'score': 1e-5, 'mask': 0.999}


# ----------------------------------------------------------------------------------------------
# Clients (each runs in its own child process: ``this_file --client NAME ...``)


def _save(path, boxes, boxes_num, masks, mask_scores=None):
    arrays = dict(boxes=np.asarray(boxes, np.float32), boxes_num=np.asarray(boxes_num).reshape(-1))
    if masks is not None:
        arrays['masks'] = np.asarray(masks)
    if mask_scores is not None:
        arrays['mask_scores'] = np.asarray(mask_scores, np.float32).reshape(-1)
    np.savez(path, **arrays)


def new_executor_with_memory_optim():
    """From outside PaddleDetection's code: ``Config.enable_memory_optim()`` also calls ``enable_new_executor()``.

    PaddleDetection's load_predictor calls enable_memory_optim(), which makes create_predictor fail
    for every PIR (model.json) program on Paddle 3.3 ("Not find predictor_id 0 and pass_name
    memory_optimize_pass", PaddlePaddle/Paddle#75496); with the new executor enabled it does not.
    A user of PaddleDetection adds ``config.enable_new_executor()`` to load_predictor instead.
    """
    from paddle import inference

    original = inference.Config.enable_memory_optim

    def enable_memory_optim(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.enable_new_executor()

    inference.Config.enable_memory_optim = enable_memory_optim


def client_ppdet_detector(ppdet, model_dir, png, out, onednn, new_executor):
    """PaddleDetection's deploy/python/infer.py Detector, as its main() builds it (threshold 0: every row)."""
    sys.path.insert(0, os.path.join(ppdet, 'deploy', 'python'))
    import paddle
    import infer as ppdet_infer

    if new_executor:
        new_executor_with_memory_optim()
    paddle.enable_static()
    detector = ppdet_infer.Detector(model_dir, device='CPU', run_mode='paddle', batch_size=1, cpu_threads=1,
                                    enable_mkldnn=onednn, threshold=0.0, output_dir=os.path.dirname(out))
    result = detector.predict_image([png], visual=False)
    _save(out, result['boxes'], result['boxes_num'], result.get('masks'))


def client_ppdet_program(ppdet, new_executor, *argv):
    """PaddleDetection's deploy/python/infer.py as a program (run as __main__), optionally with the workaround."""
    import runpy

    if new_executor == '1':
        new_executor_with_memory_optim()
    path = os.path.join(ppdet, 'deploy', 'python', 'infer.py')
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name='__main__')


class _RecordingSession:
    """Stands between PaddleDetection's onnx predict_image and its onnxruntime session: records the outputs."""

    def __init__(self, session):
        self.session = session
        self.outputs = None

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, output_names=None, input_feed=None):
        self.outputs = self.session.run(output_names, input_feed)
        return self.outputs


def client_ppdet_onnx(ppdet, model_dir, png, out):
    """PaddleDetection's deploy/third_engine/onnx/infer.py predict_image, its session's outputs recorded."""
    sys.path.insert(0, os.path.join(ppdet, 'deploy', 'third_engine', 'onnx'))
    sys.argv = sys.argv[:1]
    import infer as ppdet_onnx
    from onnxruntime import InferenceSession

    session = _RecordingSession(InferenceSession(os.path.join(model_dir, 'model.onnx')))
    config = ppdet_onnx.PredictConfig(os.path.join(model_dir, 'infer_cfg.yml'))
    ppdet_onnx.predict_image(config, session, [png])
    outputs = session.outputs
    _save(out, outputs[0], outputs[1], outputs[2] if len(outputs) > 2 else None,
          outputs[3] if len(outputs) > 3 else None)


def _direct_inputs(png):
    """The export's inputs for one image with the default Preprocess (RGB float32 0..255, CHW)."""
    import cv2

    image = cv2.cvtColor(cv2.imread(png), cv2.COLOR_BGR2RGB)
    return {'image': np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32),
            'im_shape': np.array([image.shape[:2]], np.float32), 'scale_factor': np.ones((1, 2), np.float32)}


def client_paddle(model_dir, png, out, onednn):
    """Paddle Inference on the CPU, fed directly; no enable_memory_optim (PaddlePaddle/Paddle#75496)."""
    from paddle import inference

    graph = next(os.path.join(model_dir, n) for n in ('model.json', 'model.pdmodel')
                 if os.path.isfile(os.path.join(model_dir, n)))
    config = inference.Config(graph, os.path.join(model_dir, 'model.pdiparams'))
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(1)
    if onednn:
        config.enable_onednn() if hasattr(config, 'enable_onednn') else config.enable_mkldnn()
    else:
        config.disable_onednn() if hasattr(config, 'disable_onednn') else config.disable_mkldnn()
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    inputs = _direct_inputs(png)
    for name in predictor.get_input_names():
        predictor.get_input_handle(name).copy_from_cpu(inputs[name])
    predictor.run()
    outputs = [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]
    _save(out, outputs[0], outputs[1], outputs[2], outputs[3] if len(outputs) > 3 else None)


def client_onnxruntime(model_dir, png, out):
    """onnxruntime on the CPU, fed directly."""
    import onnxruntime

    session = onnxruntime.InferenceSession(os.path.join(model_dir, 'model.onnx'), providers=['CPUExecutionProvider'])
    inputs = _direct_inputs(png)
    outputs = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})
    _save(out, outputs[0], outputs[1], outputs[2], outputs[3] if len(outputs) > 3 else None)


def run_client(args_list, env, timeout=900):
    """(ok, last error line) of ``this_file --client ...`` in a child process."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--client', *args_list], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    return proc.returncode == 0, _last_error_line(proc.stdout)


def _last_error_line(text):
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and 'ccache' not in ln and 'warnings.warn' not in ln]
    errors = [ln for ln in lines if re.match(r'^[A-Za-z_.]*(Error|Exception)\b', ln) or 'Error' in ln[:40]]
    return (errors or lines or ['(no output)'])[-1][:300]


# ----------------------------------------------------------------------------------------------
# Programs run as commands


def run_ppdet_program(ppdet, model_dir, png, work, env, onednn, new_executor):
    """PaddleDetection's deploy/python/infer.py as a program: (ok, note)."""
    out_dir = os.path.join(work, 'ppdet_program_%d%d' % (onednn, new_executor))
    argv = ['--model_dir', model_dir, '--image_file', png, '--device', 'CPU', '--output_dir', out_dir,
            '--enable_mkldnn', str(bool(onednn))]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--client', 'ppdet_program', ppdet,
                           str(int(new_executor)), *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=900)
    drawn = os.path.isfile(os.path.join(out_dir, os.path.basename(png)))
    if proc.returncode or not drawn:
        return False, 'program: ' + _last_error_line(proc.stdout)
    return True, 'its program ran and drew the image'


def run_ppdet_onnx_program(ppdet, model_dir, png, work, env, recorded):
    """PaddleDetection's deploy/third_engine/onnx/infer.py as a command; its rows against the recorded outputs."""
    # Its program prints the rows above the yml's draw_threshold only: a copy of the yml at 0 prints them all.
    import yaml

    folder = os.path.join(work, 'onnx_program_export')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(model_dir, 'infer_cfg.yml')) as f:
        cfg = yaml.safe_load(f)
    cfg['draw_threshold'] = -1.0
    with open(os.path.join(folder, 'infer_cfg.yml'), 'w') as f:
        yaml.safe_dump(cfg, f)
    cmd = [sys.executable, os.path.join(ppdet, 'deploy', 'third_engine', 'onnx', 'infer.py'),
           '--infer_cfg', os.path.join(folder, 'infer_cfg.yml'), '--onnx_file', os.path.join(model_dir, 'model.onnx'),
           '--image_file', png]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=900)
    if proc.returncode:
        return False, 'program: ' + _last_error_line(proc.stdout)
    rows = [[float(v) for v in ln.split()] for ln in proc.stdout.splitlines()
            if re.match(r'^-?\d+ [-0-9.e]+ [-0-9.e]+ [-0-9.e]+ [-0-9.e]+ [-0-9.e]+$', ln.strip())]
    expected = recorded['boxes'][recorded['boxes'][:, 0] > -1]
    printed = np.array(rows, np.float32).reshape(-1, 6)
    if printed.shape != expected.shape or not np.array_equal(printed, expected):
        return False, 'program printed %d rows, not the %d rows of its session' % (len(printed), len(expected))
    return True, 'program printed the same %d rows' % len(printed)


def run_our_runner(model_dir, png, work, env):
    """deploy/python/infer.py of this repository as a command: its COCO results as client outputs."""
    import pycocotools.mask as mask_util

    out_dir = os.path.join(work, 'runner_out')
    cmd = [sys.executable, os.path.join(ROOT, 'deploy', 'python', 'infer.py'), '--model_dir', model_dir,
           '--image_file', png, '--threshold', '0', '--output_dir', out_dir, '--cpu_threads', '1']
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=900)
    if proc.returncode:
        return None, _last_error_line(proc.stdout)
    with open(os.path.join(out_dir, 'bbox_detections.json')) as f:
        boxes = json.load(f)
    with open(os.path.join(out_dir, 'mask_detections.json')) as f:
        masks = json.load(f)
    rows = np.array([[b['category_id'], b['score'], b['bbox'][0], b['bbox'][1], b['bbox'][0] + b['bbox'][2],
                      b['bbox'][1] + b['bbox'][3]] for b in boxes], np.float32).reshape(-1, 6)
    decoded = np.stack([mask_util.decode(m['segmentation']) for m in masks]) if masks else None
    return dict(boxes=rows, boxes_num=np.array([len(rows)]), masks=decoded,
                mask_scores=np.array([m['score'] for m in masks], np.float32)), 'command'


# ----------------------------------------------------------------------------------------------
# Comparison


def compare(result, ref):
    """Agreement of one client's outputs with the reference's post_*: a dict of measurements."""
    boxes = result['boxes']
    keep = boxes[:, 0] > -1
    boxes = boxes[keep]
    n_ref = len(ref['post_classes'])
    m = {'n': int(len(boxes)), 'n_ref': n_ref}
    n = min(len(boxes), n_ref)
    m['classes_equal'] = bool(len(boxes) == n_ref and np.array_equal(boxes[:, 0].astype(np.int64), ref['post_classes']))
    m['box'] = float(np.abs(boxes[:n, 2:6] - ref['post_boxes'][:n]).max()) if n else 0.0
    m['score'] = float(np.abs(boxes[:n, 1] - ref['post_scores'][:n]).max()) if n else 0.0
    if result.get('masks') is not None:
        ref_masks = np.unpackbits(ref['post_masks_packed'], axis=-1)[..., :ref['post_masks_shape'][2]].astype(bool)
        masks = np.asarray(result['masks'])[keep][:n, :ref_masks.shape[1], :ref_masks.shape[2]] > 0
        m['mask'] = float((masks == ref_masks[:n]).mean()) if n else 1.0
        m['mask_differ'] = int((masks != ref_masks[:n]).sum())
    if 'post_mask_scores' in ref and result.get('mask_scores') is not None:
        ms = np.asarray(result['mask_scores'])[keep]
        m['mask_score'] = float(np.abs(ms[:n] - ref['post_mask_scores'][:n]).max()) if n else 0.0
    m['pass'] = bool(m['classes_equal'] and m['box'] <= TARGETS['box'] and m['score'] <= TARGETS['score']
                     and m.get('mask', 1.0) >= TARGETS['mask'] and m.get('mask_score', 0.0) <= TARGETS['score'])
    return m


def format_row(config, fmt, client, m, note=''):
    if m is None:
        return '| %s | %s | %s | fails | | | | | | %s |' % (config, fmt, client, note)
    return '| %s | %s | %s | %d/%d | %s | %.3g | %.3g | %s | %s | %s |' % (
        config, fmt, client, m['n'], m['n_ref'], 'yes' if m['classes_equal'] else 'NO', m['box'], m['score'],
        '%.5f %% (%d px differ)' % (100 * m['mask'], m['mask_differ']) if 'mask' in m else '-',
        '%.3g' % m['mask_score'] if 'mask_score' in m else '-', ('pass' if m['pass'] else 'MISS') +
        ('; ' + note if note else ''))


def check_export(model_dir, args, env, rows):
    import cv2
    import yaml

    with open(os.path.join(model_dir, 'infer_cfg.yml')) as f:
        cfg = yaml.safe_load(f)
    config = cfg.get('config')
    ref_path = os.path.join(args.reference, 'forward_%s.npz' % config)
    if not os.path.isfile(ref_path):
        raise SystemExit('%s: no reference fixture %s for config %r' % (model_dir, ref_path, config))
    with np.load(ref_path) as z:
        ref = {k: z[k] for k in z.files}
    is_onnx = os.path.isfile(os.path.join(model_dir, 'model.onnx'))
    fmt = 'onnx' if is_onnx else 'paddle'
    work = tempfile.mkdtemp(prefix='check-ppdet-')
    ok_all = True
    try:
        png = os.path.join(work, 'forward_%s.png' % config)
        cv2.imwrite(png, ref['input_bgr'])
        md = os.path.abspath(model_dir)
        clients = []
        if is_onnx:
            clients.append(('PaddleDetection onnx', ['ppdet_onnx', args.paddledetection, md, png], None))
            clients.append(('onnxruntime', ['onnxruntime', md, png], None))
        else:
            for onednn, new_executor in ((False, False), (False, True), (True, True)):
                name = 'PaddleDetection infer.py%s%s' % (', oneDNN' if onednn else '',
                                                         ' + enable_new_executor()' if new_executor else ', unchanged')
                clients.append((name, ['ppdet_detector', args.paddledetection, md, png, str(int(onednn)),
                                       str(int(new_executor))], (onednn, new_executor)))
            for onednn in (False, True):
                clients.append(('Paddle Inference%s' % (', oneDNN' if onednn else ''),
                                ['paddle', md, png, str(int(onednn))], None))
        for name, client_args, program in clients:
            out = os.path.join(work, re.sub(r'\W+', '_', name) + '.npz')
            ok, error = run_client(client_args + [out], env)
            if not ok:
                known = 'memory_optimize_pass' in error and name.endswith('unchanged')
                rows.append(format_row(config, fmt, name, None,
                                       error + (' (PaddlePaddle/Paddle#75496)' if known else '')))
                ok_all &= known
                continue
            with np.load(out) as z:
                result = {k: z[k] for k in z.files}
            note = ''
            if program is not None:
                program_ok, note = run_ppdet_program(args.paddledetection, md, png, work, env, *program)
                ok_all &= program_ok
            elif name == 'PaddleDetection onnx':
                program_ok, note = run_ppdet_onnx_program(args.paddledetection, md, png, work, env, result)
                ok_all &= program_ok
            m = compare(result, ref)
            ok_all &= m['pass']
            rows.append(format_row(config, fmt, name, m, note))
        result, note = run_our_runner(md, png, work, env)
        if result is None:
            rows.append(format_row(config, fmt, 'our runner', None, note))
            ok_all = False
        else:
            m = compare(result, ref)
            ok_all &= m['pass']
            rows.append(format_row(config, fmt, 'our runner', m, note))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print('kept', work)
    return ok_all


def client_main(argv):
    name, rest = argv[0], argv[1:]
    if name == 'ppdet_detector':
        client_ppdet_detector(rest[0], rest[1], rest[2], rest[5], rest[3] == '1', rest[4] == '1')
    elif name == 'ppdet_program':
        client_ppdet_program(*rest)
    elif name == 'ppdet_onnx':
        client_ppdet_onnx(*rest)
    elif name == 'paddle':
        client_paddle(rest[0], rest[1], rest[3], rest[2] == '1')
    elif name == 'onnxruntime':
        client_onnxruntime(*rest)
    else:
        raise SystemExit('unknown client %r' % name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('exports', nargs='+', help='export folders (tools/export_model.py --output_dir)')
    p.add_argument('--paddledetection', required=True, help='a PaddleDetection checkout (its deploy/ folder is used)')
    p.add_argument('--reference', default=DEFAULT_REFERENCE, help='folder of forward_<config>.npz (default: %(default)s)')
    p.add_argument('--client_path', action='append', default=[],
                   help="a folder added to the clients' PYTHONPATH (PaddleDetection's deploy needs imgaug, numpy < 2, "
                        'scipy); repeatable')
    p.add_argument('--keep', action='store_true', help='keep the work folder (PNG, client outputs, drawn images)')
    return p.parse_args(argv)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == '--client':
        client_main(sys.argv[2:])
        return 0
    args = parse_args(argv)
    for folder in [args.paddledetection] + args.exports:
        if not os.path.isdir(folder):
            raise SystemExit('%s: no such folder' % folder)
    if not os.path.isfile(os.path.join(args.paddledetection, 'deploy', 'python', 'infer.py')):
        raise SystemExit('%s: no deploy/python/infer.py (not a PaddleDetection checkout)' % args.paddledetection)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(args.client_path + [p for p in [env.get('PYTHONPATH')] if p])
    rows = ['| config | export | client | detections | classes | max box diff (px) | max score diff | '
            'mask pixels equal | max mask-score diff | verdict |', '|' + ' --- |' * 10]
    ok = True
    for folder in args.exports:
        ok &= check_export(folder, args, env, rows)
    print('\n'.join(rows))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
