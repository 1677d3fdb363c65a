import MBQTensor

/// Head layout of grouped-query attention: `heads` query heads share `kvHeads` key/value
/// heads, query head h reading kv head h / (heads / kvHeads) (transformers' repeat_kv).
public struct AttentionShape: Sendable, Equatable {
    public let heads: Int
    public let kvHeads: Int
    public let headDim: Int

    public init(heads: Int, kvHeads: Int, headDim: Int) {
        precondition(heads > 0 && kvHeads > 0 && heads % kvHeads == 0 && headDim > 0, "bad attention shape")
        self.heads = heads; self.kvHeads = kvHeads; self.headDim = headDim
    }

    @inlinable public var groupSize: Int { heads / kvHeads }
    @inlinable public var scale: Double { 1 / Double(headDim).squareRoot() }
}

// Which keys query i may see: keys j <= i (causal) that are not padding. A query with
// no visible key (left padding) gets a zero output and no gradient; its output is
// padding and never enters a loss or statistic. (transformers' eager attention gives
// such rows a uniform softmax instead; the value is meaningless either way.)

/// What attention backward needs: post-RoPE q, k, v, the context (softmax(qk^T) v) and
/// each row's log-sum-exp, from which the probabilities are recomputed (as
/// FlashAttention does) instead of keeping [heads, T, T].
public struct AttentionSaved<T: BLASScalar>: Sendable {
    public var q: Tensor<T>    // [T, heads * D]
    public var k: Tensor<T>    // [T, kvHeads * D]
    public var v: Tensor<T>    // [T, kvHeads * D]
    public var ctx: Tensor<T>  // [T, heads * D]
    public var lse: [T]        // [heads * T]; -inf for a query that sees no key

    @inlinable
    public init(q: Tensor<T>, k: Tensor<T>, v: Tensor<T>, ctx: Tensor<T>, lse: [T]) {
        self.q = q
        self.k = k
        self.v = v
        self.ctx = ctx
        self.lse = lse
    }
}

/// Query rows are processed in blocks of this many: block [r0, r1) only needs keys
/// [0, r1), which skips most of the causal mask's upper triangle (about half the
/// attention FLOPs at 2048 tokens) and keeps the score block [B, T] in cache.
public let attentionRowBlock = 256

/// Scaled dot-product attention with causal + padding mask, one sequence.
/// q: [T, heads*D], k, v: [T, kvHeads*D], mask: [T] (false = padding) -> ctx: [T, heads*D], lse: [heads*T]
@inlinable
public func attentionCoreForward<T: BLASScalar>(q: Tensor<T>, k: Tensor<T>, v: Tensor<T>, mask: [Bool],
                                                shape: AttentionShape,
                                                rowBlock: Int = attentionRowBlock) -> (ctx: Tensor<T>, lse: [T]) {
    let t = q.rows, d = shape.headDim
    let ldq = shape.heads * d, ldk = shape.kvHeads * d
    precondition(q.cols == ldq && k.cols == ldk && v.cols == ldk && k.rows == t && v.rows == t && mask.count == t,
                 "attention: q \(q.shape), k \(k.shape), v \(v.shape), mask \(mask.count)")
    let scale = T(shape.scale)
    let rb = Swift.max(1, Swift.min(rowBlock, t))
    // ctx [T, heads*D], lse [heads, T], scores [rb, T] (one row block's)
    var out = [[T]](arrayLiteral: [T](repeating: 0, count: t * ldq), [T](repeating: -T.infinity, count: shape.heads * t),
                    [T](repeating: 0, count: rb * t))
    withBuffers([q.data, k.data, v.data], writing: &out) { r, w in
        let (pq, pk, pv) = (r[0], r[1], r[2]), (pc, pl, ps) = (w[0], w[1], w[2])
        for h in 0..<shape.heads {
            let g = h / shape.groupSize
            for r0 in stride(from: 0, to: t, by: rb) {
                let r1 = Swift.min(t, r0 + rb), m = r1 - r0, n = r1
                // S = scale * q_h[r0..<r1] k_g[0..<r1]^T : [m, n], row stride n
                T.gemm(transA: false, transB: true, m: m, n: n, k: d, alpha: scale,
                       a: pq.baseAddress! + r0 * ldq + h * d, lda: ldq, b: pk.baseAddress! + g * d, ldb: ldk,
                       beta: 0, c: ps.baseAddress!, ldc: n)
                // Row softmax over visible keys (j <= i, not padding); the rest become exactly 0.
                parallelChunks(m, minChunk: 32) { rows in
                    for ri in rows {
                        let i = r0 + ri
                        let row = ps.baseAddress! + ri * n
                        var mx = -T.infinity
                        for j in 0...i where mask[j] { mx = Swift.max(mx, row[j]) }
                        if mx == -T.infinity {
                            for j in 0..<n { row[j] = 0 }
                            continue
                        }
                        var sum: T = 0
                        for j in 0...i {
                            if mask[j] {
                                let e = T.exp(row[j] - mx)
                                row[j] = e
                                sum += e
                            } else {
                                row[j] = 0
                            }
                        }
                        let inv = 1 / sum
                        for j in 0...i { row[j] *= inv }
                        for j in (i + 1)..<n { row[j] = 0 }
                        pl[h * t + i] = mx + T.log(sum)
                    }
                }
                // ctx_h[r0..<r1] = P v_g[0..<r1] : [m, D]
                T.gemm(transA: false, transB: false, m: m, n: d, k: n, alpha: 1,
                       a: ps.baseAddress!, lda: n, b: pv.baseAddress! + g * d, ldb: ldk,
                       beta: 0, c: pc.baseAddress! + r0 * ldq + h * d, ldc: ldq)
            }
        }
    }
    return (Tensor(shape: [t, ldq], data: out[0]), out[1])
}

/// dctx: [T, heads*D] -> dq: [T, heads*D], dk, dv: [T, kvHeads*D] (gradients w.r.t. the
/// post-RoPE q and k). Per query row block, with P recomputed from the saved lse:
///   dV_g += P^T dctx_h,  dP = dctx_h v_g^T,  dS = P * (dP - rowsum(dctx_h * ctx_h)),
///   dq_h = scale dS k_g,  dK_g += scale dS^T q_h.
@inlinable
public func attentionCoreBackward<T: BLASScalar>(dctx: Tensor<T>, saved: AttentionSaved<T>, mask: [Bool],
                                                 shape: AttentionShape,
                                                 rowBlock: Int = attentionRowBlock) -> (dq: Tensor<T>, dk: Tensor<T>, dv: Tensor<T>) {
    let t = saved.q.rows, d = shape.headDim
    let ldq = shape.heads * d, ldk = shape.kvHeads * d
    precondition(dctx.shape == saved.ctx.shape, "attention backward: dctx \(dctx.shape) vs ctx \(saved.ctx.shape)")
    let scale = T(shape.scale)
    let rb = Swift.max(1, Swift.min(rowBlock, t))
    // dq [T, heads*D], dk and dv [T, kvHeads*D], P and dP [rb, T] (one row block's)
    var out = [[T]](arrayLiteral: [T](repeating: 0, count: t * ldq), [T](repeating: 0, count: t * ldk),
                    [T](repeating: 0, count: t * ldk), [T](repeating: 0, count: rb * t), [T](repeating: 0, count: rb * t))
    withBuffers([saved.q.data, saved.k.data, saved.v.data, saved.ctx.data, saved.lse, dctx.data], writing: &out) { r, w in
        let (pq, pk, pv, pc, pl, pdc) = (r[0], r[1], r[2], r[3], r[4], r[5])
        let (pdq, pdk, pdv, pp, pdp) = (w[0], w[1], w[2], w[3], w[4])
        for h in 0..<shape.heads {
            let g = h / shape.groupSize
            for r0 in stride(from: 0, to: t, by: rb) {
                let r1 = Swift.min(t, r0 + rb), m = r1 - r0, n = r1
                T.gemm(transA: false, transB: true, m: m, n: n, k: d, alpha: scale,
                       a: pq.baseAddress! + r0 * ldq + h * d, lda: ldq, b: pk.baseAddress! + g * d, ldb: ldk,
                       beta: 0, c: pp.baseAddress!, ldc: n)
                // dP = dctx_h v_g^T
                T.gemm(transA: false, transB: true, m: m, n: n, k: d, alpha: 1,
                       a: pdc.baseAddress! + r0 * ldq + h * d, lda: ldq, b: pv.baseAddress! + g * d, ldb: ldk,
                       beta: 0, c: pdp.baseAddress!, ldc: n)
                parallelChunks(m, minChunk: 32) { rows in
                    for ri in rows {
                        let i = r0 + ri
                        let row = pp.baseAddress! + ri * n
                        let drow = pdp.baseAddress! + ri * n
                        let l = pl[h * t + i]
                        if l == -T.infinity {
                            for j in 0..<n { row[j] = 0; drow[j] = 0 }
                            continue
                        }
                        var dot: T = 0
                        for c in 0..<d { dot += pdc[i * ldq + h * d + c] * pc[i * ldq + h * d + c] }
                        for j in 0...i {
                            if mask[j] {
                                let pr = T.exp(row[j] - l)
                                row[j] = pr
                                drow[j] = pr * (drow[j] - dot)
                            } else {
                                row[j] = 0; drow[j] = 0
                            }
                        }
                        for j in (i + 1)..<n { row[j] = 0; drow[j] = 0 }
                    }
                }
                // dV_g[0..<r1] += P^T dctx_h[r0..<r1]
                T.gemm(transA: true, transB: false, m: n, n: d, k: m, alpha: 1,
                       a: pp.baseAddress!, lda: n, b: pdc.baseAddress! + r0 * ldq + h * d, ldb: ldq,
                       beta: 1, c: pdv.baseAddress! + g * d, ldc: ldk)
                // dq_h[r0..<r1] = scale dS k_g[0..<r1]
                T.gemm(transA: false, transB: false, m: m, n: d, k: n, alpha: scale,
                       a: pdp.baseAddress!, lda: n, b: pk.baseAddress! + g * d, ldb: ldk,
                       beta: 0, c: pdq.baseAddress! + r0 * ldq + h * d, ldc: ldq)
                // dK_g[0..<r1] += scale dS^T q_h[r0..<r1]
                T.gemm(transA: true, transB: false, m: n, n: d, k: m, alpha: scale,
                       a: pdp.baseAddress!, lda: n, b: pq.baseAddress! + r0 * ldq + h * d, ldb: ldq,
                       beta: 1, c: pdk.baseAddress! + g * d, ldc: ldk)
            }
        }
    }
    return (Tensor(shape: [t, ldq], data: out[0]), Tensor(shape: [t, ldk], data: out[1]), Tensor(shape: [t, ldk], data: out[2]))
}
