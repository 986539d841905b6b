"""A user's mistakes get one line naming the file or entry, exit status 1, and lose nothing.

Each case runs a program's main() under utils.errors.run_cli (what ``python train.py`` etc. do)
and reads what it printed on stderr; one case runs a real process to show no traceback reaches
the terminal. Dataset entries (bad annotations) are tested in tests/test_dataset_validation.py.
"""
import json
import os
import shutil
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
from utils.training import checkpoint
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
    """A batch size, worker count, top_k, score threshold or image count out of range is a usage error (exit 2)
    naming the flag and the value, with no traceback."""
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
    """A checkpoint record that is a list, invalid JSON, a config of the wrong type or an unknown config is one
    line naming the record file; the config is never guessed from the weights' file name instead."""
    path, sidecar = _copy_weights(weights, tmp_path / 'w', name='yolact_shapes_1_10')
    with open(sidecar, 'w') as f:
        f.write(record)
    line = one_line_error(capsys, eval_script.main, ['--trained_model', path, '--dygraph',
                                                     '--image', f'{path}:{tmp_path}/out.png'])
    assert line.startswith(f'error: {sidecar}: ') and message in line, line


def test_images_sharing_a_stem_are_all_drawn(shapes, weights, tmp_path, caplog):
    """x.jpg and x.png of one folder are drawn to x.jpg.png and x.png.png: neither drawing replaces the other."""
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
    """Two categories of one name are refused by training and by evaluation, one line naming the file and both
    ids (one class for both would give wrong ids and drop detections)."""
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


# ------------------------------------------------------------- huge and undecodable images --
def _huge_png(path, width=20000, height=20000):
    """A PNG whose header declares width x height pixels, with a body of a few bytes (never decodable)."""
    import struct
    import zlib
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data
                                + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
                + chunk(b'IEND', b''))
    return str(path)


@pytest.fixture
def opencv_refuses(monkeypatch):
    """cv2.imread raises cv2.error for files named huge* (OpenCV 5 above its pixel limit), as OpenCV 5 does."""
    import cv2
    original = cv2.imread

    def imread(path, *args):
        if os.path.basename(str(path)).startswith('huge'):
            raise cv2.error('OpenCV(5.1.0) imgcodecs: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS')
        return original(path, *args)

    monkeypatch.setattr(cv2, 'imread', imread)


def test_an_image_above_the_pixel_cap_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    """An image above the pixel cap is refused from its header, never decoded (a 20000x20000 PNG of a few
    hundred KB would take 7 GB in training)."""
    import cv2
    from data.coco import read_image
    path = _huge_png(tmp_path / 'big.png')

    def no_decoding(*args):
        raise AssertionError('the image was decoded')

    monkeypatch.setattr(cv2, 'imread', no_decoding)
    with pytest.raises(OSError, match=r'big\.png is 20000x20000 = 400\.0 M pixels, above the cap'):
        read_image(path)


def test_the_header_gives_the_size_of_each_format(tmp_path):
    import cv2
    from data.images import header_size, read_image
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    for ext in ('.png', '.jpg', '.bmp', '.webp'):
        path = str(tmp_path / f'x{ext}')
        assert cv2.imwrite(path, image), ext
        assert header_size(path) == (53, 37), ext
        assert read_image(path, max_pixels=53 * 37).shape == (37, 53, 3)
        with pytest.raises(OSError, match='above the cap'):
            read_image(path, max_pixels=53 * 37 - 1)
    # A progressive JPEG (SOF2) and a file that is not an image.
    path = str(tmp_path / 'p.jpg')
    cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert header_size(path) == (53, 37)
    (tmp_path / 't.png').write_text('text')
    assert header_size(str(tmp_path / 't.png')) is None
    (tmp_path / 'zero_length.jpg').write_bytes(b'\xff\xd8\xff\xe0\x00\x00' + b'\x00' * 8)   # ends, no loop
    assert header_size(str(tmp_path / 'zero_length.jpg')) is None


def test_opencv_errors_skip_the_image_in_training_and_evaluation_data(shapes, tmp_path, opencv_refuses):
    """A cv2.error (OpenCV 5 above its pixel limit) skips the file in the training and evaluation datasets."""
    from data.coco import COCODetection, COCOEvalImages, SampleError
    from data.transforms import BaseTransform
    images = tmp_path / 'images'
    shutil.copytree(shapes.train_images, images)
    with open(shapes.train_info) as f:
        info = json.load(f)
    first = info['images'][0]
    os.rename(images / first['file_name'], images / ('huge_' + first['file_name']))
    first['file_name'] = 'huge_' + first['file_name']
    info_file = tmp_path / 'info.json'
    info_file.write_text(json.dumps(info))
    train_set = COCODetection(str(images), str(info_file))
    index = train_set.ids.index(first['id'])
    sample = train_set[index]
    assert not isinstance(sample, SampleError), sample
    evals = COCOEvalImages(str(images), str(info_file), BaseTransform.from_config(get_config('yolact_shapes')))
    sample = evals[evals.ids.index(first['id'])]
    assert not isinstance(sample, SampleError) and sample[1] == first['id'] and sample[4] is False


def test_images_go_on_after_an_opencv_error_and_keep_the_results(capsys, shapes, weights, tmp_path, opencv_refuses):
    """--images goes on after a cv2.error and keeps the COCO JSON of the other images; --image is one line."""
    folder = tmp_path / 'in'
    folder.mkdir()
    for name in ('000001.jpg', '000002.jpg'):
        shutil.copy(os.path.join(shapes.valid_images, name), folder / name)
    shutil.copy(os.path.join(shapes.valid_images, '000001.jpg'), folder / 'huge.jpg')
    _huge_png(folder / 'huge2.png')   # refused from its header
    results = tmp_path / 'results'
    assert run_cli(eval_script.main, ['--trained_model', weights, '--dygraph', '--images', str(folder),
                                      '--output_coco_json', '--results_dir', str(results)]) == 0
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    with open(results / 'image_info.json') as f:
        assert sorted(img['file_name'] for img in json.load(f)['images']) == ['000001.jpg', '000002.jpg']
    line = one_line_error(capsys, eval_script.main, ['--trained_model', weights, '--dygraph',
                                                     '--image', f'{folder / "huge.jpg"}:{tmp_path / "o.png"}'])
    assert 'huge.jpg' in line and 'CV_IO_MAX_IMAGE_PIXELS' in line
    line = one_line_error(capsys, eval_script.main, ['--trained_model', weights, '--dygraph',
                                                     '--image', f'{folder / "huge2.png"}:{tmp_path / "o.png"}'])
    assert 'huge2.png is 20000x20000' in line and not os.path.exists(tmp_path / 'o.png')


def test_a_video_above_the_pixel_cap_is_one_line(capsys, shapes, weights, tmp_path):
    import cv2
    video = str(tmp_path / 'v.mp4')
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), 10, (SIDE, SIDE))
    writer.write(cv2.imread(os.path.join(shapes.valid_images, '000001.jpg')))
    writer.release()
    line = one_line_error(capsys, eval_script.main, ['--trained_model', weights, '--dygraph', '--max_image_pixels',
                                                     str(SIDE * SIDE - 1), '--video', f'{video}:{tmp_path}/o.mp4'])
    assert f'{SIDE}x{SIDE}' in line and 'above the cap' in line and not os.path.exists(tmp_path / 'o.mp4')


# ------------------------------------------------------------------ arrays given to Predictor --
@pytest.fixture(scope='module')
def predictor(weights):
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    net.set_state_dict(paddle.load(weights))
    net.eval()
    return Predictor.from_network(cfg, net)


def _same_detections(a, b):
    assert len(a['scores']) > 0
    for key in ('classes', 'scores', 'boxes', 'masks'):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_predictor_converts_what_needs_no_guess(predictor, shapes, tmp_path):
    """A path, uint16, BGRA, float 0..255 and gray images give the detections of the equivalent 8-bit BGR image."""
    import cv2
    path = os.path.join(shapes.valid_images, '000001.jpg')
    bgr = cv2.imread(path)
    expected = predictor(bgr)
    _same_detections(predictor(path), expected)
    _same_detections(predictor(bgr.astype(np.uint16) * 257), expected)              # 16 bits, scaled
    _same_detections(predictor(np.dstack([bgr, np.full(bgr.shape[:2], 7, np.uint8)])), expected)  # BGRA
    _same_detections(predictor(bgr.astype(np.float32)), expected)                   # float in 0..255
    gray = bgr[:, :, 1]
    _same_detections(predictor(gray), predictor(np.repeat(gray[:, :, None], 3, axis=2)))
    _same_detections(predictor(gray[:, :, None]), predictor(gray))


@pytest.mark.parametrize('image, message', [
    (np.full((32, 32, 3), 0.5, np.float32), 'all lie in 0..1'),
    (np.full((32, 32, 3), -1.0, np.float32), 'outside 0..255'),
    (np.zeros((32, 32, 3), np.int32), 'dtype int32'),
    (np.zeros((32, 32, 2), np.uint8), 'shape [32, 32, 2]'),
])
def test_predictor_refuses_what_needs_a_guess(predictor, image, message):
    """A float image in 0..1, values outside 0..255, an integer dtype other than uint8/uint16 or two channels are
    a one-line ValueError, not a silent guess."""
    from utils.errors import YolactError
    with pytest.raises(YolactError) as info:
        predictor(image)
    assert isinstance(info.value, ValueError) and message in str(info.value) and '\n' not in str(info.value)


# ------------------------------------------------------------------ output folders at start --
def test_unwritable_training_folders_fail_before_training(capsys, shapes, tmp_path, monkeypatch):
    """An unwritable --save_folder or --log_folder is one line before the first training step, so no training
    is lost at the first checkpoint. (Tests run as root, where chmod does not stop writes: the folders lie
    under a regular file.)"""
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    monkeypatch.setattr(Trainer, 'train_step', lambda *a: pytest.fail('trained before checking the outputs'))
    for flag, what in (('--save_folder', 'checkpoints'), ('--log_folder', 'training logs')):
        argv = train_argv(shapes, tmp_path, '--backbone_weights', 'none', '--max_iter', '1')
        argv[argv.index(flag) + 1] = str(blocker / 'sub')
        line = one_line_error(capsys, train.main, argv)
        assert f'cannot write {what} ({flag}) to {blocker / "sub"}' in line, line


@pytest.mark.parametrize('flag, what', [('--log_dir', 'evaluation logs'), ('--results_dir', 'results files')])
def test_unwritable_eval_folders_fail_before_evaluating(capsys, shapes, weights, tmp_path, monkeypatch, flag, what):
    """eval.py with an unwritable --log_dir or --results_dir is one line before the model is loaded and any
    image is evaluated."""
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    # Not even the model is loaded (on a CPU that is an export on first use).
    monkeypatch.setattr(eval_script, 'build_predictor', lambda *a: pytest.fail('the model was loaded first'))
    argv = ['--trained_model', weights, '--dygraph', '--valid_images', shapes.valid_images,
            '--valid_info', shapes.valid_info, '--num_workers', '0',
            '--results_dir', str(tmp_path / 'r'), '--log_dir', str(tmp_path / 'logs')]
    argv[argv.index(flag) + 1] = str(blocker / 'sub')
    line = one_line_error(capsys, eval_script.main, argv)
    assert f'cannot write {what} ({flag}) to {blocker / "sub"}' in line, line


def test_importing_the_library_prints_no_ccache_warning_but_keeps_other_warnings(tmp_path):
    """Importing the library or running a submission tool prints no 'No ccache found' (Paddle's import-time
    warning); other warnings still show."""
    code = ('import warnings\n'
            'from utils.predictor import Predictor\n'
            'warnings.warn("another warning", UserWarning)\n')
    for argv in ([sys.executable, '-c', code], [sys.executable, os.path.join(ROOT, 'tools', 'check_submission.py'),
                                                '--help']):
        env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert 'No ccache found' not in done.stderr, done.stderr
        if argv[1] == '-c':
            assert 'UserWarning: another warning' in done.stderr, done.stderr


def test_the_writable_check_creates_nothing_and_names_a_read_only_folder(tmp_path, monkeypatch):
    import errno
    import tempfile
    from utils.files import check_writable_folder
    check_writable_folder(str(tmp_path / 'new' / 'deeper'), 'outputs')
    assert os.listdir(tmp_path) == []
    # Root writes through chmod; a read-only file system refuses even root.
    monkeypatch.setattr(tempfile, 'mkstemp', lambda **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))))
    with pytest.raises(OutputError, match=f'cannot write outputs to {tmp_path}: Read-only file system'):
        check_writable_folder(str(tmp_path), 'outputs')
