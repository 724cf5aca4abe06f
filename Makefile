# Dev chores. `make demo` and `make test` bootstrap everything they need from a bare Python.
PYTHON ?= python3
VENV := .venv
BUILD_DIR ?= build/dev
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
DEV_DEPS := cmake ninja pybind11 scikit-build-core pytest hypothesis numpy scikit-learn matplotlib pandas tqdm ruff \
	tensorboard ipython

.PHONY: venv build test demo bench lint sanitize wheel clean

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(DEV_DEPS)
	@# fitstream only as the reference the parity tests compare against; its deps are ours already
	$(PY) -m pip install -q --no-deps fitstream==0.4.1
	touch $@

venv: $(VENV)/.ready

# In-place build of hotloop._C into python/hotloop (tests and the demo import from python/).
build: venv
	$(VENV)/bin/cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) $(CMAKE_ARGS) > /dev/null
	$(VENV)/bin/cmake --build $(BUILD_DIR)
	@# copy then rename: a new inode, so processes that have the old module mapped are not corrupted
	for f in $(BUILD_DIR)/_C*.so $(BUILD_DIR)/_build_info.py; do \
		cp $$f python/hotloop/.$$(basename $$f).tmp && mv python/hotloop/.$$(basename $$f).tmp python/hotloop/$$(basename $$f); done

test: build
	$(PY) -m pytest -q

demo: build
	PYTHONPATH=python $(PY) bench/demo.py

bench: build
	PYTHONPATH=python $(PY) bench/run.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench

wheel: venv
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist python/hotloop/_C*.so python/hotloop/_build_info.py
