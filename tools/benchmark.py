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
    python tools/benchmark.py --trained_model weights/yolact_base_54_800000.pth --image photo.jpg

--pipeline N also runs a dataset evaluation of N images (utils.evaluation.loop.evaluate)
with a stand-in network that sleeps for the measured network time and returns the
measured final detections, as a GPU leaves the host free while it works: the
host-side work per image (RLE encoding and JSON of the results) then runs in the
background writer, and the evaluation should approach 1 / max(network, host)
images/s instead of 1 / (network + host).
"""
import argparse
import logging
import os
import statistics
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
from utils.evaluation import coco_eval  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.evaluation.loop import evaluate  # noqa: E402
from utils.deploy.inference import OnnxYolact, export_onnx, export_yolact  # noqa: E402
from utils.weights.loader import load_model  # noqa: E402
from utils.predictor import Predictor  # noqa: E402
from utils.runtime import select_device  # noqa: E402
from yolact import Yolact  # noqa: E402

logger = logging.getLogger('benchmark')

STAGES = ('decode', 'preprocess', 'network', 'detect', 'postprocess')
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
    """
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


def benchmark(chains, cfg, image_path, runs=5, warmup=1, max_drawn=None, alternate=False):
    """Median stage times of each chain.

    chains: {label: Predictor} (dygraph Yolact, StaticYolact or OnnxYolact network),
    timed one after the other by default: alternating them would time each
    network while the other's CPU threads are still spinning down.
    alternate: run the chains in turn, one run each, instead; fairer on a
    machine whose load changes, for runtimes that do not spin (Paddle
    Inference and onnxruntime as utils.deploy.inference sets it up). max_drawn: see
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
    p.add_argument('--alternate', action='store_true',
                   help='run the networks in turn, one run each, instead of all runs of one network first')
    p.add_argument('--pipeline', default=0, type=int, metavar='N',
                   help='also time a dataset evaluation of N images with a stand-in network that sleeps for the '
                        'measured network time (see above); 0: skip')
    p.add_argument('--stand_in_ms', default=None, type=float,
                   help="with --pipeline: the stand-in network's time instead of the measured one, e.g. 30 for "
                        'a GPU running yolact_base at 33 FPS')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    select_device(args.device)
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
