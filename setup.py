"""Builds robust_fast._C (CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA torch
are both present, or FORCE_CUDA=1) and installs kernels/ as robust_fast.kernels."""
import glob
import os

from setuptools import find_packages, setup
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
    # at::vec uses AVX2 when told so; the compiled kernels then need a CPU that has it.
    if os.environ.get("ROBUST_FAST_NO_AVX2") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if " avx2" in flags and " fma" in flags and " f16c" in flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    import torch
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3"] + cpu_vector_flags()  # cpp_extension picks the C++ standard torch needs
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

setup(
    name="robust_fast",
    version="0.1.0",
    description="Fused kernels for adversarial robustness and robustness transfer in PyTorch",
    packages=find_packages(include=["robust_fast", "robust_fast.*"]) + ["robust_fast.kernels"],
    package_dir={"robust_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "nvtx"],
    extras_require={"triton": ["triton"], "test": ["pytest", "torchattacks"]},
    entry_points={"console_scripts": ["robust-fast=robust_fast.cli:main"]},
)
