# Dev chores. `make demo` and `make test` bootstrap everything they need from a bare Python.
PYTHON ?= python3
VENV := .venv
BUILD_DIR ?= build/dev
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
DEV_DEPS := cmake ninja pybind11 scikit-build-core pytest hypothesis numpy scikit-learn matplotlib pandas tqdm ruff \
	tensorboard ipython

.PHONY: venv build test cpp-test demo bench lint sanitize wheel clean cuda-build cuda-compile-check gpu-check

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(DEV_DEPS)
	@# fitstream is only the reference the parity tests compare against (it declares 3.12+, runs on 3.10+)
	$(PY) -m pip install -q --no-deps --ignore-requires-python fitstream==0.4.1
	touch $@

venv: $(VENV)/.ready

# In-place build of hotloop._C into python/hotloop (tests and the demo import from python/).
build: venv
	$(VENV)/bin/cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) -DHOTLOOP_BUILD_TESTS=ON $(CMAKE_ARGS) > /dev/null
	$(VENV)/bin/cmake --build $(BUILD_DIR)
	@# copy then rename: a new inode, so processes that have the old module mapped are not corrupted
	for f in $(BUILD_DIR)/_C*.so $(BUILD_DIR)/_build_info.py; do \
		cp $$f python/hotloop/.$$(basename $$f).tmp && mv python/hotloop/.$$(basename $$f).tmp python/hotloop/$$(basename $$f); done

test: build cpp-test
	$(PY) -m pytest -q

# The engine's C++ tests (tests/cpp), built against the same engine library as _C, without Python.
cpp-test: build
	$(VENV)/bin/cmake --build $(BUILD_DIR) --target engine_tests
	$(VENV)/bin/ctest --test-dir $(BUILD_DIR) --output-on-failure

demo: build
	PYTHONPATH=python $(PY) bench/demo.py

bench: build
	PYTHONPATH=python $(PY) bench/run.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench

# The test suite against an AddressSanitizer + UBSan build of _C (CI-optional; slow). The sanitized module
# goes into a copy of the package under build/asan, never into python/hotloop.
ASAN_PKG := build/asan/pkg
sanitize: venv
	$(VENV)/bin/cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHOTLOOP_SANITIZE=ON \
		-DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) > /dev/null
	$(VENV)/bin/cmake --build build/asan
	rm -rf $(ASAN_PKG) && mkdir -p $(ASAN_PKG) && cp -r python/hotloop $(ASAN_PKG)/
	rm -f $(ASAN_PKG)/hotloop/_C*.so && cp build/asan/_C*.so build/asan/_build_info.py $(ASAN_PKG)/hotloop/
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	HOTLOOP_SANITIZED=1 \
		$(PY) -m pytest -q tests -o pythonpath=$(ASAN_PKG) $(SANITIZE_ARGS)

# The graph engine on a GPU machine: a second venv with a CUDA torch, _C built into build/cuda and run from
# a copy of the package (python/hotloop keeps the CPU build). Building needs nvcc, not a GPU.
CUDA_VENV := .venv-cuda
CUDA_TORCH_PIN ?= torch==2.14.1

$(CUDA_VENV)/.ready:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(CUDA_TORCH_PIN) cmake ninja pybind11 scikit-build-core pytest numpy
	touch $@

cuda-build: $(CUDA_VENV)/.ready
	bench/cuda_build.sh $(CUDA_VENV)/bin/python build/cuda --require-cuda

# Compile-only check of the CUDA build against a given torch (nvcc, no GPU): a venv under build/ with that
# torch and only the CUDA libraries `import torch` loads (pip --no-deps, no triton), then _C is built with
# its CUDA sources and imported. TORCH=2.11.0 is the GPU machine's torch, 2.14.1 a CUDA wheel CI can get.
TORCH ?= 2.11.0
CUDA_CHECK := build/cuda-check-$(TORCH)
# What torch's CUDA libraries need to load (libtorch_cuda.so's DT_NEEDED, cusparse's nvJitLink) and nvrtc,
# which torch's CMake config links.
CUDA_IMPORT_LIBS := nvidia-cublas nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusparse \
	nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvshmem-cu13 nvidia-nvjitlink nvidia-cuda-nvrtc

$(CUDA_CHECK)/venv/.ready:
	$(PYTHON) -m venv $(CUDA_CHECK)/venv
	$(CUDA_CHECK)/venv/bin/pip install -q --no-deps torch==$(TORCH) $(CUDA_IMPORT_LIBS)
	$(CUDA_CHECK)/venv/bin/pip install -q cmake ninja pybind11 numpy typing-extensions sympy networkx jinja2 fsspec filelock
	touch $@

cuda-compile-check: $(CUDA_CHECK)/venv/.ready
	bench/cuda_build.sh $(CUDA_CHECK)/venv/bin/python $(CUDA_CHECK)/build --require-cuda
	PYTHONPATH=$(CUDA_CHECK)/build/pkg $(CUDA_CHECK)/venv/bin/python -c "import torch, hotloop; \
		from hotloop._native import _C; assert _C.WITH_CUDA; print('torch', torch.__version__, ': _C with CUDA imports')"

# The whole GPU check on the GPU machine itself, with its python3 (no network, no venv): build, CUDA tests,
# sync count, benchmark; see bench/gpu_check.sh. On a CPU machine it is a rehearsal (CUDA tests skip).
gpu-check:
	PYTHON=$(PYTHON) bench/gpu_check.sh

wheel: venv
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist python/hotloop/_C*.so python/hotloop/_build_info.py
