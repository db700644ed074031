// TSPARSE_HD marks the functions of the torch-free headers in this folder that the CPU kernels
// (host code) and the CUDA kernels (device code) both run: __host__ __device__ __forceinline__
// under nvcc, plain inline for the host compiler. Defined once here for every such header.
#pragma once

#if defined(__CUDACC__)
#define TSPARSE_HD __host__ __device__ __forceinline__
#else
#define TSPARSE_HD inline
#endif
