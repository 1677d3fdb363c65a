import Foundation
import MBQFormats
import MBQWire

/// What a worker's memory must hold, per the plan (docs/DESIGN.md §1, memory): per held
/// layer its weights as stored and one sample's input to it (the backward recomputes the
/// inputs the budget did not keep); two layers' inputs for every sample (the stage's
/// first layer's, kept from the forward; in the search, the current layer's and the
/// outputs it makes) unless it spills them to --scratch; and a fixed part: the final
/// norm and lm_head for the last stage (reserved on every worker so any can be last),
/// one sample's working set through one block, one layer's fp32 working copies and the
/// search's smallest chunk (one sample).
public struct MemoryNeeds: Sendable, Equatable {
    public var layerWeightBytes: Double = 0
    /// One layer's inputs for every calibration sample.
    public var stageInputBytes: Double = 0
    public var fixedBytes: Double = 0
    /// The search's smallest chunk (one sample), part of `fixedBytes`.
    public var minChunkBytes: Double = 0

    public init(layerWeightBytes: Double = 0, stageInputBytes: Double = 0, fixedBytes: Double = 0, minChunkBytes: Double = 0) {
        self.layerWeightBytes = layerWeightBytes
        self.stageInputBytes = stageInputBytes
        self.fixedBytes = fixedBytes
        self.minChunkBytes = minChunkBytes
    }

    /// For a model: block weights held as stored (`weightBytes` per parameter: 2 for a
    /// bf16 checkpoint, whose layers workers keep in bf16; 4 otherwise), fp32 norms and
    /// one recomputed input of `tokens` per layer; `inputRows` rows (every sample's
    /// tokens) per layer's inputs; the fixed part at `tokens` per sample.
    public init(shape s: CostModel.Shape, inputRows: Int, tokens: Int, weightBytes: Int = 4) {
        let chunk = Double(tokens) * Self.searchBytesPerToken(hidden: s.hidden, intermediate: s.intermediate)
        self.init(layerWeightBytes: s.paramsPerLayer * Double(weightBytes) + Double(2 * s.hidden * 4) + Double(tokens * s.hidden * 4),
                  stageInputBytes: Double(inputRows * s.hidden * 4),
                  fixedBytes: Self.fixed(hidden: s.hidden, intermediate: s.intermediate, heads: s.heads, vocab: s.vocab, tokens: tokens)
                      + Self.layerWorkingBytes(params: s.paramsPerLayer) + chunk,
                  minChunkBytes: chunk)
    }

    /// Bytes per weight a worker holds a checkpoint's blocks in: its CPU backend keeps a
    /// bf16 checkpoint's linears as bf16 (`CPUBackend(keepStoredPrecision:)`); fp16
    /// values are generally not bf16 values, so anything else is held in fp32.
    public static func heldWeightBytes(stored: DType) -> Int { stored == .bf16 ? 2 : 4 }

    /// The fp32 copies of the layer being worked on: widened from storage, scaled,
    /// quantized (the apply step holds all three at once).
    public static func layerWorkingBytes(params: Double) -> Double { 3 * params * 4 }

    /// What one process needs besides its held weights and the block inputs: the head,
    /// one sample's working set at `tokens`, one layer's fp32 working copies.
    public static func working(_ cfg: LanguageModelConfig, tokens: Int) -> Double {
        fixed(hidden: cfg.hiddenSize, intermediate: cfg.intermediateSize, heads: cfg.numHeads, vocab: cfg.vocabSize, tokens: tokens)
            + layerWorkingBytes(params: CostModel.Shape(cfg).paramsPerLayer)
    }

    /// Bytes per token of a search chunk: the captured inputs of q/k/v, o, gate/up and
    /// down and the attention and MLP outputs ((5 C + I) floats), plus one group's rows
    /// gathered for its GEMMs and their output (C + I floats at most).
    public static func searchBytesPerToken(hidden: Int, intermediate: Int) -> Double {
        Double(6 * hidden + 2 * intermediate) * 4
    }

    /// The search's chunk (`LayerStep.search`) in tokens, and what it takes: `chunkTokens`
    /// when given, else what a quarter of `free` (the budget left after weights, working
    /// set and block inputs) holds; at least one sample of `longest` tokens. One policy
    /// for the one-process job and the workers.
    public static func searchChunk(_ cfg: LanguageModelConfig, free: Double, chunkTokens: Int?, longest: Int) -> (tokens: Int, bytes: Double) {
        let per = searchBytesPerToken(hidden: cfg.hiddenSize, intermediate: cfg.intermediateSize)
        let tokens = max(longest, chunkTokens ?? Int(min(free / 4 / per, Double(Int32.max))))
        return (tokens, Double(tokens) * per)
    }

    /// What a worker holding `layers` layers needs in memory.
    public func bytes(layers: Int, spills: Bool) -> Double {
        fixedBytes + Double(layers) * layerWeightBytes + (spills ? 0 : 2 * stageInputBytes)
    }

    /// The fixed part for a model: head weights plus one sample's largest intermediates
    /// through one block (q/k/v/o, MLP and the saved attention probabilities).
    public static func fixed(hidden: Int, intermediate: Int, heads: Int, vocab: Int, tokens: Int) -> Double {
        let t = Double(tokens)
        let head = Double(vocab * hidden + hidden) * 4 + t * Double(vocab) * 4 * 2
        let working = t * Double(8 * hidden + 4 * intermediate) * 4 + Double(heads) * t * t * 4
        return head + working
    }

    /// Of `layers` held layers, how many keep their block inputs from the forward to the
    /// backward (the first always; the backward recomputes the others'): what is left of
    /// `memory` once the search's default chunk (a quarter of what the weights, working
    /// set and two layers' inputs leave) is set aside, as `Worker.assign` splits it.
    public func inputLayersKept(memory: Double, layers: Int, spills: Bool) -> Int {
        guard !spills, stageInputBytes > 0, layers > 0 else { return layers }
        let free = memory - (fixedBytes - minChunkBytes) - Double(layers) * layerWeightBytes
        let chunk = max(minChunkBytes, (free - 2 * stageInputBytes) / 4)
        return max(1, min(layers, Int((free - chunk) / stageInputBytes)))
    }

    /// How many layers fit in `memory` bytes (everything when nothing is known).
    public func capacity(memory: UInt64, spills: Bool, layers: Int) -> Int {
        guard layerWeightBytes > 0 else { return layers }
        let avail = Double(memory) - bytes(layers: 0, spills: spills)
        return avail <= 0 ? 0 : min(layers, Int(avail / layerWeightBytes))
    }
}

/// Contiguous block ranges over workers in a fixed order, sized by measured GEMM rate so
/// that stages finish together, and never more layers than a worker's memory holds.
public enum Planner {
    public typealias Plan = [(worker: String, range: Range<Int>)]

    /// nil when the workers' memory cannot hold all `layers` together.
    public static func plan(layers: Int, workers: [(id: String, gflops: Double, capacity: Int)]) -> Plan? {
        let ws = workers.filter { $0.capacity > 0 }
        guard ws.reduce(0, { $0 + $1.capacity }) >= layers, layers > 0 else { return nil }
        let p = proportional(layers: layers, workers: ws.map { ($0.id, $0.gflops) })
        let cap = Dictionary(uniqueKeysWithValues: ws.map { ($0.id, $0.capacity) })
        if p.allSatisfy({ $0.range.count <= cap[$0.worker]! }) { return p }
        return bottleneck(layers: layers, workers: ws)
    }

    /// Layers in proportion to speed (rounded), at least one per stage, at most `layers` stages.
    public static func proportional(layers: Int, workers: [(id: String, gflops: Double)]) -> Plan {
        let n = min(layers, workers.count)
        let ws = Array(workers.prefix(n))
        let total = ws.reduce(0) { $0 + max($1.gflops, 1e-3) }
        var plan: Plan = []
        var start = 0
        var acc = 0.0
        for (i, w) in ws.enumerated() {
            acc += max(w.gflops, 1e-3)
            var end = i == n - 1 ? layers : Int((Double(layers) * acc / total).rounded())
            end = max(end, start + 1)
            end = min(end, layers - (n - 1 - i))
            plan.append((w.id, start..<end))
            start = end
        }
        return plan
    }

    /// The smallest stage time T at which every worker taking min(capacity, T x speed)
    /// layers covers the model (binary search over the times n / speed); surplus is
    /// taken back from the last stages.
    static func bottleneck(layers: Int, workers ws: [(id: String, gflops: Double, capacity: Int)]) -> Plan {
        let speed = ws.map { max($0.gflops, 1e-3) }
        func counts(_ t: Double) -> [Int] {
            zip(ws, speed).map { w, g in min(w.capacity, Int((t * g * (1 + 1e-12)).rounded(.down))) }
        }
        var times = Set<Double>()
        for (w, g) in zip(ws, speed) { for n in 1...min(w.capacity, layers) { times.insert(Double(n) / g) } }
        let sorted = times.sorted()
        var lo = 0, hi = sorted.count - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if counts(sorted[mid]).reduce(0, +) >= layers { hi = mid } else { lo = mid + 1 }
        }
        var c = counts(sorted[lo])
        var surplus = c.reduce(0, +) - layers
        for i in c.indices.reversed() where surplus > 0 {
            let take = min(c[i], surplus)
            c[i] -= take
            surplus -= take
        }
        var plan: Plan = []
        var start = 0
        for (w, n) in zip(ws, c) where n > 0 {
            plan.append((w.id, start..<(start + n)))
            start += n
        }
        return plan
    }
}
