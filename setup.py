#!/usr/bin/env python
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = 'krdistill-autoload.pth'


class build_py_with_pth(build_py):
    """Ship ``krdistill-autoload.pth`` at the top of site-packages (BasicSR's own train.py then
    finds krdistill's classes; see ``_krdistill_autoload.py``)."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(here, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]

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
    py_modules=['_krdistill_autoload'],
    cmdclass={'build_py': build_py_with_pth},
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
            'krdistill-evaluate=krdistill.evaluation:main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
    license='Apache-2.0',
)
