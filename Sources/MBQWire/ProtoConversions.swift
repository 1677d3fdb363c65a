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
