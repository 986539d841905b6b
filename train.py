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

Resume (Ctrl+C writes <config>_<epoch>_<iteration>_interrupt.pdparams):

    python train.py --config yolact_base --resume interrupt     # or: --resume latest / a .pdparams path

Several GPUs (--batch_size is the total, split evenly across the cards):

    python -m paddle.distributed.launch --gpus 0,1,2,3 train.py --config yolact_base --batch_size 32

Checkpoints go to --save_folder (see utils/checkpoint.py), VisualDL scalars to
--log_folder (``visualdl --logdir logs``).
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import paddle
import paddle.distributed as dist

import eval as eval_script
from data.coco import COCODetection, COCOEvalImages, classes_from_categories, detection_collate
from data.config import DATASETS, DatasetConfig, get_config
from layers.functions import Detect
from layers.modules.multibox_loss import MultiBoxLoss
from utils import checkpoint
from utils.augmentations import BaseTransform, SSDAugmentation
from utils.convert import convert_checkpoint
from utils.logger import TrainingLogger
from utils.lr_schedule import WarmupStepSchedule
from utils.runtime import select_device
from yolact import Yolact

logger = logging.getLogger('train')

# The reference's lr and iteration counts are for this total batch size;
# other sizes scale them (unless --no_autoscale).
REFERENCE_BATCH_SIZE = 8
# Below this many images per device, BatchNorm statistics are too noisy to
# train: the reference freezes BatchNorm.
MIN_BN_BATCH = 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='YOLACT training', epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='yolact_base', help='config name, e.g. yolact_base, yolact_plus_resnet50')
    p.add_argument('--batch_size', default=8, type=int,
                   help='total batch size over all devices (the reference default, 8)')
    p.add_argument('--resume', default=None, type=str,
                   help="checkpoint to resume from (.pdparams, or a reference .pth: weights only); "
                        "'interrupt' for the interrupt checkpoint in "
                        "--save_folder, 'latest' for the newest checkpoint of the config there")
    p.add_argument('--start_iter', default=-1, type=int,
                   help='iteration to resume at; -1 reads it from the checkpoint')
    p.add_argument('--num_workers', default=4, type=int, help='DataLoader worker processes')
    p.add_argument('--lr', '--learning_rate', default=None, type=float,
                   help='initial learning rate (default: the config, scaled with the batch size)')
    p.add_argument('--momentum', default=None, type=float, help='SGD momentum (default: the config)')
    p.add_argument('--decay', '--weight_decay', default=None, type=float,
                   help='SGD weight decay (default: the config)')
    p.add_argument('--gamma', default=None, type=float,
                   help='learning-rate factor at each step (default: the config)')
    p.add_argument('--max_iter', default=None, type=int,
                   help='number of iterations (default: the config, scaled with the batch size)')
    p.add_argument('--no_autoscale', dest='autoscale', action='store_false',
                   help=f'do not scale lr, max_iter and lr_steps by batch_size / {REFERENCE_BATCH_SIZE}')
    p.add_argument('--save_folder', default='weights/', help='checkpoint folder')
    p.add_argument('--log_folder', default='logs/', help='VisualDL log folder')
    p.add_argument('--save_interval', default=10000, type=int, help='iterations between checkpoints')
    p.add_argument('--keep_latest', action='store_true', help='keep only the newest checkpoint')
    p.add_argument('--keep_latest_interval', default=100000, type=int,
                   help='with --keep_latest, still keep the checkpoints at multiples of this (0: none)')
    p.add_argument('--validation_size', default=5000, type=int, help='images used for validation mAP')
    p.add_argument('--validation_epoch', default=2, type=int,
                   help='compute validation mAP every this many epochs and at the end; -1: never')
    p.add_argument('--log_interval', default=10, type=int, help='iterations between console lines')
    p.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                   help="a named dataset instead of the config's")
    p.add_argument('--train_images', help='custom dataset: training image folder')
    p.add_argument('--train_info', help='custom dataset: training COCO annotation file')
    p.add_argument('--valid_images', help='custom dataset: validation image folder')
    p.add_argument('--valid_info', help='custom dataset: validation COCO annotation file')
    p.add_argument('--class_names',
                   help='custom dataset: comma-separated class names, matched to the category names of '
                        '--train_info (default: every category, in increasing id order)')
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
    return args


# --------------------------------------------------------------- configuration --
def build_config(args, world_size):
    """The config of this run: the preset, the dataset flags, batch-size scaling, the BatchNorm rule."""
    cfg = get_config(args.config)
    if args.dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=DATASETS[args.dataset])
    custom = custom_dataset(args, cfg.dataset)
    if custom is not None:
        cfg = dataclasses.replace(cfg, dataset=custom, num_classes=len(custom.class_names) + 1)

    if args.autoscale and args.batch_size != REFERENCE_BATCH_SIZE:
        factor = args.batch_size / REFERENCE_BATCH_SIZE
        logger.info('scaling lr, max_iter and lr_steps by %.2f for a batch size of %d', factor, args.batch_size)
        cfg = dataclasses.replace(cfg, lr=cfg.lr * factor, max_iter=int(cfg.max_iter // factor),
                                  lr_steps=tuple(int(s // factor) for s in cfg.lr_steps))
    overrides = {name: getattr(args, name) for name in ('lr', 'momentum', 'decay', 'gamma', 'max_iter')
                 if getattr(args, name) is not None}
    cfg = dataclasses.replace(cfg, **overrides)

    if args.batch_size % world_size:
        raise ValueError(f'--batch_size {args.batch_size} does not split evenly over {world_size} devices')
    return dataclasses.replace(cfg, freeze_bn=batch_norm_frozen(args, cfg, world_size))


def batch_norm_frozen(args, cfg, world_size):
    """The BatchNorm rule: frozen below MIN_BN_BATCH images per device, unless nothing is pretrained.

    Frozen BatchNorm normalises with the running statistics it was loaded
    with. Pretrained weights (backbone, YOLACT weights, a checkpoint to resume)
    bring real statistics; a network initialised at random has mean 0 and
    variance 1 everywhere, so freezing it would remove all normalisation and
    a deep ResNet's activations explode within a few iterations. From scratch,
    BatchNorm therefore always learns from batch statistics, noisy as they
    are for small batches.
    """
    per_device = args.batch_size // world_size
    pretrained = (args.resume is not None or args.trained_model is not None
                  or (args.backbone_weights or default_backbone_weights(cfg, args.save_folder)).lower() != 'none')
    if not pretrained:
        if per_device < MIN_BN_BATCH:
            logger.warning('training from random initialisation with %d images per device: BatchNorm uses batch '
                           'statistics (freezing it would leave the network unnormalised); below %d images per '
                           'device they are noisy, prefer a larger --batch_size or backbone weights',
                           per_device, MIN_BN_BATCH)
        return False
    if per_device < MIN_BN_BATCH and not cfg.freeze_bn:
        logger.info('%d images per device is below %d: BatchNorm is frozen (the reference rule)',
                    per_device, MIN_BN_BATCH)
        return True
    return cfg.freeze_bn


def custom_dataset(args, base):
    """A DatasetConfig from the custom-dataset flags, or None when none is given.

    Unset folders/files fall back to ``base``'s. Class names and the category
    id -> label map come from the training annotation file's categories.
    """
    flags = ('train_images', 'train_info', 'valid_images', 'valid_info', 'class_names')
    if all(getattr(args, f) is None for f in flags):
        return None
    paths = {f: getattr(args, f) or getattr(base, f) for f in flags[:4]}
    with open(paths['train_info']) as f:
        categories = json.load(f)['categories']
    names, label_map = classes_from_categories(categories, args.class_names, paths['train_info'])
    return DatasetConfig(name='custom', class_names=names, label_map=label_map, **paths)


# ------------------------------------------------------------------------ data --
class SeededSamples(paddle.io.Dataset):
    """A training dataset whose augmentation depends only on (seed, epoch, sample index).

    ``rng`` is the RandomState the dataset's augmentation draws from; it is
    reseeded before every sample. Batches are then the same however they are
    spread over DataLoader workers, and a resumed run sees exactly the images
    an uninterrupted run would have.
    """

    def __init__(self, dataset, rng, seed):
        self.dataset = dataset
        self.rng = rng
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Call before creating the epoch's DataLoader iterator (workers copy the dataset then)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        self.rng.seed(int(seed))
        return self.dataset[index]


class ResumableBatchSampler(paddle.io.DistributedBatchSampler):
    """Shuffled, drop_last DistributedBatchSampler over a window [start_batch, end_batch) of an epoch.

    The parent shuffles with ``np.random.RandomState(epoch)``, so skipping the
    first batches of an epoch yields exactly the batches an uninterrupted run
    would have continued with. Ending the window at the last iteration to run
    lets the DataLoader iterator finish by itself: an iterator abandoned
    mid-way keeps its worker processes alive, one set per epoch.
    Each device gets its slice of every global batch.
    num_replicas/rank default to the distributed environment's, as in the parent.
    """

    def __init__(self, dataset, batch_size, num_replicas=None, rank=None):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.start_batch, self.end_batch = 0, None

    def set_epoch(self, epoch, start_batch=0, end_batch=None):
        """Batches start_batch..end_batch-1 of ``epoch`` (end_batch None: to the end of the epoch)."""
        super().set_epoch(epoch)
        self.start_batch, self.end_batch = start_batch, end_batch

    def __iter__(self):
        batches = super().__iter__()
        for _ in range(self.start_batch):
            next(batches)
        for _ in range(len(self)):
            yield next(batches)

    def __len__(self):
        end = super().__len__() if self.end_batch is None else min(self.end_batch, super().__len__())
        return max(end - self.start_batch, 0)


# ---------------------------------------------------------------------- model --
class NetLoss(paddle.nn.Layer):
    """The network and its loss as one layer.

    DataParallel synchronises the gradients of what its wrapped layer computes;
    wrapping the loss too covers the YOLACT++ mask-IoU net, which only the loss
    runs. Never call train()/eval() on this wrapper: Paddle's Layer.train()
    would switch frozen BatchNorm layers back to batch statistics; the Yolact
    net's own train() keeps them frozen.

    Forward: (images [B, 3, S, S], targets B x [n_i, 5], masks B x [n_i, S, S],
    num_crowds B ints) -> {loss term: scalar tensor} (see MultiBoxLoss).
    """

    def __init__(self, net, criterion, amp=False):
        super().__init__()
        self.net = net
        self.criterion = criterion
        self.amp = amp

    def forward(self, images, targets, masks, num_crowds):
        with paddle.amp.auto_cast(enable=self.amp):
            preds = self.net(images)
        # The loss is computed in float32 whatever the network ran in.
        preds = {k: v.astype('float32') for k, v in preds.items()}
        return self.criterion(self.net, preds, targets, masks, num_crowds)


def build_optimizer(net, cfg):
    """The reference's optimizer: torch SGD with momentum and weight decay on every parameter.

    Paddle's Momentum with a float weight_decay adds ``decay * w`` to the
    gradient before the momentum update, as torch's SGD(weight_decay) does;
    frozen (stop_gradient) parameters get no gradient and are left alone.
    The learning rate is set every iteration from the schedule.
    """
    return paddle.optimizer.Momentum(learning_rate=cfg.lr, momentum=cfg.momentum,
                                     parameters=net.parameters(), weight_decay=cfg.decay)


def class_dependent_keys(net):
    """Predicate: does a state-dict key belong to a layer whose shape depends on the class count?

    Those are the class-confidence convs of the heads, the semantic-segmentation
    conv and (YOLACT++) the last conv of the mask-IoU net.
    """
    prefixes = ['semantic_seg_conv.']
    if net.maskiou_net is not None:
        convs = [name for name, layer in net.maskiou_net.named_sublayers(prefix='maskiou_net')
                 if isinstance(layer, paddle.nn.Conv2D)]
        prefixes.append(convs[-1] + '.')
    return lambda key: '.conf_layer.' in key or key.startswith(tuple(prefixes))


def load_trained_model(net, path, cfg):
    """Initialise ``net`` (built for ``cfg``) from YOLACT weights for fine-tuning.

    ``path``: a converted ``.pdparams``, or a reference ``.pth`` converted on
    the fly for the preset ``cfg.name`` (whose class count the published files have).
    When the class count differs, the class-dependent layers keep their fresh
    initialisation; every other tensor must match. Returns the skipped keys.
    """
    source = path
    if path.endswith('.pth'):
        source, report = convert_checkpoint(path, get_config(cfg.name))
        logger.info('%s', report.summary())
    skipped = checkpoint.load_weights(net, source, skip=class_dependent_keys(net))
    if skipped:
        logger.warning('fine-tuning %s for %d classes: re-initialised the class-dependent tensors %s',
                       path, cfg.num_classes - 1, ', '.join(skipped))
    else:
        logger.info('fine-tuning %s', path)
    return skipped


def default_backbone_weights(cfg, save_folder):
    """<save_folder>/<the config's backbone file, as .pdparams>, where the reference looks for it.

    'none' for configs trained from scratch (no backbone file).
    """
    if not cfg.backbone.path:
        return 'none'
    stem = os.path.splitext(os.path.basename(cfg.backbone.path))[0]
    return os.path.join(save_folder, stem + checkpoint.WEIGHTS_EXT)


def resolve_resume(resume, save_folder, config_name):
    """The checkpoint path --resume designates, or None to start a new run."""
    if resume == 'interrupt':
        path = checkpoint.interrupt_checkpoint(save_folder)
    elif resume == 'latest':
        path = checkpoint.latest_checkpoint(save_folder, config_name)
    else:
        return resume
    if path is None:
        logger.warning('--resume %s: no such checkpoint in %s; starting a new run', resume, save_folder)
    return path


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without saving."""


# -------------------------------------------------------------------- training --
class Trainer:
    """One training run: model, optimizer, data, schedule, checkpoints and logging.

    Only rank 0 writes checkpoints and logs.
    """

    def __init__(self, args, cfg, rank=0, world_size=1):
        self.args, self.cfg = args, cfg
        self.rank, self.world_size = rank, world_size
        paddle.seed(args.seed)
        self.schedule = WarmupStepSchedule.from_config(cfg)
        self.net = Yolact.from_config(cfg)
        self.net.train()
        if cfg.freeze_bn:
            self.net.freeze_bn(True)
        self.criterion = MultiBoxLoss.from_config(cfg)
        self.optimizer = build_optimizer(self.net, cfg)
        # Inactive (a pass-through) without --amp.
        self.scaler = paddle.amp.GradScaler(enable=args.amp)
        net_loss = NetLoss(self.net, self.criterion, amp=args.amp)
        # Parameters may go unused in an iteration (the mask-IoU net trains only on
        # large enough masks), which DataParallel must be told to expect.
        self.net_loss = (paddle.DataParallel(net_loss, find_unused_parameters=True)
                         if world_size > 1 else net_loss)

        # The checkpoint --keep_latest deletes at the next save: the last one written or resumed from.
        self.last_checkpoint = None
        self.saved_iteration = None
        self.iteration = self._starting_point()

        self.rng = np.random.RandomState()
        train_set = COCODetection.from_config(cfg, SSDAugmentation.from_config(cfg, rng=self.rng), train=True)
        self.train_set = SeededSamples(train_set, self.rng, args.seed)
        self.epoch_size = len(train_set) // args.batch_size
        if self.epoch_size == 0:
            raise ValueError(f'{len(train_set)} training images are fewer than one batch of {args.batch_size}')
        self.sampler = ResumableBatchSampler(self.train_set, args.batch_size // world_size)
        self.loader = paddle.io.DataLoader(self.train_set, batch_sampler=self.sampler,
                                           num_workers=args.num_workers, collate_fn=detection_collate)
        self.epoch = self.iteration // self.epoch_size

        self.validation = args.validation_epoch > 0 and bool(cfg.dataset.valid_info)
        if self.validation and rank == 0:
            self.val_set = COCOEvalImages.from_config(cfg, BaseTransform.from_config(cfg))
            self.detect = Detect.from_config(cfg)
        self.log = (TrainingLogger(args.log_folder, cfg.max_iter, start_iter=self.iteration,
                                   log_interval=args.log_interval) if rank == 0 else None)

    def _starting_point(self):
        """Load the resume checkpoint or initialise the weights; the first iteration to run."""
        args, cfg = self.args, self.cfg
        resume = resolve_resume(args.resume, args.save_folder, cfg.name)
        if resume is not None:
            logger.info('resuming training from %s', resume)
            self.last_checkpoint = resume
            if resume.endswith('.pth'):
                # A checkpoint of the reference's own training: weights only.
                params, report = convert_checkpoint(resume, cfg)
                logger.info('%s', report.summary())
                checkpoint.load_weights(self.net, params)
                state, has_optimizer = None, False
            else:
                state, has_optimizer = checkpoint.load_checkpoint(resume, self.net, self.optimizer, self.scaler)
            if state is not None and state.get('config') != cfg.name:
                raise ValueError(f"{resume} was trained with config {state.get('config')}, not {cfg.name}")
            if state is not None and state.get('freeze_bn', cfg.freeze_bn) != cfg.freeze_bn:
                # The run keeps the BatchNorm rule it started with (see batch_norm_frozen).
                self.cfg = cfg = dataclasses.replace(cfg, freeze_bn=state['freeze_bn'])
                self.net.freeze_bn(cfg.freeze_bn)
                logger.info('BatchNorm %s, as in the run being resumed', 'frozen' if cfg.freeze_bn else 'trained')
            if not has_optimizer:
                logger.warning('%s has no optimizer state next to it: SGD momentum restarts from zero', resume)
            if args.start_iter >= 0:
                return args.start_iter
            if state is not None:
                return state['iteration']
            return checkpoint.SavePath.from_path(resume).iteration

        if args.trained_model is not None:
            self.net.init_weights()
            load_trained_model(self.net, args.trained_model, cfg)
        else:
            path = args.backbone_weights or default_backbone_weights(cfg, args.save_folder)
            if path.lower() == 'none':
                logger.info('no backbone weights: training from random initialisation')
                path = None
            elif not os.path.isfile(path):
                raise FileNotFoundError(
                    f'backbone weights {path} not found: convert the reference file {cfg.backbone.path} with '
                    f"tools/convert_weights.py --backbone, pass --backbone_weights, or 'none' to train from scratch")
            self.net.init_weights(backbone_path=path)
        return max(args.start_iter, 0)

    # ---------------------------------------------------------------- the loop --
    def run(self):
        """Train until cfg.max_iter. Returns 'done', or 'interrupted' after Ctrl+C (checkpoint saved)."""
        cfg, args = self.cfg, self.args
        logger.info('training %s on %s: %d images, %d iterations per epoch, iterations %d..%d',
                    cfg.name, cfg.dataset.name, len(self.train_set), self.epoch_size, self.iteration, cfg.max_iter)
        try:
            while self.iteration < cfg.max_iter:
                self._run_epoch()
                if self.iteration >= cfg.max_iter:
                    break
                if self.validation and self.epoch % args.validation_epoch == 0 and self.epoch > 0:
                    self.validate()
                self.epoch += 1
            # Saved before the final validation, which a failure must not cost the weights.
            self.save()
            if self.validation:
                self.validate()
        except KeyboardInterrupt:
            if self.rank == 0:
                logger.info('stopping early: saving an interrupt checkpoint')
                path = self.save(interrupt=True)
                checkpoint.remove_interrupts(self.args.save_folder, keep=path)
            return 'interrupted'
        finally:
            if self.log is not None:
                self.log.close()
        return 'done'

    def _run_epoch(self):
        """Iterations of the current epoch from self.iteration, up to its end or max_iter."""
        start_batch = self.iteration - self.epoch * self.epoch_size
        end = min((self.epoch + 1) * self.epoch_size, self.cfg.max_iter)
        self.train_set.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start_batch, end - self.epoch * self.epoch_size)
        last_time = time.perf_counter()
        for images, targets, masks, num_crowds in self.loader:
            lr = self.schedule.lr_at(self.iteration)
            losses = self.train_step(images, targets, masks, num_crowds, lr)
            now = time.perf_counter()
            if self.log is not None:
                self.log.log_iteration(self.epoch, self.iteration, losses, lr, now - last_time)
            last_time = now
            self.iteration += 1
            if self.iteration % self.args.save_interval == 0:
                self.save()
        if self.iteration < end:
            raise RuntimeError(f'the data loader ended at iteration {self.iteration}, before the end of '
                               f'epoch {self.epoch} ({end})')

    def train_step(self, images, targets, masks, num_crowds, lr):
        """One SGD update at ``lr``; returns {loss term: float}.

        Raises NonFiniteLossError (before any update) when the loss is NaN or infinite.
        """
        self.optimizer.set_lr(lr)
        # Mask sampling in the loss depends on (seed, iteration, rank) only,
        # so a resumed run draws what an uninterrupted one would have.
        self.criterion.rng = np.random.default_rng([self.args.seed, self.iteration, self.rank])
        losses = self.net_loss(images, targets, masks, num_crowds)
        loss = paddle.add_n(list(losses.values()))
        finite = paddle.isfinite(loss).astype('int32')
        if self.world_size > 1:
            # Every rank must stop together, or the others would wait forever in the next all-reduce.
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        values = {k: float(v) for k, v in losses.items()}
        if not int(finite):
            raise NonFiniteLossError(
                f'the loss is not finite at iteration {self.iteration} '
                f"({', '.join(f'{k} {v:.4g}' for k, v in values.items())}); training stopped without "
                f'saving. Resume from the last good checkpoint, e.g. with a lower --lr.')
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.clear_grad()
        return values

    # ------------------------------------------------------ checkpoints, eval --
    def save(self, interrupt=False):
        """Write the checkpoint of the current iteration (rank 0); returns its path."""
        if self.rank != 0:
            return None
        args, cfg = self.args, self.cfg
        path = checkpoint.SavePath(cfg.name, self.epoch, self.iteration, interrupt).path(args.save_folder)
        if self.saved_iteration == self.iteration and not interrupt:
            return path
        state = {'config': cfg.name, 'iteration': self.iteration, 'epoch': self.epoch,
                 'lr': self.schedule.lr_at(self.iteration), 'schedule': dataclasses.asdict(self.schedule),
                 'batch_size': args.batch_size, 'seed': args.seed, 'num_classes': cfg.num_classes,
                 'class_names': list(cfg.dataset.class_names), 'dataset': cfg.dataset.name,
                 'freeze_bn': cfg.freeze_bn}
        logger.info('saving %s', path)
        checkpoint.save_checkpoint(path, self.net, self.optimizer, state, self.scaler)
        self.saved_iteration = self.iteration
        previous, self.last_checkpoint = self.last_checkpoint, path
        # The reference's --keep_latest: drop the previous save unless it sits
        # at a multiple of --keep_latest_interval. Only after the new one is complete.
        if (args.keep_latest and not interrupt and previous is not None and os.path.abspath(previous) != os.path.abspath(path)
                and (args.keep_latest_interval <= 0
                     or self.iteration % args.keep_latest_interval != args.save_interval)):
            logger.info('deleting the previous checkpoint %s (--keep_latest)', previous)
            checkpoint.remove_checkpoint(previous)
        return path

    def validate(self):
        """COCO box and mask mAP on up to --validation_size validation images (rank 0; others wait).

        The table goes to the console and <log_folder>/eval_*.json, the numbers
        (in percent) to VisualDL as val/box_AP, val/mask_AP50, ...
        """
        if self.rank == 0:
            self.net.eval()
            try:
                summary = eval_script.evaluate(
                    self.net, self.detect, self.cfg, self.val_set,
                    results_dir=os.path.join(self.args.log_folder, 'validation'),
                    max_images=self.args.validation_size, num_workers=self.args.num_workers,
                    log_dir=self.args.log_folder, progress=False)
            finally:
                self.net.train()
            self.log.log_validation(self.iteration, {
                f'{prefix}_{metric}': 100 * value
                for iou_type, prefix in (('bbox', 'box'), ('segm', 'mask'))
                for metric, value in summary.results[iou_type].items()})
        if self.world_size > 1:
            dist.barrier()


def main(argv=None):
    """Run training; returns the process exit code (0 done, 1 non-finite loss, 130 interrupted)."""
    args = parse_args(argv)
    device = select_device(args.device)
    if args.amp and device == 'cpu':
        logger.warning('--amp needs a GPU: training in float32')
        args.amp = False
    world_size = dist.get_world_size()
    if world_size > 1:
        dist.init_parallel_env()
    rank = dist.get_rank()

    cfg = build_config(args, world_size)
    trainer = Trainer(args, cfg, rank, world_size)
    try:
        status = trainer.run()
    except NonFiniteLossError as err:
        logger.error('%s Last good checkpoint: %s', err, trainer.last_checkpoint or 'none saved by this run')
        return 1
    return 130 if status == 'interrupted' else 0


def configure_logging():
    """Console logging of a training process: one console for a multi-device run, the other ranks report only problems."""
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
                        format='%(asctime)s %(message)s', datefmt='%H:%M:%S', force=True)


if __name__ == '__main__':
    configure_logging()
    sys.exit(main())
