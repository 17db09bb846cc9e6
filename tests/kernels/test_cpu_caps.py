"""kernels/cpu_caps.py: the CPU kernel an integer layer gets, for every kind of CPU (features are faked, so each
capability's rule runs on any machine; no timing is asserted)."""

import pytest
import torch

from lowbit_compile.errors import LowbitError
from lowbit_compile.kernels import cpu, cpu_caps, int4pack_layout, native

AVX2 = {"capability": "AVX2", "avx2": True, "avx512": False, "avx512_bf16": False, "amx": False, "vnni": False}
AVX512 = {**AVX2, "capability": "AVX512", "avx512": True, "vnni": True}
AVX512_BF16 = {**AVX512, "avx512_bf16": True}
AMX = {**AVX512_BF16, "amx": True}


@pytest.fixture
def cpu_is(monkeypatch):
    def make(features, native_ok=True, int4pack_ok=True, bf16_time=None):
        monkeypatch.delenv(cpu_caps.KERNEL_ENV, raising=False)
        monkeypatch.setattr(cpu_caps, "features", lambda: features)
        monkeypatch.setattr(native, "available", lambda: native_ok)
        monkeypatch.setattr(native, "unavailable_reason", lambda: "" if native_ok else "no compiler")
        monkeypatch.setattr(int4pack_layout, "packed_block_n", lambda: 64 if int4pack_ok else None)
        if bf16_time is not None:  # seconds of (float32, bfloat16) GEMM: the measured case
            times = iter(bf16_time)
            monkeypatch.setattr(cpu_caps, "_time", lambda fn, reps=3: next(times))
        cpu_caps.fast_bf16.cache_clear()

    yield make
    cpu_caps.fast_bf16.cache_clear()


def test_avx2_takes_the_native_kernels_with_a_float32_prefill(cpu_is):
    cpu_is(AVX2)
    c = cpu_caps.choose(2, 0)
    assert c.kernel == "native" and "AVX2 without AVX-512-BF16" in c.reason
    assert cpu_caps.prefill_dtype() == torch.float32


@pytest.mark.parametrize("features, name", [(AVX512_BF16, "AVX-512-BF16"), (AMX, "AMX")])
def test_fast_bfloat16_keeps_the_int4pack_kernel_and_its_bf16_prefill(cpu_is, features, name):
    cpu_is(features)
    c = cpu_caps.choose(4, 128)
    assert c.kernel == "int4pack" and name in c.reason
    assert cpu_caps.prefill_dtype() == torch.bfloat16


@pytest.mark.parametrize("t32, t16, kernel", [(1.0, 0.8, "int4pack"), (1.0, 3.0, "native")])
def test_avx512_without_bf16_is_decided_by_measurement(cpu_is, t32, t16, kernel):
    cpu_is(AVX512, bf16_time=(t32, t16))
    c = cpu_caps.choose(3, 0)
    assert c.kernel == kernel and f"a bfloat16 GEMM takes {t16 / t32:.2f}x float32" in c.reason


def test_without_the_native_library_int4pack_runs_with_a_float32_prefill(cpu_is):
    cpu_is(AVX2, native_ok=False)
    c = cpu_caps.choose(2, 0)
    assert c.kernel == "int4pack" and "native kernels unavailable (no compiler)" in c.reason
    rows, bf16 = cpu.prefill_choice()
    assert not bf16 and rows == 8


def test_neither_kernel_leaves_the_reference(cpu_is):
    cpu_is(AVX2, native_ok=False, int4pack_ok=False)
    assert cpu_caps.choose(2, 0).kernel == "reference"


@pytest.mark.parametrize("bits, group, why", [(8, 0, "int8 has no CPU fast path"),
                                              (4, 16, "group size 16 is not a multiple of 32")])
def test_what_no_cpu_kernel_takes_says_why(cpu_is, bits, group, why):
    cpu_is(AVX2)
    c = cpu_caps.choose(bits, group)
    assert c.kernel == "reference" and c.reason == why


def test_weights_off_the_cpu_stay_on_the_reference(cpu_is):
    cpu_is(AVX2)
    assert cpu_caps.choose(4, 0, torch.device("meta")).kernel == "reference"


def test_the_environment_forces_a_kernel_and_rejects_unknown_ones(cpu_is, monkeypatch):
    cpu_is(AVX512_BF16)
    monkeypatch.setenv(cpu_caps.KERNEL_ENV, "native")
    assert cpu_caps.choose(2, 0).kernel == "native"
    monkeypatch.setenv(cpu_caps.KERNEL_ENV, "fast")
    with pytest.raises(LowbitError, match=r"LOWBIT_CPU_KERNEL='fast': valid values are"):
        cpu_caps.choose(2, 0)


def test_kernels_reference_keeps_the_reference_op_and_auto_chooses(cpu_is):
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import parse_spec

    cpu_is(AVX2)
    rec = quantize_weight("l", torch.randn(64, 64), parse_spec("w4"))
    assert cpu_caps.choose_for(rec, "reference").kernel == "reference"
    assert cpu_caps.choose_for(rec, "auto").kernel == "native"


def test_this_machine_reports_its_features():
    f = cpu_caps.features()
    assert f["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(f) >= {"avx2", "avx512", "avx512_bf16", "amx"}


def test_a_machine_with_a_compiler_builds_the_native_kernels():
    """The native kernel tests skip where the extension is unavailable; where a C++ compiler is on the PATH, an
    unavailable extension is a build failure, not a reason to skip."""
    import os
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the int4pack and reference kernels run")
    assert native.available(), native.unavailable_reason()
