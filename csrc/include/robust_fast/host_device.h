// RF_HOST_DEVICE: scalar math shared by the CPU and CUDA kernels compiles for both sides.
#pragma once

#if defined(__CUDACC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif
