import Foundation
import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// The four scaling groups of a Llama/Qwen2 block (docs/DESIGN.md §2).
public enum SearchGroup: String, CaseIterable, Sendable {
    /// input_layernorm -> q, k, v; compared on the whole self-attention.
    case qkv
    /// v_proj -> o_proj; compared on o_proj (only without GQA).
    case o
    /// post_attention_layernorm -> gate, up; compared on the whole MLP.
    case gateUp = "gate_up"
    /// up_proj -> down_proj; compared on down_proj.
    case down

    public var isAttention: Bool { self == .qkv || self == .o }
}

public enum SearchLoss: String, Sendable, CaseIterable {
    case mae, mse
}

public struct SearchOptions: Sendable {
    public var weights: WeightQuantizer
    /// Per-token activation bits for W-A schemes (nil: weight-only).
    public var actBits: Int?
    public var loss: SearchLoss
    /// MBQ's modality reweighting; false = AWQ's uniform loss over non-padding positions.
    public var reweight: Bool
    public var grid: Int

    public init(weights: WeightQuantizer, actBits: Int? = nil, loss: SearchLoss = .mae, reweight: Bool, grid: Int = 20) {
        self.weights = weights; self.actBits = actBits; self.loss = loss; self.reweight = reweight; self.grid = grid
    }
}

/// What the search keeps of one sample for one layer: the fp block's linear inputs and
/// module outputs (the targets), and the masks.
public struct LayerSample: Sendable {
    public var captures: BlockCaptures<Float>
    public var rope: RoPETable<Float>
    public var attention: [Bool]
    public var vision: [Bool]    // vision & attended
    public var caption: [Bool]   // caption & attended

    public init(captures: BlockCaptures<Float>, rope: RoPETable<Float>, attention: [Bool], vision: [Bool], caption: [Bool]) {
        self.captures = captures; self.rope = rope; self.attention = attention
        self.vision = zip(vision, attention).map { $0 && $1 }
        self.caption = zip(caption, attention).map { $0 && $1 }
    }
}

public struct GroupResult: Sendable {
    public init(layer: Int, group: SearchGroup, bestIndex: Int, alpha: Double, losses: [Double], ratio: Double, scales: [Float]) {
        self.layer = layer
        self.group = group
        self.bestIndex = bestIndex
        self.alpha = alpha
        self.losses = losses
        self.ratio = ratio
        self.scales = scales
    }

    public var layer: Int
    public var group: SearchGroup
    public var bestIndex: Int
    public var alpha: Double
    public var losses: [Double]
    public var ratio: Double
    /// Per input channel of the scaled linears. [C_in]
    public var scales: [Float]
}

/// Sums a comparison of module output with the fp target over positions, split the way
/// the losses need them.
struct LossAccumulator {
    var capSum = 0.0, capCount = 0
    var visSum = 0.0, visCount = 0
    var allSum = 0.0, allCount = 0

    mutating func add(_ out: Tensor<Float>, _ ref: Tensor<Float>, sample s: LayerSample, squared: Bool) {
        let c = out.cols
        out.data.withUnsafeBufferPointer { po in
            ref.data.withUnsafeBufferPointer { pr in
                for r in 0..<out.rows where s.attention[r] {
                    var rs: Float = 0
                    for j in 0..<c {
                        let d = po[r * c + j] - pr[r * c + j]
                        rs += squared ? d * d : Swift.abs(d)
                    }
                    let v = Double(rs)
                    allSum += v; allCount += c
                    if s.caption[r] { capSum += v; capCount += c }
                    if s.vision[r] { visSum += v; visCount += c }
                }
            }
        }
    }

    /// docs/DESIGN.md §2: mae with reweight (cap + r vis) / (n_cap + n_vis); mse with reweight
    /// mean_cap + r mean_vis; without reweight the mean over non-padding positions.
    func loss(_ kind: SearchLoss, reweight: Bool, ratio: Double) -> Double {
        guard reweight else { return allSum / Double(Swift.max(allCount, 1)) }
        switch kind {
        case .mae:
            return (capSum + ratio * visSum) / Double(Swift.max(capCount + visCount, 1))
        case .mse:
            let cap = capCount > 0 ? capSum / Double(capCount) : 0
            let vis = visCount > 0 ? visSum / Double(visCount) : 0
            return cap + ratio * vis
        }
    }
}

public enum ScaleSearch {
    /// Groups searched for a block: o only when v_proj and o_proj have the same shape (no GQA).
    public static func groups(for w: DecoderBlockWeights<Float>) -> [SearchGroup] {
        groups(vShape: w.v.shape, oShape: w.o.shape)
    }

    /// The rule itself (the authors' code): the o group only when v_proj and o_proj have
    /// the same shape, i.e. no grouped-query attention.
    public static func groups(vShape: [Int], oShape: [Int]) -> [SearchGroup] {
        vShape == oShape ? [.qkv, .o, .gateUp, .down] : [.qkv, .gateUp, .down]
    }

    /// The groups searched in a block of this model.
    public static func groups(for cfg: LanguageModelConfig) -> [SearchGroup] {
        let shapes = Dictionary(uniqueKeysWithValues: cfg.linearShapes.map { ($0.role, $0.shape) })
        return groups(vShape: shapes["v"]!, oShape: shapes["o"]!)
    }

    /// Per input channel mean |x| over non-padding positions of all samples. -> [C]
    public static func meanAbsPerChannel(_ inputs: [Tensor<Float>], masks: [[Bool]]) -> [Float] {
        let c = inputs[0].cols
        var sum = [Double](repeating: 0, count: c)
        var n = 0
        for (x, m) in zip(inputs, masks) {
            for r in 0..<x.rows where m[r] {
                for j in 0..<c { sum[j] += Double(Swift.abs(x.data[r * c + j])) }
                n += 1
            }
        }
        return sum.map { Float($0 / Double(Swift.max(n, 1))) }
    }

    /// s = clamp(xMean^a, 1e-4); s /= sqrt(max(s) min(s)).
    public static func scales(_ xMean: [Float], alpha: Float) -> [Float] {
        var s = xMean.map { Swift.max(Float.pow($0, alpha), 1e-4) }
        let norm = (s.max()! * s.min()!).squareRoot()
        for i in s.indices { s[i] /= norm }
        return s
    }

    /// W diag(s): w [out, in], s [in]
    static func scaleColumns(_ w: Tensor<Float>, _ s: [Float], divide: Bool = false) -> Tensor<Float> {
        var o = w
        let c = w.cols
        o.data.withUnsafeMutableBufferPointer { p in
            s.withUnsafeBufferPointer { ps in
                let p = p, ps = ps
                parallelChunks(w.rows, minChunk: 64) { rows in
                    for r in rows {
                        if divide {
                            for j in 0..<c { p[r * c + j] /= ps[j] }
                        } else {
                            for j in 0..<c { p[r * c + j] *= ps[j] }
                        }
                    }
                }
            }
        }
        return o
    }

    /// For the token-wise groups (o, gate_up, down) only the rows that enter the loss
    /// matter: caption and vision rows with reweighting, every non-padding row without.
    /// They are gathered from all samples into one batch (one GEMM per linear instead of
    /// one per sample, and none for rows the loss ignores). Attention (qkv) mixes rows, so
    /// its samples stay whole.
    static func compacted(_ g: SearchGroup, _ samples: [LayerSample], reweight: Bool) -> [LayerSample] {
        guard g != .qkv else { return samples }
        var keep: [(Int, Int)] = []
        for (si, s) in samples.enumerated() {
            for r in 0..<s.attention.count where reweight ? (s.caption[r] || s.vision[r]) : s.attention[r] {
                keep.append((si, r))
            }
        }
        func gather(_ pick: (BlockCaptures<Float>) -> Tensor<Float>) -> Tensor<Float> {
            let c = pick(samples[0].captures).cols
            var out = Tensor<Float>(uninitialized: [keep.count, c])
            out.data.withUnsafeMutableBufferPointer { po in
                for (k, (si, r)) in keep.enumerated() {
                    pick(samples[si].captures).data.withUnsafeBufferPointer { pi in
                        for j in 0..<c { po[k * c + j] = pi[r * c + j] }
                    }
                }
            }
            return out
        }
        let empty = Tensor<Float>(zeros: [keep.count, 0])
        let x = gather { input(g, $0) }
        let ref = gather { g.isAttention ? $0.attentionOutput : $0.mlpOutput }
        let caps = BlockCaptures(qkvInput: empty, oInput: g == .o ? x : empty, gateUpInput: g == .gateUp ? x : empty,
                                 downInput: g == .down ? x : empty,
                                 attentionOutput: g.isAttention ? ref : empty, mlpOutput: g.isAttention ? empty : ref)
        let one = RoPETable<Float>(positions: [[0]], headDim: 2, theta: 1)
        return [LayerSample(captures: caps, rope: one, attention: [Bool](repeating: true, count: keep.count),
                            vision: keep.map { samples[$0.0].vision[$0.1] }, caption: keep.map { samples[$0.0].caption[$0.1] })]
    }

    /// x / s per channel, then per-token quantization. x: [T, C]
    static func quantizedScaledInput(_ x: Tensor<Float>, _ s: [Float], bits: Int) -> Tensor<Float> {
        var o = scaleColumns(x, s, divide: true)
        Quantize.rowSymmetricInPlace(&o, bits: bits)
        return o
    }

    /// The scaled linear's weight as the search sees it. Weight-only: Q(W diag(s)) diag(s)^-1.
    /// W-A: Q(W diag(s)) (its input is divided by s and quantized instead).
    static func searchWeight(_ w: Tensor<Float>, _ s: [Float], _ o: SearchOptions) -> Tensor<Float> {
        if o.actBits == nil, case let .groupAsymmetric(bits, group) = o.weights {
            return Quantize.groupAsymmetric(w, bits: bits, group: group, columnScales: s)
        }
        let q = o.weights.apply(scaleColumns(w, s))
        return o.actBits == nil ? scaleColumns(q, s, divide: true) : q
    }

    /// Runs group `g`'s module with scales `s` on one sample. -> module output [T, C]
    static func runModule(_ g: SearchGroup, _ w: DecoderBlockWeights<Float>, _ s: [Float], sample: LayerSample,
                          _ o: SearchOptions, quantized: [String: Tensor<Float>]) -> Tensor<Float> {
        let c = sample.captures
        func input(_ x: Tensor<Float>) -> Tensor<Float> {
            o.actBits.map { quantizedScaledInput(x, s, bits: $0) } ?? x
        }
        switch g {
        case .qkv:
            var wq = w
            wq.q = quantized["q"]!; wq.k = quantized["k"]!; wq.v = quantized["v"]!
            return selfAttentionForward(input(c.qkvInput), weights: wq, rope: sample.rope, mask: sample.attention).out
        case .o:
            return linearForward(input(c.oInput), weight: quantized["o"]!, bias: w.oBias)
        case .gateUp:
            return mlpForward(input(c.gateUpInput), gate: quantized["gate"]!, up: quantized["up"]!, down: w.down).y
        case .down:
            return linearForward(input(c.downInput), weight: quantized["down"]!)
        }
    }

    static func linears(_ g: SearchGroup, _ w: DecoderBlockWeights<Float>) -> [(String, Tensor<Float>)] {
        switch g {
        case .qkv: return [("q", w.q), ("k", w.k), ("v", w.v)]
        case .o: return [("o", w.o)]
        case .gateUp: return [("gate", w.gate), ("up", w.up)]
        case .down: return [("down", w.down)]
        }
    }

    static func input(_ g: SearchGroup, _ c: BlockCaptures<Float>) -> Tensor<Float> {
        switch g {
        case .qkv: return c.qkvInput
        case .o: return c.oInput
        case .gateUp: return c.gateUpInput
        case .down: return c.downInput
        }
    }

    /// Searches one group: `grid` points a = k / grid, lowest loss wins, first on ties.
    public static func searchGroup(_ g: SearchGroup, layer: Int, weights w: DecoderBlockWeights<Float>,
                                   samples allSamples: [LayerSample], ratio: Double, options o: SearchOptions) -> GroupResult {
        let xMean = meanAbsPerChannel(allSamples.map { input(g, $0.captures) }, masks: allSamples.map(\.attention))
        let samples = compacted(g, allSamples, reweight: o.reweight)
        var losses: [Double] = []
        var best = 0, bestLoss = Double.infinity
        var bestScales: [Float] = []
        for k in 0..<o.grid {
            let alpha = Float(k) / Float(o.grid)
            let s = scales(xMean, alpha: alpha)
            var q: [String: Tensor<Float>] = [:]
            for (name, t) in linears(g, w) { q[name] = searchWeight(t, s, o) }
            var acc = LossAccumulator()
            for sample in samples {
                let out = runModule(g, w, s, sample: sample, o, quantized: q)
                let ref = g.isAttention ? sample.captures.attentionOutput : sample.captures.mlpOutput
                acc.add(out, ref, sample: sample, squared: o.loss == .mse)
            }
            let loss = acc.loss(o.loss, reweight: o.reweight, ratio: ratio)
            losses.append(loss)
            if loss < bestLoss {
                bestLoss = loss
                best = k
                bestScales = s
            }
        }
        if bestScales.isEmpty { bestScales = scales(xMean, alpha: 0) }  // every loss NaN: fall back to no scaling
        return GroupResult(layer: layer, group: g, bestIndex: best, alpha: Double(best) / Double(o.grid),
                           losses: losses, ratio: ratio, scales: bestScales)
    }

    /// Searches every group of a layer against the unscaled fp block.
    public static func searchLayer(_ layer: Int, weights w: DecoderBlockWeights<Float>, samples: [LayerSample],
                                   attnRatio: Double, mlpRatio: Double, options o: SearchOptions) -> [GroupResult] {
        groups(for: w).map { g in
            searchGroup(g, layer: layer, weights: w, samples: samples, ratio: g.isAttention ? attnRatio : mlpRatio, options: o)
        }
    }
}
