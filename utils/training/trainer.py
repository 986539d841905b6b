"""One training run: model, optimizer, data, schedule, checkpoints, validation and logging.

``Trainer(cfg, TrainOptions(...))`` is what train.py wires from its flags;
``run()`` trains to ``cfg.max_iter``, resumable at any iteration.
"""
import dataclasses
import logging
import os
import time
from typing import Optional

import numpy as np
import paddle
import paddle.distributed as dist

from data.coco import COCODetection, COCOEvalImages, check_batches, detection_collate
from data.images import DEFAULT_MAX_PIXELS
from data.samplers import ResumableBatchSampler, SeededSamples
from layers.backend import check_backend, use_device_path
from layers.modules.multibox_loss import MultiBoxLoss
from utils.training import checkpoint
from data.transforms import BaseTransform, SSDAugmentation
from utils.errors import ConfigError, DatasetError, MissingFileError, OutputError, Terminated, YolactError
from utils.evaluation.loop import evaluate
from utils.files import check_writable_folder
from utils.training.cpu_ops import use_cpu_training_convolutions
from utils.training.logger import TrainingLogger
from utils.training.lr_schedule import WarmupStepSchedule
from utils.weights.loader import WeightsFile, init_for_finetuning, load_backbone_weights
from utils.predictor import Predictor
from utils.runtime import dataloader_shared_memory, sigterm_as_interrupt, training_batch_bytes
from yolact import Yolact

logger = logging.getLogger(__name__)

# Below this many images per device, BatchNorm statistics are too noisy to
# train: the reference freezes BatchNorm.
MIN_BN_BATCH = 6


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The settings of a run that are not the model's config (train.py's flags of the same names).

    batch_size is the total over all devices. resume: a checkpoint path,
    'interrupt' or 'latest' (see utils.training.checkpoint.find_resume_checkpoint);
    start_iter -1 reads the iteration from it. trained_model: weights to
    fine-tune; backbone_weights: ImageNet weights ('none': random
    initialisation; None: <save_folder>/<the config's backbone file>). strict: stop at a bad
    annotation instead of skipping it (data.validation). shared_memory: 'auto', 'on' or 'off'
    (utils.runtime.dataloader_shared_memory). keep_best: keep the weights of the best
    validation mask AP as <save_folder>/<config>_best.pdparams. include_background_images:
    train on the images without annotations too (data.coco.COCODetection include_background).
    max_image_pixels: the pixel cap of every image read (data.images.read_image); larger images are skipped.
    """
    batch_size: int = 8
    num_workers: int = 4
    save_folder: str = 'weights/'
    log_folder: str = 'logs/'
    save_interval: int = 10000
    keep_latest: bool = False
    keep_latest_interval: int = 100000
    validation_size: int = 5000
    validation_epoch: int = 2
    log_interval: int = 10
    resume: Optional[str] = None
    start_iter: int = -1
    trained_model: Optional[str] = None
    backbone_weights: Optional[str] = None
    amp: bool = False
    seed: int = 0
    strict: bool = False
    shared_memory: str = 'auto'
    keep_best: bool = False
    include_background_images: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS


class NonFiniteLossError(YolactError):
    """The loss became NaN or infinite; training stopped without saving (usually: lr too high)."""


def batch_norm_frozen(cfg, opts, world_size):
    """The BatchNorm rule: frozen below MIN_BN_BATCH images per device, unless nothing is pretrained.

    Frozen BatchNorm normalises with the running statistics it was loaded
    with. Pretrained weights (backbone, YOLACT weights, a checkpoint to resume)
    bring real statistics; a network initialised at random has mean 0 and
    variance 1 everywhere, so freezing it would remove all normalisation and
    a deep ResNet's activations explode within a few iterations. From scratch,
    BatchNorm therefore always learns from batch statistics, noisy as they
    are for small batches. A --resume 'interrupt' or 'latest' that finds no
    checkpoint is a new run here too.
    """
    per_device = opts.batch_size // world_size
    pretrained = (resume_found(opts, cfg.name) or opts.trained_model is not None
                  or (opts.backbone_weights or default_backbone_weights(cfg, opts.save_folder)).lower() != 'none')
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




def resume_found(opts, model_name):
    """Whether ``opts.resume`` designates a checkpoint: a path, or an 'interrupt' / 'latest' one that exists."""
    if opts.resume is None:
        return False
    if opts.resume == 'interrupt':
        return checkpoint.interrupt_checkpoint(opts.save_folder) is not None
    if opts.resume == 'latest':
        return checkpoint.latest_checkpoint(opts.save_folder, model_name) is not None
    return True


def resolve_resume(opts, model_name):
    """``opts`` with ``resume`` replaced by the checkpoint it designates, or by None when 'interrupt' /
    'latest' finds none (warned): the run is then exactly a run without --resume."""
    return dataclasses.replace(opts, resume=checkpoint.find_resume_checkpoint(opts.resume, opts.save_folder,
                                                                              model_name))


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


def default_backbone_weights(cfg, save_folder):
    """<save_folder>/<the config's backbone file, as .pdparams>, where the reference looks for it.

    'none' for configs trained from scratch (no backbone file).
    """
    if not cfg.backbone.path:
        return 'none'
    stem = os.path.splitext(os.path.basename(cfg.backbone.path))[0]
    return os.path.join(save_folder, stem + checkpoint.WEIGHTS_EXT)


class Trainer:
    """One training run: model, optimizer, data, schedule, checkpoints and logging.

    Only rank 0 writes checkpoints and logs.

    ``backend`` ('auto', 'device', 'host') is where the loss and the step's
    bookkeeping run (layers.backend.use_device_path; 'auto': the device path
    on a GPU). On the host path the loss terms are read every iteration; on
    the device path nothing is copied to the host between the loss logging
    intervals: the terms and the finite flag of each iteration stay on the
    device until the next console line, checkpoint or epoch end reads them
    all at once (tests force it onto the CPU).
    """

    def __init__(self, cfg, opts, rank=0, world_size=1, backend='auto'):
        check_backend(backend)
        self.opts, self.cfg = opts, cfg
        self.rank, self.world_size = rank, world_size
        if rank == 0:
            # Before any work: an unwritable folder found at the first save would cost the training up to it.
            check_writable_folder(opts.save_folder, 'checkpoints (--save_folder)')
            check_writable_folder(opts.log_folder, 'training logs (--log_folder)')
        self.backend = backend
        paddle.seed(opts.seed)
        self.schedule = WarmupStepSchedule.from_config(cfg)
        self.net = Yolact.from_config(cfg)
        # Its convolutions through oneDNN's while training on the CPU (F.conv2d elsewhere).
        use_cpu_training_convolutions(self.net)
        self.net.train()
        if cfg.freeze_bn:
            self.net.freeze_bn(True)
        self.criterion = MultiBoxLoss.from_config(cfg, backend=backend)
        self.optimizer = build_optimizer(self.net, cfg)
        # Inactive (a pass-through) without --amp.
        self.scaler = paddle.amp.GradScaler(enable=opts.amp)
        net_loss = NetLoss(self.net, self.criterion, amp=opts.amp)
        # Parameters may go unused in an iteration (the mask-IoU net trains only on
        # large enough masks), which DataParallel must be told to expect.
        self.net_loss = (paddle.DataParallel(net_loss, find_unused_parameters=True)
                         if world_size > 1 else net_loss)

        # Which checkpoints are kept (--keep_latest, --keep_best, interrupts).
        self.keep = checkpoint.CheckpointPolicy.from_options(opts, cfg.name)
        # The checkpoint --keep_latest deletes at the next save: the last one written or resumed from.
        self.last_checkpoint = None
        self.saved_iteration = None
        self.iteration = self._starting_point()
        # (iteration, loss row on the device, lr, wall time) of the iterations not yet read (read_losses).
        self._pending = []
        self.loss_names = ()

        self.rng = np.random.RandomState()
        train_set = COCODetection.from_config(cfg, SSDAugmentation.from_config(cfg, rng=self.rng),
                                              strict=opts.strict, include_background=opts.include_background_images,
                                              max_pixels=opts.max_image_pixels)
        if opts.include_background_images:
            negatives = sum(1 for i in train_set.ids if not train_set.coco.imgToAnns.get(i))
            logger.info('training on %d images without annotations as negatives (--include_background_images)',
                        negatives)
        self.train_set = SeededSamples(train_set, self.rng, opts.seed)
        self.epoch_size = len(train_set) // opts.batch_size
        if self.epoch_size == 0:
            raise DatasetError(f'{cfg.dataset.train_info}: {len(train_set)} usable training images are fewer '
                               f'than one batch of {opts.batch_size} (--batch_size)')
        self.sampler = ResumableBatchSampler(self.train_set, opts.batch_size // world_size)
        batch_bytes = training_batch_bytes(cfg.max_size, opts.batch_size // world_size)
        self.loader = paddle.io.DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=opts.num_workers, collate_fn=detection_collate,
            use_shared_memory=dataloader_shared_memory(opts.num_workers, batch_bytes, opts.shared_memory))
        self.epoch = self.iteration // self.epoch_size

        self.validation = opts.validation_epoch > 0 and bool(cfg.dataset.valid_info)
        if self.validation and rank == 0:
            self.val_set = COCOEvalImages.from_config(cfg, BaseTransform.from_config(cfg), strict=opts.strict,
                                                      max_pixels=opts.max_image_pixels)
            self.predictor = Predictor.from_network(cfg, self.net)
        self.best_path = self.keep.best_path
        self.best_mask_ap = self.keep.recorded_best(opts.resume is not None) if opts.keep_best else None
        self.log = (TrainingLogger(opts.log_folder, cfg.max_iter, start_iter=self.iteration,
                                   log_interval=opts.log_interval) if rank == 0 else None)

    def _starting_point(self):
        """Load the resume checkpoint or initialise the weights; the first iteration to run."""
        opts, cfg = self.opts, self.cfg
        resume = checkpoint.find_resume_checkpoint(opts.resume, opts.save_folder, cfg.name)
        if resume is not None:
            logger.info('resuming training from %s', resume)
            self.last_checkpoint = resume
            if resume.endswith('.pth'):
                # A checkpoint of the reference's own training: weights only.
                WeightsFile(resume).load_into(self.net, cfg)
                record, has_optimizer = None, False
            else:
                record, has_optimizer = checkpoint.load_checkpoint(resume, self.net, self.optimizer, self.scaler)
            if record is not None and record.config != cfg.name:
                raise ConfigError(f"{resume} was trained with config {record.config}, not {cfg.name}: "
                                  f"resume with --config {record.config}")
            if record is not None and record.freeze_bn is not None and record.freeze_bn != cfg.freeze_bn:
                # The run keeps the BatchNorm rule it started with (see batch_norm_frozen).
                self.cfg = cfg = dataclasses.replace(cfg, freeze_bn=record.freeze_bn)
                self.net.freeze_bn(cfg.freeze_bn)
                logger.info('BatchNorm %s, as in the run being resumed', 'frozen' if cfg.freeze_bn else 'trained')
            if not has_optimizer:
                logger.warning('%s has no optimizer state next to it: SGD momentum restarts from zero', resume)
            if opts.start_iter >= 0:
                return opts.start_iter
            if record is not None and record.iteration is not None:
                return record.iteration
            return checkpoint.SavePath.from_path(resume).iteration

        if opts.trained_model is not None:
            self.net.init_weights()
            init_for_finetuning(self.net, opts.trained_model, cfg)
        else:
            self.net.init_weights()
            path = opts.backbone_weights or default_backbone_weights(cfg, opts.save_folder)
            if path.lower() == 'none':
                logger.info('no backbone weights: training from random initialisation')
            elif not os.path.isfile(path):
                raise MissingFileError(
                    f'backbone weights {path} not found: convert the reference file {cfg.backbone.path} with '
                    f"tools/convert_weights.py --backbone, pass --backbone_weights, or 'none' to train from scratch")
            else:
                load_backbone_weights(self.net.backbone, path)
        return max(opts.start_iter, 0)

    # ---------------------------------------------------------------- the loop --
    def run(self):
        """Train until cfg.max_iter. Returns 'done', or 'interrupted' after Ctrl+C, 'terminated' after SIGTERM
        (utils.runtime.sigterm_as_interrupt), both with an interrupt checkpoint saved."""
        cfg = self.cfg
        logger.info('training %s on %s: %d images, %d iterations per epoch, iterations %d..%d',
                    cfg.name, cfg.dataset.name, len(self.train_set), self.epoch_size, self.iteration, cfg.max_iter)
        with sigterm_as_interrupt():
            return self._run()

    def _run(self):
        cfg, opts = self.cfg, self.opts
        try:
            while self.iteration < cfg.max_iter:
                self._run_epoch()
                if self.iteration >= cfg.max_iter:
                    break
                if self.validation and self.epoch % opts.validation_epoch == 0 and self.epoch > 0:
                    self.validate()
                self.epoch += 1
            # Saved before the final validation, which a failure must not cost the weights.
            self.save()
            if self.validation:
                self.validate()
        except KeyboardInterrupt as stop:
            # The DataLoader's iterator (and its workers) ends with the loop's frames, already unwound.
            self.read_losses()
            if self.rank == 0:
                logger.info('stopping early: saving an interrupt checkpoint')
                self.save(interrupt=True)
            return 'terminated' if isinstance(stop, Terminated) else 'interrupted'
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
        for images, targets, masks, num_crowds in check_batches(self.loader):
            lr = self.schedule.lr_at(self.iteration)
            row = self.train_step(images, targets, masks, num_crowds, lr)
            now = time.perf_counter()
            self._pending.append((self.iteration, row, lr, now - last_time))
            last_time = now
            self.iteration += 1
            save = self.iteration % self.opts.save_interval == 0
            if save or self.iteration % self.opts.log_interval == 0 or not use_device_path(row, self.backend):
                self.read_losses()
            if save:
                self.save()
        self.read_losses()
        if self.iteration < end:
            raise RuntimeError(f'the data loader ended at iteration {self.iteration}, before the end of '
                               f'epoch {self.epoch} ({end})')

    def train_step(self, images, targets, masks, num_crowds, lr):
        """One SGD update at ``lr``; returns the [T + 1] float32 device tensor of the T loss
        terms (in self.loss_names order) and the finite flag (1 or 0), for read_losses.

        On the host path a NaN or infinite loss (on any rank) raises
        NonFiniteLossError before the update. On the device path nothing here
        waits for the device: such an iteration updates with zero gradients, so
        the weights stay finite until read_losses stops the run.
        """
        self.optimizer.set_lr(lr)
        # Mask sampling in the loss depends on (seed, iteration, rank) only,
        # so a resumed run draws what an uninterrupted one would have.
        self.criterion.rng = np.random.default_rng([self.opts.seed, self.iteration, self.rank])
        losses = self.net_loss(images, targets, masks, num_crowds)
        self.loss_names = tuple(losses)
        loss = paddle.add_n(list(losses.values()))
        finite = paddle.isfinite(loss).astype('int32')
        if self.world_size > 1:
            # Every rank must stop together, or the others would wait forever in the next all-reduce.
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        row = paddle.concat([paddle.stack(list(losses.values())).astype('float32'),
                             finite.astype('float32').reshape([1])])
        on_device = use_device_path(row, self.backend)
        if not on_device:
            # On the host the flag costs nothing to read: stop before the update.
            host = row.numpy()
            if not host[-1]:
                raise self._non_finite(self.iteration, host)
        self.scaler.scale(loss).backward()
        if on_device:
            keep = finite.astype('bool')
            for param in self.net_loss.parameters():
                if param.grad is not None:
                    # where, not a product: NaN * 0 is NaN.
                    param.grad.set_value(paddle.where(keep, param.grad, paddle.zeros_like(param.grad)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.clear_grad()
        return row

    def read_losses(self):
        """Copy the pending iterations' loss terms to the host in one transfer and log them.

        Raises NonFiniteLossError naming the first iteration whose loss was
        NaN or infinite; nothing is saved after it.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = paddle.stack([row for _, row, _, _ in pending]).numpy()
        for (iteration, _, lr, elapsed), row in zip(pending, rows):
            if not row[-1]:
                raise self._non_finite(iteration, row)
            self.record_losses(iteration, dict(zip(self.loss_names, row[:-1].tolist())), lr, elapsed)

    def _non_finite(self, iteration, row):
        """The NonFiniteLossError of ``iteration`` whose terms (and flag) are the host array ``row``."""
        terms = ', '.join(f'{k} {v:.4g}' for k, v in zip(self.loss_names, row[:-1].tolist()))
        return NonFiniteLossError(
            f'the loss is not finite at iteration {iteration} ({terms}); training stopped without '
            f'saving. Resume from the last good checkpoint, e.g. with a lower --lr.')

    def record_losses(self, iteration, values, lr, elapsed):
        """One finished iteration's {loss term: float}, its lr and wall time, to the log (rank 0)."""
        if self.log is not None:
            self.log.log_iteration(self.epoch, iteration, values, lr, elapsed)

    # ------------------------------------------------------ checkpoints, eval --
    def _state(self):
        """The checkpoint record (CheckpointRecord) of the current iteration."""
        cfg, opts = self.cfg, self.opts
        return checkpoint.CheckpointRecord(
            config=cfg.name, iteration=self.iteration, epoch=self.epoch, lr=self.schedule.lr_at(self.iteration),
            schedule=dataclasses.asdict(self.schedule), batch_size=opts.batch_size, seed=opts.seed,
            num_classes=cfg.num_classes, class_names=tuple(cfg.dataset.class_names), dataset=cfg.dataset.name,
            freeze_bn=cfg.freeze_bn)

    def save(self, interrupt=False):
        """Write the checkpoint of the current iteration (rank 0); returns its path."""
        if self.rank != 0:
            return None
        path = self.keep.path(self.epoch, self.iteration, interrupt)
        if self.saved_iteration == self.iteration and not interrupt:
            return path
        record = self._state()
        logger.info('saving %s', path)
        try:
            checkpoint.save_checkpoint(path, self.net, self.optimizer, record, self.scaler)
        except OutputError as err:
            raise OutputError(f'{err}; kept: {self.last_checkpoint or "no earlier checkpoint of this run"}') from err
        self.saved_iteration = self.iteration
        previous, self.last_checkpoint = self.last_checkpoint, path
        self.keep.saved(path, previous, interrupt)
        return path

    def validate(self):
        """COCO box and mask mAP on up to --validation_size validation images (rank 0; others wait).

        The table goes to the console and <log_folder>/eval_*.json, the numbers
        (in percent) to VisualDL as val/box_AP, val/mask_AP50, ...
        """
        if self.rank == 0:
            self.net.eval()
            try:
                summary = evaluate(
                    self.predictor, self.val_set,
                    results_dir=os.path.join(self.opts.log_folder, 'validation'),
                    max_images=self.opts.validation_size, num_workers=self.opts.num_workers,
                    shared_memory=self.opts.shared_memory,
                    log_dir=self.opts.log_folder, progress=False)
            finally:
                self.net.train()
            self.log.log_validation(self.iteration, {
                f'{prefix}_{metric}': 100 * value
                for iou_type, prefix in (('bbox', 'box'), ('segm', 'mask'))
                for metric, value in summary.results[iou_type].items()})
            if self.opts.keep_best:
                self._keep_if_best(summary.results)
        if self.world_size > 1:
            dist.barrier()

    def _keep_if_best(self, results):
        """Save the weights as the best checkpoint when this validation's mask AP beats the best so far."""
        mask_ap = results['segm']['AP']
        if not self.keep.is_better(mask_ap, self.best_mask_ap):
            logger.info('mask AP %.2f is not above the best %.2f: %s kept', 100 * mask_ap,
                        100 * self.best_mask_ap, self.best_path)
            return
        record = dataclasses.replace(self._state(), mask_AP=mask_ap, box_AP=results['bbox']['AP'])
        checkpoint.save_checkpoint(self.best_path, self.net, None, record)
        logger.info('best mask AP so far, %.2f at iteration %d (previous best %s): saved %s', 100 * mask_ap,
                    self.iteration, f'{100 * self.best_mask_ap:.2f}' if self.best_mask_ap >= 0 else 'none',
                    self.best_path)
        self.best_mask_ap = mask_ap
