"""Plain install; the CUDA extension nbp_kernels._C is built only when asked (see README)."""
from setuptools import setup

setup()
