"""The CPU backend: C kernels (`kernels.c`, `quant.c`, loaded by `kernels.py`) and the choice, per op, of a C kernel
or the op's pure-torch reference (`lowering.py`), which backend "reference" calls."""
