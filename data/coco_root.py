"""COCO 2017 from where it is: the dataset configs of a COCO tree on disk, its files checked.

``--coco_root`` (train.py, eval.py) points at one folder in the standard layout
instead of the configs' default paths.
"""
import dataclasses
import os

from data.config import COCO2017, COCO2017_TESTDEV
from utils.errors import ConfigError, MissingFileError

# The standard COCO 2017 tree (as the official zips unpack): which file comes from which zip.
COCO_LAYOUT = {
    'train2017': 'train2017.zip',
    'val2017': 'val2017.zip',
    'test2017': 'test2017.zip',
    'annotations/instances_train2017.json': 'annotations_trainval2017.zip',
    'annotations/instances_val2017.json': 'annotations_trainval2017.zip',
    'annotations/image_info_test-dev2017.json': 'image_info_test2017.zip',
}


def coco_datasets(root):
    """{'coco2017_dataset', 'coco2017_testdev_dataset': DatasetConfig} for a COCO tree at ``root``.

    ``root`` holds the standard layout (:data:`COCO_LAYOUT`): ``train2017/``,
    ``val2017/``, ``test2017/``, ``annotations/instances_{train,val}2017.json``,
    ``annotations/image_info_test-dev2017.json``. Raises MissingFileError when
    ``root`` is not a folder; use :func:`coco_root_dataset` to check the files a run needs.
    """
    if not os.path.isdir(root):
        raise MissingFileError(f'COCO root folder not found: {root}')

    def path(rel):
        return os.path.join(root, rel)
    train = dict(train_images=path('train2017'), train_info=path('annotations/instances_train2017.json'))
    return {
        'coco2017_dataset': dataclasses.replace(
            COCO2017, valid_images=path('val2017'), valid_info=path('annotations/instances_val2017.json'),
            **train),
        'coco2017_testdev_dataset': dataclasses.replace(
            COCO2017_TESTDEV, valid_images=path('test2017'),
            valid_info=path('annotations/image_info_test-dev2017.json'), **train),
    }


def coco_root_dataset(root, dataset, splits=('valid',)):
    """``dataset`` (the COCO 2017 or test-dev preset) moved to the COCO tree at ``root``.

    Args:
        root: a folder in the layout of :func:`coco_datasets`.
        dataset: ``COCO2017`` or ``COCO2017_TESTDEV`` (a config's dataset or ``DATASETS[--dataset]``).
        splits: the parts the run reads, of 'train' and 'valid'; their image
            folders and annotation files must exist.

    Raises ConfigError for another dataset, MissingFileError naming the first
    missing file or folder and the zip it comes from.
    """
    by_preset = {COCO2017: 'coco2017_dataset', COCO2017_TESTDEV: 'coco2017_testdev_dataset'}
    if dataset not in by_preset:
        raise ConfigError(f'--coco_root applies to the COCO 2017 datasets (coco2017_dataset, '
                          f'coco2017_testdev_dataset), not to {dataset.name!r}')
    moved = coco_datasets(root)[by_preset[dataset]]
    for split in splits:
        for needed in (getattr(moved, f'{split}_images'), getattr(moved, f'{split}_info')):
            rel = os.path.relpath(needed, root).replace(os.sep, '/')
            if not os.path.exists(needed):
                raise MissingFileError(f'{needed} not found under the COCO root {root} '
                                       f'(it comes from {COCO_LAYOUT.get(rel, "the COCO 2017 download")})')
    return moved
