"""Flags that train.py and eval.py share, defined once so that their meaning and help stay the same,
and the argparse types that check numeric flags (a bad value is argparse's one-line usage error)."""
import argparse


def add_data_loading_flags(parser):
    """--shared_memory and --strict on ``parser`` (an ArgumentParser or one of its groups)."""
    parser.add_argument('--shared_memory', default='auto', choices=('auto', 'on', 'off'),
                        help='pass DataLoader batches through /dev/shm; auto: only when it has room for the '
                             "workers' batches (AI Studio and Docker give 64 MB)")
    parser.add_argument('--strict', action='store_true',
                        help='stop at the first bad annotation instead of skipping it (every bad entry is '
                             'reported either way, counted by reason)')


def add_max_image_pixels_flag(parser):
    """--max_image_pixels on ``parser``: the pixel cap of data.images.read_image (its docstring: the default)."""
    from data.images import DEFAULT_MAX_PIXELS
    parser.add_argument('--max_image_pixels', default=DEFAULT_MAX_PIXELS, type=positive_int, metavar='N',
                        help='skip (with a warning naming it) an image whose header declares more than N pixels, '
                             f'before decoding it (default {DEFAULT_MAX_PIXELS}, 4096x4096: two training '
                             'workers at their peak fit a 24 GB machine; see data/images.py)')


def add_coco_root_flag(parser):
    """--coco_root on ``parser``; data.coco_root.coco_root_dataset reads the tree."""
    parser.add_argument('--coco_root', default=None, metavar='DIR',
                        help='a COCO 2017 tree in the standard layout (train2017/, val2017/, test2017/, '
                             'annotations/...) used for coco2017_dataset / coco2017_testdev_dataset instead of '
                             'data/coco')


def _int_flag(test, wanted):
    """An argparse ``type``: an int passing ``test``, else argparse's one-line usage error saying ``wanted``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if not test(value):
            raise argparse.ArgumentTypeError(f'{value} is not {wanted}')
        return value
    return parse


positive_int = _int_flag(lambda v: v > 0, 'a positive integer')
non_negative_int = _int_flag(lambda v: v >= 0, 'a non-negative integer')
count_or_all = _int_flag(lambda v: v > 0 or v == -1, 'a positive integer or -1 (all)')


def fraction(text):
    """An argparse ``type``: a float in [0, 1] (a score threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'{value} is not in [0, 1]')
    return value


def str2bool(value):
    """The reference's boolean flag values (``--fast_nms false``): yes/true/t/y/1 and no/false/f/n/0."""
    if value.lower() in ('yes', 'true', 't', 'y', '1'):
        return True
    if value.lower() in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'boolean value expected, got {value!r}')
