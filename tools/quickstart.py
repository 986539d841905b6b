"""Quickstart: the whole system on a CPU in minutes, with nothing to download.

1. writes the synthetic shapes dataset (tools/make_shapes_dataset.py) if it is absent,
2. trains the CPU-sized ``yolact_shapes`` config from scratch with train.py
   (16 images per step; on a CPU, two data-parallel processes of 8),
3. evaluates it with eval.py: COCO box and mask mAP through pycocotools, and
   bbox_detections.json / mask_detections.json,
4. draws the detections on a few validation images,
and prints where everything went. ``--quick`` is the short variant CI runs.

    python tools/quickstart.py            # ~10 min on 2 cores: mask AP ~0.6 on the val split
    python tools/quickstart.py --quick    # ~3 min: the CI variant

--quick trains on 16 images and evaluates on those same images: it checks
that the whole path learns (the model must fit what it saw), not how well it
generalises.
"""
import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.runtime import quiet_paddle_import  # noqa: E402

quiet_paddle_import()  # before the first import of paddle, here and in the programs and loader workers it starts

import paddle  # noqa: E402

from data.config import get_config  # noqa: E402
from tools.make_shapes_dataset import make_shapes_dataset  # noqa: E402
from utils.training.checkpoint import latest_checkpoint  # noqa: E402

CONFIG = 'yolact_shapes'
# Images per SGD step, over all training processes. The config's lr and
# iterations are stated for the reference's 8; train.py's --autoscale adapts them.
BATCH_SIZE = 16
NUM_DRAWN = 6
# --quick: a few images, learned by heart and scored on themselves. Its own schedule: the
# config's warm-up (300) spans the run and one decay comes near its end; the config's steps scaled
# to 250 iterations (train.py's --max_iter rule) would cut the warm-up to 187 iterations, and this
# from-scratch run then stalled (mask loss flat at 5.5, mask AP 0.0001 instead of 0.7).
QUICK = dict(num_train=16, num_val=16, max_iter=250, lr_steps='225')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--out', default=os.path.join(ROOT, 'runs', 'quickstart'),
                   help='folder for weights, logs, results and drawn images (default: runs/quickstart)')
    p.add_argument('--data', default=None,
                   help='shapes dataset folder, written if absent (default: data/shapes, or <out>/shapes with --quick)')
    p.add_argument('--quick', action='store_true', help='the short CI variant: %s' % QUICK)
    p.add_argument('--max_iter', type=int, default=None, help='training iterations (default: the config)')
    p.add_argument('--procs', type=int, default=None,
                   help='training processes sharing the %d images of a step (default: 2 on a CPU with at least '
                        'two cores, else 1). The small network cannot keep two cores busy from one process: '
                        'two single-threaded data-parallel processes train faster (README)' % BATCH_SIZE)
    p.add_argument('--num_workers', type=int, default=None,
                   help='DataLoader worker processes per training process (default 1; 0 with --quick, whose '
                        'epoch is one step: workers would start anew for every step)')
    return p.parse_args(argv)


def default_procs():
    """2 data-parallel CPU processes when there is no GPU and there are two cores for them, else 1."""
    return 2 if paddle.device.cuda.device_count() == 0 and (os.cpu_count() or 1) >= 2 else 1


def run_program(script, argv):
    """Run one of the project's programs (train.py, eval.py) in a new Python process; its exit code."""
    return subprocess.call([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT)


def run_training(argv, procs):
    """train.py in one process, or in ``procs`` data-parallel CPU processes (paddle.distributed.launch, gloo).

    Returns the exit code. With several processes, the launcher's per-process
    logs go to a temporary folder; the first process's is printed if training fails.
    """
    if procs <= 1:
        return run_program('train.py', argv)
    with tempfile.TemporaryDirectory() as log_dir:
        code = subprocess.call([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', str(procs),
                                '--log_dir', log_dir, os.path.join(ROOT, 'train.py'), *argv], cwd=ROOT)
        if code:
            for name in sorted(os.listdir(log_dir)):
                with open(os.path.join(log_dir, name), errors='replace') as f:
                    print(f'--- {name}\n{f.read()[-4000:]}', file=sys.stderr)
    return code


def ensure_dataset(folder, num_train, num_val):
    """The shapes DatasetConfig at ``folder``, generating it first if its annotations are missing."""
    train_info = os.path.join(folder, 'annotations', 'instances_train.json')
    val_info = os.path.join(folder, 'annotations', 'instances_val.json')
    if not (os.path.isfile(train_info) and os.path.isfile(val_info)):
        print(f'[1/4] writing the shapes dataset to {folder} ...', flush=True)
        return make_shapes_dataset(folder, num_train=num_train, num_val=num_val)
    print(f'[1/4] using the shapes dataset in {folder}', flush=True)
    return dataclasses.replace(get_config(CONFIG).dataset, train_images=os.path.join(folder, 'train'),
                               train_info=train_info, valid_images=os.path.join(folder, 'val'), valid_info=val_info)


def main(argv=None):
    args = parse_args(argv)
    quick = QUICK if args.quick else {}
    data_dir = args.data or (os.path.join(args.out, 'shapes') if args.quick else os.path.join(ROOT, 'data', 'shapes'))
    dataset = ensure_dataset(data_dir, quick.get('num_train', 600), quick.get('num_val', 100))
    weights_dir, log_dir = os.path.join(args.out, 'weights'), os.path.join(args.out, 'logs')
    results_dir, drawn_dir = os.path.join(args.out, 'results'), os.path.join(args.out, 'drawn')
    if args.quick:
        dataset = dataclasses.replace(dataset, valid_images=dataset.train_images, valid_info=dataset.train_info)
    data_flags = ['--valid_images', dataset.valid_images, '--valid_info', dataset.valid_info]

    max_iter = args.max_iter or quick.get('max_iter')
    num_workers = args.num_workers if args.num_workers is not None else (0 if args.quick else 1)
    procs = args.procs or default_procs()
    if BATCH_SIZE % procs:
        raise SystemExit(f'--procs {procs} does not divide the batch of {BATCH_SIZE} images')
    print(f'[2/4] training {CONFIG} in {procs} process{"es" if procs > 1 else ""} '
          f'(checkpoints in {weights_dir}) ...', flush=True)
    code = run_training(
        ['--config', CONFIG, '--batch_size', str(BATCH_SIZE), '--num_workers', str(num_workers),
         '--save_folder', weights_dir, '--log_folder', log_dir, '--validation_epoch', '-1',
         '--train_images', dataset.train_images, '--train_info', dataset.train_info, *data_flags]
        + (['--max_iter', str(max_iter)] if max_iter else [])
        + (['--lr_steps', quick['lr_steps']] if args.quick and not args.max_iter else []), procs)
    if code:
        return code
    weights = latest_checkpoint(weights_dir, CONFIG)

    print(f'[3/4] evaluating {os.path.basename(weights)} with pycocotools ...', flush=True)
    eval_logs = os.path.join(log_dir, 'quickstart_eval')
    shutil.rmtree(eval_logs, ignore_errors=True)
    code = run_program('eval.py', ['--trained_model', weights, '--results_dir', results_dir, '--log_dir', eval_logs,
                                   '--num_workers', str(num_workers), *data_flags])
    if code:
        return code
    with open(glob.glob(os.path.join(eval_logs, 'eval_*.json'))[0]) as f:
        results = json.load(f)['results']

    print(f'[4/4] drawing detections on {NUM_DRAWN} validation images ...', flush=True)
    samples = os.path.join(args.out, 'samples')
    os.makedirs(samples, exist_ok=True)
    for name in sorted(os.listdir(dataset.valid_images))[:NUM_DRAWN]:
        shutil.copy(os.path.join(dataset.valid_images, name), samples)
    code = run_program('eval.py', ['--trained_model', weights, '--images', f'{samples}:{drawn_dir}',
                                   '--score_threshold', '0.3'])
    if code:
        return code

    print(f'\nquickstart done: box AP {results["bbox"]["AP"]:.3f}, mask AP {results["segm"]["AP"]:.3f} '
          f'(COCO AP@[.5:.95] on {dataset.valid_info})')
    print(f'  weights: {weights}\n  results: {results_dir}/mask_detections.json, bbox_detections.json\n'
          f'  drawn:   {drawn_dir}\n  curves:  visualdl --logdir {log_dir}')
    summary = {'box_AP': results['bbox']['AP'], 'mask_AP': results['segm']['AP'], 'weights': weights}
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
