"""Demo: tiny teacher, student alone and distilled students on scikit-image's sample images.

    python tools/demo.py [--root .] [--total-iter N]

The logic lives in :mod:`krdistill.demo`.
"""
from krdistill.demo import main

if __name__ == '__main__':
    main()
