import MBQModel
import MBQQuant
import MBQTensor

/// Folding searched scales into a block and quantizing it (docs/DESIGN.md §2 "Apply").
/// The scaled block computes the same function as the fp block: the previous op's
/// output channels are divided by s and the scaled linears' input columns multiplied.
public enum ApplyScales {
    static func divide(_ t: inout Tensor<Float>, _ s: [Float]) {
        precondition(t.count == s.count, "previous-op vector \(t.shape) vs scales \(s.count)")
        for i in 0..<s.count { t.data[i] /= s[i] }
    }

    /// Output rows of w ([out, in]) divided by s ([out]).
    static func divideRows(_ w: inout Tensor<Float>, _ s: [Float]) {
        precondition(w.rows == s.count, "weight \(w.shape) vs scales \(s.count)")
        let c = w.cols
        for r in 0..<w.rows { for j in 0..<c { w.data[r * c + j] /= s[r] } }
    }

    /// Applies one group's scales to the block (`SearchGroupSpec`: the previous op's
    /// output divided, the scaled linears' columns multiplied).
    public static func apply(_ g: SearchGroup, scales s: [Float], to w: inout DecoderBlockWeights<Float>) {
        let spec = g.spec
        switch spec.previous {
        case let .norm(path):
            divide(&w[keyPath: path], s)
        case let .linearRows(path, bias):
            divideRows(&w[keyPath: path], s)
            if let bias, var b = w[keyPath: bias] { divide(&b, s); w[keyPath: bias] = b }
        }
        for (_, path) in spec.linears { scaleColumnsInPlace(&w[keyPath: path], by: s) }
    }

    /// The block's linears by role, in the order the output formats list them.
    public static var linears: [(role: String, path: WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>>)] {
        DecoderBlockWeights<Float>.linears
    }

    /// Quantizes every linear of the block: its integer codes (what packed formats
    /// store, by role), and in `w` their dequantization with scales in `precision`, the
    /// weights the output holds (with fp32 scales, exactly the search's fake
    /// quantization).
    @discardableResult
    public static func quantizeLinears(_ w: inout DecoderBlockWeights<Float>, with q: WeightQuantizer,
                                       precision: ScalePrecision = .f32) -> [String: QuantizedWeight] {
        var codes: [String: QuantizedWeight] = [:]
        for (role, path) in linears {
            let c = q.codes(w[keyPath: path])
            w[keyPath: path] = c.dequantized(precision: precision)
            codes[role] = c
        }
        return codes
    }

    /// SmoothQuant's migration (Xiao et al. 2023, alpha 0.5): per input channel
    /// s = max|X_j|^alpha / max|W_j|^(1 - alpha), W_j over every linear sharing the input,
    /// applied to the norm -> q/k/v and norm -> gate/up pairs.
    public static func smoothQuantScales(activationMax: [Float], weights: [Tensor<Float>], alpha: Float = 0.5) -> [Float] {
        let c = activationMax.count
        var wmax = [Float](repeating: 0, count: c)
        for w in weights {
            for r in 0..<w.rows { for j in 0..<c { wmax[j] = Swift.max(wmax[j], Swift.abs(w.data[r * c + j])) } }
        }
        return (0..<c).map { j in
            let s = Float.pow(Swift.max(activationMax[j], 1e-5), alpha) / Float.pow(Swift.max(wmax[j], 1e-5), 1 - alpha)
            return Swift.max(s, 1e-5)
        }
    }

    /// One layer's SmoothQuant scales from its captured inputs: norm -> q/k/v and
    /// norm -> gate/up, each over the non-padding positions of every sample.
    /// The samples are read chunk by chunk; a maximum does not depend on the order.
    public static func smoothQuantLayer(_ fp: DecoderBlockWeights<Float>, samples: SampleChunks<LayerSample>) throws -> (qkv: [Float], gateUp: [Float]) {
        var qkvMax: [Float] = [], gateUpMax: [Float] = []
        func merge(_ a: inout [Float], _ b: [Float]) { a = a.isEmpty ? b : zip(a, b).map { Swift.max($0, $1) } }
        for i in 0..<samples.count {
            let chunk = try samples.read(i)
            let masks = chunk.map(\.attention)
            merge(&qkvMax, maxAbsPerChannel(chunk.map(\.captures.qkvInput), masks: masks))
            merge(&gateUpMax, maxAbsPerChannel(chunk.map(\.captures.gateUpInput), masks: masks))
        }
        return (smoothQuantScales(activationMax: qkvMax, weights: [fp.q, fp.k, fp.v]),
                smoothQuantScales(activationMax: gateUpMax, weights: [fp.gate, fp.up]))
    }

    /// Per input channel max |x| over non-padding positions. -> [C]
    public static func maxAbsPerChannel(_ inputs: [Tensor<Float>], masks: [[Bool]]) -> [Float] {
        let c = inputs[0].cols
        var m = [Float](repeating: 0, count: c)
        for (x, mask) in zip(inputs, masks) {
            for r in 0..<x.rows where mask[r] { for j in 0..<c { m[j] = Swift.max(m[j], Swift.abs(x.data[r * c + j])) } }
        }
        return m
    }
}
