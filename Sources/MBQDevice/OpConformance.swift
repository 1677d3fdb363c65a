import MBQModel
import MBQQuant
import MBQTensor

/// Every `DeviceOps` op against its CPU reference (issue 25, item 2; after ggml's
/// test-backend-ops): random inputs on shapes chosen to catch indexing bugs — rows that
/// are not a multiple of 32 (37, 45), head_dim 64 and 128, GQA 4 heads on 2 kv heads,
/// left padding, M-RoPE tables, quantization groups of 128 and per channel — each
/// compared element by element. A failing check names the op, its shapes and the first
/// element past the tolerance. The emulated device runs the kernels' own source on the
/// host, so its non-GEMM ops are expected to be exact; a GPU's expf/logf and cuBLAS's
/// summation order are what the tolerances allow for.
public enum OpConformance {
    public struct Check: Sendable, CustomStringConvertible {
        public var op: String
        public var shapes: String
        public var maxAbs: Double
        /// maxAbs relative to the reference's largest magnitude.
        public var rel: Double
        public var tolerance: Double
        public var firstDeviation: String?
        public var passed: Bool { firstDeviation == nil && maxAbs.isFinite }

        public var description: String {
            "\(passed ? "ok  " : "FAIL") \(op) \(shapes): max abs \(fmt(maxAbs)), rel \(fmt(rel)) (tolerance \(tolerance))"
                + (firstDeviation.map { ", first deviation at \($0)" } ?? "")
        }
    }

    /// Relative tolerances: ops whose every step is a correctly rounded IEEE operation in
    /// the CPU's order (copies, RMSNorm's sqrt and division, RoPE, scaling, the
    /// quantizers' division and round-to-nearest-even) must agree to the last bit on any
    /// device that honours --fmad=false; ops with expf/logf (SwiGLU, softmax) get a few
    /// ulp; GEMMs, whose summation order is the library's, 1e-5 of the output's scale.
    public static let exact = 0.0, transcendental = 1e-6, gemm = 1e-5

    static func fmt(_ v: Double) -> String {
        v == 0 ? "0" : String(format: "%.2e", v)
    }

    /// Runs every check on `device`.
    public static func run(on device: Device, seed: UInt64 = 25) throws -> [Check] {
        var suite = Suite(ops: DeviceOps(device: device), rng: SeededRandom(seed: seed))
        try suite.widening()
        for (t, cin, cout) in [(37, 96, 160), (45, 128, 64)] { try suite.linear(rows: t, inFeatures: cin, outFeatures: cout) }
        for (t, c) in [(37, 96), (45, 256)] { try suite.rmsNorm(rows: t, cols: c) }
        for (t, heads, d, mrope) in [(37, 4, 64, false), (45, 2, 128, false), (37, 4, 128, true)] {
            try suite.rope(rows: t, heads: heads, headDim: d, mrope: mrope)
        }
        try suite.swiglu(count: 37 * 160)
        for (t, heads, kv, d, pad) in [(37, 4, 2, 64, 3), (45, 4, 4, 128, 0), (33, 4, 2, 128, 5)] {
            try suite.attention(rows: t, heads: heads, kvHeads: kv, headDim: d, padding: pad)
        }
        for (t, c) in [(37, 96), (45, 4096)] { try suite.fakeQuantRows(rows: t, cols: c, bits: 8) }
        for (r, c, g, bits, scaled) in [(48, 256, 128, 4, false), (48, 256, 128, 4, true), (37, 96, 0, 3, true), (45, 384, 128, 8, true)] {
            try suite.fakeQuantGroups(rows: r, cols: c, group: g, bits: bits, scaled: scaled)
        }
        try suite.scaleColumns(rows: 37, cols: 96)
        for squared in [true, false] { try suite.rowError(rows: 45, cols: 96, squared: squared) }
        try suite.add(count: 1001)
        try suite.gatherAndColumnSums(rows: 45, cols: 96)
        try suite.lossHeadOps(rows: 37, vocab: 1000)
        return suite.checks
    }

    struct Suite {
        let ops: DeviceOps
        var rng: SeededRandom
        var checks: [Check] = []
        var device: Device { ops.device }

        mutating func check(_ op: String, _ shapes: String, tolerance: Double, _ pairs: [(got: [Float], want: [Float], cols: Int)]) {
            var d = Deviation()
            for p in pairs { d.add(p.got, p.want, cols: p.cols, tolerance: tolerance) }
            checks.append(Check(op: op, shapes: shapes, maxAbs: d.maxAbs, rel: d.rel, tolerance: tolerance, firstDeviation: d.first))
        }

        mutating func random(_ shape: [Int], std: Double = 1) -> Tensor<Float> { rng.normalTensor(shape, std: std) }
        func put(_ x: Tensor<Float>) throws -> DeviceArray { try DeviceArray(device, x.data) }
        func put(_ x: [Float]) throws -> DeviceArray { try DeviceArray(device, x) }
        func empty(_ n: Int) throws -> DeviceArray { try DeviceArray(device, count: n) }

        mutating func widening() throws {
            // Every finite class: normals, subnormals, zeros of both signs, infinities, NaN.
            var bits: [UInt16] = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3C00, 0xC000, 0x8001]
            for _ in 0..<989 { bits.append(UInt16(truncatingIfNeeded: rng.next())) }
            for bf16 in [true, false] {
                let src = try DeviceArray(device, bits: bits), out = try empty(bits.count)
                try ops.widen(src.pointer, bf16: bf16, into: out.pointer, count: bits.count)
                let want = bits.map { bf16 ? HalfPrecision.bf16ToFloat($0) : HalfPrecision.fp16ToFloat($0) }
                check(bf16 ? "widen bf16" : "widen fp16", "[\(bits.count)]", tolerance: OpConformance.exact,
                      [(Array(try out.download().prefix(bits.count)), want, 0)])
            }
        }

        mutating func linear(rows t: Int, inFeatures k: Int, outFeatures n: Int) throws {
            let x = random([t, k]), w = random([n, k], std: 0.1), bias = random([n]), dy = random([t, n])
            let dx = try put(x), dw = try put(w), db = try put(bias), y = try empty(t * n)
            try ops.linear(dx.pointer, weight: dw.pointer, bias: db.pointer, into: y.pointer, rows: t, inFeatures: k, outFeatures: n)
            check("linear (+ bias)", "x [\(t), \(k)], W [\(n), \(k)]", tolerance: OpConformance.gemm,
                  [(try y.download(), linearForward(x, weight: w, bias: bias).data, n)])
            let ddy = try put(dy), g = try empty(t * k)
            try ops.linearBackward(ddy.pointer, weight: dw.pointer, into: g.pointer, rows: t, inFeatures: k, outFeatures: n)
            check("linear backward", "dy [\(t), \(n)], W [\(n), \(k)]", tolerance: OpConformance.gemm,
                  [(try g.download(), linearBackward(dy, weight: w).data, k)])
        }

        mutating func rmsNorm(rows t: Int, cols c: Int) throws {
            let x = random([t, c], std: 3), w = random([c]), dy = random([t, c])
            let want = rmsNormForward(x, weight: w, eps: 1e-6)
            let dx = try put(x), dw = try put(w), y = try empty(t * c), inv = try empty(t)
            try ops.rmsNormForward(dx.pointer, weight: dw.pointer, eps: 1e-6, into: y.pointer, invRms: inv.pointer, rows: t, cols: c)
            check("rmsnorm forward", "[\(t), \(c)]", tolerance: OpConformance.exact,
                  [(try y.download(), want.y.data, c), (try inv.download(), want.invRms, 0)])
            let ddy = try put(dy), g = try empty(t * c)
            try ops.rmsNormBackward(ddy.pointer, x: dx.pointer, weight: dw.pointer, invRms: inv.pointer, into: g.pointer, rows: t, cols: c)
            check("rmsnorm backward", "[\(t), \(c)]", tolerance: OpConformance.exact,
                  [(try g.download(), rmsNormBackward(dy, x: x, weight: w, invRms: want.invRms).data, c)])
        }

        mutating func rope(rows t: Int, heads: Int, headDim d: Int, mrope: Bool) throws {
            // Left-padded positions (the first three repeat 0), or M-RoPE's three rows.
            let ids = (0..<t).map { max(0, $0 - 3) }
            let table = mrope
                ? RoPETable<Float>(positions: [ids, ids.map { $0 / 2 }, ids.map { $0 % 5 }], headDim: d, theta: 1e6,
                                   mropeSection: [d / 8, d * 3 / 16, d * 3 / 16])
                : RoPETable<Float>(positions: [ids], headDim: d, theta: 10000)
            let x = random([t, heads * d])
            let cosv = try put(table.cos), sinv = try put(table.sin)
            for backward in [false, true] {
                var want = x
                if backward { ropeBackward(&want, table: table) } else { ropeForward(&want, table: table) }
                let dx = try put(x)
                try ops.rope(dx.pointer, cos: cosv.pointer, sin: sinv.pointer, rows: t, heads: heads, headDim: d, backward: backward)
                check("rope \(backward ? "backward" : "forward")\(mrope ? " (M-RoPE)" : "")", "[\(t), \(heads) x \(d)]",
                      tolerance: OpConformance.exact, [(try dx.download(), want.data, heads * d)])
            }
        }

        mutating func swiglu(count n: Int) throws {
            // Gates out to ±40, where sigmoid's two branches and overflow matter.
            let g = random([n], std: 12), u = random([n]), da = random([n])
            let dg = try put(g), du = try put(u), a = try empty(n)
            try ops.swigluForward(gate: dg.pointer, up: du.pointer, into: a.pointer, count: n)
            check("swiglu forward", "[\(n)]", tolerance: OpConformance.transcendental,
                  [(try a.download(), MBQModel.swiglu(gate: g, up: u).data, 0)])
            var wantG = [Float](repeating: 0, count: n), wantU = wantG
            for i in 0..<n {   // MBQModel mlpBackward's elementwise step
                let gv = g.data[i], s = sigmoid(gv)
                wantG[i] = da.data[i] * u.data[i] * s * (1 + gv * (1 - s))
                wantU[i] = da.data[i] * gv * s
            }
            let dda = try put(da), gg = try empty(n), gu = try empty(n)
            try ops.swigluBackward(dda.pointer, gate: dg.pointer, up: du.pointer, dGate: gg.pointer, dUp: gu.pointer, count: n)
            check("swiglu backward", "[\(n)]", tolerance: OpConformance.transcendental,
                  [(try gg.download(), wantG, 0), (try gu.download(), wantU, 0)])
        }

        mutating func attention(rows t: Int, heads: Int, kvHeads: Int, headDim d: Int, padding: Int) throws {
            let shape = AttentionShape(heads: heads, kvHeads: kvHeads, headDim: d)
            let q = random([t, heads * d]), k = random([t, kvHeads * d]), v = random([t, kvHeads * d]), dctx = random([t, heads * d])
            let mask = (0..<t).map { $0 >= padding }
            // Row blocks of 16 so that these short sequences cross block bounds as 2048-token ones do at 256.
            let rb = 16
            let want = attentionCoreForward(q: q, k: k, v: v, mask: mask, shape: shape, rowBlock: rb)
            let dq = try put(q), dk = try put(k), dv = try put(v), dm = try DeviceArray(device, int32: mask.map { $0 ? 1 : 0 })
            let ctx = try empty(t * heads * d), lse = try empty(heads * t), scores = try empty(rb * t), scores2 = try empty(rb * t)
            try ops.attentionForward(q: dq.pointer, k: dk.pointer, v: dv.pointer, mask: dm.pointer, into: ctx.pointer, lse: lse.pointer,
                                     scores: scores.pointer, rows: t, heads: heads, kvHeads: kvHeads, headDim: d, rowBlock: rb)
            let shapes = "[\(t)], \(heads) heads on \(kvHeads) kv, D \(d), \(padding) padded"
            check("attention forward", shapes, tolerance: OpConformance.gemm,
                  [(try ctx.download(), want.ctx.data, heads * d), (try lse.download(), want.lse, t)])
            let saved = AttentionSaved(q: q, k: k, v: v, ctx: want.ctx, lse: want.lse)
            let g = attentionCoreBackward(dctx: dctx, saved: saved, mask: mask, shape: shape, rowBlock: rb)
            let dc = try put(dctx), gq = try empty(t * heads * d), gk = try empty(t * kvHeads * d), gv = try empty(t * kvHeads * d)
            try ops.attentionBackward(dctx: dc.pointer, q: dq.pointer, k: dk.pointer, v: dv.pointer, ctx: ctx.pointer, lse: lse.pointer,
                                      mask: dm.pointer, dq: gq.pointer, dk: gk.pointer, dv: gv.pointer, p: scores.pointer, dp: scores2.pointer,
                                      rows: t, heads: heads, kvHeads: kvHeads, headDim: d, rowBlock: rb)
            check("attention backward", shapes, tolerance: OpConformance.gemm,
                  [(try gq.download(), g.dq.data, heads * d), (try gk.download(), g.dk.data, kvHeads * d), (try gv.download(), g.dv.data, kvHeads * d)])
        }

        mutating func fakeQuantRows(rows t: Int, cols c: Int, bits: Int) throws {
            var x = random([t, c])
            x.data[c] = 0   // a row with a zero keeps its scale floor path honest
            let dx = try put(x)
            try ops.fakeQuantRows(dx.pointer, rows: t, cols: c, bits: bits)
            var want = x
            Quantize.rowSymmetricInPlace(&want, bits: bits)
            check("per-token int\(bits) fake quantization", "[\(t), \(c)]", tolerance: OpConformance.exact,
                  [(try dx.download(), want.data, c)])
        }

        mutating func fakeQuantGroups(rows r: Int, cols c: Int, group: Int, bits: Int, scaled: Bool) throws {
            var w = random([r, c], std: 0.05)
            for j in 0..<c { w.data[j] = 0.25 }   // a constant row: the 1e-5 range floor
            let s: [Float] = (0..<c).map { _ in Float(0.25 + 2 * rng.uniform()) }
            let dw = try put(w), ds = try put(s), out = try empty(r * c)
            try ops.fakeQuantGroups(dw.pointer, scales: scaled ? ds.pointer : 0, into: out.pointer, rows: r, cols: c, group: group, bits: bits)
            check("w\(bits) \(group == 0 ? "per-channel" : "g\(group)") fake quantization\(scaled ? " of W diag(s)" : "")", "[\(r), \(c)]",
                  tolerance: OpConformance.exact,
                  [(try out.download(), Quantize.groupAsymmetric(w, bits: bits, group: group, columnScales: scaled ? s : nil).data, c)])
        }

        mutating func scaleColumns(rows t: Int, cols c: Int) throws {
            let x = random([t, c]), s = (0..<c).map { _ in Float(0.1 + rng.uniform()) }
            let ds = try put(s)
            for divide in [false, true] {
                let dx = try put(x)
                try ops.scaleColumns(dx.pointer, by: ds.pointer, rows: t, cols: c, divide: divide)
                var want = x
                scaleColumnsInPlace(&want, by: s, divide: divide)
                check("column scaling (\(divide ? "divide" : "multiply"))", "[\(t), \(c)]", tolerance: OpConformance.exact,
                      [(try dx.download(), want.data, c)])
            }
        }

        mutating func rowError(rows t: Int, cols c: Int, squared: Bool) throws {
            let a = random([t, c]), b = random([t, c])
            let da = try put(a), db = try put(b), out = try empty(t)
            try ops.rowError(da.pointer, db.pointer, into: out.pointer, rows: t, cols: c, squared: squared)
            let want: [Float] = (0..<t).map { r in   // MBQMethods LossAccumulator.add's row sum
                var s: Float = 0
                for j in 0..<c { let d = a.data[r * c + j] - b.data[r * c + j]; s += squared ? d * d : Swift.abs(d) }
                return s
            }
            check("row \(squared ? "squared" : "absolute") error", "[\(t), \(c)]", tolerance: OpConformance.exact,
                  [(try out.download(), want, 0)])
        }

        mutating func gatherAndColumnSums(rows t: Int, cols c: Int) throws {
            let x = random([t, c])
            let idx = [44, 0, 7, 7, 31, 12]
            let dx = try put(x), out = try empty(idx.count * c)
            let di = try DeviceArray(device, int64: idx)
            try ops.gatherRows(dx.pointer, indices: di.pointer, count: idx.count, cols: c, into: out.pointer)
            check("gather rows", "\(idx.count) of [\(t), \(c)]", tolerance: OpConformance.exact,
                  [(try out.download(), idx.flatMap { x.data[$0 * c ..< ($0 + 1) * c] }, c)])
            let mask = (0..<t).map { $0 % 3 != 1 }
            var want = (0..<c).map { Double($0) * 0.125 }   // sums already holding something
            let sums = try DeviceArray(device, count: c * 2), dm = try DeviceArray(device, int32: mask.map { $0 ? 1 : 0 })
            try want.withUnsafeBytes { try device.copy($0, to: sums.pointer) }
            try ops.columnAbsSums(dx.pointer, mask: dm.pointer, rows: t, cols: c, into: sums.pointer)
            for r in 0..<t where mask[r] { for j in 0..<c { want[j] += Double(Swift.abs(x.data[r * c + j])) } }
            var got = [Double](repeating: 0, count: c)
            try got.withUnsafeMutableBytes { try device.copy(sums.pointer, to: $0) }
            try device.synchronize()
            // fp64 sums in the CPU's order: equal, bit for bit.
            let first = zip(got, want).enumerated().first { $0.element.0 != $0.element.1 }
            checks.append(Check(op: "column |x| sums (fp64)", shapes: "[\(t), \(c)]",
                                maxAbs: zip(got, want).map { Swift.abs($0 - $1) }.max() ?? 0,
                                rel: (zip(got, want).map { Swift.abs($0 - $1) }.max() ?? 0) / max(want.map(Swift.abs).max() ?? 0, 1e-300),
                                tolerance: OpConformance.exact,
                                firstDeviation: first.map { "[\($0.offset)] (\($0.element.0) vs \($0.element.1))" }))
            let filled = try empty(77)
            try ops.fill(filled.pointer, with: -.infinity, count: 77)
            check("fill", "[77]", tolerance: OpConformance.exact, [(try filled.download(), [Float](repeating: -.infinity, count: 77), 0)])
        }

        /// The loss head's row ops on a [37, 1000] logits block (targets anywhere in a row).
        mutating func lossHeadOps(rows r: Int, vocab v: Int) throws {
            let x = random([r, v], std: 4)
            let targets = (0..<r).map { ($0 * 7919) % v }
            let idx = try DeviceArray(device, int64: targets)
            let dx = try put(x)
            try ops.logSoftmaxRows(dx.pointer, rows: r, cols: v)
            var lp = x
            logSoftmaxRowsInPlace(&lp)
            check("log-softmax rows", "[\(r), \(v)]", tolerance: OpConformance.transcendental, [(try dx.download(), lp.data, v)])
            let picked = try empty(r)
            try ops.pickPerRow(dx.pointer, indices: idx.pointer, rows: r, cols: v, into: picked.pointer)
            check("pick per row", "[\(r), \(v)]", tolerance: OpConformance.exact,
                  [(try picked.download(), (0..<r).map { lp.data[$0 * v + targets[$0]] }, 0)])
            try ops.exp(dx.pointer, count: r * v)
            try ops.addPerRow(dx.pointer, indices: idx.pointer, value: -1, rows: r, cols: v)
            try ops.scale(dx.pointer, by: 1 / Float(r), count: r * v)
            var want = lp.data.map { Float.exp($0) }
            for k in 0..<r { want[k * v + targets[k]] -= 1 }
            for i in want.indices { want[i] *= 1 / Float(r) }
            check("exp, one-hot, scale (head gradient)", "[\(r), \(v)]", tolerance: OpConformance.transcendental, [(try dx.download(), want, v)])
            let rows = [5, 0, 36, 12], t = 40, c = 8
            let h = random([rows.count, c]), out = try DeviceArray(device, [Float](repeating: 0, count: t * c))
            let dh = try put(h)
            let ri = try DeviceArray(device, int64: rows)
            try ops.scatterRows(dh.pointer, indices: ri.pointer, count: rows.count, cols: c, into: out.pointer)
            var scattered = [Float](repeating: 0, count: t * c)
            for (k, p) in rows.enumerated() { for j in 0..<c { scattered[p * c + j] = h.data[k * c + j] } }
            check("scatter rows", "\(rows.count) into [\(t), \(c)]", tolerance: OpConformance.exact, [(try out.download(), scattered, c)])
        }

        mutating func add(count n: Int) throws {
            let x = random([n]), y = random([n])
            let dx = try put(x), dy = try put(y)
            try ops.add(dy.pointer, into: dx.pointer, count: n)
            check("add", "[\(n)]", tolerance: OpConformance.exact, [(try dx.download(), MBQTensor.add(x, y).data, 0)])
        }
    }
}
