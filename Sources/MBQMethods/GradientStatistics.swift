import Logging
import MBQFormats
import MBQModel
import MBQTensor

/// MBQ's modality sensitivity (docs/DESIGN.md §2, paper §3.2): per layer and branch, the mean
/// |dL/d output| at vision positions over that at caption positions, where L is one
/// sample's mean caption cross-entropy and the outputs are o_proj's (attention) and
/// down_proj's (MLP). Averaged over samples, then each ratio is clamped from below by
/// the median over layers (the last layer's raw ratio is exactly 0: its vision outputs
/// reach no caption prediction).
public struct GradientStatistics: Sendable, Equatable {
    public init(layers: [Layer], samplesUsed: Int, skipped: [String]) {
        self.layers = layers
        self.samplesUsed = samplesUsed
        self.skipped = skipped
    }

    public struct Layer: Sendable, Equatable {
        public var attnVis = 0.0, attnCap = 0.0, mlpVis = 0.0, mlpCap = 0.0
        /// Clamped ratios, the ones the search uses.
        public var attnRatio = 1.0, mlpRatio = 1.0
        public var rawAttnRatio = 1.0, rawMlpRatio = 1.0

        public init() {}

        /// Adds one sample's mean |grad| at vision and caption rows (grads: [T, C]).
        public mutating func accumulate(attentionGrad: Tensor<Float>, mlpGrad: Tensor<Float>, vision: [Bool], caption: [Bool]) {
            func mean(_ x: Tensor<Float>, _ rows: [Bool]) -> Double {
                let m = GradientStatistics.meanAbs(x, rows: rows)
                return m.sum / Double(m.count)
            }
            add(attnVis: mean(attentionGrad, vision), attnCap: mean(attentionGrad, caption),
                mlpVis: mean(mlpGrad, vision), mlpCap: mean(mlpGrad, caption))
        }

        /// Adds one sample's means.
        public mutating func add(attnVis av: Double, attnCap ac: Double, mlpVis mv: Double, mlpCap mc: Double) {
            attnVis += av
            attnCap += ac
            mlpVis += mv
            mlpCap += mc
        }
    }

    public var layers: [Layer]
    public var samplesUsed: Int
    /// Samples left out, with why (no vision or no caption positions).
    public var skipped: [String]

    /// Uniform ratios (AWQ: no reweighting).
    public static func uniform(layers: Int) -> GradientStatistics {
        GradientStatistics(layers: Array(repeating: Layer(), count: layers), samplesUsed: 0, skipped: [])
    }

    /// Mean |x| over rows where `rows` is true, all columns (0 when none). x: [T, C]
    public static func meanAbs(_ x: Tensor<Float>, rows: [Bool]) -> (sum: Double, count: Int) {
        var s = 0.0, n = 0
        let c = x.cols
        x.data.withUnsafeBufferPointer { p in
            for r in 0..<x.rows where rows[r] {
                var rs: Float = 0
                for j in 0..<c { rs += Swift.abs(p[r * c + j]) }
                s += Double(rs)
                n += c
            }
        }
        return (s, n)
    }

    public static func median(_ v: [Double]) -> Double {
        let s = v.sorted()
        guard !s.isEmpty else { return 0 }
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// Why sample `s` does not enter the statistics, or nil when it does: it needs
    /// attended vision and caption positions and at least one predicted caption token.
    /// The one rule for the one-process job, the workers and `mbq forward`.
    public static func skipReason(_ s: CalibrationSample) -> String? {
        if !s.attendedVision.contains(true) { return "no vision positions" }
        if !s.attendedCaption.contains(true) { return "no caption positions" }
        if !(0..<Swift.max(0, s.length - 1)).contains(where: { s.labels[$0 + 1] != -100 }) { return "no caption token is predicted" }
        return nil
    }

    /// Runs forward and backward on every usable sample of `samples` through `backend`
    /// (`GradientPass`, the workers' arithmetic), layer by layer so that one block is in
    /// memory at a time: the forward runs every sample through layer l and keeps each
    /// layer's input in `inputs` (in memory up to its budget, then on scratch); the head
    /// turns the last outputs into gradients; the backward runs every sample back through
    /// layer l, recomputing its forward from the kept input. Per sample the arithmetic is
    /// the one-stage pipeline's, in the same order, so the statistics are identical.
    /// `tokenNorms(layer, sample, norms)`: when given, every used sample's per-token
    /// squared output-gradient norms of each linear of each layer (sample: its index in
    /// `samples`). `losses(sample, loss, tokens)`: when given, every used sample's mean
    /// caption cross-entropy and its token count, from the head's step.
    public static func compute(source: ModelSource, samples: [CalibrationSample], backend: ComputeBackend = CPUBackend(),
                               inputs: ActivationStore = ActivationStore(budgetBytes: .max, scratch: nil, owner: "grad"),
                               tokenNorms: ((Int, Int, [String: [Float]]) -> Void)? = nil,
                               losses: ((Int, Float, Int) -> Void)? = nil,
                               progress: ((String, Int, Int) -> Void)? = nil) throws -> GradientStatistics {
        let nl = source.config.numLayers
        var skipped: [String] = []
        var used: [(index: Int, sample: CalibrationSample)] = []
        for (i, s) in samples.enumerated() {
            if let why = skipReason(s) { skipped.append("sample \(i): \(why)") } else { used.append((i, s)) }
        }
        guard !used.isEmpty else {
            throw MethodsError.noUsableSamples("every sample lacks vision or caption positions (\(skipped.prefix(3).joined(separator: "; ")))")
        }
        // Left filled at the end (the caller reads what spilled, then resets it).
        inputs.reset()
        let ropes = used.map { source.ropeTable($0.sample.positions) }
        var xs = used.map(\.sample.embeds)
        for l in 0..<nl {
            let b = try source.block(l, into: backend)
            for (k, u) in used.enumerated() {
                let y = try GradientPass.forward(try backend.upload(xs[k]), layers: l..<(l + 1), blocks: { _ in b }, rope: ropes[k],
                                                 mask: u.sample.attention, backend: backend) { _, x in
                    try inputs.put(layer: l, sample: k, try backend.download(x))
                }
                xs[k] = try backend.download(y)
            }
            progress?("forward", l + 1, nl)
        }
        var dys: [Tensor<Float>] = []
        do {
            let head = try source.head(into: backend)
            for (k, u) in used.enumerated() {
                let g = try backend.lossGradient(try backend.upload(xs[k]), head, labels: u.sample.labels)
                losses?(u.index, g.loss, g.count)
                dys.append(try backend.download(g.grad))
            }
        }
        xs = []
        var sums = [Layer](repeating: Layer(), count: nl)
        for l in stride(from: nl - 1, through: 0, by: -1) {
            let b = try source.block(l, into: backend)
            var layerSums = [sums[l]]
            for (k, u) in used.enumerated() {
                let dx = try GradientPass.backward(try backend.upload(dys[k]), layers: l..<(l + 1), blocks: { _ in b },
                                                   input: { try backend.upload(try inputs.get(layer: $0, sample: k)) },
                                                   sample: u.sample, rope: ropes[k], backend: backend, sums: &layerSums,
                                                   outputNorms: tokenNorms.map { f in { l, n in f(l, u.index, n) } })
                dys[k] = try backend.download(dx)
            }
            sums[l] = layerSums[0]
            progress?("backward", nl - l, nl)
        }
        return finalize(sums: sums, used: used.count, skipped: skipped)
    }

    /// The same on a model in memory.
    public static func compute(model: LanguageModel<Float>, samples: [CalibrationSample], backend: ComputeBackend = CPUBackend(),
                               losses: ((Int, Float, Int) -> Void)? = nil,
                               progress: ((String, Int, Int) -> Void)? = nil) throws -> GradientStatistics {
        for s in samples where skipReason(s) == nil { try model.check(SequenceInput(s)) }
        return try compute(source: .model(model), samples: samples, backend: backend, losses: losses, progress: progress)
    }

    /// Averages, divides and clamps. `sums` hold per-sample means summed over samples.
    public static func finalize(sums: [Layer], used: Int, skipped: [String]) -> GradientStatistics {
        var layers = sums.map { s -> Layer in
            var l = Layer()
            let n = Double(used)
            l.attnVis = s.attnVis / n; l.attnCap = s.attnCap / n
            l.mlpVis = s.mlpVis / n; l.mlpCap = s.mlpCap / n
            l.rawAttnRatio = l.attnCap > 0 ? l.attnVis / l.attnCap : 0
            l.rawMlpRatio = l.mlpCap > 0 ? l.mlpVis / l.mlpCap : 0
            return l
        }
        let ma = median(layers.map(\.rawAttnRatio)), mm = median(layers.map(\.rawMlpRatio))
        for i in layers.indices {
            layers[i].attnRatio = Swift.max(layers[i].rawAttnRatio, ma)
            layers[i].mlpRatio = Swift.max(layers[i].rawMlpRatio, mm)
        }
        return GradientStatistics(layers: layers, samplesUsed: used, skipped: skipped)
    }
}
