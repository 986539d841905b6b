"""A user's mistakes get one line naming the file or entry, exit status 1, and lose nothing.

Each case runs a program's main() under utils.errors.run_cli (what ``python train.py`` etc. do)
and reads what it printed on stderr; one case runs a real process to show no traceback reaches
the terminal. Dataset entries (bad annotations) are tested in tests/test_dataset_validation.py.
"""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import eval as eval_script
import train
from data.config import get_config
from tests.conftest import ROOT
from tools import benchmark as benchmark_tool
from tools import convert_weights, export_model
from tools.make_shapes_dataset import make_shapes_dataset
from utils import files
from utils.weights import checkpoint
from utils.evaluation import coco_eval
from utils.errors import EXIT_USER_ERROR, OutputError, WeightsError, run_cli
from utils.predictor import Predictor
from utils.training.trainer import Trainer
from yolact import Yolact

SIDE = 96


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_train=4, num_val=2, size=SIDE, seed=0)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """yolact_shapes weights named so that the config is read from the name."""
    net = Yolact.from_config(get_config('yolact_shapes'))
    benchmark_tool.benchmark_weights(net, seed=0)
    path = str(tmp_path_factory.mktemp('weights') / 'yolact_shapes_1_10.pdparams')
    paddle.save(net.state_dict(), path)
    return path


def one_line_error(capsys, main, argv):
    """Run main under the error policy; assert exit status 1 and return the one error line (no traceback).

    The programs' INFO log also goes to stderr; the error is the one line starting 'error: '.
    """
    assert run_cli(main, argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


def train_argv(shapes, tmp_path, *extra):
    return ['--config', 'yolact_shapes', '--batch_size', '2', '--num_workers', '0', '--validation_epoch', '-1',
            '--train_images', shapes.train_images, '--train_info', shapes.train_info,
            '--save_folder', str(tmp_path / 'w'), '--log_folder', str(tmp_path / 'logs'), *extra]


def test_unknown_config_lists_the_valid_names(capsys):
    line = one_line_error(capsys, train.main, ['--config', 'yolact_bse'])
    assert "unknown config 'yolact_bse'" in line and 'yolact_base' in line and 'yolact_plus_resnet50' in line


@pytest.mark.parametrize('flag', ['--trained_model', '--resume'])
def test_missing_weights_or_resume_file(capsys, shapes, tmp_path, flag):
    missing = str(tmp_path / 'nowhere' / 'yolact_shapes_1_10.pdparams')
    line = one_line_error(capsys, train.main, train_argv(shapes, tmp_path, flag, missing))
    assert 'not found' in line and missing in line


def test_unreadable_pth_names_the_file(capsys, shapes, tmp_path):
    bad = tmp_path / 'yolact_shapes_1_10.pth'
    bad.write_bytes(np.random.RandomState(0).bytes(4096))
    line = one_line_error(capsys, train.main, train_argv(shapes, tmp_path, '--trained_model', str(bad)))
    assert 'yolact_shapes_1_10.pth' in line


@pytest.mark.parametrize('content, message', [(None, 'annotation file not found'),
                                              ('{"images": [', 'is not valid JSON')])
def test_missing_or_malformed_annotation_file(capsys, shapes, tmp_path, content, message):
    info = tmp_path / 'train.json'
    if content is not None:
        info.write_text(content)
    argv = train_argv(shapes, tmp_path)
    argv[argv.index('--train_info') + 1] = str(info)
    line = one_line_error(capsys, train.main, argv)
    assert message in line and str(info) in line


@pytest.mark.parametrize('content', [3, ['a', 'list']])
def test_pdparams_that_is_not_a_state_dict(capsys, tmp_path, content):
    path = str(tmp_path / 'yolact_shapes_1_10.pdparams')
    paddle.save(content, path)
    line = one_line_error(capsys, eval_script.main, ['--trained_model', path, '--image', f'{path}:out.png'])
    assert path in line and 'not a state dict' in line
    with pytest.raises(WeightsError, match='not a state dict'):
        Predictor(path)


def test_outputs_under_a_file_are_one_line_errors(capsys, weights, tmp_path):
    """Unwritable destinations (as root, a folder that is a file; read-only folders likewise)."""
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    pth = tmp_path / 'yolact_shapes_1_10.pth'
    pytest.importorskip('torch')
    import torch
    torch.save({k: torch.from_numpy(v.numpy()) for k, v in paddle.load(weights).items()}, str(pth))
    line = one_line_error(capsys, convert_weights.main, [str(pth), str(blocker / 'out.pdparams')])
    assert 'cannot write' in line and 'out.pdparams' in line
    line = one_line_error(capsys, export_model.main, ['--trained_model', weights, '--output_dir',
                                                      str(blocker / 'exported')])
    assert 'cannot write the export' in line


def test_disk_full_during_a_checkpoint_says_what_was_kept(shapes, tmp_path, monkeypatch):
    args = train.parse_args(train_argv(shapes, tmp_path, '--backbone_weights', 'none', '--max_iter', '2'))
    trainer = Trainer(train.build_config(args, 1), train.train_options(args))
    first = trainer.save()

    def disk_full(f, data):
        f.write(data[:10])
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(files, '_write_all', disk_full)
    trainer.iteration = 1
    with pytest.raises(OutputError, match='No space left on device') as info:
        trainer.save()
    assert f'kept: {first}' in str(info.value)
    assert checkpoint.latest_checkpoint(str(tmp_path / 'w'), 'yolact_shapes') == first


def test_results_files_are_written_whole_or_not_at_all(tmp_path):
    """An evaluation that dies midway leaves the previous complete files; concurrent writers cannot interleave."""
    folder = str(tmp_path)
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:5, 2:5] = True
    args = ([0], np.array([[2, 2, 5, 5]]), [0.9], mask)
    with coco_eval.CocoResultsWriter(folder, {0: 1}) as writer:
        writer.add(1, *args)
    with open(writer.bbox_path) as f:
        previous = f.read()
    with pytest.raises(KeyboardInterrupt):
        with coco_eval.CocoResultsWriter(folder, {0: 1}) as writer:
            writer.add(2, *args)
            raise KeyboardInterrupt
    with open(writer.bbox_path) as f:
        assert f.read() == previous
    assert sorted(os.listdir(folder)) == [coco_eval.BBOX_FILE, coco_eval.MASK_FILE]

    first, second = coco_eval.CocoResultsWriter(folder, {0: 1}), coco_eval.CocoResultsWriter(folder, {0: 1})
    for i in range(50):
        first.add(100 + i, *args)
        second.add(200 + i, *args)
    first.close()
    second.close()
    with open(second.bbox_path) as f:
        assert {r['image_id'] for r in json.load(f)} == set(range(200, 250))


def test_results_file_of_a_killed_run_never_appears(tmp_path):
    """SIGKILL midway through writing: nothing under the final name."""
    script = (f'import sys; sys.path.insert(0, {ROOT!r}); import os, signal\n'
              'from utils.evaluation.coco_eval import JsonArrayWriter\n'
              f'w = JsonArrayWriter({str(tmp_path / "bbox_detections.json")!r})\n'
              'for i in range(1000): w.write({"image_id": i})\n'
              'os.kill(os.getpid(), signal.SIGKILL)\n')
    assert subprocess.run([sys.executable, '-c', script]).returncode == -9
    assert not (tmp_path / 'bbox_detections.json').exists()


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--trained_model',
                             str(tmp_path / 'yolact_base_54_800000.pth')], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == EXIT_USER_ERROR
    assert 'Traceback' not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith('error: ')] == [
        f"error: weights file not found: {tmp_path / 'yolact_base_54_800000.pth'}"]


@pytest.mark.parametrize('program, argv, message', [
    (train, ['--batch_size', '0'], 'argument --batch_size: 0 is not a positive integer'),
    (train, ['--batch_size', '-1'], 'argument --batch_size: -1 is not a positive integer'),
    (train, ['--num_workers', '-2'], 'argument --num_workers: -2 is not a non-negative integer'),
    (eval_script, ['--trained_model', 'w.pdparams', '--top_k', '-1'], 'argument --top_k: -1 is not a positive integer'),
    (eval_script, ['--trained_model', 'w.pdparams', '--top_k', '0'], 'argument --top_k: 0 is not a positive integer'),
    (eval_script, ['--trained_model', 'w.pdparams', '--score_threshold', '1.5'],
     'argument --score_threshold: 1.5 is not in [0, 1]'),
    (eval_script, ['--trained_model', 'w.pdparams', '--max_images', '0'],
     'argument --max_images: 0 is not a positive integer or -1 (all)'),
])
def test_numeric_flags_out_of_range_are_usage_errors(capsys, program, argv, message):
    """Was: --batch_size 0 a ZeroDivisionError traceback, -1 an AssertionError; --top_k -1 drew nothing, silently."""
    with pytest.raises(SystemExit) as info:
        program.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(f'error: {message}') and 'Traceback' not in err, err


def test_every_training_image_missing_is_one_line(capsys, shapes, tmp_path):
    empty = tmp_path / 'no_images'
    empty.mkdir()
    argv = train_argv(shapes, tmp_path, '--backbone_weights', 'none', '--max_iter', '1')
    argv[argv.index('--train_images') + 1] = str(empty)
    line = one_line_error(capsys, train.main, argv)
    assert f'none of the 4 images of {shapes.train_info} is in {empty}' in line


def test_fewer_images_than_one_batch_is_one_line(capsys, shapes, tmp_path):
    argv = train_argv(shapes, tmp_path)
    argv[argv.index('--batch_size') + 1] = '8'
    line = one_line_error(capsys, train.main, argv + ['--backbone_weights', 'none'])
    assert f'{shapes.train_info}: 4 usable training images are fewer than one batch of 8' in line


def _copy_weights(weights, folder, name='mymodel'):
    folder.mkdir(exist_ok=True)
    path = folder / f'{name}.pdparams'
    path.write_bytes(open(weights, 'rb').read())
    return str(path), checkpoint.sidecar_paths(str(path))[1]


@pytest.mark.parametrize('record, message', [
    ('[1, 2]', 'the checkpoint record holds a list, not a JSON object'),
    ('{"config": "yolact_shapes", "class_names": ["a"', 'the checkpoint record is not valid JSON'),
    ('{"config": ["yolact_shapes"]}', '"config" is a list, not a config name'),
    ('{"config": "yolact_nonexistent"}', "unknown config 'yolact_nonexistent'"),
])
def test_a_bad_sidecar_record_is_one_line_naming_it(capsys, weights, tmp_path, record, message):
    """Was: a list -> AttributeError traceback; invalid JSON ignored with a warning (the config then guessed from
    the file name); an unknown config reported without saying that the record named it."""
    path, sidecar = _copy_weights(weights, tmp_path / 'w', name='yolact_shapes_1_10')
    with open(sidecar, 'w') as f:
        f.write(record)
    line = one_line_error(capsys, eval_script.main, ['--trained_model', path, '--dygraph',
                                                     '--image', f'{path}:{tmp_path}/out.png'])
    assert line.startswith(f'error: {sidecar}: ') and message in line, line


def test_images_sharing_a_stem_are_all_drawn(shapes, weights, tmp_path, caplog):
    """Was: x.jpg and x.png both drawn to x.png (the second replaced the first) while the log said 2 were drawn."""
    import cv2
    folder = tmp_path / 'in'
    folder.mkdir()
    image = cv2.imread(os.path.join(shapes.valid_images, '000001.jpg'))
    cv2.imwrite(str(folder / 'x.jpg'), image)
    cv2.imwrite(str(folder / 'x.png'), np.ascontiguousarray(image[::-1]))
    cv2.imwrite(str(folder / 'y.png'), image)
    out = tmp_path / 'out'
    assert run_cli(eval_script.main, ['--trained_model', weights, '--dygraph', '--display_masks', 'false',
                                      '--display_bboxes', 'false', '--display_text', 'false',
                                      '--images', f'{folder}:{out}']) == 0
    assert sorted(os.listdir(out)) == ['x.jpg.png', 'x.png.png', 'y.png']
    # Nothing drawn (all overlays off): each drawing is its own input.
    np.testing.assert_array_equal(cv2.imread(str(out / 'x.png.png')), cv2.imread(str(folder / 'x.png')))
    np.testing.assert_array_equal(cv2.imread(str(out / 'x.jpg.png')), cv2.imread(str(folder / 'x.jpg')))


def test_images_drawn_into_their_own_folder_never_replace_an_input(capsys, weights, tmp_path):
    import cv2
    folder = tmp_path / 'in'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), np.zeros((32, 32, 3), np.uint8))
    before = (folder / 'a.png').read_bytes()
    line = one_line_error(capsys, eval_script.main, ['--trained_model', weights, '--dygraph',
                                                     '--images', f'{folder}:{folder}'])
    assert 'would replace the input' in line and 'a.png' in line
    assert (folder / 'a.png').read_bytes() == before


def test_duplicate_category_names_are_refused_naming_the_ids(capsys, shapes, weights, tmp_path):
    """Was: training accepted them; evaluation then mapped both categories to one class (wrong ids, dropped
    detections)."""
    with open(shapes.train_info) as f:
        info = json.load(f)
    info['categories'][2]['name'] = info['categories'][0]['name']
    dup = tmp_path / 'dup.json'
    dup.write_text(json.dumps(info))
    name, first, third = info['categories'][0]['name'], info['categories'][0]['id'], info['categories'][2]['id']
    argv = train_argv(shapes, tmp_path, '--backbone_weights', 'none', '--max_iter', '1')
    argv[argv.index('--train_info') + 1] = str(dup)
    line = one_line_error(capsys, train.main, argv)
    assert f"{dup}: categories share a name ('{name}': ids {first}, {third})" in line
    line = one_line_error(capsys, eval_script.main, ['--trained_model', weights, '--dygraph', '--valid_images',
                                                     shapes.train_images, '--valid_info', str(dup)])
    assert f"{dup}: categories share a name ('{name}': ids {first}, {third})" in line
