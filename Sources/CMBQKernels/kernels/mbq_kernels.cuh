// The CUDA backend's kernels (issue 25), one source for two compilers:
//   - NVRTC compiles it for the GPU (MBQDevice/KernelCompiler.swift, options there:
//     --fmad=false and IEEE division and square root, so that a product and a sum stay
//     two roundings as on the CPU);
//   - the host's C compiler compiles it into the emulated device (host_kernels.c), which
//     runs every kernel over its grid and blocks on the CPU.
// So the source is the common subset of CUDA C++ and C23: no templates, no references,
// no shared memory, no __syncthreads, no warp shuffles, no atomics (the emulator runs the
// threads of a block one after another, and sums must be deterministic). Each thread
// owns its outputs; a reduction is one thread's sequential loop, in the CPU reference's
// order (MBQModel, MBQQuant), so that the emulated device reproduces the CPU bit for bit.
// Indices are long long: a 72B MLP weight has 29568 * 8192 = 242M elements, and
// products of int sizes overflow past 2^31.
//
// Launch contract (MBQDevice/DeviceOps.swift): a 1-D grid of 1-D blocks covers n
// threads; thread i = blockIdx.x * blockDim.x + threadIdx.x, threads past n return.

#if defined(__CUDACC__)
#define MBQ_KERNEL extern "C" __global__ void
#define MBQ_FN static __device__ __forceinline__
#else
#define MBQ_KERNEL static void
#define MBQ_FN static inline
#endif

MBQ_FN long long mbq_thread(void) { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }

// -infinity without math.h (NVRTC has no INFINITY).
MBQ_FN float mbq_neg_inf(void) { return __int_as_float((int)0xFF800000u); }

// Logistic sigmoid, finite for large |x| (MBQTensor/Kernels.swift `sigmoid`).
MBQ_FN float mbq_sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// ---- stored dtypes -----------------------------------------------------------------

// out[i] = the fp32 value of bf16 bits in[i] (exact). n elements.
MBQ_KERNEL widen_bf16(float* out, const unsigned short* in, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    unsigned int bits = ((unsigned int)in[i]) << 16;
    out[i] = __int_as_float((int)bits);
}

// out[i] = the fp32 value of fp16 bits in[i] (exact; subnormals, infinities, NaN kept).
MBQ_KERNEL widen_f16(float* out, const unsigned short* in, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    unsigned int h = in[i];
    unsigned int sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
    if (e == 0x1Fu) {
        bits = sign | 0x7F800000u | (m << 13);
    } else if (e != 0) {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        bits = sign;
    } else {
        // Subnormal: normalize the mantissa.
        e = 113u;
        while ((m & 0x400u) == 0) { m <<= 1; e -= 1; }
        bits = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
    out[i] = __int_as_float((int)bits);
}

// ---- RMSNorm (MBQModel/RMSNorm.swift) ------------------------------------------------

// x: [rows, cols], w: [cols] -> y: [rows, cols], inv_rms: [rows]. One thread per row.
MBQ_KERNEL rmsnorm_forward(float* y, float* inv_rms, const float* x, const float* w, long long rows, long long cols, float eps) {
    long long r = mbq_thread();
    if (r >= rows) return;
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    float ss = 0.0f;
    for (long long j = 0; j < cols; j++) ss += xr[j] * xr[j];
    float ri = 1.0f / sqrtf(ss / (float)cols + eps);
    inv_rms[r] = ri;
    for (long long j = 0; j < cols; j++) yr[j] = w[j] * (xr[j] * ri);
}

// dy, x: [rows, cols], w: [cols], inv_rms: [rows] -> dx: [rows, cols]. One thread per row.
MBQ_KERNEL rmsnorm_backward(float* dx, const float* dy, const float* x, const float* w, const float* inv_rms,
                            long long rows, long long cols) {
    long long r = mbq_thread();
    if (r >= rows) return;
    const float* xr = x + r * cols;
    const float* gr = dy + r * cols;
    float ri = inv_rms[r];
    float dot = 0.0f;
    for (long long j = 0; j < cols; j++) dot += w[j] * gr[j] * xr[j];
    float k = ri * ri * ri * dot / (float)cols;
    for (long long j = 0; j < cols; j++) dx[r * cols + j] = ri * w[j] * gr[j] - xr[j] * k;
}

// ---- RoPE, rotate_half (MBQModel/RoPE.swift) -----------------------------------------

// In place on x: [rows, heads * d]; cos, sin: [rows, d] (M-RoPE is in the table).
// One thread per (row, head, j < d/2): the pair (j, j + d/2).
MBQ_KERNEL rope_forward(float* x, const float* cosv, const float* sinv, long long rows, long long heads, long long d) {
    long long h = d / 2, i = mbq_thread();
    if (i >= rows * heads * h) return;
    long long j = i % h, head = (i / h) % heads, p = i / (h * heads);
    float* b = x + p * heads * d + head * d;
    const float* c = cosv + p * d;
    const float* s = sinv + p * d;
    float x1 = b[j], x2 = b[j + h];
    b[j] = x1 * c[j] - x2 * s[j];
    b[j + h] = x2 * c[j + h] + x1 * s[j + h];
}

// The transpose of rope_forward, in place on a gradient dy: [rows, heads * d].
MBQ_KERNEL rope_backward(float* dy, const float* cosv, const float* sinv, long long rows, long long heads, long long d) {
    long long h = d / 2, i = mbq_thread();
    if (i >= rows * heads * h) return;
    long long j = i % h, head = (i / h) % heads, p = i / (h * heads);
    float* b = dy + p * heads * d + head * d;
    const float* c = cosv + p * d;
    const float* s = sinv + p * d;
    float g1 = b[j], g2 = b[j + h];
    b[j] = g1 * c[j] + g2 * s[j + h];
    b[j + h] = g2 * c[j + h] - g1 * s[j];
}

// ---- SwiGLU (MBQModel/MLP.swift) ------------------------------------------------------

// a = silu(g) * u, n elements.
MBQ_KERNEL swiglu_forward(float* a, const float* g, const float* u, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    a[i] = g[i] * mbq_sigmoid(g[i]) * u[i];
}

// With s = sigmoid(g): dg = da * u * s * (1 + g (1 - s)), du = da * g * s.
MBQ_KERNEL swiglu_backward(float* dg, float* du, const float* da, const float* g, const float* u, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    float gv = g[i], s = mbq_sigmoid(gv);
    dg[i] = da[i] * u[i] * s * (1.0f + gv * (1.0f - s));
    du[i] = da[i] * gv * s;
}

// ---- attention core (MBQModel/Attention.swift) -----------------------------------------

// Row softmax of one head group's scores over the visible keys (j <= query, mask[j] != 0),
// in place; the rest become 0, a query that sees no key gets a zero row and lse -inf.
// scores: [heads_in_batch, rows, ld] (row r of head b at scores + (b * rows + r) * ld,
// query index row0 + r, keys 0 ..< row0 + rows); lse: [heads_in_batch] rows apart by t
// (lse + b * t + row0 + r). One thread per (head, row).
MBQ_KERNEL softmax_causal(float* scores, float* lse, const int* mask, long long batch, long long rows, long long ld,
                          long long row0, long long t) {
    long long i = mbq_thread();
    if (i >= batch * rows) return;
    long long b = i / rows, r = i % rows, q = row0 + r;
    float* row = scores + (b * rows + r) * ld;
    float mx = mbq_neg_inf();
    // Swift.max(mx, v) is `v >= mx ? v : mx`.
    for (long long j = 0; j <= q; j++) if (mask[j]) mx = row[j] >= mx ? row[j] : mx;
    if (mx == mbq_neg_inf()) {
        for (long long j = 0; j < ld; j++) row[j] = 0.0f;
        lse[b * t + q] = mbq_neg_inf();
        return;
    }
    float sum = 0.0f;
    for (long long j = 0; j <= q; j++) {
        if (mask[j]) { float e = expf(row[j] - mx); row[j] = e; sum += e; } else { row[j] = 0.0f; }
    }
    float inv = 1.0f / sum;
    for (long long j = 0; j <= q; j++) row[j] *= inv;
    for (long long j = q + 1; j < ld; j++) row[j] = 0.0f;
    lse[b * t + q] = mx + logf(sum);
}

// The middle of attention backward for one head and one block of query rows
// (MBQModel/Attention.swift attentionCoreBackward): p holds the block's scores S (rows x
// n, row r is query row0 + r) and becomes P = exp(S - lse); dp holds dctx v^T and becomes
// dS = P * (dP - rowsum(dctx * ctx)). dctx, ctx: [t, ldq], this head's columns from
// `col`; lse: this head's [t]. One thread per row.
MBQ_KERNEL attention_backward_rows(float* p, float* dp, const float* lse, const float* dctx, const float* ctx, const int* mask,
                                   long long rows, long long n, long long row0, long long ldq, long long col, long long d) {
    long long r = mbq_thread();
    if (r >= rows) return;
    long long q = row0 + r;
    float* row = p + r * n;
    float* drow = dp + r * n;
    float l = lse[q];
    if (l == mbq_neg_inf()) {
        for (long long j = 0; j < n; j++) { row[j] = 0.0f; drow[j] = 0.0f; }
        return;
    }
    float dot = 0.0f;
    for (long long c = 0; c < d; c++) dot += dctx[q * ldq + col + c] * ctx[q * ldq + col + c];
    for (long long j = 0; j <= q; j++) {
        if (mask[j]) {
            float pr = expf(row[j] - l);
            row[j] = pr;
            drow[j] = pr * (drow[j] - dot);
        } else {
            row[j] = 0.0f; drow[j] = 0.0f;
        }
    }
    for (long long j = q + 1; j < n; j++) { row[j] = 0.0f; drow[j] = 0.0f; }
}

// ---- the caption-loss head (MBQModel/LossHead.swift) ---------------------------------------

// x -= logsumexp(x) per row, max-shifted (logSoftmaxRowsInPlace). x: [rows, cols]. One thread per row.
MBQ_KERNEL log_softmax_rows(float* x, long long rows, long long cols) {
    long long r = mbq_thread();
    if (r >= rows) return;
    float* row = x + r * cols;
    float m = mbq_neg_inf();
    for (long long j = 0; j < cols; j++) m = row[j] >= m ? row[j] : m;
    float sum = 0.0f;
    for (long long j = 0; j < cols; j++) sum += expf(row[j] - m);
    float lse = m + logf(sum);
    for (long long j = 0; j < cols; j++) row[j] -= lse;
}

// x[i] = exp(x[i]) (log-probabilities to probabilities), n elements.
MBQ_KERNEL exp_inplace(float* x, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    x[i] = expf(x[i]);
}

// x[i] *= s, n elements.
MBQ_KERNEL scale(float* x, float s, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    x[i] *= s;
}

// out[r] = x[r, idx[r]]; x: [rows, cols]. One thread per row (each target's log-probability).
MBQ_KERNEL pick_per_row(float* out, const float* x, const long long* idx, long long rows, long long cols) {
    long long r = mbq_thread();
    if (r >= rows) return;
    out[r] = x[r * cols + idx[r]];
}

// x[r, idx[r]] += v; x: [rows, cols]. One thread per row (the one-hot of the targets).
MBQ_KERNEL add_per_row(float* x, const long long* idx, float v, long long rows, long long cols) {
    long long r = mbq_thread();
    if (r >= rows) return;
    x[r * cols + idx[r]] += v;
}

// out[idx[k], :] = x[k, :]; x: [n, cols] (the head's rows back into [T, C]). One thread per element.
MBQ_KERNEL scatter_rows(float* out, const float* x, const long long* idx, long long n, long long cols) {
    long long i = mbq_thread();
    if (i >= n * cols) return;
    out[idx[i / cols] * cols + i % cols] = x[i];
}

// ---- quantizers (MBQQuant/Quantize.swift) -----------------------------------------------

// Per-row symmetric fake quantization in place (W-A schemes' activations): scale =
// max(max|x|, 1e-5) / qmax, x = clamp(round(x / scale), qmin, qmax) * scale. One thread per row.
MBQ_KERNEL fake_quant_rows(float* x, long long rows, long long cols, int bits) {
    long long r = mbq_thread();
    if (r >= rows) return;
    float* xr = x + r * cols;
    float qmax = (float)((1 << (bits - 1)) - 1), qmin = -(float)(1 << (bits - 1));
    float am = 0.0f;
    for (long long j = 0; j < cols; j++) { float a = fabsf(xr[j]); am = a > am ? a : am; }
    float scale = (am > 1e-5f ? am : 1e-5f) / qmax;
    for (long long j = 0; j < cols; j++) {
        float q = rintf(xr[j] / scale);
        q = q < qmin ? qmin : (q > qmax ? qmax : q);
        xr[j] = q * scale;
    }
}

// Group-wise asymmetric fake quantization of a weight [rows, cols] (row-major, groups
// of `group` along a row), optionally of W diag(s) with the result divided back by s
// (the search's candidate weight, Q(W diag(s)) diag(s)^-1): scale = max(max - min,
// 1e-5) / maxInt, zero = clamp(-round(min / scale), 0, maxInt), q = clamp(round(v /
// scale) + zero, 0, maxInt), v' = (q - zero) * scale. `scales` may be null. One thread
// per group.
MBQ_KERNEL fake_quant_groups(float* out, const float* w, const float* scales, long long count, long long cols,
                             long long group, int bits) {
    long long gi = mbq_thread();
    if (gi >= count / group) return;
    long long base = gi * group, col0 = base % cols;
    float maxInt = (float)((1 << bits) - 1);
    float* o = out + base;
    for (long long i = 0; i < group; i++) o[i] = scales ? w[base + i] * scales[col0 + i] : w[base + i];
    float mn = o[0], mx = o[0];
    for (long long i = 0; i < group; i++) { float v = o[i]; mn = v < mn ? v : mn; mx = v > mx ? v : mx; }
    float d = mx - mn;
    float scale = (d > 1e-5f ? d : 1e-5f) / maxInt;
    float zero = -rintf(mn / scale);
    zero = zero < 0.0f ? 0.0f : (zero > maxInt ? maxInt : zero);
    for (long long i = 0; i < group; i++) {
        float q = rintf(o[i] / scale) + zero;
        q = q < 0.0f ? 0.0f : (q > maxInt ? maxInt : q);
        o[i] = (q - zero) * scale;
    }
    if (scales) for (long long i = 0; i < group; i++) o[i] /= scales[col0 + i];
}

// ---- elementwise and reductions -----------------------------------------------------------

// x[r, j] *= s[j] (or /= with divide != 0); x: [rows, cols]. One thread per element
// (MBQTensor/Kernels.swift `scaleColumnsInPlace`).
MBQ_KERNEL scale_columns(float* x, const float* s, long long rows, long long cols, int divide) {
    long long i = mbq_thread();
    if (i >= rows * cols) return;
    if (divide) x[i] /= s[i % cols]; else x[i] *= s[i % cols];
}

// x[i] += y[i] (the residual adds).
MBQ_KERNEL add_inplace(float* x, const float* y, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    x[i] += y[i];
}

// y[r, j] = v[j]; y: [rows, cols] (a bias laid down before the GEMM adds x W^T onto
// it, as MBQTensor `linearForward` does).
MBQ_KERNEL broadcast_rows(float* y, const float* v, long long rows, long long cols) {
    long long i = mbq_thread();
    if (i >= rows * cols) return;
    y[i] = v[i % cols];
}

// x[i] = v over n elements.
MBQ_KERNEL fill(float* x, float v, long long n) {
    long long i = mbq_thread();
    if (i >= n) return;
    x[i] = v;
}

// out[k, :] = x[idx[k], :]; out: [n, cols]. One thread per element (the search's loss rows).
MBQ_KERNEL gather_rows(float* out, const float* x, const long long* idx, long long n, long long cols) {
    long long i = mbq_thread();
    if (i >= n * cols) return;
    out[i] = x[idx[i / cols] * cols + i % cols];
}

// sums[j] += |x[r, j]| over the rows r with mask[r] != 0, in double, rows in order (the
// search's channel means, MBQMethods/GroupSearch.swift ChannelMeanAbs). One thread per column.
MBQ_KERNEL column_abs_sums(double* sums, const float* x, const int* mask, long long rows, long long cols) {
    long long j = mbq_thread();
    if (j >= cols) return;
    double s = sums[j];
    for (long long r = 0; r < rows; r++) if (mask[r]) s += (double)fabsf(x[r * cols + j]);
    sums[j] = s;
}

// out[r] = sum_j (a - b)^2 (squared != 0) or |a - b| over row r, in fp32 and in column
// order, as the search's loss adds a row (MBQMethods/ScaleSearch.swift LossAccumulator);
// the host adds the rows in Double by mask. a, b: [rows, cols]. One thread per row.
MBQ_KERNEL row_error(float* out, const float* a, const float* b, long long rows, long long cols, int squared) {
    long long r = mbq_thread();
    if (r >= rows) return;
    float s = 0.0f;
    for (long long j = 0; j < cols; j++) {
        float d = a[r * cols + j] - b[r * cols + j];
        s += squared ? d * d : fabsf(d);
    }
    out[r] = s;
}
