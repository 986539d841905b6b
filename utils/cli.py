"""Flags that train.py and eval.py share, defined once so that their meaning and help stay the same."""

def add_data_loading_flags(parser):
    """--shared_memory and --strict on ``parser`` (an ArgumentParser or one of its groups)."""
    parser.add_argument('--shared_memory', default='auto', choices=('auto', 'on', 'off'),
                        help='pass DataLoader batches through /dev/shm; auto: only when it has room for the '
                             "workers' batches (AI Studio and Docker give 64 MB)")
    parser.add_argument('--strict', action='store_true',
                        help='stop at the first bad annotation instead of skipping it (every bad entry is '
                             'reported either way, counted by reason)')


def add_coco_root_flag(parser):
    """--coco_root on ``parser``; data.config.coco_root_dataset reads the tree."""
    parser.add_argument('--coco_root', default=None, metavar='DIR',
                        help='a COCO 2017 tree in the standard layout (train2017/, val2017/, test2017/, '
                             'annotations/...) used for coco2017_dataset / coco2017_testdev_dataset instead of '
                             'data/coco')
