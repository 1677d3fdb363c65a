import MBQTensor

/// GPTQ's settings (Frantar et al. 2023; IST-DASLab/gptq `gptq.py` `fasterquant`,
/// docs/DESIGN.md §2.7).
public struct GPTQSettings: Sendable, Equatable {
    public var bits: Int
    /// Columns per scale; -1: one scale per row (per channel).
    public var group: Int
    /// Dampening: this fraction of the mean diagonal is added to H's diagonal.
    public var damp: Double
    /// Columns per lazy batch update.
    public var blockSize: Int
    /// Columns in order of decreasing H diagonal (`--act-order`, `desc_act`).
    public var actOrder: Bool
    /// Group parameters taken once, before any column is quantized, from the groups in
    /// the original column order (the reference's `static_groups`; compressed-tensors'
    /// `actorder: "weight"`): with `actOrder` no `g_idx` is needed.
    public var staticGroups: Bool

    public init(bits: Int, group: Int, damp: Double = 0.01, blockSize: Int = 128, actOrder: Bool = false, staticGroups: Bool = false) {
        self.bits = bits; self.group = group; self.damp = damp; self.blockSize = blockSize; self.actOrder = actOrder
        self.staticGroups = staticGroups
    }
}

public struct GPTQResult: Sendable {
    public var codes: QuantizedWeight
    /// Σ (w - q)² / d² / 2 over every weight: GPTQ's own estimate of the Hessian-weighted
    /// error it leaves (the reference's `Losses`).
    public var loss: Double
}

/// GPTQ's quantizer (`quant.py` `Quantizer.find_params` with `sym=False`, `weight=True`):
/// min-max per row over a range that always contains 0,
///   xmin = min(min w, 0), xmax = max(max w, 0) (both 0: -1 and +1),
///   scale = (xmax - xmin) / maxq, zero = round(-xmin / scale),
///   q = clamp(round(w / scale) + zero, 0, maxq), dequantized scale * (q - zero).
/// It differs from AWQ's (docs/DESIGN.md §2.3): the range holds 0 and the scale has no
/// 1e-5 floor. Every operation in fp32, rounding half to even as torch.round.
@usableFromInline
struct GPTQQuantizer {
    @usableFromInline var scale: Float
    @usableFromInline var zero: Float
    @usableFromInline let maxq: Float

    @inlinable init(_ w: UnsafeBufferPointer<Float>, maxq: Float) {
        var mn: Float = 0, mx: Float = 0
        for v in w { mn = Swift.min(mn, v); mx = Swift.max(mx, v) }
        if mn == 0 && mx == 0 { mn = -1; mx = 1 }
        self.maxq = maxq
        scale = (mx - mn) / maxq
        zero = (-mn / scale).rounded(.toNearestOrEven)
    }

    @inlinable init(scale: Float, zero: Float, maxq: Float) {
        self.scale = scale; self.zero = zero; self.maxq = maxq
    }

    @inlinable func code(_ w: Float) -> Float {
        Swift.min(Swift.max((w / scale).rounded(.toNearestOrEven) + zero, 0), maxq)
    }

    @inlinable func dequantize(_ q: Float) -> Float { scale * (q - zero) }
}

/// GPTQ on one linear (docs/DESIGN.md §2.7), following `fasterquant` step by step:
/// dead columns (H_jj = 0) zeroed with H_jj = 1; with activation order the columns by
/// decreasing H_jj (a stable sort: ties keep column order); damp · mean(diag H) added to
/// the diagonal; U, the upper Cholesky factor of H⁻¹ (fp64, `Cholesky`); then blocks of
/// `blockSize` columns, each column quantized with its group's parameters — taken from
/// the weights as updated up to the start of the current block, at each group's first
/// column, as the reference reads `W` and not the block copy — its error spread over the
/// block's later columns, and the block's errors over the later blocks with one GEMM.
///
/// Rows never interact (only through H), so row chunks run on separate threads; the
/// lazy update is `TiledGEMM`'s, so no bit depends on the thread count.
public enum GPTQ {
    /// What GPTQ needs of a Hessian, the same for every linear that reads it: the dead
    /// columns, the column order, and U, the upper Cholesky factor of the damped,
    /// permuted H's inverse in fp32. Linears sharing a Hessian share one (q, k, v).
    public struct Factor: Sendable {
        public let cols: Int
        /// Columns whose H_jj is 0 (their weights are zeroed).
        public let dead: [Int]
        /// Position k holds original column perm[k].
        public let perm: [Int]
        /// [cols, cols] row-major, zero below the diagonal.
        public let hinv: [Float]
    }

    /// hessian: [cols, cols] row-major fp64 (2/n Σ wₜ xₜxₜᵀ; its scale does not change the
    /// codes).
    public static func factor(hessian: [Double], cols: Int, damp: Double, actOrder: Bool) throws -> Factor {
        precondition(hessian.count == cols * cols, "Hessian of \(hessian.count) values for \(cols) columns")
        var h = hessian
        let dead = (0..<cols).filter { h[$0 * cols + $0] == 0 }
        for j in dead { h[j * cols + j] = 1 }
        var perm = Array(0..<cols)
        if actOrder {
            perm = perm.enumerated().sorted { a, b in
                let da = h[a.element * cols + a.element], db = h[b.element * cols + b.element]
                return da != db ? da > db : a.offset < b.offset
            }.map(\.element)
            var hp = [Double](repeating: 0, count: cols * cols)
            for i in 0..<cols { for j in 0..<cols { hp[i * cols + j] = h[perm[i] * cols + perm[j]] } }
            h = hp
        }
        var diagMean = 0.0
        for j in 0..<cols { diagMean += h[j * cols + j] }
        let d = damp * diagMean / Double(cols)
        for j in 0..<cols { h[j * cols + j] += d }
        return Factor(cols: cols, dead: dead, perm: perm, hinv: try Cholesky.upperFactorOfInverse(overwriting: &h, n: cols))
    }

    /// GPTQ of w ([rows, cols]) on `hessian`.
    public static func quantize(_ w: Tensor<Float>, hessian: [Double], settings s: GPTQSettings) throws -> GPTQResult {
        quantize(w, factor: try factor(hessian: hessian, cols: w.cols, damp: s.damp, actOrder: s.actOrder), settings: s)
    }

    /// w: [rows, cols] -> the codes, in the original column order, with `gIdx` when
    /// activation order scrambled the groups.
    public static func quantize(_ w: Tensor<Float>, factor f: Factor, settings s: GPTQSettings) -> GPTQResult {
        let rows = w.rows, cols = w.cols
        precondition(f.cols == cols, "a factor of \(f.cols) columns for a weight of \(cols)")
        let g = s.group > 0 ? s.group : cols
        precondition(cols % g == 0 && s.blockSize > 0, "group \(g), block \(s.blockSize), \(cols) columns")
        precondition(s.group <= 0 || s.blockSize % g == 0 || g % s.blockSize == 0, "groups and blocks must nest")
        let maxq = Float((1 << s.bits) - 1)
        var W = w.data

        // Per channel: the parameters come from the weights before anything else (the
        // reference's `find_params(W)` before the dead columns are zeroed).
        var rowParams: [GPTQQuantizer] = []
        if s.group <= 0 {
            rowParams = W.withUnsafeBufferPointer { p in
                (0..<rows).map { r in GPTQQuantizer(UnsafeBufferPointer(rebasing: p[(r * cols)..<((r + 1) * cols)]), maxq: maxq) }
            }
        }
        for j in f.dead { for r in 0..<rows { W[r * cols + j] = 0 } }
        let groupsPerRow = cols / g
        var scales = [Float](repeating: 0, count: rows * groupsPerRow), zeros = [UInt8](repeating: 0, count: rows * groupsPerRow)
        var staticParams: [GPTQQuantizer] = []
        if s.staticGroups && s.group > 0 {
            // After the dead columns are zeroed, before any permutation (gptq.py).
            staticParams = W.withUnsafeBufferPointer { p in
                (0..<(rows * groupsPerRow)).map { k in
                    GPTQQuantizer(UnsafeBufferPointer(start: p.baseAddress! + (k / groupsPerRow) * cols + (k % groupsPerRow) * g, count: g),
                                  maxq: maxq)
                }
            }
            for (k, q) in staticParams.enumerated() { scales[k] = q.scale; zeros[k] = UInt8(q.zero) }
        }
        if s.actOrder { W = permuteColumns(W, rows: rows, cols: cols, f.perm) }

        // Working buffers for the row-parallel loop (freed on return).
        let pw = Buffer(W), ph = Buffer(f.hinv)
        let pq = Buffer([UInt8](repeating: 0, count: rows * cols))      // codes, permuted order
        let ps = Buffer(scales), pz = Buffer(zeros)
        let pe = Buffer([Float](repeating: 0, count: rows * s.blockSize))  // Err1 [rows, block]
        let pl = Buffer([Double](repeating: 0, count: rows))              // loss per row
        defer { pw.free(); ph.free(); pq.free(); ps.free(); pz.free(); pe.free(); pl.free() }
        let perm = f.perm
        for i1 in stride(from: 0, to: cols, by: s.blockSize) {
            let i2 = Swift.min(i1 + s.blockSize, cols), count = i2 - i1
            // Plain pointers in the hot loop (the optimizer keeps them in registers).
            let w = pw.base, hinv = UnsafePointer(ph.base), q = pq.base, sc = ps.base, zp = pz.base, er = pe.base, ls = pl.base
            parallelChunks(rows, minChunk: 16) { range in
                var w1 = [Float](repeating: 0, count: count)
                for r in range {
                    let row = r * cols
                    for i in 0..<count { w1[i] = w[row + i1 + i] }
                    // The group in force at the block's first column (a group longer than a
                    // block began in an earlier one); per channel, the row's.
                    var quant: GPTQQuantizer
                    if s.group <= 0 {
                        quant = rowParams[r]
                    } else {
                        let open = r * groupsPerRow + i1 / g
                        quant = GPTQQuantizer(scale: sc[open], zero: Float(zp[open]), maxq: maxq)
                    }
                    var loss = 0.0
                    for i in 0..<count {
                        let col = i1 + i
                        if !staticParams.isEmpty {
                            quant = staticParams[r * groupsPerRow + perm[col] / g]
                        } else if s.group > 0 && col % g == 0 {
                            // From W as of this block's start, as the reference reads it.
                            quant = GPTQQuantizer(UnsafeBufferPointer(start: w + row + col, count: g), maxq: maxq)
                            sc[r * groupsPerRow + col / g] = quant.scale
                            zp[r * groupsPerRow + col / g] = UInt8(quant.zero)
                        }
                        let x = w1[i]
                        let code = quant.code(x)
                        let dq = quant.dequantize(code)
                        q[row + col] = UInt8(code)
                        let d = hinv[col * cols + col]
                        let diff = x - dq
                        loss += Double(diff * diff / (d * d))
                        // W1[:, i:] -= err1 Hinv1[i, i:] (the product rounded, then the
                        // difference, as torch computes it).
                        let e = diff / d
                        let hrow = col * cols + i1
                        for k in i..<count {
                            let t = e * hinv[hrow + k]
                            w1[k] -= t
                        }
                        er[r * s.blockSize + i] = e
                    }
                    if s.group <= 0 {
                        sc[r] = quant.scale
                        zp[r] = UInt8(quant.zero)
                    }
                    ls[r] += loss / 2
                }
            }
            // W[:, i2:] -= Err1 Hinv[i1:i2, i2:]
            if i2 < cols {
                Float.gemm(transA: false, transB: false, m: rows, n: cols - i2, k: count, alpha: -1,
                           a: UnsafePointer(pe.base), lda: s.blockSize, b: ph.base + i1 * cols + i2, ldb: cols,
                           beta: 1, c: pw.base + i2, ldc: cols)
            }
        }
        var codes = pq.array
        scales = ps.array
        zeros = pz.array
        var gIdx: [Int32]? = nil
        if s.actOrder {
            var inverse = [Int](repeating: 0, count: cols)
            for (k, c) in f.perm.enumerated() { inverse[c] = k }
            codes = permuteColumns(codes, rows: rows, cols: cols, inverse)
            if s.group > 0 && !s.staticGroups { gIdx = inverse.map { Int32($0 / g) } }
        }
        return GPTQResult(codes: QuantizedWeight(rows: rows, cols: cols, bits: s.bits, group: g, symmetric: false,
                                                 codes: codes, scales: scales, zeros: zeros, gIdx: gIdx),
                          loss: pl.array.reduce(0, +))
    }

    /// A copy of an array in manually managed memory, which the row chunks of the loop
    /// write concurrently (disjoint rows) without the nested `withUnsafe…` closures.
    struct Buffer<E>: @unchecked Sendable {
        let raw: UnsafeMutableBufferPointer<E>
        init(_ a: [E]) {
            raw = .allocate(capacity: a.count)
            _ = raw.initialize(from: a)
        }
        var base: UnsafeMutablePointer<E> { raw.baseAddress! }
        subscript(i: Int) -> E {
            get { raw[i] }
            nonmutating set { raw[i] = newValue }
        }
        var array: [E] { Array(raw) }
        func free() { raw.deallocate() }
    }

    /// out[r, k] = x[r, perm[k]]. x: [rows, cols]
    static func permuteColumns<E>(_ x: [E], rows: Int, cols: Int, _ perm: [Int]) -> [E] {
        var out = x
        for r in 0..<rows { for k in 0..<cols { out[r * cols + k] = x[r * cols + perm[k]] } }
        return out
    }

    /// The Hessian-weighted squared error of a quantized weight against the original,
    /// per row: the mean over rows r of (w_r - q_r)ᵀ H (w_r - q_r), H undamped, taken on
    /// `sampleRows` rows spread evenly (every row when there are no more): the exact
    /// value costs rows·cols² multiply-adds, GPTQ's own update again.
    /// w, q: [rows, cols]; hessian: [cols, cols].
    public static func weightedError(_ w: Tensor<Float>, _ q: Tensor<Float>, hessian: [Double], sampleRows: Int = 256) -> Double {
        let cols = w.cols
        let stride = Swift.max(1, w.rows / sampleRows)
        let picked = Array(Swift.stride(from: 0, to: w.rows, by: stride))
        var d = [Double](repeating: 0, count: picked.count * cols)
        for (k, r) in picked.enumerated() { for j in 0..<cols { d[k * cols + j] = Double(w.data[r * cols + j] - q.data[r * cols + j]) } }
        var dh = [Double](repeating: 0, count: d.count)
        d.withUnsafeBufferPointer { pd in
            hessian.withUnsafeBufferPointer { ph in
                dh.withUnsafeMutableBufferPointer { po in
                    TiledGEMM.dgemm(transA: false, transB: false, m: picked.count, n: cols, k: cols, alpha: 1, a: pd.baseAddress!,
                                    lda: cols, b: ph.baseAddress!, ldb: cols, beta: 0, c: po.baseAddress!, ldc: cols)
                }
            }
        }
        var total = 0.0
        for i in 0..<d.count { total += dh[i] * d[i] }
        return total / Double(picked.count)
    }
}
