#!/usr/bin/env python3
"""Check COCO-server submission zips before uploading them.

For each zip: its name (detections_test-dev2017_<alg>_results.zip) and the
name of the JSON inside, image ids (only test-dev's; images without
detections are counted), at most 100 detections per image, category ids of
the info file (COCO's 1..90; contiguous class numbers 1..80 written instead of
them are refused even where every id is valid, and invalid ids are reported
with their likely cause), finite scores, boxes of 4 finite numbers, RLE
masks that decode to their image's size. Prints one line per check; exits 1
when a check fails.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402
from utils.evaluation.submission import check_submission  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('zips', nargs='+', help='submission zips')
    p.add_argument('--info', default='data/coco/annotations/image_info_test-dev2017.json',
                   help='image_info_test-dev2017.json: the image ids the server evaluates')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    status = 0
    for path in args.zips:
        report = check_submission(path, args.info)
        print(report.format())
        status = status or (0 if report.ok else 1)
    return status


if __name__ == '__main__':
    sys.exit(run_cli(main))
