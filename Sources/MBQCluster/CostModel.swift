import Foundation
import MBQFormats

/// Predicts a distributed job's time per phase and each worker's memory from the model's
/// shape and the cluster's measured speeds. Its constants are calibrated against runs on
/// this machine (README "Cost model"): the engine reaches `efficiency` of the GEMM rate a
/// worker reports, backward (recompute + input gradients) costs `backwardFactor` forwards,
/// and the 20-point search of a block costs `searchFactor` block forwards.
public struct CostModel: Sendable {
    public var efficiency = 0.81
    public var backwardFactor = 2.0
    public var searchFactor = 21.3
    /// Fixed cost per phase (process wake-up, ZeroMQ round trips, loading), seconds.
    public var phaseOverhead = 0.15

    public struct Shape: Sendable {
        public var layers, hidden, intermediate, heads, kvHeads, headDim, vocab: Int
        public init(layers: Int, hidden: Int, intermediate: Int, heads: Int, kvHeads: Int, headDim: Int, vocab: Int) {
            self.layers = layers; self.hidden = hidden; self.intermediate = intermediate; self.heads = heads
            self.kvHeads = kvHeads; self.headDim = headDim; self.vocab = vocab
        }
        public init(_ c: LanguageModelConfig) {
            self.init(layers: c.numLayers, hidden: c.hiddenSize, intermediate: c.intermediateSize, heads: c.numHeads,
                      kvHeads: c.numKVHeads, headDim: c.headDim, vocab: c.vocabSize)
        }
        public var paramsPerLayer: Double {
            let h = Double(hidden), q = Double(heads * headDim), kv = Double(kvHeads * headDim), i = Double(intermediate)
            return h * (q + 2 * kv) + q * h + 3 * h * i
        }
        /// Forward FLOPs of one block on `tokens` tokens (causal attention counted half).
        public func blockFLOPs(tokens: Int) -> Double {
            let t = Double(tokens)
            return 2 * t * paramsPerLayer + 2 * 2 * t * (t / 2) * Double(heads * headDim)
        }
    }

    public struct Worker: Sendable {
        public var gflops: Double
        public var memoryBytes: Double
        public init(gflops: Double, memoryBytes: Double) { self.gflops = gflops; self.memoryBytes = memoryBytes }
    }

    public struct Prediction: Sendable {
        public var plan: [Range<Int>]
        public var seconds: [(phase: String, seconds: Double)]
        public var memoryPerWorker: [Double]
        public var transferBytes: Double
        public var total: Double { seconds.reduce(0) { $0 + $1.seconds } }
    }

    public init() {}

    public func predict(_ s: Shape, workers: [Worker], samples: Int, tokens: Int, bandwidthBytesPerSecond: Double,
                        needsStats: Bool = true) -> Prediction {
        let plan = CoordinatorState.makePlan(layers: s.layers, workers: workers.enumerated().map { ("w\($0.offset)", $0.element.gflops) })
            .map(\.range)
        let block = s.blockFLOPs(tokens: tokens)
        let stageFwd = plan.enumerated().map { i, r in Double(r.count) * block / (workers[i].gflops * 1e9 * efficiency) }
        let slowest = stageFwd.max() ?? 0
        let stages = Double(plan.count)
        // Per sample a stage hands T x H fp32 to the next one; the pipeline fills in S - 1 steps.
        let actBytes = Double(tokens * s.hidden * 4)
        let hop = actBytes / bandwidthBytesPerSecond
        let fwd = Double(samples) * slowest + (stages - 1) * (slowest + hop) + Double(samples) * hop * (stages > 1 ? 1 : 0) + phaseOverhead
        let bwd = needsStats ? backwardFactor * (fwd - phaseOverhead) + phaseOverhead : 0
        let search = Double(samples) * slowest * searchFactor + phaseOverhead
        let weightBytes = s.paramsPerLayer * 4 * Double(s.layers)
        let apply = weightBytes / bandwidthBytesPerSecond / stages + phaseOverhead
        var seconds: [(String, Double)] = [("forward", fwd)]
        if needsStats { seconds.append(("backward", bwd)) }
        seconds += [("search", search), ("apply+transfer", apply)]
        let memory = plan.map { r -> Double in
            let layers = Double(r.count)
            let weights = layers * s.paramsPerLayer * 4
            let cache = layers * Double(samples) * actBytes
            let working = Double(tokens) * Double(max(s.intermediate, s.hidden)) * 4 * 8
            return weights + cache + working
        }
        let transfer = Double(samples) * actBytes * (stages - 1) * (needsStats ? 2 : 1) + weightBytes
        return Prediction(plan: plan, seconds: seconds, memoryPerWorker: memory, transferBytes: transfer)
    }

    public static let presets: [String: Shape] = [
        "llama-7b": Shape(layers: 32, hidden: 4096, intermediate: 11008, heads: 32, kvHeads: 32, headDim: 128, vocab: 32000),
        "qwen2-7b": Shape(layers: 28, hidden: 3584, intermediate: 18944, heads: 28, kvHeads: 4, headDim: 128, vocab: 152064),
        "qwen2-72b": Shape(layers: 80, hidden: 8192, intermediate: 29568, heads: 64, kvHeads: 8, headDim: 128, vocab: 152064),
    ]
}
