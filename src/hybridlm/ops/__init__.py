"""Functional kernels, each beside the plain reference the tests compare it with.

Every function here works on CPU in plain PyTorch; optional fast kernels (Triton packages on
GPU) are selected inside the function and must compute the same thing as the reference.
"""
