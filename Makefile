# Two entry points (see README "Quick start"): `make demo` and `make test`; `make zoo` runs the
# attention-zoo study (docs/zoo.md), `make zoo-seeds` its seeds study (93 min on a 2-vCPU AMX Xeon).
# Each creates .venv inside the repo on first use; the stamp makes re-runs instant
# until a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATTEN := natten==0.21.7
# natten's setup.py compiles its CUDA library (CMake + nvcc, for the GPU it sees) when torch sees a
# GPU or NATTEN_CUDA_ARCH is set; by default both are hidden from it: pure Python, seconds (on CUDA
# natten then runs through FlexAttention). `make setup NATTEN_CUDA=1` builds the library: it needs
# CMake, a CUDA toolkit (nvcc) matching torch's CUDA (>= 12.0) and a long compile; README "GPU set-up".
NATTEN_CUDA ?= 0
ifeq ($(NATTEN_CUDA),1)
NATTEN_INSTALL := $(PY) -m pip install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps $(NATTEN)
.PHONY: $(STAMP)  # re-run: replace an installed pure-Python natten with a CUDA build
else
NATTEN_INSTALL := CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= $(PY) -m pip install -q --no-build-isolation $(NATTEN)
endif

.PHONY: setup demo test zoo zoo-seeds lint format gpu-wheels

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# natten's sdist builds against the installed torch; no CUDA library unless NATTEN_CUDA=1 (above).
	$(NATTEN_INSTALL)
	# The NA C++ CPU kernel and the bf16 block ops (~1 min); without a compiler this prints why and the 'torch' backend serves.
	$(PY) -c "from models.layers.backends.cpp_kernel import kernel_build_error as e; print(e() or 'NA C++ kernel ready')"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

zoo: $(STAMP)
	$(PY) scripts/zoo.py --out runs/zoo-study --jobs 2

# Every mixer with 6 pathfinder seeds (18 for na, dilated, full: escape rates, 95% Wilson intervals)
# and 3 shapes seeds: 198 runs, 93 min with two side by side on a 2-vCPU AMX Xeon (docs/zoo.md). Run
# it on an otherwise idle machine; stopped and restarted, it reuses the finished runs.
zoo-seeds: $(STAMP)
	$(PY) scripts/zoo.py --out runs/zoo-seeds --parts accuracy patterns --jobs 2 \
		--seeds pathfinder=6 shapes=3 pathfinder/na=18 pathfinder/dilated=18 pathfinder/full=18

# pytest-xdist workers: 2 fit the 2-vCPU CI machines (the suite is ~half single-threaded Python and
# subprocess start-up: 9.2 -> 5.1 min on one of them); `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS)

# What a GPU machine without network access needs beside its own torch, Triton and timm, as wheels in
# .whl/ (docs/benchmarks.md, "A first GPU session"): natten built without its CUDA library (pure
# Python, py3-none-any) and this venv's timm, so the check runs against the timm the tests ran.
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl $(NATTEN)
	$(PY) -m pip download -q --no-deps -d .whl "timm==$$($(PY) -c 'import timm; print(timm.__version__)')"

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
