import Foundation
import MBQFormats
import MBQMethods

/// Every conversion between the methods' types and their protobuf messages, in one
/// place. Decoding checks what the wire cannot (enum names, group names) and throws a
/// `ProtocolError` instead of trapping.
extension Mbq_JobOptions {
    public init(_ o: QuantizeOptions) {
        self.init()
        method = o.method.rawValue
        wBit = UInt32(o.wBit)
        group = Int32(o.group)
        aBit = UInt32(o.aBit ?? 0)
        loss = o.loss.rawValue
        if let r = o.reweight { reweight = r }
        distort = o.distort
        format = o.resolvedFormat.rawValue
        weightDtype = o.weightDType.rawValue
        if o.usesGPTQ {
            thenGptq = o.thenGPTQ; hessianWeights = o.hessianWeights.rawValue; damp = o.damp
            blockSize = UInt32(o.blockSize); actOrder = o.actOrder
        }
    }

    public func quantizeOptions() throws -> QuantizeOptions {
        func bad(_ why: String) -> ProtocolError { .malformed("assignment options: \(why)") }
        var o = QuantizeOptions()
        guard let m = QuantMethod(rawValue: method) else { throw bad("unknown method '\(method)'") }
        guard let l = SearchLoss(rawValue: loss) else { throw bad("unknown loss '\(loss)'") }
        guard let f = CheckpointFormat(rawValue: format) else { throw bad("unknown format '\(format)'") }
        guard let d = DType(rawValue: weightDtype), d.isFloatingPoint else { throw bad("weight dtype '\(weightDtype)' is not a float dtype") }
        o.method = m; o.loss = l; o.format = f; o.weightDType = d
        o.wBit = Int(wBit); o.group = Int(group); o.aBit = aBit == 0 ? nil : Int(aBit)
        o.reweight = hasReweight ? reweight : nil
        o.distort = distort
        if thenGptq || m == .gptq {
            guard let w = HessianWeights(rawValue: hessianWeights) else { throw bad("unknown GPTQ token weights '\(hessianWeights)'") }
            o.thenGPTQ = thenGptq; o.hessianWeights = w; o.damp = damp; o.blockSize = Int(blockSize); o.actOrder = actOrder
        }
        return o
    }

    /// A stable text form (for the job id and status.json).
    public var canonicalText: String { (try? jsonString()) ?? "\(self)" }
}

extension Mbq_GroupResult {
    public init(_ g: GroupResult, epoch: UInt32) {
        self.init()
        layer = UInt32(g.layer); group = g.group.rawValue; bestIdx = UInt32(g.bestIndex)
        alpha = g.alpha; loss = g.losses; ratio = g.ratio; scales = g.scales
        self.epoch = epoch
    }

    public func groupResult() throws -> GroupResult {
        guard let g = SearchGroup(rawValue: group) else { throw ProtocolError.malformed("unknown group '\(group)' for layer \(layer)") }
        return GroupResult(layer: Int(layer), group: g, bestIndex: Int(bestIdx), alpha: alpha, losses: loss, ratio: ratio, scales: scales)
    }
}

/// A layer's GPTQ report on the wire: one more result of the layer, group
/// `GPTQReport.group`, its `loss` holding (tokens, error before, error after) per linear
/// in `ApplyScales.linears` order. The coordinator counts and journals it like a
/// searched group's.
public enum GPTQReport {
    public static let group = "gptq"

    public static func message(layer: Int, _ reports: [GPTQLinearReport], epoch: UInt32) -> Mbq_GroupResult {
        var m = Mbq_GroupResult()
        m.layer = UInt32(layer); m.group = group; m.epoch = epoch
        m.loss = reports.flatMap { [Double($0.tokens), $0.errorBefore, $0.errorAfter] }
        return m
    }

    public static func reports(_ m: Mbq_GroupResult) throws -> [GPTQLinearReport] {
        let roles = ApplyScales.linears.map(\.role)
        guard m.group == group, m.loss.count == 3 * roles.count else {
            throw ProtocolError.malformed("GPTQ report for layer \(m.layer): \(m.loss.count) values for \(roles.count) linears")
        }
        return roles.enumerated().map { i, r in
            GPTQLinearReport(layer: Int(m.layer), role: r, tokens: Int(m.loss[3 * i]), errorBefore: m.loss[3 * i + 1], errorAfter: m.loss[3 * i + 2])
        }
    }
}

extension Mbq_LayerStats {
    public init(layer l: Int, sums: GradientStatistics.Layer, samples: Int, skipped: [String], epoch: UInt32) {
        self.init()
        layer = UInt32(l)
        attnVis = sums.attnVis; attnCap = sums.attnCap; mlpVis = sums.mlpVis; mlpCap = sums.mlpCap
        self.samples = UInt32(samples)
        self.skipped = skipped
        self.epoch = epoch
    }

    /// The per-sample means summed over samples, as `GradientStatistics.finalize` takes them.
    public var sums: GradientStatistics.Layer {
        var x = GradientStatistics.Layer()
        x.attnVis = attnVis; x.attnCap = attnCap; x.mlpVis = mlpVis; x.mlpCap = mlpCap
        return x
    }
}
