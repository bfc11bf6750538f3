"""Tests of deepopt.kernels. Triton's mode (interpreter or compiled) is fixed at the first
``import triton`` of the process; tests/conftest.py chooses it: the interpreter without CUDA."""
