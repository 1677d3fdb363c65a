import MBQTensor

/// The quantizers written as plainly as possible: these loops are the specification
/// (DESIGN.md §2, after AWQ's pseudo_quantize_tensor and the MBQ authors' fake-quant
/// functions), in fp32 with the same operations as PyTorch, rounding half to even as
/// torch.round does. The fast paths in `Quantize` must reproduce them bit for bit.
public enum QuantReference {
    /// Weight-only, asymmetric, `bits` bits, groups of `group` along the input dim
    /// (group = -1: one group per row). w: [out, in] -> fake-quantized w, same shape.
    ///   scale = max(max - min, 1e-5) / (2^b - 1);  zero = clamp(-round(min / scale), 0, 2^b - 1)
    ///   w' = (clamp(round(w / scale) + zero, 0, 2^b - 1) - zero) * scale
    public static func groupAsymmetric(_ w: Tensor<Float>, bits: Int, group: Int) -> Tensor<Float> {
        let cols = w.cols
        let g = group <= 0 ? cols : group
        precondition(cols % g == 0, "group \(g) does not divide \(cols)")
        let maxInt = Float((1 << bits) - 1)
        var out = w
        for start in stride(from: 0, to: w.count, by: g) {
            var mn = w.data[start], mx = w.data[start]
            for i in start..<(start + g) { mn = min(mn, w.data[i]); mx = max(mx, w.data[i]) }
            let scale = max(mx - mn, 1e-5) / maxInt
            let zero = min(max(-(mn / scale).rounded(.toNearestOrEven), 0), maxInt)
            for i in start..<(start + g) {
                let q = min(max((w.data[i] / scale).rounded(.toNearestOrEven) + zero, 0), maxInt)
                out.data[i] = (q - zero) * scale
            }
        }
        return out
    }

    /// Symmetric, one scale per row: weights per output channel, or activations per token.
    /// x: [rows, cols] ->  scale = max(absmax, 1e-5) / (2^(b-1) - 1),
    ///   x' = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1) * scale
    public static func rowSymmetric(_ x: Tensor<Float>, bits: Int) -> Tensor<Float> {
        let cols = x.cols
        let qmax = Float((1 << (bits - 1)) - 1), qmin = -Float(1 << (bits - 1))
        var out = x
        for r in 0..<x.rows {
            var am: Float = 0
            for j in 0..<cols { am = max(am, abs(x.data[r * cols + j])) }
            let scale = max(am, 1e-5) / qmax
            for j in 0..<cols {
                let i = r * cols + j
                out.data[i] = min(max((x.data[i] / scale).rounded(.toNearestOrEven), qmin), qmax) * scale
            }
        }
        return out
    }
}
