"""train.py and its helpers: configuration, short CPU training runs.

Checkpoint files are tested in test_checkpoint.py, the learning-rate schedule in test_lr_schedule.py.

The runs fine-tune the reference's seed-0 stand-in ``yolact_resnet50`` weights
(81 classes, converted) on a generated 4-class shapes dataset at a 128-pixel
input, with BatchNorm frozen (batch 2, the reference rule).
"""
import dataclasses
import json
import logging
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from visualdl import LogReader

import train
from data.config import CONFIGS, SHAPE_CLASSES, get_config
from data.samplers import ResumableBatchSampler
from tests.conftest import ROOT, make_weights_module, needs_reference, reference_params
from tools.make_shapes_dataset import make_shapes_dataset
from utils.training import checkpoint
from utils.weights.convert import save_params
from utils.errors import run_cli
from utils.training.lr_schedule import WarmupStepSchedule
from utils.weights.loader import init_for_finetuning
from utils.training.trainer import NetLoss, NonFiniteLossError, Trainer, build_optimizer
from yolact import Yolact

CONFIG = 'train_test_tiny'
SIDE = 128


@pytest.fixture(scope='module')
def tiny_config():
    """A yolact_resnet50 at a 128-pixel input, registered under CONFIG for --config."""
    cfg = dataclasses.replace(get_config('yolact_resnet50', max_size=SIDE, lr_warmup_until=5), name=CONFIG)
    CONFIGS[CONFIG] = cfg
    yield cfg
    del CONFIGS[CONFIG]


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """8 training images (4 iterations per epoch at batch 2) and 2 validation images."""
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=8, num_val=2, size=SIDE, seed=0)


@pytest.fixture(scope='module')
def coco_weights(tmp_path_factory):
    """The 81-class stand-in yolact_resnet50 weights, converted to .pdparams as a user would."""
    cfg = get_config('yolact_resnet50')
    params = reference_params(Yolact.from_config(cfg), cfg)
    path = str(tmp_path_factory.mktemp('weights') / 'yolact_resnet50_54_800000.pdparams')
    save_params(params, path)
    return path


def train_argv(shapes, tmp_path, *extra):
    return ['--config', CONFIG, '--batch_size', '2', '--no_autoscale', '--num_workers', '0',
            '--train_images', shapes.train_images, '--train_info', shapes.train_info,
            '--valid_images', shapes.valid_images, '--valid_info', shapes.valid_info,
            '--validation_epoch', '-1', '--save_folder', str(tmp_path / 'weights'),
            '--log_folder', str(tmp_path / 'logs'), '--log_interval', '1', *extra]


@pytest.fixture
def recorded_losses(monkeypatch):
    """{iteration: {term: value}} of every iteration trained during the test, as read from the device."""
    records = {}
    original = Trainer.record_losses

    def recording(self, iteration, values, *args):
        records[iteration] = values
        return original(self, iteration, values, *args)

    monkeypatch.setattr(Trainer, 'record_losses', recording)
    return records


def total(losses):
    return sum(losses.values())


# ------------------------------------------------------------- configuration --
def test_batch_size_scaling_and_frozen_bn(shapes):
    cfg = train.build_config(train.parse_args(['--config', 'yolact_base', '--batch_size', '2']), world_size=1)
    base = get_config('yolact_base')
    assert cfg.lr == pytest.approx(base.lr / 4)
    assert cfg.max_iter == base.max_iter * 4
    assert cfg.lr_steps == tuple(s * 4 for s in base.lr_steps)
    assert cfg.freeze_bn    # 2 images per device < 6

    cfg = train.build_config(train.parse_args(['--batch_size', '16', '--lr', '0.01', '--max_iter', '7']),
                             world_size=2)
    assert (cfg.lr, cfg.max_iter) == (0.01, 7)     # explicit flags win over the scaling
    assert cfg.freeze_bn is False                   # 8 per device

    cfg = train.build_config(train.parse_args(['--batch_size', '2', '--no_autoscale']), world_size=1)
    assert (cfg.lr, cfg.max_iter, cfg.lr_steps) == (base.lr, base.max_iter, base.lr_steps)


def test_short_schedules_scale_or_take_their_lr_steps(caplog):
    """--max_iter alone scales the config's steps (logged), the warm-up ending by the first; --lr_steps wins."""
    caplog.set_level(logging.INFO)
    base = get_config('yolact_base')     # 800k iterations, steps 280k..750k, warm-up 500
    cfg = train.build_config(train.parse_args(['--config', 'yolact_base', '--max_iter', '20000']), world_size=1)
    assert cfg.max_iter == 20000
    assert cfg.lr_steps == (7000, 15000, 17500, 18750) and cfg.lr_warmup_until == 500
    assert any('lr steps [280000, 600000, 700000, 750000] -> [7000, 15000, 17500, 18750], warm-up 500 -> 500'
               in r.getMessage() for r in caplog.records)
    schedule = WarmupStepSchedule.from_config(cfg)
    assert schedule.lr_at(6999) == base.lr and schedule.lr_at(19999) == pytest.approx(base.lr * 1e-4)

    # Batch scaling first (max_iter 3.2M at batch 2), then the steps follow --max_iter.
    cfg = train.build_config(train.parse_args(['--config', 'yolact_base', '--batch_size', '2',
                                               '--max_iter', '2000']), world_size=1)
    assert cfg.lr_steps == (700, 1500, 1750, 1875) and cfg.lr_warmup_until == 500

    # A warm-up reaching past the first step ends there, so that the step applies
    # (the reference lets the warm-up overwrite steps inside it).
    cfg = train.build_config(train.parse_args(['--config', 'yolact_base', '--max_iter', '1000']), world_size=1)
    assert cfg.lr_steps == (350, 750, 875, 937) and cfg.lr_warmup_until == 350
    schedule = WarmupStepSchedule.from_config(cfg)
    assert schedule.lr_at(349) < base.lr and schedule.lr_at(351) == pytest.approx(base.lr * 0.1)
    unfitted = dataclasses.replace(schedule, warmup_until=500)
    assert unfitted.lr_at(351) > 5 * base.lr * 0.1     # keeping the warm-up: the step is overwritten

    cfg = train.build_config(train.parse_args(['--config', 'yolact_base', '--max_iter', '2000',
                                               '--lr_steps', '1600,1200']), world_size=1)
    assert (cfg.max_iter, cfg.lr_steps, cfg.lr_warmup_until) == (2000, (1200, 1600), base.lr_warmup_until)
    cfg = train.build_config(train.parse_args(['--config', 'yolact_base', '--lr_steps', '5']), world_size=1)
    assert (cfg.max_iter, cfg.lr_steps) == (base.max_iter, (5,))
    for bad in ('a,b', '0', ''):
        with pytest.raises(SystemExit):
            train.parse_args(['--lr_steps', bad])
    with pytest.raises(SystemExit):
        train.parse_args(['--keep_best', '--validation_epoch', '-1'])


def _with_background_images(tmp_path, count=2):
    """A 2-image shapes set plus ``count`` images without annotations (noise, no shape) in its train file."""
    import cv2
    ds = make_shapes_dataset(str(tmp_path / 'shapes_bg'), num_train=2, num_val=0, size=SIDE, seed=3)
    with open(ds.train_info) as f:
        info = json.load(f)
    rng = np.random.RandomState(0)
    for i in range(count):
        name = f'background_{i}.jpg'
        cv2.imwrite(os.path.join(ds.train_images, name), rng.randint(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))
        info['images'].append({'id': 1000 + i, 'file_name': name, 'width': SIDE, 'height': SIDE})
    with open(ds.train_info, 'w') as f:
        json.dump(info, f)
    return ds


@needs_reference
def test_include_background_images_trains_on_images_without_objects(tiny_config, coco_weights, tmp_path,
                                                                       monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    ds = _with_background_images(tmp_path)
    objects_per_batch = []
    original = Trainer.train_step

    def recording(self, images, targets, masks, num_crowds, lr):
        objects_per_batch.append(sorted(len(t) for t in targets))
        row = original(self, images, targets, masks, num_crowds, lr)
        objects_per_batch[-1] = (objects_per_batch[-1], dict(zip(self.loss_names, row.numpy().tolist())))
        return row

    monkeypatch.setattr(Trainer, 'train_step', recording)
    argv = ['--config', CONFIG, '--batch_size', '2', '--no_autoscale', '--num_workers', '0',
            '--train_images', ds.train_images, '--train_info', ds.train_info, '--validation_epoch', '-1',
            '--trained_model', coco_weights, '--save_folder', str(tmp_path / 'w'), '--log_folder',
            str(tmp_path / 'logs'), '--lr', '1e-4']
    # Without the flag the reference's rule: the 2 background images are not listed (1 batch per epoch).
    trainer = Trainer(train.build_config(train.parse_args(argv), 1), train.train_options(train.parse_args(argv)))
    assert trainer.epoch_size == 1

    assert train.main(argv + ['--include_background_images', '--max_iter', '2', '--seed', '1']) == 0
    assert any('2 images without annotations as negatives' in r.getMessage() for r in caplog.records)
    counts = [c for c, _ in objects_per_batch]
    assert len(counts) == 2 and sum(c.count(0) for c in counts) == 2, counts
    for _, losses in objects_per_batch:
        assert all(np.isfinite(v) for v in losses.values()) and losses['loss_conf'] > 0, losses


def test_batch_norm_is_never_frozen_without_pretrained_weights(tiny_config, shapes, tmp_path):
    """Frozen BatchNorm at random initialisation (mean 0, variance 1) normalises nothing: a from-scratch
    run at 2 images per device trains BatchNorm on batch statistics instead; a resumed run keeps its rule."""
    scratch = train.parse_args(['--config', 'yolact_base', '--batch_size', '2', '--backbone_weights', 'none'])
    assert train.build_config(scratch, world_size=1).freeze_bn is False
    finetune = train.parse_args(['--config', 'yolact_base', '--batch_size', '2', '--trained_model', 'w.pdparams'])
    assert train.build_config(finetune, world_size=1).freeze_bn is True

    argv = train_argv(shapes, tmp_path, '--max_iter', '1', '--backbone_weights', 'none', '--lr', '1e-4')
    assert train.main(argv) == 0
    path = checkpoint.latest_checkpoint(str(tmp_path / 'weights'), CONFIG)
    with open(checkpoint.sidecar_paths(path)[1]) as f:
        assert json.load(f)['freeze_bn'] is False
    args = train.parse_args(train_argv(shapes, tmp_path, '--resume', path))
    trainer = Trainer(train.build_config(args, 1), train.train_options(args))
    assert trainer.cfg.freeze_bn is False
    batch_norms = [layer for layer in trainer.net.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)]
    assert batch_norms and all(layer.training and not layer.weight.stop_gradient for layer in batch_norms)


def test_custom_dataset_flags(shapes):
    args = train.parse_args(['--config', 'yolact_base', '--train_images', shapes.train_images,
                             '--train_info', shapes.train_info, '--valid_images', shapes.valid_images,
                             '--valid_info', shapes.valid_info])
    cfg = train.build_config(args, world_size=1)
    assert cfg.num_classes == len(SHAPE_CLASSES) + 1
    assert cfg.dataset.class_names == SHAPE_CLASSES
    assert cfg.dataset.label_map_dict() == {1: 1, 2: 2, 3: 3, 4: 4}
    assert cfg.dataset.valid_info == shapes.valid_info

    args.class_names = 'star, circle'
    cfg = train.build_config(args, world_size=1)
    assert cfg.num_classes == 3
    assert cfg.dataset.class_names == ('star', 'circle')
    assert cfg.dataset.label_map_dict() == {4: 1, 1: 2}

    args.class_names = 'circle,hexagon'
    with pytest.raises(ValueError, match='hexagon'):
        train.build_config(args, world_size=1)


def test_sampler_resumes_mid_epoch_and_splits_global_batches():
    data = list(range(20))
    full = list(ResumableBatchSampler(data, 4, num_replicas=1, rank=0))
    sampler = ResumableBatchSampler(data, 4, num_replicas=1, rank=0)
    sampler.set_epoch(0, start_batch=2)
    assert list(sampler) == full[2:]
    assert len(sampler) == len(full) - 2

    sampler.set_epoch(1)
    assert list(sampler) != full     # another shuffle each epoch

    # Two devices with 2 images each see the same global batches as one with 4.
    halves = []
    for rank in (0, 1):
        s = ResumableBatchSampler(data, 2, num_replicas=2, rank=rank)
        s.set_epoch(0, start_batch=1)
        halves.append(list(s))
    assert [a + b for a, b in zip(*halves)] == full[1:]

    # A window that ends early (max_iter inside the epoch).
    sampler.set_epoch(0, start_batch=1, end_batch=3)
    assert list(sampler) == full[1:3] and len(sampler) == 2


def test_many_epochs_leave_no_worker_processes_behind(tiny_config, shapes, tmp_path, monkeypatch):
    """Every epoch's DataLoader iterator must finish: an abandoned one keeps its workers alive,
    which over a small dataset's many epochs exhausted the machine's memory."""
    before = len(multiprocessing.active_children())
    # 8 images at batch 2: 4 iterations per epoch, so 10 iterations end inside epoch 2.
    argv = train_argv(shapes, tmp_path, '--max_iter', '10', '--save_interval', '1000', '--backbone_weights', 'none')
    argv[argv.index('--num_workers') + 1] = '1'
    steps = []
    # The data loading is under test, not the optimisation: the step only counts batches.
    # (Its result: no loss terms, finite.)
    monkeypatch.setattr(Trainer, 'train_step', lambda self, images, *rest: steps.append(images.shape) or paddle.ones([1]))
    assert train.main(argv) == 0
    assert len(steps) == 10 and all(shape == [2, 3, SIDE, SIDE] for shape in steps)
    assert len(multiprocessing.active_children()) == before


def test_optimizer_matches_torch_sgd():
    """Momentum SGD with weight decay on every parameter, step for step as the reference's torch.optim.SGD."""
    torch = pytest.importorskip('torch')
    cfg = get_config('yolact_base', lr=0.05, momentum=0.9, decay=5e-4)
    rs = np.random.RandomState(0)
    weight, bias = rs.randn(3, 4).astype(np.float32), rs.randn(3).astype(np.float32)
    xs = [rs.randn(5, 4).astype(np.float32) for _ in range(4)]

    net = paddle.nn.Linear(4, 3)
    net.weight.set_value(weight.T)
    net.bias.set_value(bias)
    optimizer = build_optimizer(net, cfg)
    t_weight = torch.tensor(weight, requires_grad=True)
    t_bias = torch.tensor(bias, requires_grad=True)
    t_optimizer = torch.optim.SGD([t_weight, t_bias], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.decay)
    for i, x in enumerate(xs):
        lr = cfg.lr * (0.1 if i == 3 else 1.0)    # a step change, set the way train.py sets it
        optimizer.set_lr(lr)
        for group in t_optimizer.param_groups:
            group['lr'] = lr
        net(paddle.to_tensor(x)).square().sum().backward()
        optimizer.step()
        optimizer.clear_grad()
        t_optimizer.zero_grad()
        (torch.tensor(x) @ t_weight.T + t_bias).square().sum().backward()
        t_optimizer.step()
        np.testing.assert_allclose(net.weight.numpy().T, t_weight.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net.bias.numpy(), t_bias.detach().numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ training --
@needs_reference
def test_fine_tuning_from_a_reference_pth(tiny_config, tmp_path):
    """A published-style .pth (81 classes) is converted on the fly; only the class-dependent tensors are skipped."""
    pytest.importorskip('torch')
    mw = make_weights_module()
    source = mw.make_state_dict(mw.load_manifest('yolact_resnet50'), 0)
    path = str(tmp_path / 'yolact_resnet50_54_800000.pth')
    mw.save_pth(source, path, legacy=True)

    cfg = dataclasses.replace(tiny_config, num_classes=len(SHAPE_CLASSES) + 1)
    net = Yolact.from_config(cfg)
    net.init_weights()
    fresh_conf = net.state_dict()['prediction_layers.0.conf_layer.weight'].numpy()
    skipped = init_for_finetuning(net, path, cfg)
    assert skipped == ['prediction_layers.0.conf_layer.bias', 'prediction_layers.0.conf_layer.weight',
                       'semantic_seg_conv.bias', 'semantic_seg_conv.weight']
    state = net.state_dict()
    np.testing.assert_array_equal(state['prediction_layers.0.conf_layer.weight'].numpy(), fresh_conf)
    np.testing.assert_array_equal(state['prediction_layers.0.mask_layer.weight'].numpy(),
                                  source['prediction_layers.0.mask_layer.weight'])
    np.testing.assert_array_equal(state['backbone.layers.0.0.bn1._mean'].numpy(),
                                  source['backbone.layers.0.0.bn1.running_mean'])


@needs_reference
def test_fine_tuning_lowers_the_loss(tiny_config, shapes, coco_weights, tmp_path, recorded_losses, caplog):
    """81-class weights fine-tuned on the 4 shape classes: skipped layers reported, loss going down.

    Also validates (mAP) after epoch 4 and at the end, and logs everything to VisualDL.
    """
    caplog.set_level(logging.INFO)
    iters = 32
    argv = train_argv(shapes, tmp_path, '--trained_model', coco_weights, '--max_iter', str(iters),
                      '--save_interval', '1000', '--keep_best')
    argv[argv.index('--validation_epoch') + 1] = '4'
    assert train.main(argv) == 0

    reinitialised = [r.getMessage() for r in caplog.records if 're-initialised' in r.getMessage()]
    assert len(reinitialised) == 1
    for key in ('prediction_layers.0.conf_layer.weight', 'prediction_layers.0.conf_layer.bias',
                'semantic_seg_conv.weight', 'semantic_seg_conv.bias'):
        assert key in reinitialised[0]
    assert 'mask_layer' not in reinitialised[0]

    totals = [total(recorded_losses[i]) for i in range(iters)]
    assert all(np.isfinite(totals))
    # Each window is two epochs (4 iterations each): both see every image twice.
    start, end = np.mean(totals[:8]), np.mean(totals[-8:])
    assert end < 0.9 * start, totals

    final = checkpoint.SavePath(CONFIG, 7, iters).path(str(tmp_path / 'weights'))
    record, _ = checkpoint.load_checkpoint(final, Yolact.from_config(
        dataclasses.replace(tiny_config, num_classes=len(SHAPE_CLASSES) + 1)))
    assert record.iteration == iters and record.class_names == SHAPE_CLASSES
    # Batch 2 per device: BatchNorm frozen (no statistics update, no gradient, no weight decay).
    trained, initial = paddle.load(final, return_numpy=True), paddle.load(coco_weights, return_numpy=True)
    for key in ('backbone.bn1.weight', 'backbone.bn1._mean', 'backbone.layers.3.2.bn3._variance'):
        np.testing.assert_array_equal(trained[key], initial[key])
    assert not np.array_equal(trained['backbone.conv1.weight'], initial['backbone.conv1.weight'])

    records = [os.path.join(tmp_path / 'logs', f) for f in os.listdir(tmp_path / 'logs') if f.startswith('vdlrecords')]
    assert len(records) == 1
    reader = LogReader(file_path=records[0])
    scalars = set(reader.get_tags()['scalar'])
    assert {'train/loss_box', 'train/loss_conf', 'train/loss_mask', 'train/loss_segm', 'train/loss_total',
            'train/lr', 'train/iter_time', 'val/box_AP', 'val/mask_AP'} <= scalars
    logged = {x.id: x.value for x in reader.get_data('scalar', 'train/loss_total')}
    assert sorted(logged) == list(range(iters))
    assert logged[iters - 1] == pytest.approx(totals[-1], rel=1e-6)
    assert [x.id for x in reader.get_data('scalar', 'val/mask_AP')] == [20, iters]
    eval_logs = sorted(f for f in os.listdir(tmp_path / 'logs') if f.startswith('eval_') and f.endswith('.json'))
    assert len(eval_logs) == 2

    # --keep_best: the weights of the validation with the best mask AP, with its numbers.
    mask_aps = [x.value / 100 for x in reader.get_data('scalar', 'val/mask_AP')]
    best = checkpoint.sidecar_paths(str(tmp_path / 'weights' / f'{CONFIG}_best.pdparams'))[1]
    with open(best) as f:
        best_state = json.load(f)
    assert best_state['mask_AP'] == pytest.approx(max(mask_aps), abs=1e-6)
    assert best_state['iteration'] == [20, iters][int(np.argmax(mask_aps))]
    if best_state['iteration'] == iters:
        best_weights = paddle.load(best[:-len('.json')] + '.pdparams', return_numpy=True)
        for key in ('backbone.conv1.weight', 'prediction_layers.0.conf_layer.weight'):
            np.testing.assert_array_equal(best_weights[key], trained[key])


@needs_reference
def test_interrupt_and_resume_match_an_uninterrupted_run(tiny_config, shapes, coco_weights, tmp_path,
                                                         recorded_losses, monkeypatch):
    """Ctrl+C at iteration 3, then --resume interrupt: iterations 3..5 (crossing an epoch) as if never stopped.

    The full random augmentation is on, as in real training.
    """
    common = ('--trained_model', coco_weights, '--max_iter', '6', '--save_interval', '1000')
    assert train.main(train_argv(shapes, tmp_path / 'straight', *common)) == 0
    straight = dict(recorded_losses)
    recorded_losses.clear()

    recording = Trainer.train_step

    def ctrl_c_at_3(self, *args):
        if self.iteration == 3:
            raise KeyboardInterrupt
        return recording(self, *args)

    monkeypatch.setattr(Trainer, 'train_step', ctrl_c_at_3)
    assert train.main(train_argv(shapes, tmp_path / 'split', *common)) == 130
    folder = tmp_path / 'split' / 'weights'
    assert sorted(os.listdir(folder)) == [f'{CONFIG}_0_3_interrupt.{ext}' for ext in ('json', 'pdopt', 'pdparams')]

    monkeypatch.setattr(Trainer, 'train_step', recording)
    recorded_losses.clear()
    # With worker processes this time: augmentation is seeded per sample, not per process.
    argv = train_argv(shapes, tmp_path / 'split', '--resume', 'interrupt', '--max_iter', '6', '--save_interval', '1000')
    argv[argv.index('--num_workers') + 1] = '2'
    assert train.main(argv) == 0
    assert sorted(recorded_losses) == [3, 4, 5]
    for i in (3, 4, 5):
        assert recorded_losses[i] == straight[i], i


@needs_reference
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_config, shapes, coco_weights, tmp_path,
                                                             monkeypatch, capsys):
    original = NetLoss.forward
    calls = []

    def nan_at_third_call(self, *args):
        losses = original(self, *args)
        calls.append(1)
        if len(calls) == 3:
            losses['loss_box'] = losses['loss_box'] * float('nan')
        return losses

    monkeypatch.setattr(NetLoss, 'forward', nan_at_third_call)
    argv = train_argv(shapes, tmp_path, '--trained_model', coco_weights, '--max_iter', '10',
                      '--save_interval', '1', '--keep_latest')
    assert run_cli(train.main, argv) == 1

    folder = str(tmp_path / 'weights')
    last_good = checkpoint.SavePath(CONFIG, 0, 2).path(folder)
    # --keep_latest removed the checkpoint at 1; nothing was saved after the NaN.
    assert sorted(os.listdir(folder)) == [f'{CONFIG}_0_2.{ext}' for ext in ('json', 'pdopt', 'pdparams')]
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert len(error) == 1
    assert 'not finite at iteration 2' in error[0] and 'loss_box nan' in error[0]
    assert last_good in error[0]
    with open(checkpoint.sidecar_paths(last_good)[1]) as f:
        assert json.load(f)['iteration'] == 2


def _device_trainer(shapes, tmp_path, *extra, backend='device'):
    args = train.parse_args(train_argv(shapes, tmp_path, *extra))
    return Trainer(train.build_config(args, 1), train.train_options(args), backend=backend)


class _NoHostCopies:
    """Patched over paddle.Tensor while a device-path train_step runs: every way to the host raises."""
    METHODS = ('numpy', 'item', 'tolist', '__float__', '__int__', '__bool__', '__index__', '__array__')

    def __init__(self, monkeypatch):
        self.monkeypatch, self.active = monkeypatch, False
        for name in self.METHODS:
            original = getattr(paddle.Tensor, name)
            monkeypatch.setattr(paddle.Tensor, name, self._guarded(name, original))

    def _guarded(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.active:
                raise AssertionError(f'Tensor.{name} in a device-path training step')
            return original(tensor, *args, **kwargs)
        return method


@needs_reference
def test_device_path_reads_the_losses_only_at_the_log_interval(tiny_config, shapes, coco_weights, tmp_path,
                                                               monkeypatch, recorded_losses):
    """The device path forced onto the CPU: no host copy inside a step, one per console line
    (and epoch end), and the losses the host path logs."""
    common = ('--trained_model', coco_weights, '--max_iter', '6', '--save_interval', '1000', '--lr', '1e-4')
    host = _device_trainer(shapes, tmp_path / 'host', *common, backend='host')
    assert host.run() == 'done'
    host_losses = dict(recorded_losses)
    recorded_losses.clear()

    trainer = _device_trainer(shapes, tmp_path / 'device', *common[:-2], '--lr', '1e-4', '--log_interval', '3')
    guard = _NoHostCopies(monkeypatch)
    step, read = Trainer.train_step, Trainer.read_losses
    reads = []

    def guarded_step(self, *args):
        guard.active = True
        try:
            return step(self, *args)
        finally:
            guard.active = False

    def counted_read(self):
        reads.append(len(self._pending))
        return read(self)

    monkeypatch.setattr(Trainer, 'train_step', guarded_step)
    monkeypatch.setattr(Trainer, 'read_losses', counted_read)
    assert trainer.run() == 'done'
    # 4 iterations per epoch: read at iteration 3 (console line), 4 (epoch end), 6 (console line).
    assert [n for n in reads if n] == [3, 1, 2]
    assert sorted(recorded_losses) == list(range(6))
    assert all(np.isfinite(list(v.values())).all() for v in recorded_losses.values())
    # The same weights and batch: the first iteration's terms are the host path's to float32 rounding.
    assert recorded_losses[0] == pytest.approx(host_losses[0], rel=1e-6)


@needs_reference
def test_device_path_non_finite_loss_stops_at_the_next_read_without_saving(tiny_config, shapes, coco_weights,
                                                                         tmp_path, monkeypatch):
    original = NetLoss.forward
    calls = []

    def nan_at_second_call(self, *args):
        losses = original(self, *args)
        calls.append(1)
        if len(calls) == 2:
            losses['loss_mask'] = losses['loss_mask'] * float('inf')
        return losses

    monkeypatch.setattr(NetLoss, 'forward', nan_at_second_call)
    trainer = _device_trainer(shapes, tmp_path, '--trained_model', coco_weights, '--max_iter', '10',
                              '--save_interval', '2', '--log_interval', '10')
    with pytest.raises(NonFiniteLossError, match='not finite at iteration 1 .*loss_mask inf'):
        trainer.run()
    # Read before the checkpoint of iteration 2 would have been written: none was.
    assert trainer.iteration == 2 and not list((tmp_path / 'weights').glob('*'))
    # The non-finite iteration updated with zero gradients: the weights stayed finite.
    assert all(np.isfinite(p.numpy()).all() for p in trainer.net.parameters())


def test_trainer_backend_is_validated(tiny_config, shapes, tmp_path):
    with pytest.raises(ValueError, match="backend 'gpu'"):
        _device_trainer(shapes, tmp_path, backend='gpu')


def test_cpu_threads_are_shared_among_the_local_processes(monkeypatch):
    """N data-parallel processes on one machine get cores / N threads each, not a thread per core each."""
    from utils.runtime import local_process_count
    monkeypatch.delenv('PADDLE_LOCAL_SIZE', raising=False)
    monkeypatch.delenv('PADDLE_TRAINERS_NUM', raising=False)
    assert local_process_count() == 1
    monkeypatch.setenv('PADDLE_TRAINERS_NUM', '2')      # paddle.distributed.spawn
    assert local_process_count() == 2
    monkeypatch.setenv('PADDLE_LOCAL_SIZE', '4')        # paddle.distributed.launch, per node
    monkeypatch.setenv('PADDLE_TRAINERS_NUM', '8')
    assert local_process_count() == 4


def test_resume_that_finds_nothing_is_a_run_without_resume(shapes, tmp_path, recorded_losses, caplog, without_cpu_ops):
    """--resume that finds no checkpoint starts a run exactly as one without --resume: BatchNorm is not frozen as
    if pretrained (from scratch that gives NaN within 8 iterations), and the losses are the same."""
    caplog.set_level(logging.WARNING)
    scratch = ['--config', 'yolact_base', '--batch_size', '2', '--backbone_weights', 'none',
               '--save_folder', str(tmp_path / 'empty')]
    for resume in ('interrupt', 'latest'):
        args = train.parse_args(scratch + ['--resume', resume])
        assert train.build_config(args, world_size=1).freeze_bn is False, resume

    def run(name, *extra):
        argv = train_argv(shapes, tmp_path / name, '--max_iter', '1', '--backbone_weights', 'none', *extra)
        argv[argv.index('--config') + 1] = 'yolact_shapes'
        assert train.main(argv) == 0

    run('plain')
    plain = dict(recorded_losses)
    recorded_losses.clear()
    run('resumed', '--resume', 'latest')
    assert recorded_losses == plain and sorted(plain) == [0]
    assert any('--resume latest: no such checkpoint' in r.getMessage() for r in caplog.records)
    for run_name in ('plain', 'resumed'):
        path = checkpoint.latest_checkpoint(str(tmp_path / run_name / 'weights'), 'yolact_shapes')
        with open(checkpoint.sidecar_paths(path)[1]) as f:
            assert json.load(f)['freeze_bn'] is False


# A training process as `python train.py` runs it, with Paddle's F.conv2d (no first-use op build in a short run).
TRAIN_PROCESS = '''
import sys
sys.path.insert(0, {root!r})
import utils.training.cpu_ops
utils.training.cpu_ops.load_ops = lambda: None
import train
train.configure_logging()
sys.exit(train.run_cli(train.main, sys.argv[1:]))
'''


def _pids_running(script):
    """Ids of the live processes whose command line names ``script`` (trainers and their DataLoader workers,
    whichever process group or session they are in)."""
    pids = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                cmdline = f.read()
            with open(f'/proc/{entry}/stat') as f:
                zombie = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
        except (OSError, IndexError):
            continue
        if str(script).encode() in cmdline and not zombie:
            pids.append(int(entry))
    return pids


def _assert_all_ended(script):
    """Wait up to 5 s for every process of ``script`` to end; kill (by id) and fail if one does not."""
    import signal
    import time
    for _ in range(50):
        if not _pids_running(script):
            return
        time.sleep(0.1)
    left = _pids_running(script)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    pytest.fail(f'processes of the training run still alive: {left}')


def _stderr_lines(process):
    """A queue receiving ``process``'s stderr lines (None at its end), read in a thread: never blocks the test."""
    import queue
    import threading
    lines = queue.Queue()

    def read():
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_sigterm_saves_an_interrupt_checkpoint_ends_the_workers_and_resumes(shapes, tmp_path, recorded_losses,
                                                                        without_cpu_ops):
    """SIGTERM (schedulers, docker stop, timeout, kill) stops train.py like an interrupt: exit 143, a complete
    interrupt checkpoint, no DataLoader worker left running, and --resume interrupt goes on from it."""
    import re
    import signal
    import time
    script = tmp_path / 'train_process.py'
    script.write_text(TRAIN_PROCESS.format(root=ROOT))
    argv = ['--config', 'yolact_shapes', '--batch_size', '2', '--no_autoscale', '--num_workers', '1',
            '--train_images', shapes.train_images, '--train_info', shapes.train_info, '--validation_epoch', '-1',
            '--save_folder', str(tmp_path / 'weights'), '--log_folder', str(tmp_path / 'logs'),
            '--log_interval', '1', '--backbone_weights', 'none', '--save_interval', '1000']
    process = subprocess.Popen([sys.executable, str(script), *argv, '--max_iter', '1000'], stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    lines, seen = _stderr_lines(process), []
    try:
        deadline = time.monotonic() + 600
        while not any(re.search(r'\]\s+1 \|\|', line) for line in seen[-1:]):
            line = lines.get(timeout=max(1, deadline - time.monotonic()))
            assert line is not None, ''.join(seen)
            seen.append(line)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 143, ''.join(seen)
        _assert_all_ended(script)      # no DataLoader worker outlives the trainer
    finally:
        for pid in _pids_running(script):
            os.kill(pid, signal.SIGKILL)
    while True:
        line = lines.get(timeout=10)
        if line is None:
            break
        seen.append(line)
    err = ''.join(seen)
    assert 'Traceback' not in err and 'FatalError' not in err, err
    interrupt = checkpoint.interrupt_checkpoint(str(tmp_path / 'weights'))
    assert interrupt is not None and checkpoint.is_complete(interrupt), err
    stopped_at = checkpoint.SavePath.from_path(interrupt).iteration
    assert stopped_at >= 2

    argv[argv.index('--num_workers') + 1] = '0'
    assert train.main([*argv, '--resume', 'interrupt', '--max_iter', str(stopped_at + 1)]) == 0
    assert sorted(recorded_losses) == [stopped_at]


def test_sigterm_to_paddle_distributed_launch_saves_an_interrupt_checkpoint(shapes, tmp_path):
    """The launcher forwards SIGTERM to each trainer's process group (again every 0.2 s, SIGKILL after 30 s):
    rank 0 saves the interrupt checkpoint, and no trainer or DataLoader worker outlives the launcher."""
    import re
    import signal
    import time
    script = tmp_path / 'train_process.py'
    script.write_text(TRAIN_PROCESS.format(root=ROOT))
    logs = tmp_path / 'launch'
    process = subprocess.Popen(
        [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir', str(logs),
         str(script), '--config', 'yolact_shapes', '--batch_size', '4', '--no_autoscale', '--num_workers', '1',
         '--train_images', shapes.train_images, '--train_info', shapes.train_info, '--validation_epoch', '-1',
         '--save_folder', str(tmp_path / 'weights'), '--log_folder', str(tmp_path / 'logs'), '--log_interval', '1',
         '--backbone_weights', 'none', '--save_interval', '1000', '--max_iter', '1000'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rank0 = logs / 'workerlog.0'
    try:
        deadline = time.monotonic() + 600
        while not (rank0.exists() and re.search(r'\]\s+1 \|\|', rank0.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, \
                rank0.read_text() if rank0.exists() else 'no log'
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        _assert_all_ended(script)      # the trainers (each in its own session) and their DataLoader workers
    finally:
        if process.poll() is None:
            process.kill()
        for pid in _pids_running(script):
            os.kill(pid, signal.SIGKILL)
    log = rank0.read_text()
    assert 'SIGTERM: stopping' in log and 'Traceback' not in log and 'FatalError' not in log, log
    interrupt = checkpoint.interrupt_checkpoint(str(tmp_path / 'weights'))
    assert interrupt is not None and checkpoint.is_complete(interrupt), log
