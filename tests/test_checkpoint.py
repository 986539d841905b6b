"""Checkpoints (utils/training/checkpoint.py): names, the record, whole saves, the keep rules, resuming the optimizer.

A checkpoint is ``<stem>.pdparams`` + ``<stem>.pdopt`` + ``<stem>.json``; it appears
whole or not at all, and the CheckpointPolicy decides which ones a run keeps.
Reading weights (utils/weights/loader.py) is tested here where it reads a checkpoint.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest

import train
from data.config import SHAPE_CLASSES, get_config
from tests.conftest import ROOT
from utils import files
from utils.errors import OutputError, WeightsError
from utils.training import checkpoint
from utils.training.lr_schedule import WarmupStepSchedule
from utils.training.trainer import Trainer
from utils.predictor import Predictor
from utils.weights import loader
from utils.weights.loader import resolve_config
from yolact import Yolact


def small_net_and_optimizer():
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Conv2D(4, 2, 1))
    optimizer = paddle.optimizer.Momentum(0.1, 0.9, parameters=net.parameters(), weight_decay=5e-4)
    x = paddle.to_tensor(np.random.RandomState(0).randn(2, 3, 8, 8).astype(np.float32))

    def step():
        loss = net(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)
    return net, optimizer, step


def _bare_trainer(tmp_path, **options):
    """A Trainer with a small net and optimizer, for its checkpoint logic alone."""
    trainer = Trainer.__new__(Trainer)
    trainer.net, trainer.optimizer, step = small_net_and_optimizer()
    step()
    trainer.opts = dataclasses.replace(train.train_options(train.parse_args([])),
                                       save_folder=str(tmp_path), **options)
    trainer.cfg = get_config('yolact_shapes')
    trainer.schedule = WarmupStepSchedule.from_config(trainer.cfg)
    trainer.scaler = paddle.amp.GradScaler(enable=False)
    trainer.rank, trainer.epoch, trainer.iteration = 0, 0, 0
    trainer.last_checkpoint = trainer.saved_iteration = None
    trainer.keep = checkpoint.CheckpointPolicy.from_options(trainer.opts, trainer.cfg.name)
    trainer.best_path = trainer.keep.best_path
    trainer.best_mask_ap = -1.0
    return trainer


@pytest.mark.parametrize('save_interval, keep_interval', [(10, 30), (10, 10), (15, 10), (20, 10), (25, 0)])
def test_keep_latest_keeps_the_checkpoints_at_multiples_of_the_interval(tmp_path, save_interval, keep_interval):
    """--keep_latest deletes a checkpoint unless its own iteration is a multiple of --keep_latest_interval.

    Each checkpoint's own iteration is tested, not the newest one's iteration against save_interval: with
    save_interval >= keep_latest_interval that would delete every checkpoint to keep.
    """
    trainer = _bare_trainer(tmp_path, keep_latest=True, save_interval=save_interval,
                            keep_latest_interval=keep_interval)
    saved = []
    for iteration in range(save_interval, 6 * save_interval + 1, save_interval):
        trainer.iteration = iteration
        saved.append(trainer.save())
        present = {checkpoint.SavePath.from_path(p).iteration for p in checkpoint.checkpoints_in(str(tmp_path))}
        kept = {s for s in range(save_interval, iteration, save_interval) if keep_interval and s % keep_interval == 0}
        assert present == kept | {iteration}, (iteration, present)
    assert all(checkpoint.is_complete(p) for p in saved if checkpoint.SavePath.from_path(p).iteration in present)


def test_keep_latest_never_deletes_a_file_it_did_not_name(tmp_path):
    """The weights a run resumed from under another name (a .pth, a renamed file) stay."""
    trainer = _bare_trainer(tmp_path, keep_latest=True, save_interval=10, keep_latest_interval=0)
    resumed = str(tmp_path / 'my_best_weights.pdparams')
    checkpoint.save_checkpoint(resumed, trainer.net, trainer.optimizer, checkpoint.CheckpointRecord(iteration=5))
    trainer.last_checkpoint, trainer.iteration = resumed, 10
    trainer.save()
    assert checkpoint.is_complete(resumed)


def test_keep_best_keeps_the_weights_of_the_best_mask_ap(tmp_path):
    trainer = _bare_trainer(tmp_path, keep_best=True)
    weights = {}
    for iteration, mask_ap in ((4, 0.20), (8, 0.10), (12, 0.30), (16, 0.30)):
        trainer.iteration = iteration
        for p in trainer.net.parameters():
            p.set_value(p.numpy() + 1.0)
        weights[iteration] = {k: v.numpy().copy() for k, v in trainer.net.state_dict().items()}
        trainer._keep_if_best({'segm': {'AP': mask_ap}, 'bbox': {'AP': mask_ap / 2}})
        with open(checkpoint.sidecar_paths(trainer.best_path)[1]) as f:
            state = json.load(f)
        best = {4: 4, 8: 4, 12: 12, 16: 12}[iteration]       # a tie keeps the earlier one
        assert (state['iteration'], state['mask_AP']) == (best, {4: 0.2, 12: 0.3}[best])
        stored = paddle.load(trainer.best_path, return_numpy=True)
        for key, value in weights[best].items():
            np.testing.assert_array_equal(stored[key], value)
    assert state['config'] == 'yolact_shapes' and state['class_names'] == list(SHAPE_CLASSES)
    # The best checkpoint is not a checkpoint of the run: --resume latest never picks it.
    assert checkpoint.latest_checkpoint(str(tmp_path), 'yolact_shapes') is None
    # A resumed run continues from the recorded best; a new run starts over.
    assert trainer.keep.recorded_best(resuming=True) == 0.3
    assert trainer.keep.recorded_best(resuming=False) == -1.0


def test_save_path_names():
    assert checkpoint.SavePath('yolact_base', 3, 1200).path('w') == os.path.join('w', 'yolact_base_3_1200.pdparams')
    assert checkpoint.SavePath.from_path('w/yolact_plus_resnet50_12_3000_interrupt.pdparams') == \
        checkpoint.SavePath('yolact_plus_resnet50', 12, 3000, interrupt=True)
    assert checkpoint.SavePath.from_path('yolact_base_54_800000.pth').iteration == 800000
    with pytest.raises(ValueError):
        checkpoint.SavePath.from_path('resnet101_reducedfc.pdparams')


def test_optimizer_state_survives_new_parameter_names(tmp_path):
    """Momentum restored into a network built later in the process (other automatic tensor names)."""
    paddle.seed(0)
    net, optimizer, step = small_net_and_optimizer()
    for _ in range(3):
        step()
    path = checkpoint.SavePath('m', 0, 3).path(str(tmp_path))
    checkpoint.save_checkpoint(path, net, optimizer, checkpoint.CheckpointRecord(iteration=3))
    expected = [step() for _ in range(3)]

    net2, optimizer2, step2 = small_net_and_optimizer()
    assert [p.name for p in net2.parameters()] != [p.name for p in net.parameters()]
    record, has_optimizer = checkpoint.load_checkpoint(path, net2, optimizer2)
    assert record == checkpoint.CheckpointRecord(iteration=3) and has_optimizer
    assert [step2() for _ in range(3)] == expected


def test_checkpoint_record_round_trip_and_malformed_records(tmp_path):
    record = loader.CheckpointRecord(config='yolact_shapes', iteration=7, epoch=1, class_names=('a', 'b'),
                                     schedule={'warmup_iters': 3}, freeze_bn=False)
    weights = str(tmp_path / 'yolact_shapes_1_7.pdparams')
    with open(loader.sidecar_paths(weights)[1], 'w') as f:
        f.write(record.to_json())
    assert loader.read_record(weights) == record
    assert loader.read_record(str(tmp_path / 'none_0_0.pdparams')) is None
    for text, message in (('[1, 2]', 'holds a list, not a JSON object'), ('{"iteration": "7"}', '"iteration" is a str'),
                          ('{not json', 'not valid JSON')):
        with open(loader.sidecar_paths(weights)[1], 'w') as f:
            f.write(text)
        with pytest.raises(WeightsError, match=message):
            loader.read_record(weights)




# -------------------------------------------------------------- whole saves --
def _listing(folder):
    return sorted(os.listdir(folder))


def _saved_good(folder):
    """A checkpoint m_0_3 of a stepped net; returns (net, optimizer, step, its path, its weights)."""
    net, optimizer, step = small_net_and_optimizer()
    step()
    good = checkpoint.SavePath('m', 0, 3).path(folder)
    checkpoint.save_checkpoint(good, net, optimizer, loader.CheckpointRecord(iteration=3))
    return net, optimizer, step, good, {k: v.numpy() for k, v in net.state_dict().items()}


def _assert_loads_as(path, weights, iteration):
    fresh, fresh_optimizer, _ = small_net_and_optimizer()
    assert checkpoint.load_checkpoint(path, fresh, fresh_optimizer) == (loader.CheckpointRecord(iteration=iteration),
                                                                       True)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights[key])


@pytest.mark.parametrize('failing_write', [1, 2, 3], ids=['weights', 'optimizer', 'record'])
def test_a_failed_save_leaves_nothing_under_its_names(tmp_path, monkeypatch, failing_write):
    """Disk full while writing any of the three files: none of them appears, the error says so in one line,
    and the previous checkpoint stays the latest, whole."""
    folder = str(tmp_path)
    net, optimizer, step, good, saved = _saved_good(folder)
    step()
    writes = []
    original = files._write_all

    def disk_full_at_one_write(f, data):
        writes.append(f.name)
        if len(writes) == failing_write:
            f.write(data[:len(data) // 2])
            raise OSError(28, 'No space left on device')
        return original(f, data)

    monkeypatch.setattr(files, '_write_all', disk_full_at_one_write)
    bad = checkpoint.SavePath('m', 0, 6).path(folder)
    with pytest.raises(OutputError) as info:
        checkpoint.save_checkpoint(bad, net, optimizer, loader.CheckpointRecord(iteration=6))
    message = str(info.value)
    assert '\n' not in message
    assert message == f'cannot save checkpoint {bad}: No space left on device; none of its files were written'
    assert _listing(folder) == ['m_0_3.json', 'm_0_3.pdopt', 'm_0_3.pdparams']
    assert checkpoint.latest_checkpoint(folder, 'm') == good
    _assert_loads_as(good, saved, 3)


def test_a_failed_rename_puts_back_the_checkpoint_it_was_replacing(tmp_path, monkeypatch):
    """Saving over a checkpoint of the same name (the --keep_best file, an interrupt at the same iteration):
    when the last step fails, the final names hold the old checkpoint again, whole."""
    folder = str(tmp_path)
    net, optimizer, step, good, saved = _saved_good(folder)
    step()
    record_path = loader.sidecar_paths(good)[1]
    original, failed = os.replace, []

    def failing_record_rename(src, dst):
        if dst == record_path and not failed:
            if os.path.dirname(src) != os.path.dirname(dst):    # putting the new record in place
                failed.append(src)
                raise OSError(5, 'Input/output error')
        return original(src, dst)

    monkeypatch.setattr(os, 'replace', failing_record_rename)
    with pytest.raises(OutputError, match='Input/output error; none of its files were written'):
        checkpoint.save_checkpoint(good, net, optimizer, loader.CheckpointRecord(iteration=6))
    monkeypatch.undo()
    assert failed and _listing(folder) == ['m_0_3.json', 'm_0_3.pdopt', 'm_0_3.pdparams']
    _assert_loads_as(good, saved, 3)


def test_a_checkpoint_saved_again_replaces_all_its_files(tmp_path):
    """A weights-only save over a checkpoint with an optimizer state leaves no stale .pdopt beside it."""
    folder = str(tmp_path)
    net, _, step, good, _ = _saved_good(folder)
    step()
    checkpoint.save_checkpoint(good, net, None, loader.CheckpointRecord(iteration=4))
    assert _listing(folder) == ['m_0_3.json', 'm_0_3.pdparams']
    assert loader.read_record(good) == loader.CheckpointRecord(iteration=4)


@pytest.mark.parametrize('die_in', ['write', 'rename'])
def test_a_killed_save_never_shows_an_incomplete_checkpoint(tmp_path, die_in):
    """A process killed while writing the files, or between putting them in place, leaves the previous
    checkpoint the latest, intact; only a hidden staging folder stays behind."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from tests.test_checkpoint import small_net_and_optimizer
        from utils import files
        from utils.training import checkpoint
        from utils.weights.loader import CheckpointRecord
        net, optimizer, step = small_net_and_optimizer()
        checkpoint.save_checkpoint(checkpoint.SavePath('m', 0, 3).path({str(tmp_path)!r}), net, optimizer,
                                   CheckpointRecord(iteration=3))
        step()
        if {die_in!r} == 'write':
            def die_midway(f, data):
                f.write(data[:len(data) // 2])
                f.flush()
                os._exit(9)     # no cleanup, as with SIGKILL
            files._write_all = die_midway
        else:
            replace = os.replace
            def die_after_the_weights(src, dst):
                replace(src, dst)
                if dst.endswith('m_0_6.pdparams'):
                    os._exit(9)
            os.replace = die_after_the_weights
        checkpoint.save_checkpoint(checkpoint.SavePath('m', 0, 6).path({str(tmp_path)!r}), net, optimizer,
                                   CheckpointRecord(iteration=6))
    """)
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    names = os.listdir(tmp_path)
    assert 'm_0_6.json' not in names
    assert [n for n in names if not n.startswith('m_0_')] == [n for n in names if n.startswith('.m_0_6.saving.')]
    if die_in == 'write':
        assert not any(n.startswith('m_0_6') for n in names)
    good = checkpoint.latest_checkpoint(str(tmp_path), 'm')
    assert good == checkpoint.SavePath('m', 0, 3).path(str(tmp_path))
    net, optimizer, _ = small_net_and_optimizer()
    assert checkpoint.load_checkpoint(good, net, optimizer) == (loader.CheckpointRecord(iteration=3), True)
    # The run's next save clears what the killed one left.
    policy = checkpoint.CheckpointPolicy(str(tmp_path), 'm')
    checkpoint.save_checkpoint(policy.path(0, 9), net, optimizer, loader.CheckpointRecord(iteration=9))
    policy.saved(policy.path(0, 9), good)
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]


def test_a_failed_trainer_save_is_one_line_saying_what_was_kept(tmp_path, monkeypatch):
    trainer = _bare_trainer(tmp_path)
    trainer.iteration = 10
    first = trainer.save()

    def disk_full(f, data):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(files, '_write_all', disk_full)
    trainer.iteration = 20
    with pytest.raises(OutputError) as info:
        trainer.save()
    path = checkpoint.SavePath('yolact_shapes', 0, 20).path(str(tmp_path))
    assert str(info.value) == (f'cannot save checkpoint {path}: No space left on device; none of its files '
                               f'were written; kept: {first}')
    assert trainer.last_checkpoint == first
    assert _listing(tmp_path) == ['yolact_shapes_0_10.json', 'yolact_shapes_0_10.pdopt', 'yolact_shapes_0_10.pdparams']


# -------------------------------------------------------------- keep rules --
def test_an_interrupt_checkpoint_replaces_the_earlier_interrupts_only(tmp_path):
    trainer = _bare_trainer(tmp_path, keep_latest=True, keep_latest_interval=0)
    for iteration, interrupt in ((10, False), (12, True), (14, True)):
        trainer.iteration = iteration
        trainer.save(interrupt=interrupt)
    # --keep_latest never deletes the checkpoint before an interrupt: it is what a resumed run falls back on.
    assert {os.path.basename(p) for p in checkpoint.checkpoints_in(str(tmp_path))} == {
        'yolact_shapes_0_10.pdparams', 'yolact_shapes_0_14_interrupt.pdparams'}
    assert checkpoint.interrupt_checkpoint(str(tmp_path)).endswith('yolact_shapes_0_14_interrupt.pdparams')


def test_the_policy_is_built_from_the_training_flags(tmp_path):
    args = train.parse_args(['--save_folder', str(tmp_path), '--keep_latest', '--keep_latest_interval', '30',
                             '--keep_best'])
    policy = checkpoint.CheckpointPolicy.from_options(train.train_options(args), 'yolact_base')
    assert (policy.keep_latest, policy.keep_latest_interval, policy.keep_best) == (True, 30, True)
    assert policy.best_path == os.path.join(str(tmp_path), 'yolact_base_best.pdparams')
    assert policy.path(2, 60) == os.path.join(str(tmp_path), 'yolact_base_2_60.pdparams')
    assert policy.kept_by_interval(policy.path(1, 30)) and not policy.kept_by_interval(policy.path(1, 40))
    assert policy.kept_by_interval(str(tmp_path / 'yolact_base_54_800000_renamed.pth'))
    assert policy.is_better(0.31, 0.3) and not policy.is_better(0.3, 0.3)


# ----------------------------------------------------------- reading weights --
@pytest.fixture(scope='module')
def shapes_weights(tmp_path_factory):
    """yolact_shapes weights without a record, named so that the config is read from the name."""
    net = Yolact.from_config(get_config('yolact_shapes'))
    path = str(tmp_path_factory.mktemp('weights') / 'yolact_shapes_1_10.pdparams')
    paddle.save(net.state_dict(), path)
    return path


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_weights_file_is_checked_once_and_read_once(shapes_weights, monkeypatch):
    """The config (class count of a record-less .pdparams) and the network come from one reading."""
    checks = _counting(monkeypatch, loader, 'require_weights_file')
    records = _counting(monkeypatch, loader, 'read_record')
    reads = _counting(monkeypatch, loader, 'load_paddle_file')
    weights = loader.WeightsFile(shapes_weights)
    cfg = weights.config()
    cfg, net = weights.load_model(cfg=cfg)
    assert cfg.name == 'yolact_shapes' and not net.training
    assert (checks, records, reads) == ([shapes_weights],) * 3

    del checks[:], records[:], reads[:]
    Predictor(shapes_weights, device='cpu', dygraph=True)
    assert (checks, records, reads) == ([shapes_weights],) * 3


def test_a_checkpoint_resumes_through_the_weights_reader(tmp_path, monkeypatch):
    """Resuming reads the weights with the one reader, which names the file when they do not fit."""
    folder = str(tmp_path)
    _, _, _, good, _ = _saved_good(folder)
    reads = _counting(monkeypatch, loader, 'load_paddle_file')
    other = paddle.nn.Sequential(paddle.nn.Conv2D(3, 5, 3))
    with pytest.raises(WeightsError, match=f'^{good} does not match the model:'):
        checkpoint.load_checkpoint(good, other)
    assert reads == [good]


def test_config_takes_the_classes_a_checkpoint_recorded(tmp_path):
    path = str(tmp_path / 'yolact_resnet50_3_500.pdparams')
    open(path, 'w').close()
    with open(str(tmp_path / 'yolact_resnet50_3_500.json'), 'w') as f:
        json.dump({'num_classes': 3, 'class_names': ['cat', 'dog']}, f)
    cfg = resolve_config(weights_path=path)
    assert cfg.name == 'yolact_resnet50' and cfg.num_classes == 3
    assert cfg.dataset.class_names == ('cat', 'dog')
