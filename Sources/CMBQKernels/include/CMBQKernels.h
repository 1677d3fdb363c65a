// The kernels of the CUDA backend as the host sees them (issue 25): their source text,
// which NVRTC compiles for the GPU, and the same source compiled for the host, which the
// emulated device launches (host_kernels.c).
#ifndef CMBQKERNELS_H
#define CMBQKERNELS_H

#include <stddef.h>

/// The kernel source (kernels/mbq_kernels.cuh), NUL-terminated.
const char *mbq_kernel_source(void);

/// Kernels compiled for the host: how many, each one's name, and the index of a name
/// (-1 when there is none).
int mbq_host_kernel_count(void);
const char *mbq_host_kernel_name(int kernel);
int mbq_host_kernel_index(const char *name);

/// Runs blocks [block_begin, block_end) (linear block indices, x fastest) of a launch
/// of `kernel` over grid (gx, gy, gz) and blocks (bx, by, bz), each block's threads one
/// after another, on the calling thread. `args` as cuLaunchKernel takes them: args[i]
/// points to the i-th parameter's value.
void mbq_host_launch(int kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                     unsigned long long block_begin, unsigned long long block_end, void **args);

#endif
