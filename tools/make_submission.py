#!/usr/bin/env python3
"""Package eval.py's test-dev results for the COCO evaluation server.

Reads bbox_detections.json / mask_detections.json from --results_dir (written by
``eval.py --dataset coco2017_testdev_dataset --output_coco_json``, or on the
whole test2017 folder), keeps only the test-dev image ids and at most 100
detections per image (highest scores across classes), and writes

    <out_dir>/bbox/detections_test-dev2017_<alg>_results.zip
    <out_dir>/segm/detections_test-dev2017_<alg>_results.zip

each holding the .json of the same name; upload them separately (bbox, segm).
Each zip is checked as tools/check_submission.py does before it gets its
upload name: a zip that fails is not written (exit status 1).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402
from utils.evaluation.submission import write_submission  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--results_dir', default='results', help="eval.py's --results_dir")
    p.add_argument('--alg', required=True, help="algorithm name in the file names (letters, digits, '-')")
    p.add_argument('--info', default='data/coco/annotations/image_info_test-dev2017.json',
                   help='image_info_test-dev2017.json: the image ids the server evaluates')
    p.add_argument('--out_dir', default='submission', help='the zips go to OUT_DIR/bbox/ and OUT_DIR/segm/')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    reports = write_submission(args.results_dir, args.alg, args.info, args.out_dir)
    for report in reports.values():
        print(report.format() + ('' if report.ok else ' (not written)'))
    return 0 if all(r.ok for r in reports.values()) else 1


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s', force=True)
    sys.exit(run_cli(main))
