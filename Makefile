# Two commands that work on a fresh machine (Python 3.9+ with venv; x86_64 pins below):
#   make demo   -- set up .venv, then train a tiny teacher and distil students on images shipped with scikit-image
#   make test   -- set up .venv, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test clean-demo

setup: $(VENV)/.krdistill-installed

$(VENV)/.krdistill-installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first (a matching torch/torchvision pair), then basicsr without build isolation:
	# with isolation pip would pull a second torch into a throw-away build environment.
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q --no-build-isolation basicsr==1.4.2
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	# an editable install does not ship krdistill-autoload.pth (lets basicsr/train.py find krdistill)
	$(PY) -m _krdistill_autoload install
	touch $@

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf datasets/krdistill_demo experiments/demo_* results/krdistill_demo tb_logger/demo_*
