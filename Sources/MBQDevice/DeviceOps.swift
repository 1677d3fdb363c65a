/// The primitive ops of a decoder block and of the MBQ search over a `Device` (issue 25,
/// item 1's list): each one a kernel launch or a cuBLAS GEMM on fp32 row-major tensors,
/// with the CPU function it must agree with named (`OpConformance` holds it to that).
/// Shapes in comments are row-major; cuBLAS sees a row-major [R, C] matrix with leading
/// dimension L as a column-major [C, R] one with the same L (../shared/CUDA.md).
public struct DeviceOps: Sendable {
    public let device: Device
    /// Threads per block for every launch.
    public var blockSize = 256

    public init(device: Device) { self.device = device }

    func launch(_ k: Kernel, threads: Int, _ args: [KernelArgument]) throws {
        guard threads > 0 else { return }
        try device.launch(k, LaunchShape(threads: threads, blockSize: blockSize), args)
    }

    // MARK: stored dtypes

    /// out: [n] fp32 from bf16 (`bf16: true`) or fp16 bits at `bits`: [n] (loadBlock's widening).
    public func widen(_ bits: DevicePointer, bf16: Bool, into out: DevicePointer, count n: Int) throws {
        try launch(bf16 ? .widenBF16 : .widenF16, threads: n, [.pointer(out), .pointer(bits), .int64(n)])
    }

    // MARK: linears

    /// y: [T, out] = x: [T, in] · Wᵀ (W: [out, in], PyTorch's layout) + bias ([out] or 0).
    /// (MBQTensor `linearForward`)
    public func linear(_ x: DevicePointer, weight w: DevicePointer, bias: DevicePointer = 0, into y: DevicePointer,
                       rows t: Int, inFeatures k: Int, outFeatures n: Int) throws {
        try device.gemm(GEMM(transA: .transpose, transB: .none, m: n, n: t, k: k, a: w, lda: k, b: x, ldb: k, c: y, ldc: n))
        if bias != 0 { try launch(.addBias, threads: t * n, [.pointer(y), .pointer(bias), .int64(t), .int64(n)]) }
    }

    /// dx: [T, in] = dy: [T, out] · W (W: [out, in]). (MBQTensor `linearBackward`)
    public func linearBackward(_ dy: DevicePointer, weight w: DevicePointer, into dx: DevicePointer,
                               rows t: Int, inFeatures k: Int, outFeatures n: Int) throws {
        try device.gemm(GEMM(transA: .none, transB: .none, m: k, n: t, k: n, a: w, lda: k, b: dy, ldb: n, c: dx, ldc: k))
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

    /// Causal attention with a padding mask over one sequence (MBQModel
    /// `attentionCoreForward`): q: [T, heads*D], k, v: [T, kvHeads*D] post-RoPE, mask: [T]
    /// int32 (0 = padding) -> ctx: [T, heads*D], lse: [heads, T]. Per kv head g, its
    /// heads' scores Sₕ = scale qₕ k_gᵀ ([T, T] each, `scores` holds heads/kvHeads of them)
    /// in one strided-batched GEMM, the row softmax over visible keys, ctxₕ = Pₕ v_g in a
    /// second one.
    public func attentionForward(q: DevicePointer, k: DevicePointer, v: DevicePointer, mask: DevicePointer,
                                 into ctx: DevicePointer, lse: DevicePointer, scores: DevicePointer,
                                 rows t: Int, heads: Int, kvHeads: Int, headDim d: Int) throws {
        let group = heads / kvHeads, ldq = heads * d, ldk = kvHeads * d
        let scale = Float(1 / Double(d).squareRoot())
        for g in 0..<kvHeads {
            let h0 = g * group
            // Column-major Sₕᵀ [T_k, T_q] = k_g qₕᵀ: A = k_g ([D, T] column-major, transposed), B = qₕ.
            try device.gemmStridedBatched(
                GEMM(transA: .transpose, transB: .none, m: t, n: t, k: d, alpha: scale,
                     a: k + UInt64(g * d * 4), lda: ldk, b: q + UInt64(h0 * d * 4), ldb: ldq, c: scores, ldc: t),
                strideA: 0, strideB: d, strideC: t * t, batch: group)
            try launch(.softmaxCausal, threads: group * t,
                       [.pointer(scores), .pointer(lse + UInt64(h0 * t * 4)), .pointer(mask), .int64(group), .int64(t),
                        .int64(t), .int64(0), .int64(t)])
            // Column-major ctxₕᵀ [D, T_q] = v_gᵀ Pₕᵀ: A = v_g ([D, T]), B = Pₕ ([T_k, T_q]).
            try device.gemmStridedBatched(
                GEMM(transA: .none, transB: .none, m: d, n: t, k: t,
                     a: v + UInt64(g * d * 4), lda: ldk, b: scores, ldb: t, c: ctx + UInt64(h0 * d * 4), ldc: ldq),
                strideA: 0, strideB: t * t, strideC: d, batch: group)
        }
    }

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

    /// out: [R] = each row's Σ (a − b)² (`squared`) or Σ |a − b| in fp32, column order (a,
    /// b: [R, C]); the search adds rows by mask on the host in Double (MBQMethods
    /// `LossAccumulator.add`).
    public func rowError(_ a: DevicePointer, _ b: DevicePointer, into out: DevicePointer, rows: Int, cols: Int, squared: Bool) throws {
        try launch(.rowError, threads: rows, [.pointer(out), .pointer(a), .pointer(b), .int64(rows), .int64(cols), .int32(squared ? 1 : 0)])
    }
}
