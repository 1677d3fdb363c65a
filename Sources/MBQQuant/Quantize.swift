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

    /// The integers of `w` ([out, in]): what the output formats store.
    public func codes(_ w: Tensor<Float>) -> QuantizedWeight {
        switch self {
        case let .groupAsymmetric(b, g): return Quantize.groupAsymmetricCodes(w, bits: b, group: g)
        case let .channelSymmetric(b): return Quantize.rowSymmetricCodes(w, bits: b)
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
                        let (scale, zero) = groupParameters(UnsafeBufferPointer(po), base: base, count: g, maxInt: maxInt)
                        for i in base..<(base + g) {
                            po[i] = (code(po[i], scale: scale, zero: zero, maxInt: maxInt) - zero) * scale
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

    /// One group's asymmetric parameters from its values p[base ..< base + count]:
    /// scale = max(max - min, 1e-5) / maxInt, zero = clamp(-round(min / scale), 0, maxInt).
    @inline(__always)
    static func groupParameters(_ p: UnsafeBufferPointer<Float>, base: Int, count: Int, maxInt: Float) -> (scale: Float, zero: Float) {
        var mn = p[base], mx = p[base]
        for i in base..<(base + count) {
            let v = p[i]
            mn = v < mn ? v : mn
            mx = v > mx ? v : mx
        }
        let d = mx - mn
        let scale = (d > 1e-5 ? d : 1e-5) / maxInt
        let zero = -(mn / scale).rounded(.toNearestOrEven)
        return (scale, zero < 0 ? 0 : (zero > maxInt ? maxInt : zero))
    }

    /// q = clamp(round(v / scale) + zero, 0, maxInt), as a float.
    @inline(__always)
    static func code(_ v: Float, scale: Float, zero: Float, maxInt: Float) -> Float {
        let q = (v / scale).rounded(.toNearestOrEven) + zero
        return q < 0 ? 0 : (q > maxInt ? maxInt : q)
    }

    /// `QuantReference.groupAsymmetricCodes`, in parallel over groups.
    public static func groupAsymmetricCodes(_ w: Tensor<Float>, bits: Int, group: Int) -> QuantizedWeight {
        let cols = w.cols
        let g = group <= 0 ? cols : group
        precondition(bits >= 1 && bits <= 8 && cols % g == 0, "group \(g) does not divide \(cols)")
        let maxInt = Float((1 << bits) - 1)
        let groups = w.count / g
        var codes = [UInt8](repeating: 0, count: w.count)
        var scales = [Float](repeating: 0, count: groups)
        var zeros = [UInt8](repeating: 0, count: groups)
        w.data.withUnsafeBufferPointer { pw in
        codes.withUnsafeMutableBufferPointer { pq in
        scales.withUnsafeMutableBufferPointer { ps in
        zeros.withUnsafeMutableBufferPointer { pz in
            let pw = pw, pq = pq, ps = ps, pz = pz
            parallelChunks(groups, minChunk: 256) { range in
                for gi in range {
                    let base = gi * g
                    let (scale, zero) = groupParameters(pw, base: base, count: g, maxInt: maxInt)
                    for i in base..<(base + g) { pq[i] = UInt8(code(pw[i], scale: scale, zero: zero, maxInt: maxInt)) }
                    ps[gi] = scale
                    pz[gi] = UInt8(zero)
                }
            }
        }
        }
        }
        }
        return QuantizedWeight(rows: w.rows, cols: cols, bits: bits, group: g, symmetric: false,
                               codes: codes, scales: scales, zeros: zeros)
    }

    /// `QuantReference.rowSymmetricCodes`, in parallel over rows.
    public static func rowSymmetricCodes(_ x: Tensor<Float>, bits: Int) -> QuantizedWeight {
        let cols = x.cols, rows = x.rows
        precondition(bits >= 2 && bits <= 8, "bits \(bits)")
        let qmax = Float((1 << (bits - 1)) - 1), qmin = -Float(1 << (bits - 1))
        let offset = Float(1 << (bits - 1))
        var codes = [UInt8](repeating: 0, count: x.count)
        var scales = [Float](repeating: 0, count: rows)
        x.data.withUnsafeBufferPointer { px in
        codes.withUnsafeMutableBufferPointer { pq in
        scales.withUnsafeMutableBufferPointer { ps in
            let px = px, pq = pq, ps = ps
            parallelChunks(rows, minChunk: 16) { range in
                for r in range {
                    let base = r * cols
                    var am: Float = 0
                    for j in 0..<cols { let a = Swift.abs(px[base + j]); am = a > am ? a : am }
                    let scale = (am > 1e-5 ? am : 1e-5) / qmax
                    for j in 0..<cols {
                        var q = (px[base + j] / scale).rounded(.toNearestOrEven)
                        q = q < qmin ? qmin : (q > qmax ? qmax : q)
                        pq[base + j] = UInt8(q + offset)
                    }
                    ps[r] = scale
                }
            }
        }
        }
        }
        return QuantizedWeight(rows: rows, cols: cols, bits: bits, group: cols, symmetric: true, codes: codes,
                               scales: scales, zeros: [UInt8](repeating: UInt8(1 << (bits - 1)), count: rows))
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
