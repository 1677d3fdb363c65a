// The kernel source compiled for the host, for the emulated device (issue 25; after
// tinygrad's mocked CUDA, which runs kernels on the CPU). CUDA's built-in variables are
// thread-locals set before each thread runs; a kernel's threads run one after another,
// which is exact because the kernels share nothing within a block (the rules at the top
// of kernels/mbq_kernels.cuh).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "CMBQKernels.h"

// No contraction of a * b + c into an fma: the CPU reference rounds twice, and NVRTC is
// given --fmad=false for the same reason.
#pragma STDC FP_CONTRACT OFF

typedef struct { unsigned x, y, z; } mbq_uint3;
static _Thread_local mbq_uint3 threadIdx, blockIdx, blockDim, gridDim;

static inline float __int_as_float(int bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#include "kernels/mbq_kernels.cuh"

// cuLaunchKernel's contract: args[i] points to parameter i. One line per kernel; a
// kernel missing here, or a name here with no kernel, fails
// OpConformanceTests.testKernelListsAgree.
#define P(i, T) (*(T *)args[i])
typedef const float *cf;
typedef const unsigned short *cu16;
typedef long long ll;
static void k_widen_bf16(void **args) { widen_bf16(P(0, float *), P(1, cu16), P(2, ll)); }
static void k_widen_f16(void **args) { widen_f16(P(0, float *), P(1, cu16), P(2, ll)); }
static void k_rmsnorm_forward(void **args) {
    rmsnorm_forward(P(0, float *), P(1, float *), P(2, cf), P(3, cf), P(4, ll), P(5, ll), P(6, float));
}
static void k_rmsnorm_backward(void **args) {
    rmsnorm_backward(P(0, float *), P(1, cf), P(2, cf), P(3, cf), P(4, cf), P(5, ll), P(6, ll));
}
static void k_rope_forward(void **args) { rope_forward(P(0, float *), P(1, cf), P(2, cf), P(3, ll), P(4, ll), P(5, ll)); }
static void k_rope_backward(void **args) { rope_backward(P(0, float *), P(1, cf), P(2, cf), P(3, ll), P(4, ll), P(5, ll)); }
static void k_swiglu_forward(void **args) { swiglu_forward(P(0, float *), P(1, cf), P(2, cf), P(3, ll)); }
static void k_swiglu_backward(void **args) {
    swiglu_backward(P(0, float *), P(1, float *), P(2, cf), P(3, cf), P(4, cf), P(5, ll));
}
static void k_softmax_causal(void **args) {
    softmax_causal(P(0, float *), P(1, float *), P(2, const int *), P(3, ll), P(4, ll), P(5, ll), P(6, ll), P(7, ll));
}
static void k_fake_quant_rows(void **args) { fake_quant_rows(P(0, float *), P(1, ll), P(2, ll), P(3, int)); }
static void k_fake_quant_groups(void **args) {
    fake_quant_groups(P(0, float *), P(1, cf), P(2, cf), P(3, ll), P(4, ll), P(5, ll), P(6, int));
}
static void k_scale_columns(void **args) { scale_columns(P(0, float *), P(1, cf), P(2, ll), P(3, ll), P(4, int)); }
static void k_add_inplace(void **args) { add_inplace(P(0, float *), P(1, cf), P(2, ll)); }
static void k_broadcast_rows(void **args) { broadcast_rows(P(0, float *), P(1, cf), P(2, ll), P(3, ll)); }
static void k_fill(void **args) { fill(P(0, float *), P(1, float), P(2, ll)); }
static void k_gather_rows(void **args) { gather_rows(P(0, float *), P(1, cf), P(2, const long long *), P(3, ll), P(4, ll)); }
static void k_column_abs_sums(void **args) { column_abs_sums(P(0, double *), P(1, cf), P(2, const int *), P(3, ll), P(4, ll)); }
static void k_attention_backward_rows(void **args) {
    attention_backward_rows(P(0, float *), P(1, float *), P(2, cf), P(3, cf), P(4, cf), P(5, const int *), P(6, ll), P(7, ll),
                            P(8, ll), P(9, ll), P(10, ll), P(11, ll));
}
static void k_row_error(void **args) { row_error(P(0, float *), P(1, cf), P(2, cf), P(3, ll), P(4, ll), P(5, int)); }
static void k_log_softmax_rows(void **args) { log_softmax_rows(P(0, float *), P(1, ll), P(2, ll)); }
static void k_exp_inplace(void **args) { exp_inplace(P(0, float *), P(1, ll)); }
static void k_scale(void **args) { scale(P(0, float *), P(1, float), P(2, ll)); }
static void k_pick_per_row(void **args) { pick_per_row(P(0, float *), P(1, cf), P(2, const long long *), P(3, ll), P(4, ll)); }
static void k_add_per_row(void **args) { add_per_row(P(0, float *), P(1, const long long *), P(2, float), P(3, ll), P(4, ll)); }
static void k_scatter_rows(void **args) { scatter_rows(P(0, float *), P(1, cf), P(2, const long long *), P(3, ll), P(4, ll)); }
#undef P

static const struct { const char *name; void (*run)(void **); } kernels[] = {
    {"widen_bf16", k_widen_bf16}, {"widen_f16", k_widen_f16},
    {"rmsnorm_forward", k_rmsnorm_forward}, {"rmsnorm_backward", k_rmsnorm_backward},
    {"rope_forward", k_rope_forward}, {"rope_backward", k_rope_backward},
    {"swiglu_forward", k_swiglu_forward}, {"swiglu_backward", k_swiglu_backward},
    {"softmax_causal", k_softmax_causal}, {"attention_backward_rows", k_attention_backward_rows},
    {"fake_quant_rows", k_fake_quant_rows}, {"fake_quant_groups", k_fake_quant_groups},
    {"scale_columns", k_scale_columns}, {"add_inplace", k_add_inplace},
    {"broadcast_rows", k_broadcast_rows}, {"fill", k_fill}, {"gather_rows", k_gather_rows}, {"column_abs_sums", k_column_abs_sums},
    {"row_error", k_row_error},
    {"log_softmax_rows", k_log_softmax_rows}, {"exp_inplace", k_exp_inplace}, {"scale", k_scale},
    {"pick_per_row", k_pick_per_row}, {"add_per_row", k_add_per_row}, {"scatter_rows", k_scatter_rows},
};

int mbq_host_kernel_count(void) { return (int)(sizeof kernels / sizeof kernels[0]); }

const char *mbq_host_kernel_name(int kernel) {
    return kernel >= 0 && kernel < mbq_host_kernel_count() ? kernels[kernel].name : NULL;
}

int mbq_host_kernel_index(const char *name) {
    for (int i = 0; i < mbq_host_kernel_count(); i++)
        if (strcmp(kernels[i].name, name) == 0) return i;
    return -1;
}

void mbq_host_launch(int kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                     unsigned long long block_begin, unsigned long long block_end, void **args) {
    void (*run)(void **) = kernels[kernel].run;
    gridDim = (mbq_uint3){gx, gy, gz};
    blockDim = (mbq_uint3){bx, by, bz};
    for (unsigned long long b = block_begin; b < block_end; b++) {
        blockIdx = (mbq_uint3){(unsigned)(b % gx), (unsigned)(b / gx % gy), (unsigned)(b / ((unsigned long long)gx * gy))};
        for (unsigned tz = 0; tz < bz; tz++)
            for (unsigned ty = 0; ty < by; ty++)
                for (unsigned tx = 0; tx < bx; tx++) {
                    threadIdx = (mbq_uint3){tx, ty, tz};
                    run(args);
                }
    }
}

// The source text for NVRTC, embedded at build time (C23 #embed): what the GPU runs is
// what the emulator ran.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wc23-extensions"
static const char source[] = {
#embed "kernels/mbq_kernels.cuh"
    , 0};
#pragma clang diagnostic pop

const char *mbq_kernel_source(void) { return source; }
