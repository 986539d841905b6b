"""Finding COCO under one folder (data/coco_root.py): the standard layout, the missing file named with its zip."""
import os

import pytest

from data.coco_root import coco_datasets, coco_root_dataset
from data.config import COCO2017, COCO2017_TESTDEV, SHAPES
from utils.errors import ConfigError, MissingFileError


def _coco_tree(root, skip=()):
    files = {'annotations/instances_train2017.json': '{}', 'annotations/instances_val2017.json': '{}',
             'annotations/image_info_test-dev2017.json': '{}'}
    for rel, text in files.items():
        if rel not in skip:
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            with open(os.path.join(root, rel), 'w') as f:
                f.write(text)
    for folder in ('train2017', 'val2017', 'test2017'):
        if folder not in skip:
            os.makedirs(os.path.join(root, folder), exist_ok=True)


def test_coco_datasets_standard_layout(tmp_path):
    _coco_tree(tmp_path)
    sets = coco_datasets(str(tmp_path))
    val = sets['coco2017_dataset']
    assert (val.valid_images, val.valid_info) == (str(tmp_path / 'val2017'),
                                                  str(tmp_path / 'annotations' / 'instances_val2017.json'))
    assert (val.train_images, val.train_info) == (str(tmp_path / 'train2017'),
                                                  str(tmp_path / 'annotations' / 'instances_train2017.json'))
    assert val.label_map == COCO2017.label_map and val.has_gt
    dev = sets['coco2017_testdev_dataset']
    assert dev.valid_images == str(tmp_path / 'test2017') and not dev.has_gt
    assert dev.valid_info == str(tmp_path / 'annotations' / 'image_info_test-dev2017.json')
    assert coco_root_dataset(str(tmp_path), COCO2017, ('train', 'valid')) == val
    assert coco_root_dataset(str(tmp_path), COCO2017_TESTDEV) == dev


@pytest.mark.parametrize('missing, dataset, splits, zip_name', [
    ('val2017', COCO2017, ('valid',), 'val2017.zip'),
    ('annotations/instances_train2017.json', COCO2017, ('train',), 'annotations_trainval2017.zip'),
    ('annotations/image_info_test-dev2017.json', COCO2017_TESTDEV, ('valid',), 'image_info_test2017.zip'),
])
def test_coco_root_names_the_missing_file(tmp_path, missing, dataset, splits, zip_name):
    _coco_tree(tmp_path, skip=(missing,))
    with pytest.raises(MissingFileError) as err:
        coco_root_dataset(str(tmp_path), dataset, splits)
    assert str(tmp_path / missing) in str(err.value) and zip_name in str(err.value)


def test_coco_root_errors(tmp_path):
    _coco_tree(tmp_path, skip=('train2017',))
    coco_root_dataset(str(tmp_path), COCO2017, ('valid',))     # evaluation needs no train2017/
    with pytest.raises(MissingFileError, match='nowhere'):
        coco_datasets(str(tmp_path / 'nowhere'))
    with pytest.raises(ConfigError, match='Shapes'):
        coco_root_dataset(str(tmp_path), SHAPES)
