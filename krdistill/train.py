"""Train with BasicSR's pipeline and krdistill's classes registered.

    python krdistill/train.py -opt options/metakd_edsr_x4.yml [--auto_resume] [--launcher pytorch]
    python -m krdistill.train -opt ...      # or the console script: krdistill-train -opt ...

Experiments are written under the current folder (``experiments/<name>``), as with BasicSR.
BasicSR's own ``basicsr/train.py`` runs the same option files; this entry point adds, for the
duration of its run only (:mod:`krdistill.entry`), what BasicSR 1.4.2 cannot do without a
patch: resume on the CPU from a ``weights_only`` training state with the teacher kept, exact
mid-epoch resume, ``--launcher pytorch`` without CUDA, and the data checks of every
``datasets.<phase>`` block before the first loader is built.
"""
import os
import sys

if __package__ in (None, ''):  # run as a file: import the package from the repo root, not krdistill/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None, root_path=None) -> None:
    from krdistill.entry import run_pipeline
    run_pipeline('basicsr.train', 'train_pipeline', argv, root_path, 'krdistill-train')


if __name__ == '__main__':
    main()
