"""Builds robust_fast._C (CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA torch
are both present, or FORCE_CUDA=1). The package metadata, dependencies and the package list
(kernels/ installed as robust_fast.kernels) are in pyproject.toml."""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def bounded_max_jobs() -> str:
    # nvcc and cc1plus on torch headers take GBs each: one job per 4 GiB, never more than cores.
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, (pages * page_size) // (4 << 30))
    except (ValueError, OSError):
        by_memory = 1
    return str(max(1, min(os.cpu_count() or 1, by_memory)))


def cpu_vector_flags() -> list:
    # at::vec uses the widest vectors it is told it may; the kernels then need a CPU that has
    # them, so the flags follow this machine's CPU (ROBUST_FAST_CPU_ISA=avx2|none narrows them).
    choice = os.environ.get("ROBUST_FAST_CPU_ISA", "native")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    avx2 = {"avx2", "fma", "f16c"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    if choice == "native" and avx512 <= flags:
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if choice in ("native", "avx2") and avx2 <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    import torch
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline and runs serially without it. Only the compile
    # step gets it: the GOMP symbols then bind to the OpenMP runtime torch itself loaded,
    # never a second one.
    # -fno-math-errno: no kernel reads errno, and without it sqrt cannot become a vector
    # instruction (gaussian_copies' Box-Muller).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"] + cpu_vector_flags()  # cpp_extension picks the C++ standard
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if build_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "robust_fast._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DROBUST_FAST_WITH_CUDA"], "nvcc": nvcc_flags})
    return cpp_extension.CppExtension(
        "robust_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})


os.environ["MAX_JOBS"] = bounded_max_jobs()
if build_cuda() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    import torch
    if not torch.cuda.is_available():
        # cpp_extension asks the visible GPUs which architectures to compile for; on a build
        # machine without one (or in pip's build environment) it has none: CI's default.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

class BuildExtension(cpp_extension.BuildExtension):
    """ROBUST_FAST_BUILD_DIR names a folder that outlives pip's temporary one: ninja keeps its
    objects and dependency log there, so a reinstall recompiles only the sources (and headers)
    that changed, and nothing when none did."""

    def finalize_options(self):
        super().finalize_options()
        persistent = os.environ.get("ROBUST_FAST_BUILD_DIR")
        if persistent:
            self.build_temp = os.path.join(persistent, "cuda" if build_cuda() else "cpu")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
