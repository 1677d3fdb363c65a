import Foundation
import MBQFormats
import MBQMethods
import MBQWire

/// What a worker's memory must hold, per the plan (docs/DESIGN.md §1): per held
/// layer its weights as stored and one sample's input to it (the backward recomputes the
/// inputs the budget did not keep); two layers' inputs for every sample (the stage's
/// first layer's, kept from the forward; in the search, the current layer's and the
/// outputs it makes) unless it spills them to --scratch; and a fixed part: the final
/// norm and lm_head for the last stage (reserved on every worker so any can be last),
/// one sample's working set through one block, one layer's fp32 working copies and the
/// search's smallest chunk (one sample). The budget is split as the worker splits it
/// (`MemoryBudget`).
public struct MemoryNeeds: Sendable, Equatable {
    public var layerWeightBytes: Double = 0
    /// One layer's inputs for every calibration sample.
    public var stageInputBytes: Double = 0
    public var fixedBytes: Double = 0
    /// The search chunk's bytes per token (`MemoryBudget.searchBytesPerToken`) and the
    /// longest sample, the smallest chunk (part of `fixedBytes`).
    public var chunkBytesPerToken: Double = 0
    public var longestTokens = 0

    public var minChunkBytes: Double { chunkBytesPerToken * Double(longestTokens) }

    public init(layerWeightBytes: Double = 0, stageInputBytes: Double = 0, fixedBytes: Double = 0,
                chunkBytesPerToken: Double = 0, longestTokens: Int = 0) {
        self.layerWeightBytes = layerWeightBytes
        self.stageInputBytes = stageInputBytes
        self.fixedBytes = fixedBytes
        self.chunkBytesPerToken = chunkBytesPerToken
        self.longestTokens = longestTokens
    }

    /// For a model: block weights held as stored (`weightBytes` per parameter: 2 for a
    /// bf16 checkpoint, whose layers workers keep in bf16; 4 otherwise), fp32 norms and
    /// one recomputed input of `tokens` per layer; `inputRows` rows (every sample's
    /// tokens) per layer's inputs; the fixed part at `tokens` per sample.
    public init(shape s: CostModel.Shape, inputRows: Int, tokens: Int, weightBytes: Int = 4) {
        let per = MemoryBudget.searchBytesPerToken(hidden: s.hidden, intermediate: s.intermediate)
        self.init(layerWeightBytes: s.paramsPerLayer * Double(weightBytes) + Double(2 * s.hidden * 4) + Double(tokens * s.hidden * 4),
                  stageInputBytes: Double(inputRows * s.hidden * 4),
                  fixedBytes: MemoryBudget.headAndActivations(hidden: s.hidden, intermediate: s.intermediate, heads: s.heads,
                                                              vocab: s.vocab, tokens: tokens)
                      + MemoryBudget.layerWorkingBytes(params: s.paramsPerLayer) + per * Double(tokens),
                  chunkBytesPerToken: per, longestTokens: tokens)
    }

    /// What a worker holding `layers` layers needs in memory.
    public func bytes(layers: Int, spills: Bool) -> Double {
        fixedBytes + Double(layers) * layerWeightBytes + (spills ? 0 : 2 * stageInputBytes)
    }

    /// Of `layers` held layers, how many keep their block inputs from the forward to the
    /// backward (the first always; the backward recomputes the others'): what
    /// `MemoryBudget.split` leaves for inputs once the search's default chunk is set aside.
    public func inputLayersKept(memory: Double, layers: Int, spills: Bool) -> Int {
        guard !spills, stageInputBytes > 0, layers > 0 else { return layers }
        let free = memory - (fixedBytes - minChunkBytes) - Double(layers) * layerWeightBytes
        let split = MemoryBudget.split(free: free, inMemoryInputs: 2 * stageInputBytes, chunkTokens: nil,
                                       longest: longestTokens, bytesPerToken: chunkBytesPerToken)
        return Swift.max(1, Swift.min(layers, Int(split.inputBytes / stageInputBytes)))
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
        if p.allSatisfy({ $0.range.count <= (cap[$0.worker] ?? 0) }) { return p }
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
