"""Evaluate with BasicSR's test pipeline and krdistill's classes registered.

    python krdistill/test.py -opt options/test/X.yml
    python -m krdistill.test -opt ...       # or the console script: krdistill-test -opt ...

Results are written under the current folder (``results/<name>``), as with BasicSR.
"""
import os
import sys

if __package__ in (None, ''):  # run as a file: import the package from the repo root, not krdistill/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None, root_path=None) -> None:
    from krdistill.entry import run_pipeline
    run_pipeline('basicsr.test', 'test_pipeline', argv, root_path, 'krdistill-test')


if __name__ == '__main__':
    main()
