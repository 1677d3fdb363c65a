import MBQTensor

/// How a weight matrix is quantized.
public enum WeightQuantizer: Sendable, Equatable, CustomStringConvertible {
    /// Weight-only: asymmetric per group along the input dim (group -1 = per row).
    case groupAsymmetric(bits: Int, group: Int)
    /// Weight-activation: symmetric per output channel.
    case channelSymmetric(bits: Int)

    public var bits: Int {
        switch self {
        case let .groupAsymmetric(b, _), let .channelSymmetric(b): return b
        }
    }

    public var description: String {
        switch self {
        case let .groupAsymmetric(b, g): return "w\(b) asym g\(g)"
        case let .channelSymmetric(b): return "w\(b) sym per-channel"
        }
    }

    /// Fake-quantizes `w` ([out, in]).
    public func apply(_ w: Tensor<Float>) -> Tensor<Float> {
        switch self {
        case let .groupAsymmetric(b, g): return Quantize.groupAsymmetric(w, bits: b, group: g)
        case let .channelSymmetric(b): return Quantize.rowSymmetric(w, bits: b)
        }
    }
}

/// Fast paths of `QuantReference`: the same fp32 operations in the same order (so the
/// results are identical), over unsafe pointers and in parallel over rows.
public enum Quantize {
    public static func groupAsymmetric(_ w: Tensor<Float>, bits: Int, group: Int) -> Tensor<Float> {
        groupAsymmetric(w, bits: bits, group: group, columnScales: nil)
    }

    /// Q(W diag(s)) diag(s)^-1 in one pass (the weight-only search's candidate weight):
    /// each element is multiplied by its column's scale, quantized with its group, and
    /// divided back, with the same fp32 operations as doing the three steps apart.
    public static func groupAsymmetric(_ w: Tensor<Float>, bits: Int, group: Int, columnScales: [Float]?) -> Tensor<Float> {
        let cols = w.cols
        let g = group <= 0 ? cols : group
        precondition(bits >= 1 && bits <= 16 && cols % g == 0, "group \(g) does not divide \(cols)")
        let maxInt = Float((1 << bits) - 1)
        var out = Tensor<Float>(uninitialized: w.shape)
        let groups = w.count / g
        let scaled = columnScales != nil
        precondition(columnScales == nil || columnScales!.count == cols, "scales \(columnScales!.count) vs \(cols) columns")
        let sc = columnScales ?? []
        w.data.withUnsafeBufferPointer { pw in
        sc.withUnsafeBufferPointer { ps in
            out.data.withUnsafeMutableBufferPointer { po in
                let pw = pw, po = po, ps = ps
                parallelChunks(groups, minChunk: 256) { range in
                    for gi in range {
                        let base = gi * g
                        let col0 = base % cols
                        if scaled {
                            for i in 0..<g { po[base + i] = pw[base + i] * ps[col0 + i] }
                        } else {
                            for i in 0..<g { po[base + i] = pw[base + i] }
                        }
                        var mn = po[base], mx = po[base]
                        for i in base..<(base + g) {
                            let v = po[i]
                            mn = v < mn ? v : mn
                            mx = v > mx ? v : mx
                        }
                        let d = mx - mn
                        let scale = (d > 1e-5 ? d : 1e-5) / maxInt
                        var zero = -(mn / scale).rounded(.toNearestOrEven)
                        zero = zero < 0 ? 0 : (zero > maxInt ? maxInt : zero)
                        for i in base..<(base + g) {
                            var q = (po[i] / scale).rounded(.toNearestOrEven) + zero
                            q = q < 0 ? 0 : (q > maxInt ? maxInt : q)
                            po[i] = (q - zero) * scale
                        }
                        if scaled {
                            for i in 0..<g { po[base + i] /= ps[col0 + i] }
                        }
                    }
                }
            }
        }
        }
        return out
    }

    public static func rowSymmetric(_ x: Tensor<Float>, bits: Int) -> Tensor<Float> {
        var out = x
        rowSymmetricInPlace(&out, bits: bits)
        return out
    }

    /// In place (activations are quantized where they are). Generic so that the model's
    /// forward can fake-quantize linear inputs in either precision.
    @inlinable
    public static func rowSymmetricInPlace<T: BLASScalar>(_ x: inout Tensor<T>, bits: Int) {
        let cols = x.cols, rows = x.rows
        precondition(bits >= 2 && bits <= 16, "bits \(bits)")
        let qmax = T((1 << (bits - 1)) - 1), qmin = -T(1 << (bits - 1))
        let floor: T = 1e-5
        x.data.withUnsafeMutableBufferPointer { px in
            let px = px
            parallelChunks(rows, minChunk: 16) { range in
                for r in range {
                    let base = r * cols
                    var am: T = 0
                    for j in 0..<cols { let a = Swift.abs(px[base + j]); am = a > am ? a : am }
                    let scale = (am > floor ? am : floor) / qmax
                    for j in 0..<cols {
                        var q = (px[base + j] / scale).rounded(.toNearestOrEven)
                        q = q < qmin ? qmin : (q > qmax ? qmax : q)
                        px[base + j] = q * scale
                    }
                }
            }
        }
    }
}
