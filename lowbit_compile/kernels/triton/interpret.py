"""Run Triton kernel checks on CPU under TRITON_INTERPRET=1, in a fresh Python process.

TRITON_INTERPRET must be set before `triton` is imported, and a test session has usually imported it already
(torch._inductor does), so the checks run in a subprocess: `run(path)` executes `python path` with the
variable set; the script ends with `main(CHECKS)`, which runs every check, catches failures and prints one
line of JSON results that `run` returns. Kernels launched by the checks are the very kernels the ops launch on
CUDA, here on CPU tensors (the interpreter runs each program in numpy: keep shapes small).

A test file is its own script (tests/kernels/test_triton_*.py):

    CHECKS = interpret.Checks()

    @CHECKS.add
    def some_kernel_matches_its_reference(): ...

    interpreted, test_interpreted = CHECKS.pytest_side(__file__)  # one subprocess, a test per check

    if __name__ == "__main__":
        interpret.main(CHECKS)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

RESULT_MARK = "LOWBIT_INTERPRET_RESULTS "


class Checks(dict):
    """{name: check} of one script; a check is a function that raises on failure."""

    def add(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Decorator: register `fn` under its name."""
        self[fn.__name__] = fn
        return fn

    def pytest_side(self, path: str):
        """(fixture, test) to bind in the test module as `interpreted, test_interpreted`: the module-scoped
        fixture runs the script `path` once (skipped without Triton), the test is parametrized by check name;
        call it after the last check is added."""
        import pytest  # only the test session needs it, not the interpreted process

        @pytest.fixture(scope="module")
        def interpreted():
            pytest.importorskip("triton")
            return run(path)

        @pytest.mark.parametrize("name", list(self))
        def test_interpreted(interpreted, name):
            result = interpreted["results"][name]
            assert result == "ok", result

        return interpreted, test_interpreted


def run(path: str, timeout: float = 300) -> dict:
    """{"results": {check: "ok" | traceback}, "seconds": {check: s}} of the checks in script `path`."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"{path} under TRITON_INTERPRET=1 exited with {proc.returncode} before reporting:\n"
                       f"{proc.stderr[-4000:]}")


def _widen_bfloat16_dot_operands() -> None:
    """triton 3.9's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 storage (it converts
    only fp8): widen them to float32 first, which is exact (float32 products, like the tensor cores)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "lowbit_widened", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype == tl.bfloat16 else t for t in (a, b))
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.lowbit_widened = True
    builder.create_dot = create_dot


def main(checks: dict[str, Callable[[], None]]) -> None:
    """Run each check (a function that raises on failure) and print the results line."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run this script through lowbit_compile.kernels.triton.interpret.run (TRITON_INTERPRET=1)")
    import torch

    torch.set_num_threads(1)
    _widen_bfloat16_dot_operands()
    results, seconds = {}, {}
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        seconds[name] = round(time.perf_counter() - t0, 3)
    print(RESULT_MARK + json.dumps({"results": results, "seconds": seconds}), flush=True)
