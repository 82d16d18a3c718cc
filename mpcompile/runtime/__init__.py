"""Compile, cache, load and launch generated kernels; the CPU reference of the same contract."""
