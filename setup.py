#!/usr/bin/env python
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, 'krdistill', 'version.py')) as f:
    exec(f.read(), version)

with open(os.path.join(here, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='krdistill',
    version=version['__version__'],
    description='Meta knowledge distillation (learned knowledge representation) for single-image '
    'super-resolution, as a BasicSR plug-in',
    long_description=long_description,
    long_description_content_type='text/markdown',
    packages=find_packages(include=['krdistill', 'krdistill.*']),
    python_requires='>=3.9',
    install_requires=[
        'basicsr>=1.4.2',
        'torch>=2.1',
        'numpy',
        'opencv-python',
        'lmdb',
        'pyyaml',
    ],
    extras_require={
        'mmengine': ['mmengine>=0.10'],
        'dev': ['pytest', 'scikit-image', 'matplotlib', 'mmengine>=0.10'],
    },
    entry_points={
        'console_scripts': [
            'krdistill-train=krdistill.train:main',
            'krdistill-test=krdistill.test:main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
    license='Apache-2.0',
)
