import MBQTensor

/// The quantizers written as plainly as possible: these loops are the specification
/// (docs/DESIGN.md §2.3, after AWQ's pseudo_quantize_tensor and the MBQ authors'
/// fake-quant functions), in fp32 with the same operations as PyTorch, rounding half to
/// even as torch.round does. They return the integers every output format stores; fake
/// quantization is their dequantization. The fast paths in `Quantize` must reproduce
/// them bit for bit.
public enum QuantReference {
    /// Weight-only, asymmetric, `bits` bits, groups of `group` along the input dim
    /// (group = -1: one group per row). w: [out, in] ->
    ///   scale = max(max - min, 1e-5) / (2^b - 1);  zero = clamp(-round(min / scale), 0, 2^b - 1)
    ///   q = clamp(round(w / scale) + zero, 0, 2^b - 1)
    public static func groupAsymmetricCodes(_ w: Tensor<Float>, bits: Int, group: Int) -> QuantizedWeight {
        let cols = w.cols
        let g = group <= 0 ? cols : group
        precondition(cols % g == 0, "group \(g) does not divide \(cols)")
        let maxInt = Float((1 << bits) - 1)
        var codes = [UInt8](repeating: 0, count: w.count)
        var scales: [Float] = [], zeros: [UInt8] = []
        for start in stride(from: 0, to: w.count, by: g) {
            var mn = w.data[start], mx = w.data[start]
            for i in start..<(start + g) { mn = min(mn, w.data[i]); mx = max(mx, w.data[i]) }
            let scale = max(mx - mn, 1e-5) / maxInt
            let zero = min(max(-(mn / scale).rounded(.toNearestOrEven), 0), maxInt)
            for i in start..<(start + g) {
                codes[i] = UInt8(min(max((w.data[i] / scale).rounded(.toNearestOrEven) + zero, 0), maxInt))
            }
            scales.append(scale)
            zeros.append(UInt8(zero))
        }
        return QuantizedWeight(rows: w.rows, cols: cols, bits: bits, group: g, symmetric: false,
                               codes: codes, scales: scales, zeros: zeros)
    }

    /// Symmetric, one scale per row: weights per output channel, or activations per token.
    /// x: [rows, cols] ->  scale = max(absmax, 1e-5) / (2^(b-1) - 1),
    ///   signed code = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1); stored code = signed + 2^(b-1)
    public static func rowSymmetricCodes(_ x: Tensor<Float>, bits: Int) -> QuantizedWeight {
        let cols = x.cols
        let qmax = Float((1 << (bits - 1)) - 1), qmin = -Float(1 << (bits - 1))
        let offset = Float(1 << (bits - 1))
        var codes = [UInt8](repeating: 0, count: x.count)
        var scales: [Float] = []
        for r in 0..<x.rows {
            var am: Float = 0
            for j in 0..<cols { am = max(am, abs(x.data[r * cols + j])) }
            let scale = max(am, 1e-5) / qmax
            for j in 0..<cols {
                let i = r * cols + j
                codes[i] = UInt8(min(max((x.data[i] / scale).rounded(.toNearestOrEven), qmin), qmax) + offset)
            }
            scales.append(scale)
        }
        return QuantizedWeight(rows: x.rows, cols: cols, bits: bits, group: cols, symmetric: true, codes: codes,
                               scales: scales, zeros: [UInt8](repeating: UInt8(1 << (bits - 1)), count: x.rows))
    }

    /// Fake quantization, weight-only: the dequantized codes, (q - zero) * scale in fp32.
    public static func groupAsymmetric(_ w: Tensor<Float>, bits: Int, group: Int) -> Tensor<Float> {
        groupAsymmetricCodes(w, bits: bits, group: group).dequantized()
    }

    /// Fake quantization, symmetric per row: signed code * scale in fp32.
    public static func rowSymmetric(_ x: Tensor<Float>, bits: Int) -> Tensor<Float> {
        rowSymmetricCodes(x, bits: bits).dequantized()
    }
}
