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
/// (DESIGN.md §2). Layer by layer: run the fp block on the calibration inputs, search
/// its groups against the fp outputs, apply the scales, quantize; the next layer's
/// inputs are the fp block's outputs (all searches independent) or, with `distort`,
/// the quantized block's.
public enum QuantizeJob {
    public static func run(model: LanguageModel<Float>, samples: [CalibrationSample], options: QuantizeOptions,
                           logger: Logger = Logger(label: "mbq.quantize")) throws -> QuantizeResult {
        try options.validate(for: model.config)
        var seconds: [String: Double] = [:]
        let start = Date()
        func elapsed() -> String { String(format: "%.1fs", Date().timeIntervalSince(start)) }
        let nl = model.config.numLayers

        if options.method == .rtn {
            let q = options.weightQuantizer
            var blocks: [DecoderBlockWeights<Float>] = [], codes: [[String: QuantizedWeight]] = []
            for var b in model.blocks {
                codes.append(ApplyScales.quantizeLinears(&b, with: q, precision: options.scaleDType.scalePrecision))
                blocks.append(b)
            }
            seconds["quantize"] = Date().timeIntervalSince(start)
            logger.info("[quantize] rtn \(q): \(nl) layers in \(elapsed())")
            return QuantizeResult(options: options, gradStats: nil, groups: [], blocks: blocks, codes: codes, seconds: seconds)
        }

        var stats: GradientStatistics? = nil
        if options.method == .mbq || (options.method == .awq && options.effectiveReweight) {
            let t0 = Date()
            stats = try GradientStatistics.compute(model: model, samples: samples) { done, total in
                let dt = Date().timeIntervalSince(t0)
                let eta = dt / Double(done) * Double(total - done)
                logger.info("[grad-stats] sample \(done)/\(total), elapsed \(elapsed()), ETA \(String(format: "%.1fs", eta))")
            }
            seconds["grad_stats"] = Date().timeIntervalSince(t0)
            for s in stats!.skipped { logger.warning("[grad-stats] skipped \(s)") }
        }
        let ratios = stats ?? GradientStatistics.uniform(layers: nl)

        let t0 = Date()
        var xs = samples.map(\.embeds)
        var groups: [GroupResult] = []
        var blocks: [DecoderBlockWeights<Float>] = []
        var codes: [[String: QuantizedWeight]] = []
        let search = options.searchOptions
        for l in 0..<nl {
            let fp = model.blocks[l]
            var layerSamples: [LayerSample] = []
            var fpOutputs: [Tensor<Float>] = []
            for (i, s) in samples.enumerated() {
                let rope = model.ropeTable(s.positions)
                let f = decoderBlockForward(xs[i], weights: fp, rope: rope, mask: s.attention, capture: true)
                layerSamples.append(LayerSample(captures: f.captures!, rope: rope, attention: s.attention,
                                                vision: s.vision, caption: s.caption))
                fpOutputs.append(f.output)
            }
            var w = fp
            if options.method == .smoothquant {
                let s = ApplyScales.smoothQuantLayer(fp, samples: layerSamples)
                ApplyScales.apply(.qkv, scales: s.qkv, to: &w)
                ApplyScales.apply(.gateUp, scales: s.gateUp, to: &w)
            } else {
                let found = ScaleSearch.searchLayer(l, weights: fp, samples: layerSamples,
                                                    attnRatio: ratios.layers[l].attnRatio,
                                                    mlpRatio: ratios.layers[l].mlpRatio, options: search)
                for g in found { ApplyScales.apply(g.group, scales: g.scales, to: &w) }
                groups += found
                let picks = found.map { "\($0.group.rawValue)=\(String(format: "%.2f", $0.alpha))" }.joined(separator: " ")
                logger.info("[search] layer \(l + 1)/\(nl): \(picks)")
            }
            codes.append(ApplyScales.quantizeLinears(&w, with: options.weightQuantizer, precision: options.scaleDType.scalePrecision))
            blocks.append(w)
            if options.distort {
                for (i, s) in samples.enumerated() {
                    xs[i] = decoderBlockForward(xs[i], weights: w, rope: layerSamples[i].rope, mask: s.attention,
                                                actBits: options.aBit).output
                }
            } else {
                xs = fpOutputs
            }
            let dt = Date().timeIntervalSince(t0)
            logger.info("[search] layer \(l + 1)/\(nl) done, elapsed \(elapsed()), ETA \(String(format: "%.1fs", dt / Double(l + 1) * Double(nl - l - 1)))")
        }
        seconds["search_apply_quantize"] = Date().timeIntervalSince(t0)
        return QuantizeResult(options: options, gradStats: stats, groups: groups, blocks: blocks, codes: codes, seconds: seconds)
    }
}
