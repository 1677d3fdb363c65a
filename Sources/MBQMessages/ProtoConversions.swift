import Foundation
import MBQFormats
import MBQMethods
import MBQWire

/// Every conversion between the methods' types and their protobuf messages, in one
/// place. Decoding checks what the wire cannot (enum values, group names) and throws a
/// `ProtocolError` instead of trapping.

/// A Swift enum and its proto enum, value for value: `wire` out, `init(wire:)` back in
/// (nil for a value the proto has that the job does not: unspecified or newer).
public protocol WireEnum {
    associatedtype Wire: Equatable
    static var wireTable: [(Self, Wire)] { get }
}

extension WireEnum where Self: Equatable {
    public var wire: Wire {
        guard let w = Self.wireTable.first(where: { $0.0 == self })?.1 else { preconditionFailure("\(self) has no wire value") }
        return w
    }

    public init?(wire: Wire) {
        guard let s = Self.wireTable.first(where: { $0.1 == wire })?.0 else { return nil }
        self = s
    }
}

extension QuantMethod: WireEnum {
    public static var wireTable: [(QuantMethod, Mbq_Method)] {
        [(.rtn, .rtn), (.awq, .awq), (.mbq, .mbq), (.smoothquant, .smoothquant), (.gptq, .gptq)]
    }
}

extension SearchLoss: WireEnum {
    public static var wireTable: [(SearchLoss, Mbq_Loss)] { [(.mae, .mae), (.mse, .mse)] }
}

extension SearchGroup: WireEnum {
    public static var wireTable: [(SearchGroup, Mbq_Group)] { [(.qkv, .qkv), (.o, .o), (.gateUp, .gateUp), (.down, .down)] }
}

extension Mbq_Phase {
    /// As logs and events name it.
    public var name: String {
        switch self {
        case .forward: return "forward"
        case .backward: return "backward"
        case .search: return "search"
        case .apply: return "apply"
        case .unspecified, .UNRECOGNIZED: return "\(self)"
        }
    }
}

extension Mbq_OutputRouting {
    /// The `--output-via` spellings.
    public static let options: [(String, Mbq_OutputRouting)] = [("auto", .auto), ("shared", .shared), ("coordinator", .coordinator)]

    public init?(option: String) {
        guard let r = Self.options.first(where: { $0.0 == option })?.1 else { return nil }
        self = r
    }

    public var option: String { Self.options.first { $0.1 == self }?.0 ?? "\(self)" }
}

extension Mbq_JobOptions {
    public init(_ o: QuantizeOptions) {
        self.init()
        method = o.method.wire
        wBit = UInt32(o.wBit)
        group = Int32(o.group)
        aBit = UInt32(o.aBit ?? 0)
        loss = o.loss.wire
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
        guard let m = QuantMethod(wire: method) else { throw bad("unknown method \(method)") }
        guard let l = SearchLoss(wire: loss) else { throw bad("unknown loss \(loss)") }
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
        layer = UInt32(g.layer); group = g.group.wire; bestIdx = UInt32(g.bestIndex)
        alpha = g.alpha; loss = g.losses; ratio = g.ratio; scales = g.scales
        self.epoch = epoch
    }

    /// The group, when it is one the job knows.
    public var searchGroup: SearchGroup? { SearchGroup(wire: group) }

    public func groupResult() throws -> GroupResult {
        guard let g = searchGroup else { throw ProtocolError.malformed("unknown group \(group) for layer \(layer)") }
        return GroupResult(layer: Int(layer), group: g, bestIndex: Int(bestIdx), alpha: alpha, losses: loss, ratio: ratio, scales: scales)
    }
}

extension Mbq_GptqReport {
    /// A layer's GPTQ report: one entry per linear, in `DecoderBlockWeights.linears` order.
    public init(layer l: Int, _ reports: [GPTQLinearReport], epoch: UInt32) {
        self.init()
        layer = UInt32(l); self.epoch = epoch
        linears = reports.map { r in
            var e = Mbq_LinearError()
            e.role = r.role; e.tokens = UInt64(r.tokens); e.errorBefore = r.errorBefore; e.errorAfter = r.errorAfter
            return e
        }
    }

    /// Checks that every linear of the block is reported once, in order.
    public func reports() throws -> [GPTQLinearReport] {
        let roles = ApplyScales.linears.map(\.role)
        guard linears.map(\.role) == roles else {
            throw ProtocolError.malformed("GPTQ report for layer \(layer): linears \(linears.map(\.role)), expected \(roles)")
        }
        return linears.map { GPTQLinearReport(layer: Int(layer), role: $0.role, tokens: Int($0.tokens), errorBefore: $0.errorBefore, errorAfter: $0.errorAfter) }
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
