import Foundation
import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

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
    /// Grid points a = k / grid, k = 0 ..< grid: one candidate each.
    public var grid: Int

    /// The authors' grid (`n_grid = 20` in `auto_scale_block`): the search and the cost
    /// model both read it.
    public static let defaultGrid = 20

    public init(weights: WeightQuantizer, actBits: Int? = nil, loss: SearchLoss = .mae, reweight: Bool, grid: Int = defaultGrid) {
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

/// The calibration samples of one layer as the search reads them: `count` chunks of
/// whole samples, chunk i captured by `read(i)` when it is read — once per pass, so at
/// most one chunk's captures exist at a time (docs/DESIGN.md §2.2). One chunk of
/// samples already captured is the in-memory search.
public struct SampleChunks<Sample> {
    public var count: Int
    public var read: (Int) throws -> [Sample]

    public init(count: Int, read: @escaping (Int) throws -> [Sample]) {
        self.count = count; self.read = read
    }

    /// One chunk: these samples.
    public static func captured(_ samples: [Sample]) -> SampleChunks {
        SampleChunks(count: 1) { _ in samples }
    }

    /// The same chunks with each sample mapped (a backend's handles to host values).
    public func map<T>(_ f: @escaping (Sample) throws -> T) -> SampleChunks<T> {
        let read = self.read
        return SampleChunks<T>(count: count) { try read($0).map(f) }
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

    /// One batch's per-row errors (`ComputeBackend.rowErrors`: each row's sum in fp32),
    /// added in row order to the sums their masks select.
    /// One batch's per-row errors over `cols` columns (`ComputeBackend.rowErrors`: each
    /// row's sum in fp32, in column order), added in row order to the sums their masks select.
    mutating func add(_ rowErrors: [Float], cols c: Int, attention: [Bool], vision: [Bool], caption: [Bool]) {
        for r in 0..<rowErrors.count where attention[r] {
            let v = Double(rowErrors[r])
            allSum += v; allCount += c
            if caption[r] { capSum += v; capCount += c }
            if vision[r] { visSum += v; visCount += c }
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
    /// The groups searched in a block with these v_proj / o_proj shapes
    /// (`SearchGroupSpec.isSearched`), in table order.
    public static func groups(vShape: [Int], oShape: [Int]) -> [SearchGroup] {
        SearchGroupSpec.table.filter { $0.isSearched(vShape: vShape, oShape: oShape) }.map(\.group)
    }

    public static func groups(for w: DecoderBlockWeights<Float>) -> [SearchGroup] {
        groups(vShape: w.v.shape, oShape: w.o.shape)
    }

    /// The groups searched in a block of this model.
    public static func groups(for cfg: LanguageModelConfig) -> [SearchGroup] {
        groups(vShape: [cfg.numKVHeads * cfg.headDim, cfg.hiddenSize], oShape: [cfg.hiddenSize, cfg.numHeads * cfg.headDim])
    }

    /// s = clamp(xMean^a, 1e-4); s /= sqrt(max(s) min(s)).
    public static func scales(_ xMean: [Float], alpha: Float) -> [Float] {
        var s = xMean.map { Swift.max(Float.pow($0, alpha), 1e-4) }
        let norm = (s.max()! * s.min()!).squareRoot()
        for i in s.indices { s[i] /= norm }
        return s
    }

    /// W diag(s) (or W diag(s)^-1): w [out, in], s [in]
    static func scaleColumns(_ w: Tensor<Float>, _ s: [Float], divide: Bool = false) -> Tensor<Float> {
        var o = w
        scaleColumnsInPlace(&o, by: s, divide: divide)
        return o
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

    /// Runs group `g`'s module with scales `s` and the candidate's weights (`quantized`,
    /// by role) on x (the group's captured input; [T, C_in]) -> module output [T, C]. The
    /// CPU backend's `runCandidate`; `rope` only for the attention group.
    static func runModule(_ g: SearchGroup, _ w: DecoderBlockWeights<Float>, _ s: [Float], input: Tensor<Float>,
                          rope: RoPETable<Float>?, mask: [Bool], _ o: SearchOptions, quantized: [String: Tensor<Float>]) -> Tensor<Float> {
        let spec = g.spec
        var x = input
        if let bits = o.actBits { x = quantizedScaledInput(x, s, bits: bits) }
        func q(_ role: String) -> Tensor<Float> {
            guard let t = quantized[role] else { preconditionFailure("no candidate weight for \(role)") }
            return t
        }
        switch spec.module {
        case .attention:
            guard let rope else { preconditionFailure("the attention group runs on whole samples, with their positions") }
            var wq = w
            for (role, path) in spec.linears { wq[keyPath: path] = q(role) }
            return selfAttentionForward(x, weights: wq, rope: rope, mask: mask).out
        case let .linear(bias):
            return linearForward(x, weight: q(spec.linears[0].role), bias: bias.flatMap { w[keyPath: $0] })
        case .mlp:
            return mlpForward(x, gate: q("gate"), up: q("up"), down: w.down).y
        }
    }

    /// Searches one group on host samples held in memory (one chunk), on the CPU backend
    /// (`mbq bench` times one group this way).
    public static func searchGroup(_ g: SearchGroup, layer: Int, weights w: DecoderBlockWeights<Float>,
                                   samples: [LayerSample], ratio: Double, options o: SearchOptions) throws -> GroupResult {
        let cpu = CPUBackend(), b = cpu.loadBlock(w)
        let held = samples.map(cpu.handles)
        var mean = ChannelMeanAbs()
        try mean.add(held.map { $0.captures[g.spec.input] }, masks: held.map(\.attention), backend: cpu)
        var search = GroupSearch(g, xMean: mean.mean, options: o)
        try search.add(held, block: b, last: true, backend: cpu)
        return search.result(layer: layer, ratio: ratio)
    }

    /// `searchLayer` on host weights and samples, on the CPU backend.
    public static func searchLayer(_ layer: Int, weights w: DecoderBlockWeights<Float>, samples: SampleChunks<LayerSample>,
                                   attnRatio: Double, mlpRatio: Double, options o: SearchOptions) throws -> [GroupResult] {
        let cpu = CPUBackend()
        return try searchLayer(layer, cpu.loadBlock(w), samples: samples.map(cpu.handles), attnRatio: attnRatio, mlpRatio: mlpRatio,
                               options: o, backend: cpu)
    }

    /// Searches every group of a layer against the unscaled fp block, reading the samples
    /// chunk by chunk, on any backend (issue 25: the grid, the batching and the loss are
    /// written once; a backend supplies the ops): a first pass sums each group's mean |x|
    /// (in sample order), a second runs every grid point of every group on each chunk
    /// and adds to that grid point's loss. With one chunk the samples are read once. Any
    /// chunking gives the same bits as one chunk: every sum runs in the same order,
    /// attention sees whole samples, and the token-wise groups' rows go through their
    /// GEMMs in blocks aligned to the GEMM's fixed row tiles (`GroupSearch`).
    public static func searchLayer(_ layer: Int, _ b: BackendBlock, samples: SampleChunks<BackendLayerSample>,
                                   attnRatio: Double, mlpRatio: Double, options o: SearchOptions,
                                   backend: ComputeBackend) throws -> [GroupResult] {
        let gs = groups(vShape: b.linearShapes["v"] ?? [], oShape: b.linearShapes["o"] ?? [])
        var means = gs.map { _ in ChannelMeanAbs() }
        var held: [BackendLayerSample]? = nil
        for i in 0..<samples.count {
            let chunk = try samples.read(i)
            for (k, g) in gs.enumerated() {
                try means[k].add(chunk.map { $0.captures[g.spec.input] }, masks: chunk.map(\.attention), backend: backend)
            }
            if samples.count == 1 { held = chunk }
        }
        var searches = gs.enumerated().map { k, g in GroupSearch(g, xMean: means[k].mean, options: o) }
        for i in 0..<samples.count {
            let chunk = try held ?? samples.read(i)
            for k in searches.indices { try searches[k].add(chunk, block: b, last: i == samples.count - 1, backend: backend) }
        }
        return searches.map { $0.result(layer: layer, ratio: $0.group.isAttention ? attnRatio : mlpRatio) }
    }
}
