import Foundation
import Logging
import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// What a quantization run produces.
public struct QuantizeResult: Sendable {
    public init(options: QuantizeOptions, gradStats: GradientStatistics?, groups: [GroupResult], blocks: [DecoderBlockWeights<Float>],
                codes: [[String: QuantizedWeight]] = [], seconds: [String: Double]) {
        self.options = options
        self.gradStats = gradStats
        self.groups = groups
        self.blocks = blocks
        self.codes = codes
        self.seconds = seconds
    }

    public var options: QuantizeOptions
    public var gradStats: GradientStatistics?
    public var groups: [GroupResult]
    /// The blocks with scales applied and weights fake-quantized (dequantized with the
    /// output's scale precision).
    public var blocks: [DecoderBlockWeights<Float>]
    /// Per layer, every linear's integer codes by role ("q", ..., "down").
    public var codes: [[String: QuantizedWeight]]
    public var seconds: [String: Double]
}

/// MBQ / AWQ / SmoothQuant / RTN on one process holding the whole model
/// (docs/DESIGN.md §2). Layer by layer, `LayerStep` as the workers run it: the fp block on the
/// calibration inputs, its groups searched against the fp outputs, scales applied,
/// quantized; the next layer's inputs are the fp block's outputs (all searches
/// independent) or, with `distort`, the quantized block's.
public enum QuantizeJob {
    public static func run(model: LanguageModel<Float>, samples: [CalibrationSample], options: QuantizeOptions,
                           backend: ComputeBackend = CPUBackend(),
                           logger: Logger = Logger(label: "mbq.quantize")) throws -> QuantizeResult {
        try options.validate(for: model.config)
        var seconds: [String: Double] = [:]
        let start = Date()
        func elapsed() -> String { String(format: "%.1fs", Date().timeIntervalSince(start)) }
        let nl = model.config.numLayers

        if options.method == .rtn {
            var blocks: [DecoderBlockWeights<Float>] = [], codes: [[String: QuantizedWeight]] = []
            for b in model.blocks {
                let q = try LayerStep.quantized(try backend.loadBlock(b), options: options, backend: backend)
                blocks.append(try backend.downloadBlock(q.block)); codes.append(q.codes)
            }
            seconds["quantize"] = Date().timeIntervalSince(start)
            logger.info("[quantize] rtn \(options.weightQuantizer): \(nl) layers in \(elapsed())")
            return QuantizeResult(options: options, gradStats: nil, groups: [], blocks: blocks, codes: codes, seconds: seconds)
        }

        var stats: GradientStatistics? = nil
        if options.method == .mbq || (options.method == .awq && options.effectiveReweight) {
            let t0 = Date()
            stats = try GradientStatistics.compute(model: model, samples: samples, backend: backend) { done, total in
                let dt = Date().timeIntervalSince(t0)
                let eta = dt / Double(done) * Double(total - done)
                logger.info("[grad-stats] sample \(done)/\(total), elapsed \(elapsed()), ETA \(String(format: "%.1fs", eta))")
            }
            seconds["grad_stats"] = Date().timeIntervalSince(t0)
            for s in stats!.skipped { logger.warning("[grad-stats] skipped \(s)") }
        }
        let ratios = stats ?? GradientStatistics.uniform(layers: nl)

        let t0 = Date()
        var xs = try samples.map { try backend.upload($0.embeds) }
        var groups: [GroupResult] = []
        var blocks: [DecoderBlockWeights<Float>] = []
        var codes: [[String: QuantizedWeight]] = []
        for l in 0..<nl {
            let fp = try backend.loadBlock(model.blocks[l])
            let captured = try LayerStep.capture(fp, inputs: xs, samples: samples, rope: { model.ropeTable($0.positions) }, backend: backend)
            let found = try LayerStep.scales(layer: l, block: fp, samples: captured.samples, attnRatio: ratios.layers[l].attnRatio,
                                             mlpRatio: ratios.layers[l].mlpRatio, options: options, backend: backend)
            if options.method != .smoothquant {
                // SmoothQuant's scales are not reported (alpha is fixed), as in the distributed job.
                groups += found
                let picks = found.map { "\($0.group.rawValue)=\(String(format: "%.2f", $0.alpha))" }.joined(separator: " ")
                logger.info("[search] layer \(l + 1)/\(nl): \(picks)")
            }
            let q = try LayerStep.quantized(try LayerStep.applied(fp, results: found, backend: backend), options: options, backend: backend)
            blocks.append(try backend.downloadBlock(q.block))
            codes.append(q.codes)
            xs = options.distort ? try LayerStep.distorted(q.block, inputs: xs, samples: samples, rope: { model.ropeTable($0.positions) },
                                                           options: options, backend: backend)
                                 : captured.outputs
            let dt = Date().timeIntervalSince(t0)
            logger.info("[search] layer \(l + 1)/\(nl) done, elapsed \(elapsed()), ETA \(String(format: "%.1fs", dt / Double(l + 1) * Double(nl - l - 1)))")
        }
        seconds["search_apply_quantize"] = Date().timeIntervalSince(t0)
        return QuantizeResult(options: options, gradStats: stats, groups: groups, blocks: blocks, codes: codes, seconds: seconds)
    }
}
