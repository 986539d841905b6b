"""Train YOLACT / YOLACT++ (the reference's train.py, on Paddle).

From ImageNet backbone weights (converted with tools/convert_weights.py --backbone
into <save_folder>/<backbone file>.pdparams) on COCO 2017:

    python train.py --config yolact_base --batch_size 8

Fine-tune converted published weights on your own COCO-format data; the class
count is read from the annotation file, and the class-dependent layers are
re-initialised when it differs from the weights':

    python train.py --config yolact_resnet50 --trained_model weights/yolact_resnet50_54_800000.pdparams \\
        --train_images data/mine/train --train_info data/mine/annotations/train.json \\
        --valid_images data/mine/val --valid_info data/mine/annotations/val.json --batch_size 8

Resume (Ctrl+C, and SIGTERM as sent by schedulers, docker stop, timeout, kill and
paddle.distributed.launch, write <config>_<epoch>_<iteration>_interrupt.pdparams):

    python train.py --config yolact_base --resume interrupt     # or: --resume latest / a .pdparams path

Several GPUs (--batch_size is the total, split evenly across the cards):

    python -m paddle.distributed.launch --gpus 0,1,2,3 train.py --config yolact_base --batch_size 32

Checkpoints go to --save_folder (see utils/training/checkpoint.py), VisualDL scalars to
--log_folder (``visualdl --logdir logs``).
"""
import argparse
import dataclasses
import logging
import sys

from utils.runtime import quiet_paddle_import

quiet_paddle_import()  # before the first import of paddle, here and in the DataLoader workers

import paddle.distributed as dist  # noqa: E402

from data.coco import custom_dataset_config  # noqa: E402
from data.config import DATASETS, get_config  # noqa: E402
from data.coco_root import coco_root_dataset  # noqa: E402
from utils.cli import (add_coco_root_flag, add_data_loading_flags, add_max_image_pixels_flag,  # noqa: E402
                       non_negative_int, positive_int)
from utils.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ConfigError, run_cli  # noqa: E402
from utils.runtime import select_device  # noqa: E402
from utils.training.trainer import (NonFiniteLossError, Trainer, TrainOptions, batch_norm_frozen,  # noqa: E402
                                    resolve_resume)

logger = logging.getLogger('train')

# The reference's lr and iteration counts are for this total batch size;
# other sizes scale them (unless --no_autoscale).
REFERENCE_BATCH_SIZE = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='YOLACT training', epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='yolact_base', help='config name, e.g. yolact_base, yolact_plus_resnet50')
    p.add_argument('--batch_size', default=8, type=positive_int,
                   help='total batch size over all devices (the reference default, 8)')
    p.add_argument('--resume', default=None, type=str,
                   help="checkpoint to resume from (.pdparams, or a reference .pth: weights only); "
                        "'interrupt' for the interrupt checkpoint in "
                        "--save_folder, 'latest' for the newest checkpoint of the config there")
    p.add_argument('--start_iter', default=-1, type=int,
                   help='iteration to resume at; -1 reads it from the checkpoint')
    p.add_argument('--num_workers', default=4, type=non_negative_int, help='DataLoader worker processes')
    add_data_loading_flags(p)
    add_max_image_pixels_flag(p)
    p.add_argument('--lr', '--learning_rate', default=None, type=float,
                   help='initial learning rate (default: the config, scaled with the batch size)')
    p.add_argument('--momentum', default=None, type=float, help='SGD momentum (default: the config)')
    p.add_argument('--decay', '--weight_decay', default=None, type=float,
                   help='SGD weight decay (default: the config)')
    p.add_argument('--gamma', default=None, type=float,
                   help='learning-rate factor at each step (default: the config)')
    p.add_argument('--max_iter', default=None, type=int,
                   help="number of iterations (default: the config, scaled with the batch size); without "
                        "--lr_steps the config's lr steps are scaled to this length and the warm-up ends by the "
                        "first of them (logged)")
    p.add_argument('--lr_steps', default=None, type=_iterations,
                   help='comma-separated iterations at which the lr is multiplied by --gamma, e.g. 1200,1600 '
                        '(default: the config\'s, scaled to --max_iter); used as given, not batch-scaled')
    p.add_argument('--no_autoscale', dest='autoscale', action='store_false',
                   help=f'do not scale lr, max_iter and lr_steps by batch_size / {REFERENCE_BATCH_SIZE}')
    p.add_argument('--save_folder', default='weights/', help='checkpoint folder')
    p.add_argument('--log_folder', default='logs/', help='VisualDL log folder')
    p.add_argument('--save_interval', default=10000, type=int, help='iterations between checkpoints')
    p.add_argument('--keep_latest', action='store_true', help='keep only the newest checkpoint')
    p.add_argument('--keep_latest_interval', default=100000, type=int,
                   help='with --keep_latest, still keep the checkpoints at multiples of this (0: none)')
    p.add_argument('--keep_best', action='store_true',
                   help='after each validation, keep the weights of the best mask AP so far as '
                        '<save_folder>/<config>_best.pdparams (with its iteration and mAP in <config>_best.json)')
    p.add_argument('--validation_size', default=5000, type=int, help='images used for validation mAP')
    p.add_argument('--validation_epoch', default=2, type=int,
                   help='compute validation mAP every this many epochs and at the end; -1: never')
    p.add_argument('--log_interval', default=10, type=int, help='iterations between console lines')
    p.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                   help="a named dataset instead of the config's")
    add_coco_root_flag(p)
    p.add_argument('--train_images', help='custom dataset: training image folder')
    p.add_argument('--train_info', help='custom dataset: training COCO annotation file')
    p.add_argument('--valid_images', help='custom dataset: validation image folder')
    p.add_argument('--valid_info', help='custom dataset: validation COCO annotation file')
    p.add_argument('--class_names',
                   help='custom dataset: comma-separated class names, matched to the category names of '
                        '--train_info (default: every category, in increasing id order)')
    p.add_argument('--include_background_images', action='store_true',
                   help='also train on the images of --train_info without annotations, as negatives (every '
                        'anchor background); off by default, as in the reference, which skips them')
    p.add_argument('--backbone_weights', default=None,
                   help="ImageNet backbone .pdparams (default: <save_folder>/<config's backbone file>.pdparams); "
                        "'none' trains from random initialisation")
    p.add_argument('--trained_model', default=None,
                   help='YOLACT weights to fine-tune: a converted .pdparams or a reference .pth; with a '
                        'different class count, the class-dependent layers are re-initialised')
    p.add_argument('--amp', action='store_true', help='mixed precision (float16, GPU only) through paddle.amp')
    p.add_argument('--device', default=None,
                   help="'gpu' or 'cpu' (default: gpu when Paddle is built with CUDA and one is visible)")
    p.add_argument('--seed', default=0, type=int,
                   help='seed of initialisation, augmentation and loss sampling (a run is reproducible)')
    args = p.parse_args(argv)
    if args.resume is not None and args.trained_model is not None:
        p.error('--resume continues a run, --trained_model starts one: give only one')
    if args.coco_root and any(getattr(args, f) for f in ('train_images', 'train_info', 'valid_images', 'valid_info')):
        p.error('give either --coco_root or the custom dataset flags')
    if args.keep_best and args.validation_epoch <= 0:
        p.error('--keep_best needs validation (--validation_epoch > 0 and a validation set)')
    return args


def _iterations(text):
    """'1200,1600' -> (1200, 1600): the --lr_steps value."""
    try:
        steps = tuple(int(v) for v in text.split(',') if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated iterations, got {text!r}') from None
    if not steps or any(s <= 0 for s in steps):
        raise argparse.ArgumentTypeError(f'expected positive iterations, got {text!r}')
    return tuple(sorted(steps))


def build_config(args, world_size):
    """The config of this run: the preset, the dataset flags, batch-size scaling, the BatchNorm rule."""
    cfg = get_config(args.config)
    if args.dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=DATASETS[args.dataset])
    if args.coco_root:
        splits = ('train', 'valid') if args.validation_epoch > 0 else ('train',)
        cfg = dataclasses.replace(cfg, dataset=coco_root_dataset(args.coco_root, cfg.dataset, splits))
    flags = ('train_images', 'train_info', 'valid_images', 'valid_info', 'class_names')
    if any(getattr(args, f) is not None for f in flags):
        # Unset folders/files fall back to the preset's; the classes come from the training file.
        paths = {f: getattr(args, f) or getattr(cfg.dataset, f) for f in flags[:4]}
        dataset_cfg = dataclasses.replace(custom_dataset_config(paths['train_info'], args.class_names, **paths),
                                          name='custom', has_gt=True)
        cfg = dataclasses.replace(cfg, dataset=dataset_cfg, num_classes=len(dataset_cfg.class_names) + 1)

    if args.autoscale and args.batch_size != REFERENCE_BATCH_SIZE:
        factor = args.batch_size / REFERENCE_BATCH_SIZE
        logger.info('scaling lr, max_iter and lr_steps by %.2f for a batch size of %d', factor, args.batch_size)
        cfg = dataclasses.replace(cfg, lr=cfg.lr * factor, max_iter=int(cfg.max_iter // factor),
                                  lr_steps=tuple(int(s // factor) for s in cfg.lr_steps))
    if args.max_iter is not None and args.lr_steps is None and args.max_iter != cfg.max_iter:
        cfg = scale_schedule(cfg, args.max_iter)
    overrides = {name: getattr(args, name) for name in ('lr', 'momentum', 'decay', 'gamma', 'max_iter', 'lr_steps')
                 if getattr(args, name) is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    if any(step >= cfg.max_iter for step in cfg.lr_steps):
        logger.warning('lr steps %s at or after max_iter %d never apply', list(cfg.lr_steps), cfg.max_iter)

    if args.batch_size % world_size:
        raise ConfigError(f'--batch_size {args.batch_size} does not split evenly over {world_size} devices')
    return dataclasses.replace(cfg, freeze_bn=batch_norm_frozen(cfg, train_options(args), world_size))


def scale_schedule(cfg, max_iter):
    """cfg with its lr steps scaled by ``max_iter / cfg.max_iter`` and its warm-up fitted in before them.

    The reference keeps a config's steps (e.g. 280k..750k) whatever --max_iter
    says, so a 2,000-iteration fine-tune never decays; here they keep their
    place in the schedule. The warm-up keeps its length in iterations (it is
    about the network's stability in its first updates, not a fraction of the
    run: shortened 4x, the quickstart's from-scratch run went NaN at iteration
    41), but ends by the first step at the latest: a step inside the warm-up
    would be overwritten by it (the reference's order) and never apply.
    """
    factor = max_iter / cfg.max_iter
    steps = tuple(int(s * factor) for s in cfg.lr_steps)
    warmup = min(cfg.lr_warmup_until, min(steps) if steps else max_iter)
    logger.info('--max_iter %d is %.4g x the config\'s %d: lr steps %s -> %s, warm-up %d -> %d iterations '
                '(give --lr_steps to choose the steps)', max_iter, factor, cfg.max_iter, list(cfg.lr_steps),
                list(steps), cfg.lr_warmup_until, warmup)
    return dataclasses.replace(cfg, lr_steps=steps, lr_warmup_until=warmup)


def train_options(args):
    """The TrainOptions of the parsed flags (same names)."""
    return TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})


def main(argv=None):
    """Run training; returns the process exit code (0 done, 1 bad input or non-finite loss, 130 interrupted by
    Ctrl+C, 143 by SIGTERM: both save an interrupt checkpoint that --resume interrupt continues from)."""
    args = parse_args(argv)
    device = select_device(args.device)
    if args.amp and device == 'cpu':
        logger.warning('--amp needs a GPU: training in float32')
        args.amp = False
    world_size = dist.get_world_size()
    if world_size > 1:
        dist.init_parallel_env()
    # Resolved once: an 'interrupt' or 'latest' that finds nothing is a run without --resume (BatchNorm rule too).
    args.resume = resolve_resume(train_options(args), get_config(args.config).name).resume
    cfg = build_config(args, world_size)
    trainer = Trainer(cfg, train_options(args), dist.get_rank(), world_size)
    try:
        status = trainer.run()
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f'{err} Last good checkpoint: '
                                 f'{trainer.last_checkpoint or "none saved by this run"}') from None
    return {'interrupted': EXIT_INTERRUPTED, 'terminated': EXIT_TERMINATED}.get(status, 0)


def configure_logging():
    """Console logging of a training process: one console for a multi-device run, the other ranks report only problems."""
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
                        format='%(asctime)s %(message)s', datefmt='%H:%M:%S', force=True)


if __name__ == '__main__':
    configure_logging()
    sys.exit(run_cli(main))
