# make demo: convert, compress, verify and count a built-in example network.
# make test: the test suite.  make bench: speed and paper-table reproductions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BC     := $(VENV)/bin/basisconv
OUT    := build

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,plot,dev,dist]'
	touch $@

demo: $(VENV)/.installed
	@mkdir -p $(OUT)
	$(BC) convert examples/demo_net.py:build --input-shape 1,3,40,40 -o $(OUT)/demo.h5
	$(BC) inspect $(OUT)/demo.h5
	$(BC) verify $(OUT)/demo.h5
	$(BC) compress $(OUT)/demo.h5 --mac-budget 0.3 -o $(OUT)/demo_basis.h5
	$(BC) verify $(OUT)/demo_basis.h5
	$(BC) count $(OUT)/demo_basis.h5 --against $(OUT)/demo.h5 --executed
	$(PY) -c "import numpy as np; np.save('$(OUT)/demo_input.npy', np.random.default_rng(0).standard_normal((4, 3, 40, 40), dtype=np.float32))"
	$(BC) run $(OUT)/demo_basis.h5 --input $(OUT)/demo_input.npy --output $(OUT)/demo_output.npz

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/speed.py

clean:
	rm -rf $(OUT) $(VENV)
