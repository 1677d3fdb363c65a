import MBQModel

/// The primitive ops of a decoder block and of the MBQ search over a `Device` (issue 25,
/// item 1's list): each one a kernel launch or a cuBLAS GEMM on fp32 row-major tensors,
/// with the CPU function it must agree with named (`OpConformance` holds it to that).
/// Shapes in comments are row-major; cuBLAS sees a row-major [R, C] matrix with leading
/// dimension L as a column-major [C, R] one with the same L (../shared/CUDA.md).
public struct DeviceOps: Sendable {
    public let device: Device
    /// Threads per block: 256, or 32 for launches of fewer than 32,768 threads (the
    /// one-thread-per-row kernels: a 1024-token RMSNorm is 1024 threads, which blocks of
    /// 256 would put on 4 of an H100's 132 SMs). Results do not depend on it.
    public static func blockSize(threads: Int) -> Int { threads < 32_768 ? 32 : 256 }
    /// Every GEMM's precision (`GEMMPrecision`; strict unless asked).
    public var precision: GEMMPrecision

    public init(device: Device, precision: GEMMPrecision = .strict) { self.device = device; self.precision = precision }

    func launch(_ k: Kernel, threads: Int, _ args: [KernelArgument]) throws {
        guard threads > 0 else { return }
        try device.launch(k, LaunchShape(threads: threads, blockSize: Self.blockSize(threads: threads)), args)
    }

    // MARK: stored dtypes

    /// out: [n] fp32 from bf16 (`bf16: true`) or fp16 bits at `bits`: [n] (loadBlock's widening).
    public func widen(_ bits: DevicePointer, bf16: Bool, into out: DevicePointer, count n: Int) throws {
        try launch(bf16 ? .widenBF16 : .widenF16, threads: n, [.pointer(out), .pointer(bits), .int64(n)])
    }

    // MARK: GEMMs as the CPU calls them

    /// Row-major C [m, n] = alpha op(A) op(B) + beta C, the call `BLASScalar.gemm` makes on
    /// the CPU, as cuBLAS's column-major product: Cᵀ = op(B)ᵀ op(A)ᵀ over the same memory,
    /// so the operands swap and each keeps its flag. On the emulated device this is the
    /// very call the CPU makes (EmulatedDevice swaps back), which is why the CUDA backend
    /// mirrors the CPU's products one for one.
    public func rowMajorGEMM(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                             a: DevicePointer, lda: Int, b: DevicePointer, ldb: Int,
                             beta: Float = 0, c: DevicePointer, ldc: Int) throws {
        try device.gemm(GEMM(transA: transB ? .transpose : .none, transB: transA ? .transpose : .none, m: n, n: m, k: k, alpha: alpha,
                             a: b, lda: ldb, b: a, ldb: lda, beta: beta, c: c, ldc: ldc, precision: precision))
    }

    // MARK: linears

    /// y: [T, out] = x: [T, in] · Wᵀ (W: [out, in], PyTorch's layout) + bias ([out] or 0):
    /// the bias laid down first and the product added onto it (MBQTensor `linearForward`).
    public func linear(_ x: DevicePointer, weight w: DevicePointer, bias: DevicePointer = 0, into y: DevicePointer,
                       rows t: Int, inFeatures k: Int, outFeatures n: Int) throws {
        if bias != 0 { try launch(.broadcastRows, threads: t * n, [.pointer(y), .pointer(bias), .int64(t), .int64(n)]) }
        try rowMajorGEMM(transA: false, transB: true, m: t, n: n, k: k, a: x, lda: k, b: w, ldb: k, beta: bias != 0 ? 1 : 0, c: y, ldc: n)
    }

    /// dx: [T, in] = dy: [T, out] · W (W: [out, in]), or dx += with `accumulate`.
    /// (MBQTensor `linearBackward`, `linearBackwardAccumulate`)
    public func linearBackward(_ dy: DevicePointer, weight w: DevicePointer, into dx: DevicePointer,
                               rows t: Int, inFeatures k: Int, outFeatures n: Int, accumulate: Bool = false) throws {
        try rowMajorGEMM(transA: false, transB: false, m: t, n: k, k: n, a: dy, lda: n, b: w, ldb: k, beta: accumulate ? 1 : 0, c: dx, ldc: k)
    }

    // MARK: memory

    /// x[0 ..< n] = v.
    public func fill(_ x: DevicePointer, with v: Float, count n: Int) throws {
        try launch(.fill, threads: n, [.pointer(x), .float(v), .int64(n)])
    }

    /// out: [n, C] = x's rows idx (int64 on the device, [n]).
    public func gatherRows(_ x: DevicePointer, indices idx: DevicePointer, count n: Int, cols: Int, into out: DevicePointer) throws {
        try launch(.gatherRows, threads: n * cols, [.pointer(out), .pointer(x), .pointer(idx), .int64(n), .int64(cols)])
    }

    /// sums ([C] fp64 on the device) += Σ |x[r, ·]| over rows with mask[r] != 0, rows in order.
    public func columnAbsSums(_ x: DevicePointer, mask: DevicePointer, rows: Int, cols: Int, into sums: DevicePointer) throws {
        try launch(.columnAbsSums, threads: cols, [.pointer(sums), .pointer(x), .pointer(mask), .int64(rows), .int64(cols)])
    }

    // MARK: RMSNorm, RoPE, SwiGLU

    /// x: [T, C], w: [C] -> y: [T, C], invRms: [T]. (MBQModel `rmsNormForward`)
    public func rmsNormForward(_ x: DevicePointer, weight w: DevicePointer, eps: Float, into y: DevicePointer,
                               invRms: DevicePointer, rows: Int, cols: Int) throws {
        try launch(.rmsNormForward, threads: rows,
                   [.pointer(y), .pointer(invRms), .pointer(x), .pointer(w), .int64(rows), .int64(cols), .float(eps)])
    }

    /// dy, x: [T, C], w: [C], invRms: [T] -> dx: [T, C]. (MBQModel `rmsNormBackward`)
    public func rmsNormBackward(_ dy: DevicePointer, x: DevicePointer, weight w: DevicePointer, invRms: DevicePointer,
                                into dx: DevicePointer, rows: Int, cols: Int) throws {
        try launch(.rmsNormBackward, threads: rows,
                   [.pointer(dx), .pointer(dy), .pointer(x), .pointer(w), .pointer(invRms), .int64(rows), .int64(cols)])
    }

    /// In place on x: [T, heads * D]; cos, sin: [T, D] (a `RoPETable`'s, M-RoPE included).
    /// (MBQModel `ropeForward` / `ropeBackward` with `backward`)
    public func rope(_ x: DevicePointer, cos: DevicePointer, sin: DevicePointer, rows: Int, heads: Int, headDim: Int,
                     backward: Bool = false) throws {
        try launch(backward ? .ropeBackward : .ropeForward, threads: rows * heads * headDim / 2,
                   [.pointer(x), .pointer(cos), .pointer(sin), .int64(rows), .int64(heads), .int64(headDim)])
    }

    /// a = silu(g) * u over n elements. (MBQModel `swiglu`)
    public func swigluForward(gate g: DevicePointer, up u: DevicePointer, into a: DevicePointer, count n: Int) throws {
        try launch(.swigluForward, threads: n, [.pointer(a), .pointer(g), .pointer(u), .int64(n)])
    }

    /// dg, du from da and the saved g, u. (MBQModel `mlpBackward`'s elementwise step)
    public func swigluBackward(_ da: DevicePointer, gate g: DevicePointer, up u: DevicePointer,
                               dGate dg: DevicePointer, dUp du: DevicePointer, count n: Int) throws {
        try launch(.swigluBackward, threads: n, [.pointer(dg), .pointer(du), .pointer(da), .pointer(g), .pointer(u), .int64(n)])
    }

    // MARK: attention

    /// Causal attention with a padding mask over one sequence, MBQModel
    /// `attentionCoreForward` product for product: q: [T, heads*D], k, v: [T, kvHeads*D]
    /// post-RoPE, mask: [T] int32 (0 = padding) -> ctx: [T, heads*D], lse: [heads, T].
    /// Per head and block of `rowBlock` query rows [r0, r1): S = scale q_h k_gᵀ over keys
    /// [0, r1) into `scores` ([rowBlock, T] at least), the row softmax over visible keys,
    /// ctx_h = P v_g.
    public func attentionForward(q: DevicePointer, k: DevicePointer, v: DevicePointer, mask: DevicePointer,
                                 into ctx: DevicePointer, lse: DevicePointer, scores: DevicePointer,
                                 rows t: Int, heads: Int, kvHeads: Int, headDim d: Int, rowBlock: Int = attentionRowBlock) throws {
        let group = heads / kvHeads, ldq = heads * d, ldk = kvHeads * d
        let scale = Float(1 / Double(d).squareRoot())
        let rb = max(1, min(rowBlock, t))
        try fill(lse, with: -.infinity, count: heads * t)
        for h in 0..<heads {
            let g = h / group
            for r0 in stride(from: 0, to: t, by: rb) {
                let r1 = min(t, r0 + rb), m = r1 - r0, n = r1
                try rowMajorGEMM(transA: false, transB: true, m: m, n: n, k: d, alpha: scale, a: q + f(r0 * ldq + h * d), lda: ldq,
                                 b: k + f(g * d), ldb: ldk, c: scores, ldc: n)
                try launch(.softmaxCausal, threads: m, [.pointer(scores), .pointer(lse + f(h * t)), .pointer(mask), .int64(1), .int64(m),
                                                        .int64(n), .int64(r0), .int64(t)])
                try rowMajorGEMM(transA: false, transB: false, m: m, n: d, k: n, a: scores, lda: n, b: v + f(g * d), ldb: ldk,
                                 c: ctx + f(r0 * ldq + h * d), ldc: ldq)
            }
        }
    }

    /// MBQModel `attentionCoreBackward`, product for product: dctx: [T, heads*D] and the
    /// forward's q, k, v, ctx, lse -> dq: [T, heads*D], dk, dv: [T, kvHeads*D]. `p`, `dp`:
    /// scratch of [rowBlock, T] each.
    public func attentionBackward(dctx: DevicePointer, q: DevicePointer, k: DevicePointer, v: DevicePointer, ctx: DevicePointer,
                                  lse: DevicePointer, mask: DevicePointer, dq: DevicePointer, dk: DevicePointer, dv: DevicePointer,
                                  p: DevicePointer, dp: DevicePointer, rows t: Int, heads: Int, kvHeads: Int, headDim d: Int,
                                  rowBlock: Int = attentionRowBlock) throws {
        let group = heads / kvHeads, ldq = heads * d, ldk = kvHeads * d
        let scale = Float(1 / Double(d).squareRoot())
        let rb = max(1, min(rowBlock, t))
        try fill(dq, with: 0, count: t * ldq)
        try fill(dk, with: 0, count: t * ldk)
        try fill(dv, with: 0, count: t * ldk)
        for h in 0..<heads {
            let g = h / group
            for r0 in stride(from: 0, to: t, by: rb) {
                let r1 = min(t, r0 + rb), m = r1 - r0, n = r1
                try rowMajorGEMM(transA: false, transB: true, m: m, n: n, k: d, alpha: scale, a: q + f(r0 * ldq + h * d), lda: ldq,
                                 b: k + f(g * d), ldb: ldk, c: p, ldc: n)
                try rowMajorGEMM(transA: false, transB: true, m: m, n: n, k: d, a: dctx + f(r0 * ldq + h * d), lda: ldq,
                                 b: v + f(g * d), ldb: ldk, c: dp, ldc: n)
                try launch(.attentionBackwardRows, threads: m,
                           [.pointer(p), .pointer(dp), .pointer(lse + f(h * t)), .pointer(dctx), .pointer(ctx), .pointer(mask),
                            .int64(m), .int64(n), .int64(r0), .int64(ldq), .int64(h * d), .int64(d)])
                try rowMajorGEMM(transA: true, transB: false, m: n, n: d, k: m, a: p, lda: n, b: dctx + f(r0 * ldq + h * d), ldb: ldq,
                                 beta: 1, c: dv + f(g * d), ldc: ldk)
                try rowMajorGEMM(transA: false, transB: false, m: m, n: d, k: n, alpha: scale, a: dp, lda: n, b: k + f(g * d), ldb: ldk,
                                 c: dq + f(r0 * ldq + h * d), ldc: ldq)
                try rowMajorGEMM(transA: true, transB: false, m: n, n: d, k: m, alpha: scale, a: dp, lda: n,
                                 b: q + f(r0 * ldq + h * d), ldb: ldq, beta: 1, c: dk + f(g * d), ldc: ldk)
            }
        }
    }

    /// Bytes of `elements` fp32 values, as a pointer offset.
    func f(_ elements: Int) -> UInt64 { UInt64(elements * 4) }

    // MARK: quantizers and the search's arithmetic

    /// Per-token symmetric fake quantization in place, x: [T, C]. (MBQQuant
    /// `Quantize.rowSymmetricInPlace`, the W-A schemes' activations)
    public func fakeQuantRows(_ x: DevicePointer, rows: Int, cols: Int, bits: Int) throws {
        try launch(.fakeQuantRows, threads: rows, [.pointer(x), .int64(rows), .int64(cols), .int32(Int32(bits))])
    }

    /// out: [R, C] = Q(W diag(s)) diag(s)⁻¹ in groups of `group` along rows (s = `scales`,
    /// [C], or none when 0). (MBQQuant `Quantize.groupAsymmetric(_:bits:group:columnScales:)`)
    public func fakeQuantGroups(_ w: DevicePointer, scales: DevicePointer = 0, into out: DevicePointer,
                                rows: Int, cols: Int, group: Int, bits: Int) throws {
        let g = group <= 0 ? cols : group
        guard cols % g == 0 else { throw DeviceError.invalidArgument(op: "fakeQuantGroups", reason: "group \(g) does not divide \(cols) columns") }
        try launch(.fakeQuantGroups, threads: rows * cols / g,
                   [.pointer(out), .pointer(w), .pointer(scales), .int64(rows * cols), .int64(cols), .int64(g), .int32(Int32(bits))])
    }

    /// x[r, j] *= s[j] (or /=), x: [R, C]. (MBQTensor `scaleColumnsInPlace`)
    public func scaleColumns(_ x: DevicePointer, by s: DevicePointer, rows: Int, cols: Int, divide: Bool = false) throws {
        try launch(.scaleColumns, threads: rows * cols, [.pointer(x), .pointer(s), .int64(rows), .int64(cols), .int32(divide ? 1 : 0)])
    }

    /// x += y over n elements.
    public func add(_ y: DevicePointer, into x: DevicePointer, count n: Int) throws {
        try launch(.addInPlace, threads: n, [.pointer(x), .pointer(y), .int64(n)])
    }

    // MARK: the caption-loss head (MBQModel `lossHeadForward`, `lossHeadBackward`)

    /// x -= logsumexp(x) per row, x: [R, C] (MBQModel `logSoftmaxRowsInPlace`).
    public func logSoftmaxRows(_ x: DevicePointer, rows: Int, cols: Int) throws {
        try launch(.logSoftmaxRows, threads: rows, [.pointer(x), .int64(rows), .int64(cols)])
    }

    /// x = exp(x) over n elements.
    public func exp(_ x: DevicePointer, count n: Int) throws {
        try launch(.expInPlace, threads: n, [.pointer(x), .int64(n)])
    }

    /// x *= s over n elements.
    public func scale(_ x: DevicePointer, by s: Float, count n: Int) throws {
        try launch(.scale, threads: n, [.pointer(x), .float(s), .int64(n)])
    }

    /// out: [R] = x[r, idx[r]] (idx: [R] int64 on the device), x: [R, C].
    public func pickPerRow(_ x: DevicePointer, indices idx: DevicePointer, rows: Int, cols: Int, into out: DevicePointer) throws {
        try launch(.pickPerRow, threads: rows, [.pointer(out), .pointer(x), .pointer(idx), .int64(rows), .int64(cols)])
    }

    /// x[r, idx[r]] += v, x: [R, C].
    public func addPerRow(_ x: DevicePointer, indices idx: DevicePointer, value v: Float, rows: Int, cols: Int) throws {
        try launch(.addPerRow, threads: rows, [.pointer(x), .pointer(idx), .float(v), .int64(rows), .int64(cols)])
    }

    /// out[idx[k], :] = x[k, :] for k < n, x: [n, C].
    public func scatterRows(_ x: DevicePointer, indices idx: DevicePointer, count n: Int, cols: Int, into out: DevicePointer) throws {
        try launch(.scatterRows, threads: n * cols, [.pointer(out), .pointer(x), .pointer(idx), .int64(n), .int64(cols)])
    }

    /// out: [R] = each row's Σ (a − b)² (`squared`) or Σ |a − b| in fp32, column order (a,
    /// b: [R, C]); the search adds rows by mask on the host in Double (MBQMethods
    /// `LossAccumulator.add`).
    public func rowError(_ a: DevicePointer, _ b: DevicePointer, into out: DevicePointer, rows: Int, cols: Int, squared: Bool) throws {
        try launch(.rowError, threads: rows, [.pointer(out), .pointer(a), .pointer(b), .int64(rows), .int64(cols), .int32(squared ? 1 : 0)])
    }
}
