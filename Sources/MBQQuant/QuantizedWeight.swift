import MBQTensor

/// The precision a packed format stores its scales in, and in which its dequantization
/// multiplies (compressed-tensors: the model's dtype; AutoAWQ and GPTQ: fp16; our fake
/// output: the model's dtype). Rounding is to nearest even, as PyTorch's casts.
public enum ScalePrecision: String, Sendable, CaseIterable {
    case f32, bf16, f16

    /// x rounded to this precision (and widened back to fp32, exactly).
    @inlinable public func round(_ x: Float) -> Float {
        switch self {
        case .f32: return x
        case .bf16: return HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16(x))
        case .f16: return HalfPrecision.fp16ToFloat(HalfPrecision.floatToFP16(x))
        }
    }
}

/// A quantized linear weight as integers: what every packed format stores, and what
/// fake quantization dequantizes (docs/FORMATS.md; ../shared/FORMATS.md).
///
/// w: [rows = out, cols = in]. Codes are unsigned: for the asymmetric scheme q in
/// 0...2^b-1 with a zero point z per group; for the symmetric scheme the signed code plus
/// 2^(b-1) (compressed-tensors' stored value), so that z = 2^(b-1) for every group and
/// both schemes dequantize as (q - z) * scale.
public struct QuantizedWeight: Sendable, Equatable {
    public var rows: Int
    public var cols: Int
    public var bits: Int
    /// Columns per scale: the group size, or `cols` for one scale per output row.
    public var group: Int
    public var symmetric: Bool
    public var codes: [UInt8]          // [rows, cols]
    public var scales: [Float]         // [rows, cols / group]
    public var zeros: [UInt8]          // [rows, cols / group]; 2^(b-1) everywhere when symmetric
    /// Column c's group when GPTQ's activation order took the columns out of order
    /// (`g_idx`, [cols]; group k holds the k-th `group` columns in that order); nil: c / group.
    public var gIdx: [Int32]?

    public init(rows: Int, cols: Int, bits: Int, group: Int, symmetric: Bool,
                codes: [UInt8], scales: [Float], zeros: [UInt8], gIdx: [Int32]? = nil) {
        precondition(bits >= 1 && bits <= 8 && group > 0 && cols % group == 0, "bits \(bits), group \(group), cols \(cols)")
        precondition(codes.count == rows * cols && scales.count == rows * (cols / group) && zeros.count == scales.count,
                     "codes \(codes.count), scales \(scales.count), zeros \(zeros.count) for [\(rows), \(cols)] / \(group)")
        self.rows = rows; self.cols = cols; self.bits = bits; self.group = group; self.symmetric = symmetric
        self.codes = codes; self.scales = scales; self.zeros = zeros
        precondition(gIdx.map { $0.count == cols && $0.allSatisfy { $0 >= 0 && Int($0) < cols / group } } ?? true,
                     "g_idx must give every one of \(cols) columns a group below \(cols / group)")
        self.gIdx = gIdx
    }

    /// g_idx as the GPTQ format stores it, [cols]: every column's group.
    public var groupIndices: [Int32] { gIdx ?? (0..<cols).map { Int32($0 / group) } }

    public var groupsPerRow: Int { cols / group }
    public var maxCode: Int { (1 << bits) - 1 }

    /// (q - z) * scale, each product rounded to `precision` as the engines compute it in
    /// the scale's dtype. With fp32 scales this is exactly the fake quantization the
    /// search evaluates. -> [rows, cols]
    public func dequantized(precision: ScalePrecision = .f32) -> Tensor<Float> {
        var out = Tensor<Float>(uninitialized: [rows, cols])
        if let gi = gIdx {
            // Activation order: each column's own group.
            for r in 0..<rows {
                for c in 0..<cols {
                    let k = r * groupsPerRow + Int(gi[c])
                    out.data[r * cols + c] = precision.round((Float(codes[r * cols + c]) - Float(zeros[k])) * precision.round(scales[k]))
                }
            }
            return out
        }
        let gpr = groupsPerRow, g = group, cols = cols
        codes.withUnsafeBufferPointer { pq in
        scales.withUnsafeBufferPointer { ps in
        zeros.withUnsafeBufferPointer { pz in
            out.data.withUnsafeMutableBufferPointer { po in
                let pq = pq, ps = ps, pz = pz, po = po
                parallelChunks(rows, minChunk: 16) { range in
                    for r in range {
                        for gi in 0..<gpr {
                            let s = precision.round(ps[r * gpr + gi]), z = Float(pz[r * gpr + gi])
                            let base = r * cols + gi * g
                            for i in base..<(base + g) { po[i] = precision.round((Float(pq[i]) - z) * s) }
                        }
                    }
                }
            }
        }
        }
        }
        return out
    }
}
