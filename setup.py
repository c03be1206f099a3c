"""Packaging entry point. Metadata lives in pyproject.toml; this file builds the native extension
``flowrl_kernels._C`` with CMake (CMakeLists.txt; torch's CMake config via find_package(Torch)).

    pip install --no-build-isolation -e .     # build against the torch already installed (recommended)
    pip install --no-build-isolation .
    FLOWRL_KERNELS_SKIP_NATIVE=1 pip install .  # pure-Python package, no compiler needed

torch must be importable at build time, so build with ``--no-build-isolation``. A plain ``pip install .``
(build isolation: an empty build environment without torch) and any build failure (no compiler, no
cmake, a torch without headers) install the pure-Python package with a warning; the library then runs
its Triton and torch paths, and ``flowrl_kernels.native_available()`` is False.

Environment knobs: FLOWRL_KERNELS_SKIP_NATIVE=1 (no extension), FLOWRL_KERNELS_CUDA=0 (CPU kernels only;
the CUDA kernels are built when torch has CUDA and nvcc is found via CUDA_HOME, /usr/local/cuda or PATH;
a failed CUDA build falls back to the CPU kernels), FLOWRL_KERNELS_CUDA_ARCHS (default "80;90"),
MAX_JOBS (parallel compile jobs; default all cores), FLOWRL_KERNELS_NATIVE_STRICT=1 (a failed build is
an error instead of a warning; for CI of the extension itself). ccache is used when found.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="0"):
    return os.environ.get(name, default) not in ("", "0")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # CMake owns the sources


def _find_cmake():
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the `cmake` PyPI package
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return None


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


class CMakeBuild(build_ext):
    """Configure + build CMakeLists.txt for each CMakeExtension; never fails the install unless
    FLOWRL_KERNELS_NATIVE_STRICT=1 (the package works without the extension)."""

    def run(self):
        self._built = []
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure degrades to the pure-Python package
            self._degrade(e)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._cmake_build(ext)
            self._built.append(ext)
        except Exception as e:  # noqa: BLE001
            self._degrade(e)

    def _degrade(self, err, what=None):
        if _flag("FLOWRL_KERNELS_NATIVE_STRICT"):
            raise err
        what = what or ("the native extension was NOT built. Installing the pure-Python package; CPU ops "
                        "will use the torch reference. To build it: have torch, cmake and a C++17 compiler "
                        "installed and run `pip install --no-build-isolation .`")
        msg = (f"flowrl_kernels: {what} ({type(err).__name__}: {err}); "
               "set FLOWRL_KERNELS_NATIVE_STRICT=1 to make this an error.")
        warnings.warn(msg)
        print("WARNING: " + msg, file=sys.stderr)

    def get_outputs(self):
        # an extension that was skipped must not be listed, or wheel / editable packaging looks for it
        built = getattr(self, "_built", None)
        if built is None:
            return super().get_outputs()
        return [self.get_ext_fullpath(e.name) for e in built]

    def _cmake_build(self, ext):
        try:
            import torch
            import torch.utils
        except ImportError as e:
            raise RuntimeError("torch is not importable at build time (build isolation? use "
                               "`pip install --no-build-isolation .`)") from e
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("cmake not found (install it, e.g. `pip install cmake ninja`)")

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir, out_file = os.path.split(out_path)
        ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)

        torch_cuda = torch.version.cuda is not None
        nvcc = _find_nvcc() if torch_cuda else None
        with_cuda = torch_cuda and nvcc is not None
        if "FLOWRL_KERNELS_CUDA" in os.environ:
            with_cuda = _flag("FLOWRL_KERNELS_CUDA") and nvcc is not None
        try:
            self._cmake_run(cmake, build_dir, ext_suffix, out_file, torch, with_cuda, nvcc)
        except subprocess.CalledProcessError as e:
            if not with_cuda:
                raise
            # the CUDA part is the fragile one (toolkit vs torch's CUDA, nvtx, arch flags): keep the CPU
            # kernels rather than lose the whole extension
            self._degrade(e, what="the CUDA kernels were NOT built; retrying with the CPU kernels only")
            shutil.rmtree(build_dir, ignore_errors=True)
            os.makedirs(build_dir, exist_ok=True)
            self._cmake_run(cmake, build_dir, ext_suffix, out_file, torch, False, None)
        built = os.path.join(build_dir, out_file)
        os.makedirs(out_dir, exist_ok=True)
        tmp = out_path + ".tmp"
        shutil.copyfile(built, tmp)
        os.replace(tmp, out_path)  # atomic: a process that has the old .so mapped keeps a valid file

    def _cmake_run(self, cmake, build_dir, ext_suffix, out_file, torch, with_cuda, nvcc):
        torch_cuda = torch.version.cuda is not None
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFLOWRL_OUTPUT_NAME={out_file[: -len(ext_suffix)] if out_file.endswith(ext_suffix) else '_C'}",
            f"-DFLOWRL_EXT_SUFFIX={ext_suffix}",
            f"-DFLOWRL_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            # a CUDA torch without a CUDA toolkit makes find_package(Torch) fail hard: use plain paths
            f"-DFLOWRL_FIND_TORCH={'OFF' if torch_cuda and not with_cuda else 'ON'}",
        ]
        if with_cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DFLOWRL_CUDA_ARCHS={os.environ.get('FLOWRL_KERNELS_CUDA_ARCHS', '80;90')}"]
        if shutil.which("ninja") or _has_module("ninja"):
            args += ["-G", "Ninja"]
            if not shutil.which("ninja"):
                import ninja

                args += [f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        subprocess.run([cmake, "-S", ROOT, "-B", build_dir] + args, check=True)
        subprocess.run([cmake, "--build", build_dir, "--config", cfg, "--parallel", jobs], check=True)


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


ext_modules = [] if _flag("FLOWRL_KERNELS_SKIP_NATIVE") else [CMakeExtension("flowrl_kernels._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
