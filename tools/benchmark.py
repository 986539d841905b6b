#!/usr/bin/env python3
"""Time single-image YOLACT inference on this machine, stage by stage.

Stages: decode (cv2.imread), preprocess (FastBaseTransform), the network in
dygraph and exported (Paddle Inference, oneDNN on CPU), detect (Fast NMS) and
postprocess (numpy masks at image size). Each run goes through the
whole chain once; the table gives, per network, the median over --runs runs
after --warmup runs of each stage and of the end-to-end total.

Without --trained_model the network gets random weights with trained-like
statistics (see ``benchmark_weights``), so that Detect and postprocess work
on a full set of detections as with a real model on a busy image.

    python tools/benchmark.py --config yolact_base --runs 5
    python tools/benchmark.py --config yolact_base --onnx --alternate --no_dygraph   # vs onnxruntime
    python tools/benchmark.py --config yolact_base --e2e --onnx --alternate --no_dygraph   # whole-detector exports
    python tools/benchmark.py --trained_model weights/yolact_base_54_800000.pth --image photo.jpg

--pipeline N also runs a dataset evaluation of N images (utils.evaluation.loop.evaluate)
with a stand-in network that sleeps for the measured network time and returns the
measured final detections, as a GPU leaves the host free while it works: the
host-side work per image (RLE encoding and JSON of the results) then runs in the
background writer, and the evaluation should approach 1 / max(network, host)
images/s instead of 1 / (network + host).

--train times the training step instead, stage by stage (forward, loss,
backward, optimizer), on a fixed synthetic batch (--batch_size images at the
config's size, BatchNorm frozen as the reference freezes it below 6 images per
GPU, the stand-in weights above). With --reference DIR (a checkout of
dbolya/yolact; needs torch) the reference's own step runs in a child process
(tools/reference_train_step.py) on the same batch and the same weights, one
step of each in turn:

    python tools/benchmark.py --train --config yolact_resnet50 --batch_size 2 --reference ../yolact
"""
import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Run from any directory: the project's top-level packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.runtime import quiet_paddle_import  # noqa: E402

quiet_paddle_import()

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from data.config import get_config  # noqa: E402
from layers.modules.multibox_loss import MultiBoxLoss  # noqa: E402
from utils.evaluation import coco_eval  # noqa: E402
from utils.errors import MissingFileError, YolactError, run_cli  # noqa: E402
from utils.evaluation.loop import evaluate  # noqa: E402
from utils.deploy import detector_export  # noqa: E402
from utils.deploy.network_export import export_yolact  # noqa: E402
from utils.deploy.onnx_export import export_onnx  # noqa: E402
from utils.deploy.runners import OnnxYolact  # noqa: E402
from utils.weights.loader import load_model  # noqa: E402
from utils.predictor import Predictor  # noqa: E402
from utils.runtime import default_cpu_threads, select_device  # noqa: E402
from tools.stage_clock import StageClock  # noqa: E402
from utils.training.cpu_ops import use_cpu_training_convolutions  # noqa: E402
from utils.training.trainer import build_optimizer  # noqa: E402
from yolact import Yolact  # noqa: E402

logger = logging.getLogger('benchmark')

STAGES = ('decode', 'preprocess', 'network', 'detect', 'postprocess')
TRAIN_STAGES = ('forward', 'loss', 'backward', 'optimizer')
REFERENCE_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference_train_step.py')
# Prediction-head kernels are scaled up so that random weights give confident,
# well separated class scores (and so detections), as trained weights do.
HEAD_GAIN = {'conf_layer.weight': 9.0, 'mask_layer.weight': 5.0}


def benchmark_weights(net, seed=0):
    """Fill ``net`` with random weights whose outputs look like a trained model's.

    Paddle's default initialisation gives near-uniform class scores, below
    Detect's confidence threshold, so nothing would reach NMS or postprocess.
    Here BatchNorm statistics and scales are moderate, convolutions are
    He-scaled and the class and mask-coefficient kernels are amplified: the
    network then yields the full max_num_detections, the heaviest case for
    Detect and postprocess.
    """
    rng = np.random.RandomState(seed)
    params = {}
    for name, value in net.state_dict().items():
        shape = tuple(value.shape)
        if name.endswith('._mean'):
            array = rng.normal(0.0, 0.1, shape)
        elif name.endswith('._variance'):
            array = rng.uniform(0.5, 1.5, shape)
        elif name.endswith('.weight') and len(shape) == 1:   # BatchNorm scale
            array = rng.uniform(0.3, 0.7, shape)
        elif name.endswith('.bias'):
            array = rng.normal(0.0, 0.05, shape)
        elif len(shape) == 4:                                  # conv kernel
            array = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[1:]))
            array *= next((g for suffix, g in HEAD_GAIN.items() if name.endswith(suffix)), 1.0)
        else:
            array = rng.normal(0.0, 0.02, shape)
        params[name] = array.astype(np.float32)
    net.set_state_dict(params)


def synthetic_image(path, width=640, height=480, seed=0):
    """Write a JPEG of smooth random colour blobs (a COCO-sized image) and return its path."""
    rng = np.random.RandomState(seed)
    small = rng.uniform(0, 255, (height // 40, width // 40, 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 8, image.shape)
    cv2.imwrite(path, np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path


def run_chain(predictor, image_path, max_drawn=None):
    """One pass decode -> postprocess through a Predictor's stages; returns ({stage: seconds}, number of detections).

    max_drawn: postprocess only the k best detections (eval.py's drawing path); None: all.
    A :class:`WholeDetector` chain times its own stages.
    """
    if isinstance(predictor, WholeDetector):
        return predictor.run_chain(image_path)
    times = {}
    t = time.perf_counter()
    image = cv2.imread(image_path)
    times['decode'] = time.perf_counter() - t
    height, width = image.shape[:2]

    t = time.perf_counter()
    x = predictor.transform(paddle.to_tensor(image[None]))
    times['preprocess'] = time.perf_counter() - t

    t = time.perf_counter()
    preds = predictor.net(x)
    times['network'] = time.perf_counter() - t

    t = time.perf_counter()
    det = predictor.detect(preds)[0]
    times['detect'] = time.perf_counter() - t

    t = time.perf_counter()
    out = predictor.finish(det, width, height, max_num_detections=max_drawn)
    times['postprocess'] = time.perf_counter() - t
    return times, len(out['scores'])


class WholeDetector:
    """A whole-detector export (tools/export_model.py) as a benchmark chain.

    Stages: decode (cv2.imread), preprocess (BGR -> RGB and PaddleDetection's
    inputs), network (the graph: resize, network, Detect and the final masks at
    image size, all inside); detect and postprocess are 0.
    run: numpy inputs -> the graph's outputs (detector_export.predict on a
    Paddle Inference predictor, or an onnxruntime session's run).
    """

    def __init__(self, run):
        self.run = run

    @classmethod
    def export(cls, net, cfg, folder, export_format):
        detector_export.export_detector(net, cfg, folder, export_format)
        if export_format == 'paddle':
            predictor = detector_export.create_paddle_predictor(folder)
            return cls(lambda inputs: detector_export.predict(predictor, inputs))
        session = detector_export.create_onnx_session(os.path.join(folder, 'model.onnx'))
        return cls(lambda inputs: session.run(None, inputs))

    def run_chain(self, image_path):
        times = {'detect': 0.0, 'postprocess': 0.0}
        t = time.perf_counter()
        image = cv2.imread(image_path)
        times['decode'] = time.perf_counter() - t
        t = time.perf_counter()
        inputs = detector_export.inputs_for([cv2.cvtColor(image, cv2.COLOR_BGR2RGB)])
        times['preprocess'] = time.perf_counter() - t
        t = time.perf_counter()
        outputs = self.run(inputs)
        times['network'] = time.perf_counter() - t
        return times, int(outputs[1].sum())


def benchmark(chains, cfg, image_path, runs=5, warmup=1, max_drawn=None, alternate=False):
    """Median stage times of each chain.

    chains: {label: Predictor} (dygraph Yolact, StaticYolact or OnnxYolact network),
    timed one after the other by default: alternating them would time each
    network while the other's CPU threads are still spinning down.
    alternate: run the chains in turn, one run each, instead; fairer on a
    machine whose load changes, for runtimes that do not spin (Paddle
    Inference and onnxruntime as utils.deploy.runners sets it up). max_drawn: see
    run_chain. Returns {label: {stage or 'total': median seconds}} and logs the table.
    """
    samples = {label: [] for label in chains}
    detections = {}
    if alternate:
        order = [(run, label) for run in range(warmup + runs) for label in chains]
    else:
        order = [(run, label) for label in chains for run in range(warmup + runs)]
    with paddle.no_grad():
        for run, label in order:
            times, detections[label] = run_chain(chains[label], image_path, max_drawn)
            if run >= warmup:
                samples[label].append(times)
                logger.info('run %d %-9s %.3f s', run - warmup + 1, label, sum(times.values()))
    medians = {}
    for label, runs_times in samples.items():
        medians[label] = {s: statistics.median(t[s] for t in runs_times) for s in STAGES}
        medians[label]['total'] = statistics.median(sum(t.values()) for t in runs_times)
    header = f"{'stage':<12}" + ''.join(f'{label:>12}' for label in chains)
    rows = [f'{s:<12}' + ''.join(f'{1000 * medians[label][s]:10.1f}ms' for label in chains)
            for s in STAGES + ('total',)]
    logger.info('%s at %dx%d on %s, median of %d runs (%s detections):\n%s', cfg.name, cfg.max_size,
                cfg.max_size, paddle.device.get_device(), runs,
                ', '.join(f'{label} {n}' for label, n in detections.items()), '\n'.join([header] + rows))
    return medians


class _StandInImages(paddle.io.Dataset):
    """``count`` evaluation samples (img, image_id, height, width, ok) with a 1x1 'image'."""

    def __init__(self, count, height, width):
        self.ids = list(range(1, count + 1))
        self.height, self.width = height, width

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return np.zeros((3, 1, 1), np.float32), self.ids[index], self.height, self.width, True


class _StandInPredictor:
    """A Predictor look-alike: sleeps for the network time, returns one image's final detections."""

    def __init__(self, cfg, detections, seconds):
        self.cfg, self.detections, self.seconds = cfg, detections, seconds

    def predict_preprocessed(self, x, width, height, max_num_detections=None):
        time.sleep(self.seconds)
        return self.detections


def pipeline_benchmark(cfg, detections, image_size, network_seconds, num_images, runs=5):
    """Images/s of a dataset evaluation whose network takes ``network_seconds`` and leaves the host free.

    detections: one image's final detections (Predictor output); image_size: (height, width).
    Returns {'network', 'host' (seconds per image), 'bound' (1 / max of both), 'sequential',
    'pipelined' (images/s)}.
    """
    class_to_cat = coco_eval.class_to_category(cfg.dataset.label_map_dict())
    host = []
    with tempfile.TemporaryDirectory() as tmp:
        with coco_eval.CocoResultsWriter(tmp, class_to_cat) as writer:
            for i in range(runs):
                t = time.perf_counter()
                writer.add(i, detections['classes'], detections['boxes'], detections['scores'],
                           detections['masks'], detections.get('mask_scores'))
                host.append(time.perf_counter() - t)
        rates = {}
        for background in (False, True):
            images = _StandInImages(num_images, *image_size)
            summary = evaluate(_StandInPredictor(cfg, detections, network_seconds), images,
                               os.path.join(tmp, str(background)), num_workers=0, compute_map=False,
                               progress=False, background=background)
            rates['pipelined' if background else 'sequential'] = len(summary.image_ids) / summary.seconds
    result = {'network': network_seconds, 'host': statistics.median(host)}
    result['bound'] = 1 / max(result['network'], result['host'])
    result.update(rates)
    logger.info('dataset evaluation of %d images, stand-in network of %.1f ms, host work (RLE + JSON of %d '
                'detections) %.1f ms per image:\n  sequential %.2f img/s, pipelined %.2f img/s; '
                'bound 1 / max(network, host) = %.2f img/s (pipelined at %.0f%% of it)',
                num_images, 1000 * network_seconds, len(detections['scores']), 1000 * result['host'],
                rates['sequential'], rates['pipelined'], result['bound'], 100 * rates['pipelined'] / result['bound'])
    return result


def cpu_model():
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), else platform.processor()."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def synthetic_training_batch(batch_size, side, num_objects=4, seed=0):
    """A fixed training batch: (images [B, 3, S, S] float32, targets B x [n, 5], masks B x [n, S, S]).

    Targets are point-form boxes relative to the image plus a 0-based label;
    each mask is the ellipse inscribed in its box. No crowds.
    """
    rng = np.random.RandomState(seed)
    images = rng.normal(0, 1, (batch_size, 3, side, side)).astype(np.float32)
    grid = (np.arange(side, dtype=np.float32) + 0.5) / side
    targets, masks = [], []
    for _ in range(batch_size):
        corner = rng.uniform(0.0, 0.6, (num_objects, 2))
        size = rng.uniform(0.15, 0.4, (num_objects, 2))
        boxes = np.concatenate([corner, corner + size], axis=1)
        labels = rng.randint(0, 80, (num_objects, 1))
        targets.append(np.concatenate([boxes, labels], axis=1).astype(np.float32))
        center, half = (boxes[:, :2] + boxes[:, 2:]) / 2, size / 2
        dx = (grid[None, None, :] - center[:, 0, None, None]) / half[:, 0, None, None]
        dy = (grid[None, :, None] - center[:, 1, None, None]) / half[:, 1, None, None]
        masks.append((dx ** 2 + dy ** 2 <= 1).astype(np.float32))
    return images, targets, masks


class TrainStep:
    """This project's training step (utils.training.trainer's components) on a fixed batch, timed by stage."""

    def __init__(self, cfg, batch, seed=0):
        self.net = Yolact.from_config(cfg)
        benchmark_weights(self.net, seed)
        use_cpu_training_convolutions(self.net)      # as the Trainer does
        self.net.train()
        self.criterion = MultiBoxLoss.from_config(cfg, rng=np.random.default_rng(seed))
        self.optimizer = build_optimizer(self.net, cfg)
        images, targets, masks = batch
        self.images = paddle.to_tensor(images)
        self.targets = [paddle.to_tensor(t) for t in targets]
        self.masks = [paddle.to_tensor(m) for m in masks]
        self.num_crowds = [0] * len(targets)

    def __call__(self):
        """One step; returns {'wall': {stage: seconds}, 'cpu': {stage: process CPU seconds}, 'losses': {term: float}}."""
        clock = StageClock()
        with clock('forward'):
            preds = self.net(self.images)
        with clock('loss'):
            losses = self.criterion(self.net, preds, self.targets, self.masks, self.num_crowds)
            loss = paddle.add_n(list(losses.values()))
        with clock('backward'):
            loss.backward()
        with clock('optimizer'):
            self.optimizer.step()
            self.optimizer.clear_grad()
        return dict(clock.times, losses={k: float(v) for k, v in losses.items()})


class ReferenceTrainStep:
    """The reference's training step in a child process (tools/reference_train_step.py), timed there by stage.

    The child gets the same batch and ``net``'s weights under the reference's
    BatchNorm names; ``threads``: torch's thread count (None: its default). Use as a
    context manager (the child ends with it).
    """

    def __init__(self, reference_dir, cfg, batch, net, workdir, threads=None):
        if not os.path.isfile(os.path.join(reference_dir, 'yolact.py')):
            raise MissingFileError(f'--reference {reference_dir}: no yolact.py there (expected a checkout of '
                                   f'dbolya/yolact)')
        images, targets, masks = batch
        batch_path = os.path.join(workdir, 'batch.npz')
        np.savez(batch_path, images=images, **{f'targets_{i}': t for i, t in enumerate(targets)},
                 **{f'masks_{i}': m for i, m in enumerate(masks)})
        weights_path = os.path.join(workdir, 'weights.npz')
        np.savez(weights_path, **{_reference_key(k): v.numpy() for k, v in net.state_dict().items()})
        self.child = subprocess.Popen(
            [sys.executable, REFERENCE_STEP, os.path.abspath(reference_dir), cfg.name, batch_path, weights_path]
            + ([str(threads)] if threads else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect('ready')

    def _expect(self, what):
        line = self.child.stdout.readline()
        if not line:
            self.close()
            raise YolactError(f'the reference training step ({REFERENCE_STEP}) stopped before {what}; '
                              f'its error is above')
        return line

    def __call__(self):
        self.child.stdin.write('step\n')
        self.child.stdin.flush()
        return json.loads(self._expect('a step'))

    def close(self):
        if self.child.stdin and not self.child.stdin.closed:
            self.child.stdin.close()
        self.child.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reference_key(key):
    """A Paddle parameter name -> the reference's (only BatchNorm statistics differ)."""
    if key.endswith('._mean'):
        return key[:-len('._mean')] + '.running_mean'
    if key.endswith('._variance'):
        return key[:-len('._variance')] + '.running_var'
    return key


def train_benchmark(steps, cfg, batch_size, runs=5, warmup=1, pause=0.5):
    """Median stage times of each training step in ``steps`` ({label: callable}), run in turn.

    Each step returns {'wall': {stage: s}, 'cpu': {stage: s}, 'losses': {...}}.
    ``pause`` seconds between steps let one framework's worker threads go idle
    before the other runs. Returns {label: {'wall' | 'cpu': {stage or 'total':
    median seconds}}} and logs the table, with the CPU and each step's last losses.
    """
    samples = {label: [] for label in steps}
    last = {}
    for run in range(warmup + runs):
        for label, step in steps.items():
            result = step()
            last[label] = result.pop('losses')
            if run >= warmup:
                samples[label].append(result)
                logger.info('run %d %-9s %.2f s (CPU %.2f s)', run - warmup + 1, label,
                            sum(result['wall'].values()), sum(result['cpu'].values()))
            time.sleep(pause)
    medians = {label: {kind: {s: statistics.median(t[kind][s] for t in runs_times) for s in TRAIN_STAGES}
                       for kind in ('wall', 'cpu')} for label, runs_times in samples.items()}
    for label, runs_times in samples.items():
        for kind in ('wall', 'cpu'):
            medians[label][kind]['total'] = statistics.median(sum(t[kind].values()) for t in runs_times)
    header = f"{'stage':<12}" + ''.join(f"{label + ' ' + kind:>16}" for label in steps for kind in ('wall', 'cpu'))
    rows = [f'{s:<12}' + ''.join(f'{medians[label][kind][s]:15.3f}s' for label in steps for kind in ('wall', 'cpu'))
            for s in TRAIN_STAGES + ('total',)]
    if 'reference' in medians and 'ours' in medians:
        ratios = [statistics.median(a[kind][s] / b[kind][s] for a, b in zip(samples['ours'], samples['reference']))
                  for s in TRAIN_STAGES for kind in ('wall', 'cpu')]
        totals = [statistics.median(sum(a[kind].values()) / sum(b[kind].values())
                                    for a, b in zip(samples['ours'], samples['reference'])) for kind in ('wall', 'cpu')]
        rows.append('ours / reference, median over the alternating pairs:')
        rows += [f'{s:<12}' + ''.join(f'{r:15.2f}x' for r in ratios[2 * i:2 * i + 2])
                 for i, s in enumerate(TRAIN_STAGES)]
        rows.append(f"{'total':<12}" + ''.join(f'{r:15.2f}x' for r in totals))
    logger.info('training step of %s, %d images at %dx%d, BatchNorm frozen, on %s (%d CPUs, %s), median of %d '
                'runs (wall clock and CPU time of the process):\n%s\nlast losses: %s', cfg.name, batch_size,
                cfg.max_size, cfg.max_size, cpu_model(), os.cpu_count(), paddle.device.get_device(), runs,
                '\n'.join([header] + rows),
                '; '.join(f"{label} {', '.join(f'{k} {v:.4f}' for k, v in sorted(l.items()))}"
                          for label, l in last.items()))
    return medians


def run_train_benchmark(args):
    """--train: this project's training step and, with --reference, the reference's."""
    cfg = get_config(args.config or 'yolact_resnet50', freeze_bn=True)
    batch = synthetic_training_batch(args.batch_size, cfg.max_size, seed=args.seed)
    steps = {'ours': TrainStep(cfg, batch, args.seed)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.reference:
            # torch gets Paddle's thread count: left to itself it would read the OMP_NUM_THREADS=1
            # that importing paddle set in this process's environment, and run on one core.
            threads = args.threads or default_cpu_threads()
            with ReferenceTrainStep(args.reference, cfg, batch, steps['ours'].net, tmp, threads) as reference:
                steps['reference'] = reference
                train_benchmark(steps, cfg, args.batch_size, args.runs, args.warmup)
        else:
            train_benchmark(steps, cfg, args.batch_size, args.runs, args.warmup)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=None,
                   help='config name (default: from --trained_model, else yolact_base)')
    p.add_argument('--trained_model', default=None,
                   help='weights (.pth or .pdparams); default: random weights, see --seed')
    p.add_argument('--seed', default=0, type=int, help='seed of the random weights')
    p.add_argument('--image', default=None,
                   help='image to run on (default: a synthetic 640x480 JPEG, decoded every run)')
    p.add_argument('--runs', default=5, type=int, help='timed runs (the median is reported)')
    p.add_argument('--warmup', default=1, type=int, help='untimed runs first (graph setup, caches)')
    p.add_argument('--export_dir', default=None,
                   help='where to export the static model (default: a temporary folder)')
    p.add_argument('--no_dygraph', action='store_true', help='time only the exported network')
    p.add_argument('--top_k', default=None, type=int,
                   help='postprocess only the k best detections, as eval.py --image/--video do for drawing '
                        '(default: all, as dataset evaluation does)')
    p.add_argument('--device', default='cpu', choices=('cpu', 'gpu'), help='where the networks run')
    p.add_argument('--onnx', action='store_true',
                   help='also time the network exported to ONNX and run by onnxruntime on the CPU '
                        '(needs paddle2onnx and onnxruntime)')
    p.add_argument('--e2e', action='store_true',
                   help='also time the whole-detector export (tools/export_model.py; Paddle Inference, and '
                        'onnxruntime with --onnx): decode, inputs, and the graph that returns the final masks')
    p.add_argument('--alternate', action='store_true',
                   help='run the networks in turn, one run each, instead of all runs of one network first')
    p.add_argument('--pipeline', default=0, type=int, metavar='N',
                   help='also time a dataset evaluation of N images with a stand-in network that sleeps for the '
                        'measured network time (see above); 0: skip')
    p.add_argument('--stand_in_ms', default=None, type=float,
                   help="with --pipeline: the stand-in network's time instead of the measured one, e.g. 30 for "
                        'a GPU running yolact_base at 33 FPS')
    p.add_argument('--train', action='store_true',
                   help='time the training step by stage instead of inference (see above; default config '
                        'yolact_resnet50)')
    p.add_argument('--batch_size', default=2, type=int, help='with --train: images per step')
    p.add_argument('--reference', default=None, metavar='DIR',
                   help='with --train: also time the reference PyTorch code of this dbolya/yolact checkout')
    p.add_argument('--threads', default=None, type=int,
                   help="with --train: CPU threads of Paddle's operators and, with --reference, of torch's (default: "
                        "utils.runtime's choice, the machine's cores, for both); 1 measures the work itself on a busy "
                        "machine")
    args = p.parse_args(argv)
    if (args.reference or args.batch_size != 2 or args.threads) and not args.train:
        p.error('--reference, --batch_size and --threads need --train')
    if args.threads is not None and args.threads < 1:
        p.error(f'--threads must be at least 1, not {args.threads}')
    if args.batch_size < 1:
        p.error(f'--batch_size must be at least 1, not {args.batch_size}')
    return args


def main(argv=None):
    args = parse_args(argv)
    select_device(args.device, cpu_threads=args.threads)
    if args.train:
        return run_train_benchmark(args)
    if args.trained_model:
        cfg, net = load_model(args.trained_model, args.config)
    else:
        cfg = get_config(args.config or 'yolact_base')
        net = Yolact.from_config(cfg)
        benchmark_weights(net, args.seed)
        net.eval()

    with tempfile.TemporaryDirectory() as tmp:
        image_path = args.image or synthetic_image(os.path.join(tmp, 'image.jpg'))
        prefix = os.path.join(args.export_dir or tmp, cfg.name)
        export_yolact(net, cfg, prefix)
        chains = {'exported': Predictor.from_exported(prefix, device=args.device)}
        if args.onnx:
            export_onnx(net, cfg, prefix + '_onnx')
            chains['onnx'] = Predictor.from_network(cfg, OnnxYolact(prefix + '_onnx'))
        if args.e2e:
            chains['e2e'] = WholeDetector.export(net, cfg, os.path.join(tmp, 'e2e'), 'paddle')
            if args.onnx:
                chains['e2e_onnx'] = WholeDetector.export(net, cfg, os.path.join(tmp, 'e2e_onnx'), 'onnx')
        if not args.no_dygraph:
            chains['dygraph'] = Predictor.from_network(cfg, net)
        medians = benchmark(chains, cfg, image_path, args.runs, args.warmup, args.top_k, args.alternate)
        if args.pipeline:
            image = cv2.imread(image_path)
            detections = chains['exported'](image)
            seconds = args.stand_in_ms / 1000 if args.stand_in_ms else medians['exported']['network']
            pipeline_benchmark(cfg, detections, image.shape[:2], seconds, args.pipeline)
    return 0


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s', force=True)
    sys.exit(run_cli(main))
