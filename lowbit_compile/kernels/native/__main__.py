"""`python -m lowbit_compile.kernels.native`: build (or load) the extension and print what this CPU runs."""

import sys

import torch

from . import available, build_dir, capabilities, unavailable_reason

if not available():
    print(f"lowbit_native: unavailable: {unavailable_reason()}", file=sys.stderr)
    sys.exit(1)
print(f"lowbit_native: built in {build_dir()}")
print(f"torch {torch.__version__}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
for key, value in capabilities().items():
    print(f"  {key}: {value}")
