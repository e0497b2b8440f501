"""Build script. The pure-Python package installs as is; the native backend (csrc/) is
built by CMake into the extension module ``pyinf._C`` when a C++ toolchain is present.

Environment:
  PYINF_CUDA=auto|0|1      auto (default): build the CUDA kernels when nvcc is found, and fall
                           back to a CPU-only build, then to no extension (with a warning), if
                           the native build fails. 1: CUDA is required, failures are fatal.
                           0: CPU-only native build.
  PYINF_CUDA_ARCHS="90a;80" CUDA architectures (SM numbers) to compile for.
  PYINF_CUDA_SM90=auto|0|1 the Hopper factored_scores kernel (with 90a among the archs, nvcc
                           12.3+ and the CUTLASS headers): auto builds it when it can.
  PYINF_CUTLASS_DIR=DIR    CUTLASS's include directory (default: the nvidia-cutlass package's).
  PYINF_BUILD_NATIVE=0     skip the native build entirely (pure-Python install).
  PYINF_BUILD_JOBS=N       parallel compile jobs (default: CPU count).
"""
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _warn(msg):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (pyinf): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _tool(module, name):
    """A build tool from its PyPI package (cmake, ninja) or PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR"), name)
        if os.path.exists(path):
            return path
    except Exception:
        pass
    return shutil.which(name)


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        self._skipped = set()
        if os.environ.get("PYINF_BUILD_NATIVE", "1") == "0":
            _warn("PYINF_BUILD_NATIVE=0: skipping the native backend (pyinf._C)")
            for ext in self.extensions:
                self._skip(ext)
            self.extensions = []
            return
        super().run()

    def build_extensions(self):
        super().build_extensions()
        # Extensions that were skipped must not be copied or listed as outputs.
        self.extensions = [e for e in self.extensions if e.name not in self._skipped]

    def _skip(self, ext):
        self._skipped.add(ext.name)
        # An editable install keeps the extension in the source tree: drop a stale one.
        in_tree = os.path.join(ROOT, *ext.name.split(".")) + sysconfig.get_config_var("EXT_SUFFIX")
        if os.path.exists(in_tree):
            os.remove(in_tree)

    def build_extension(self, ext):
        mode = os.environ.get("PYINF_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"PYINF_CUDA must be auto, 0 or 1, got {mode!r}")
        # A failed build must not leave an older extension behind (editable installs build in place).
        stale = os.path.abspath(self.get_ext_fullpath(ext.name))
        if os.path.exists(stale):
            os.remove(stale)
        cmake = _tool("cmake", "cmake")
        if cmake is None:
            if mode == "1":
                raise RuntimeError("pyinf: PYINF_CUDA=1 but cmake was not found")
            _warn("cmake not found: installing without the native backend (pyinf._C)")
            self._skip(ext)
            return
        attempts = [mode]
        if mode == "auto":
            attempts = (["1"] if _nvcc() else []) + ["0"]
        errors = []
        for cuda in attempts:
            try:
                self._cmake_build(ext, cmake, cuda)
                if errors:
                    _warn("the CUDA build failed; built the CPU-only native backend instead.\n" + errors[-1])
                return
            except Exception as exc:  # a compiler error, a missing pybind11, ...
                errors.append(f"PYINF_CUDA={cuda}: {type(exc).__name__}: {exc}")
                if mode != "auto":
                    raise
        _warn("the native backend (pyinf._C) failed to build; pyinf works without it (pure Python).\n"
              + "\n".join(errors))
        self._skip(ext)

    def _cmake_build(self, ext, cmake, cuda):
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), f"cmake-cuda{cuda}")
        os.makedirs(build_dir, exist_ok=True)
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed (pip install 'pybind11>=2.12')") from exc

        args = [
            "-DPYINF_BUILD_PYTHON=ON",
            "-DPYINF_BUILD_SHARED=OFF",
            f"-DPYINF_CUDA={cuda}",
            f"-DPYINF_CUDA_ARCHS={os.environ.get('PYINF_CUDA_ARCHS') or '90a;80'}",
            f"-DPYINF_PYTHON_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        # The Hopper kernel (CUTLASS/CuTe headers): auto | 0 | 1, and where the headers are.
        for var in ("PYINF_CUDA_SM90", "PYINF_CUTLASS_DIR"):
            if os.environ.get(var):
                args.append(f"-D{var}={os.environ[var]}")
        ninja = _tool("ninja", "ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        nvcc = _nvcc()
        if cuda == "1" and nvcc and not os.environ.get("CUDACXX"):
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        jobs = os.environ.get("PYINF_BUILD_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.run([cmake, "-S", ROOT, "-B", build_dir, *args], check=True)
        subprocess.run([cmake, "--build", build_dir, "--target", "_C", "-j", jobs], check=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = os.path.join(out_dir, "_C" + suffix)
        if not os.path.exists(built):
            raise subprocess.CalledProcessError(1, "cmake --build", f"expected {built} after the build")


setup(ext_modules=[CMakeExtension("pyinf._C")], cmdclass={"build_ext": CMakeBuild})
