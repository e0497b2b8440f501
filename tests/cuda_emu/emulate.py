"""Build libpyinf with its CUDA kernels (csrc/cuda/*.cu, unmodified) emulated on the CPU.

The .cu sources are copied into a build directory with two mechanical rewrites that keep
every line number (errors and the file:line of a finding point at the original source):

  * each launch ``kernel<<<grid, block[, smem[, stream]]>>>(args...)`` becomes
    ``::emu::launch("kernel", dim3(grid), dim3(block), smem, stream, kernel, args...)``;
  * after each ``__shared__`` declaration, ``EMU_SHARED(name);`` registers the array so the
    launcher can poison it before every block (see cuda_runtime.h).

They are then compiled as C++ (g++ -x c++) against the emulation headers of this directory
(first on the include path: cuda_runtime.h, mma.h) and the real CUDA headers (after it:
cuda_bf16.h, cuda_fp16.h, vector_types.h, cuda_runtime_api.h for types and declarations),
with the macros of a CUDA build of CMakeLists.txt (PYINF_WITH_CUDA, PYINF_BUILDING_LIBRARY),
together with csrc/api.cpp, csrc/cpu/*.cpp and emu_runtime.cpp into one shared library.
The library is cached under the build root by a hash of every input and flag.

    python tests/cuda_emu/emulate.py [--build-root DIR]   # builds, prints the library path
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sm90_overlay  # noqa: E402  (this directory is not a package)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.environ.get("PYINF_EMU_CSRC") or os.path.join(ROOT, "csrc")  # override: build a copy
CUDA_INCLUDE = os.environ.get("PYINF_EMU_CUDA_INCLUDE", "/usr/local/cuda/include")
LIB_NAME = "libpyinf_cuda_emu.so"

CXXFLAGS = [
    "-std=c++17",  # CMakeLists.txt: CMAKE_CXX_STANDARD / CMAKE_CUDA_STANDARD 17
    "-O1", "-g0", "-fPIC", "-pthread", "-fopenmp", "-fvisibility=hidden",
    "-fno-strict-aliasing",  # the sources reinterpret 16-bit arrays as uint4, as CUDA allows
    "-Wall", "-Wextra", "-Wno-unknown-pragmas",
    "-DPYINF_BUILDING_LIBRARY", "-DPYINF_WITH_CUDA", '-DPYINF_CUDA_ARCH_LIST="emulated"',
]


# The Hopper kernel's unit (build(sm90=True)): its body is compiled (__CUDA_ARCH_FEAT_SM90_ALL)
# against CUTLASS as nvcc 13 would see it on the host side (the TMA descriptor type, the
# driver's tensor-map encoder called directly: emu_sm90.cpp defines it), in release mode
# like the real build (CUTLASS's host asserts off).
SM90_FLAGS = ["-D__CUDA_ARCH_FEAT_SM90_ALL", "-D__CUDACC_VER_MAJOR__=13", "-D__CUDACC_VER_MINOR__=0",
              "-DCUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL", "-DNDEBUG", "-Wno-unused-parameter",
              "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-Wno-unused-local-typedefs"]


class EmulationError(RuntimeError):
    pass


def missing_sm90_prerequisites() -> str | None:
    """Why the Hopper kernel cannot be emulated here, or None."""
    if sm90_overlay.cutlass_include() is None:
        return "no CUTLASS headers (pip install nvidia-cutlass==4.2.0.0, or set PYINF_CUTLASS_DIR)"
    for header in ("cuda.h", os.path.join("cccl", "cuda", "std", "utility")):
        if not os.path.exists(os.path.join(CUDA_INCLUDE, header)):
            return f"{os.path.join(CUDA_INCLUDE, header)} not found"
    return None


def missing_prerequisites() -> str | None:
    """Why the emulated build cannot run here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "g++ not found"
    for header in ("cuda_bf16.h", "cuda_fp16.h", "vector_types.h", "cuda_runtime_api.h"):
        if not os.path.exists(os.path.join(CUDA_INCLUDE, header)):
            return f"{os.path.join(CUDA_INCLUDE, header)} not found (CUDA headers needed for the types)"
    return None


# ---- source rewriting ---------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def _match_close(text: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing text[i] == open_ch (no strings or chars in launch args)."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_ch:
            depth += 1
        elif text[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j
    raise EmulationError(f"unbalanced {open_ch!r} at offset {i}")


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:j])
            start = j + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _kernel_name_start(text: str, end: int) -> int:
    """Start of the kernel expression ending at text[end - 1] (identifier, optional
    template arguments, optional qualification)."""
    i = end
    while True:
        j = i
        while j > 0 and text[j - 1].isspace():
            j -= 1
        if j > 0 and text[j - 1] == ">":  # template arguments
            depth = 0
            k = j - 1
            while k >= 0:
                if text[k] == ">":
                    depth += 1
                elif text[k] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                k -= 1
            j = k
        while j > 0 and (text[j - 1].isalnum() or text[j - 1] == "_"):
            j -= 1
        if j >= 2 and text[j - 2:j] == "::":
            i = j - 2
            continue
        return j


def rewrite_launches(text: str, fname: str) -> tuple[str, int]:
    out, pos, count = [], 0, 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out), count
        start = _kernel_name_start(text, i)
        name = text[start:i].strip()
        if not name or not _IDENT.match(name):
            raise EmulationError(f"{fname}: cannot read the kernel name before <<< at offset {i}")
        j = text.find(">>>", i)
        if j < 0:
            raise EmulationError(f"{fname}: <<< without >>> at offset {i}")
        cfg = _split_top(text[i + 3:j])
        if not 2 <= len(cfg) <= 4 or not all(cfg):
            raise EmulationError(f"{fname}: launch configuration {cfg} of {name}")
        cfg += ["0", "0"][: 4 - len(cfg)]
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise EmulationError(f"{fname}: expected '(' after the launch configuration of {name}")
        close = _match_close(text, k, "(", ")")
        args = text[k + 1:close]
        logged = re.sub(r"\s+", "", name)  # the launch log separates fields with spaces
        call = (f'::emu::launch("{logged}", dim3({cfg[0]}), dim3({cfg[1]}), static_cast<size_t>({cfg[2]}), '
                f"static_cast<cudaStream_t>({cfg[3]}), {name}" + (f", {args})" if args.strip() else ")"))
        out.append(text[pos:start])
        out.append(call)
        pos = close + 1
        count += 1


_SHARED = re.compile(r"__shared__([^;]*);")
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*(\d+)\s*\)\s*)?([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")


def rewrite_extern_shared(text: str) -> tuple[str, int]:
    """``extern __shared__ [__align__(n)] T name[];`` (dynamic shared memory) becomes a pointer
    to the running block's dynamic shared memory (cuda_runtime.h: emu::dynamic_smem)."""
    def repl(m: re.Match) -> str:
        align, typ, name = m.group(1) or "16", m.group(2), m.group(3)
        return f"{typ}* const {name} = static_cast<{typ}*>(::emu::dynamic_smem({align}));"

    return _EXTERN_SHARED.subn(repl, text)


def rewrite_shared(text: str, fname: str) -> tuple[str, int]:
    count = 0

    def names(decl: str) -> list[str]:
        decl = re.sub(r"__align__\s*\([^)]*\)", "", decl)
        found = []
        for part in _split_top(decl):
            head = part.split("[", 1)[0]
            idents = _IDENT.findall(head)
            if not idents or "[" not in part:
                raise EmulationError(f"{fname}: __shared__ declaration {decl!r} is not an array declaration")
            found.append(idents[-1])
        return found

    def repl(m: re.Match) -> str:
        nonlocal count
        decl = m.group(1)
        if "extern" in decl or "\n" in decl:
            raise EmulationError(f"{fname}: unsupported __shared__ declaration {m.group(0)!r}")
        ns = names(decl)
        count += len(ns)
        return m.group(0) + "".join(f" EMU_SHARED({n});" for n in ns)

    return _SHARED.sub(repl, text), count


def preprocess(src: str, dst: str) -> dict:
    with open(src) as f:
        text = f.read()
    rel = os.path.relpath(src, ROOT)
    text, launches = rewrite_launches(text, rel)
    text, dynamic = rewrite_extern_shared(text)
    text, shared = rewrite_shared(text, rel)
    if text.count("\n") != open(src).read().count("\n"):
        raise EmulationError(f"{rel}: rewriting changed the line count")
    with open(dst, "w") as f:
        f.write(f'#line 1 "{src}"\n' + text)
    return {"launches": launches, "shared": shared, "dynamic": dynamic}


# ---- build ----------------------------------------------------------------------------------

def _sources():
    cu = sorted(os.path.join(CSRC, "cuda", f) for f in os.listdir(os.path.join(CSRC, "cuda")) if f.endswith(".cu"))
    cuh = sorted(os.path.join(CSRC, "cuda", f) for f in os.listdir(os.path.join(CSRC, "cuda")) if f.endswith(".cuh"))
    cpp = [os.path.join(CSRC, "api.cpp")] + sorted(
        os.path.join(CSRC, "cpu", f) for f in os.listdir(os.path.join(CSRC, "cpu")) if f.endswith(".cpp"))
    headers = [os.path.join(CSRC, "common.h"), os.path.join(CSRC, "cpu", "cpu_common.h"),
               os.path.join(CSRC, "include", "pyinf", "pyinf.h")]
    emu = sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith((".h", ".cpp", ".py")))
    return cu, cuh, cpp, headers, emu


def _digest(paths, extra) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def build(build_root: str | None = None, jobs: int | None = None, verbose: bool = False, sm90: bool = False) -> dict:
    """Build (or reuse) the emulated library; returns {'lib', 'dir', 'seconds', 'cached',
    'warnings', 'stats'}. sm90: also the Hopper kernel (factored_scores_sm90.cu), with the
    CUTLASS headers patched by sm90_overlay.py and the instructions of emu_sm90.cpp (as a
    CMake build with PYINF_WITH_SM90); a separate library."""
    why = missing_prerequisites() or (sm90 and missing_sm90_prerequisites())
    if why:
        raise EmulationError(why)
    cxx = os.environ.get("CXX", "g++")
    cu, cuh, cpp, headers, emu = _sources()
    cutlass = sm90_overlay.cutlass_include() if sm90 else None
    for h in cuh:
        with open(h) as f:
            t = f.read()
        if "<<<" in t or "__shared__" in t:
            raise EmulationError(f"{h}: launches / __shared__ in a header are not rewritten by the emulation")
    key = _digest(cu + cuh + cpp + headers + emu, (cxx, CXXFLAGS, CUDA_INCLUDE, cutlass, SM90_FLAGS if sm90 else None))
    root = build_root or os.path.join(tempfile.gettempdir(), "pyinf_cuda_emu")
    out_dir = os.path.join(root, key)
    lib = os.path.join(out_dir, LIB_NAME)
    if os.path.exists(lib):
        with open(os.path.join(out_dir, "build.log")) as f:
            log = f.read()
        return {"lib": lib, "dir": out_dir, "seconds": 0.0, "cached": True, "warnings": log, "stats": {}}
    t0 = time.monotonic()
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{key}.", dir=root)
    try:
        stats = {}
        units = []
        for src in cu:
            dst = os.path.join(work, os.path.basename(src) + ".cpp")
            stats[os.path.basename(src)] = preprocess(src, dst)
            units.append((dst, True))
        units += [(src, False) for src in cpp]
        units.append((os.path.join(HERE, "emu_runtime.cpp"), True))
        includes = ["-I" + HERE, "-I" + os.path.join(CSRC, "cuda"), "-I" + os.path.join(CSRC, "include"),
                    "-I" + CSRC, "-I" + CUDA_INCLUDE]
        sm90_flags = []
        if sm90:
            overlay = os.path.join(work, "overlay")
            sm90_overlay.write_overlay(cutlass, overlay)
            units.append((os.path.join(HERE, "emu_sm90.cpp"), True))
            sm90_flags = [*SM90_FLAGS, "-include", os.path.join(HERE, "emu_sm90.h"), "-I" + overlay, "-I" + cutlass,
                          "-I" + os.path.join(CUDA_INCLUDE, "cccl")]

        def compile_one(unit):
            src, cuda = unit
            obj = os.path.join(work, os.path.basename(src) + ".o")
            cmd = [cxx, *CXXFLAGS, *includes]
            if sm90:  # every unit sees PYINF_WITH_SM90, as with CMake; the kernel's unit the rest
                cmd += ["-DPYINF_WITH_SM90"]
                if os.path.basename(src).startswith("factored_scores_sm90."):
                    cmd += sm90_flags
            if cuda:  # the emulation prelude first, so its keyword macros win
                cmd += ["-include", os.path.join(HERE, "cuda_runtime.h")]
            cmd += ["-x", "c++", "-c", src, "-o", obj]
            r = subprocess.run(cmd, capture_output=True, text=True)
            return obj, r, cmd

        logs = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as ex:
            results = list(ex.map(compile_one, units))
        objs = []
        for obj, r, cmd in results:
            logs.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
            if r.returncode != 0:
                raise EmulationError(f"compile failed:\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
            objs.append(obj)
        tmp_lib = os.path.join(work, LIB_NAME)
        cmd = [cxx, "-shared", "-pthread", "-fopenmp", "-Wl,-Bsymbolic", "-o", tmp_lib, *objs]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise EmulationError(f"link failed:\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        log = "\n".join(logs)
        with open(os.path.join(work, "build.log"), "w") as f:
            f.write(log)
        try:
            os.rename(work, out_dir)  # atomic publish; a concurrent build of the same key wins
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if verbose:
        print(log)
    return {"lib": lib, "dir": out_dir, "seconds": time.monotonic() - t0, "cached": False, "warnings": log,
            "stats": stats}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-root", default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--sm90", action="store_true", help="also the Hopper kernel (a separate library)")
    args = ap.parse_args(argv)
    try:
        info = build(args.build_root, verbose=args.verbose, sm90=args.sm90)
    except EmulationError as exc:
        print(exc, file=sys.stderr)
        return 1
    how = "cached" if info["cached"] else "built in %.1f s" % info["seconds"]
    print(f"{info['lib']}  ({how})")
    for name, s in info["stats"].items():
        print(f"  {name}: {s['launches']} launches, {s['shared']} shared arrays rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
