import Foundation
import Logging
import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// What a quantization run produces.
public struct QuantizeResult: Sendable {
    public init(options: QuantizeOptions, gradStats: GradientStatistics?, groups: [GroupResult], blocks: [DecoderBlockWeights<Float>],
                codes: [[String: QuantizedWeight]] = [], gptq: [GPTQLinearReport] = [], seconds: [String: Double]) {
        self.options = options
        self.gptq = gptq
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
    /// GPTQ's report per linear, in layer order (empty without GPTQ).
    public var gptq: [GPTQLinearReport]
    public var seconds: [String: Double]
}

/// Receives each layer's quantized weights and codes as soon as they exist (the
/// one-process CLI writes the layer's shard and lets them go).
public typealias QuantizedLayerSink = (_ layer: Int, _ block: DecoderBlockWeights<Float>, _ codes: [String: QuantizedWeight]) throws -> Void

/// MBQ / AWQ / SmoothQuant / RTN in one process (docs/DESIGN.md §2), streaming the model
/// layer by layer from `source`: the gradient pass (`GradientStatistics.compute`), then
/// for each layer `LayerStep` as the workers run it: the fp block on the calibration
/// inputs, its groups searched against the fp outputs, scales applied, quantized; the
/// next layer's inputs are the fp block's outputs (all searches independent) or, with
/// `distort`, the quantized block's (`LayerInputs`: two layers' inputs at a time, past
/// the budget of `inputs` in its scratch directory). With a `sink`, each quantized layer
/// goes to it and is not kept (`QuantizeResult.blocks` stays empty); without one, the
/// result holds them all.
public enum QuantizeJob {
    public static func run(model: LanguageModel<Float>, samples: [CalibrationSample], options: QuantizeOptions,
                           backend: ComputeBackend = CPUBackend(), chunkTokens: Int? = nil,
                           logger: Logger = Logger(label: "mbq.quantize")) throws -> QuantizeResult {
        for s in samples { try model.check(SequenceInput(s)) }
        return try run(source: .model(model), samples: samples, options: options, backend: backend, chunkTokens: chunkTokens,
                       logger: logger)
    }

    /// `chunkTokens`: the search reads the samples in chunks of at most this many tokens
    /// (`LayerStep.search`; nil: all at once). It bounds the search's captures and changes
    /// no result.
    public static func run(source: ModelSource, samples: [CalibrationSample], options: QuantizeOptions,
                           backend: ComputeBackend = CPUBackend(), chunkTokens: Int? = nil,
                           inputs: ActivationStore = ActivationStore(budgetBytes: .max, scratch: nil, owner: "grad"),
                           logger: Logger = Logger(label: "mbq.quantize"),
                           sink: QuantizedLayerSink? = nil) throws -> QuantizeResult {
        try options.validate(for: source.config)
        var seconds: [String: Double] = [:]
        let start = Date()
        func elapsed() -> String { String(format: "%.1fs", Date().timeIntervalSince(start)) }
        let nl = source.config.numLayers
        var blocks: [DecoderBlockWeights<Float>] = [], codes: [[String: QuantizedWeight]] = []
        func emit(_ l: Int, _ q: (block: BackendBlock, codes: [String: QuantizedWeight])) throws {
            let b = try backend.downloadBlock(q.block)
            if let sink {
                try sink(l, b, q.codes)
            } else {
                blocks.append(b); codes.append(q.codes)
            }
        }

        if options.method == .rtn {
            for l in 0..<nl {
                try emit(l, try LayerStep.quantized(try source.block(l, into: backend), options: options, backend: backend))
            }
            seconds["quantize"] = Date().timeIntervalSince(start)
            logger.info("[quantize] rtn \(options.weightQuantizer): \(nl) layers in \(elapsed())")
            return QuantizeResult(options: options, gradStats: nil, groups: [], blocks: blocks, codes: codes, seconds: seconds)
        }

        var stats: GradientStatistics? = nil
        // GPTQ's gradient token weights: layer -> sample -> role -> [T].
        var norms: [Int: [Int: TokenWeightSet]] = [:]
        if options.needsGradientPass {
            let t0 = Date()
            let keep: ((Int, Int, TokenWeightSet) -> Void)? = options.usesGPTQ && options.hessianWeights == .gradient
                ? { l, i, n in norms[l, default: [:]][i] = n } : nil
            stats = try GradientStatistics.compute(source: source, samples: samples, backend: backend, inputs: inputs,
                                                   tokenNorms: keep) { pass, done, total in
                let dt = Date().timeIntervalSince(t0)
                let eta = pass == "forward" ? dt / Double(done) * Double(2 * total - done) : dt / Double(total + done) * Double(total - done)
                logger.info("[grad-stats] \(pass) layer \(done)/\(total), elapsed \(elapsed()), ETA \(String(format: "%.1fs", eta))")
            }
            seconds["grad_stats"] = Date().timeIntervalSince(t0)
            for s in stats!.skipped { logger.warning("[grad-stats] skipped \(s)") }
            if inputs.spilledBytes > 0 {
                logger.info("[grad-stats] \(String(format: "%.1f", Double(inputs.spilledBytes) / 1048576)) MiB of block inputs went to scratch (\(String(format: "%.1f", inputs.spillSeconds)) s)")
            }
            inputs.reset()
        }
        let ratios = stats ?? GradientStatistics.uniform(layers: nl)

        let t0 = Date()
        // The search walks the layers holding the current layer's inputs and the outputs
        // it makes (in `inputs`, spilling past its budget); the gradient pass's are gone.
        inputs.reset()
        defer { inputs.reset() }
        for (i, s) in samples.enumerated() { try inputs.put(layer: 0, sample: i, s.embeds) }
        let walk = LayerInputs(layer: 0, samples: samples.count, store: inputs, backend: backend)
        let rope = { (s: CalibrationSample) in source.ropeTable(s.positions) }
        var groups: [GroupResult] = []
        var reports: [GPTQLinearReport] = []
        for l in 0..<nl {
            let last = l == nl - 1
            var fp: BackendBlock? = try source.block(l, into: backend)
            let found = try LayerStep.search(layer: l, block: fp!, samples: samples, input: walk.input,
                                             output: options.sequential || last ? nil : walk.keepOutput, rope: rope,
                                             chunkTokens: chunkTokens, attnRatio: ratios.layers[l].attnRatio,
                                             mlpRatio: ratios.layers[l].mlpRatio, options: options, backend: backend)
            if options.method != .smoothquant && options.method != .gptq {
                // SmoothQuant's scales are not reported (alpha is fixed), as in the distributed job.
                groups += found
                let picks = found.map { "\($0.group.rawValue)=\(String(format: "%.2f", $0.alpha))" }.joined(separator: " ")
                logger.info("[search] layer \(l + 1)/\(nl): \(picks)")
            }
            // Only one layer's weights at a time, and at most two copies of them: the fp
            // block goes once the scaled one exists.
            let scaled = try LayerStep.applied(fp!, results: found, backend: backend)
            fp = nil
            let q: (block: BackendBlock, codes: [String: QuantizedWeight])
            if options.usesGPTQ {
                let g = try LayerStep.gptq(layer: l, scaled: scaled, samples: samples, input: walk.input, rope: rope, chunkTokens: chunkTokens,
                                           attnRatio: ratios.layers[l].attnRatio, mlpRatio: ratios.layers[l].mlpRatio,
                                           gradientNorms: norms.removeValue(forKey: l) ?? [:], options: options, backend: backend)
                q = (g.block, g.codes)
                reports += g.reports
                let gain = g.reports.map { $0.errorBefore / Swift.max($0.errorAfter, .leastNonzeroMagnitude) }
                logger.info("[gptq] layer \(l + 1)/\(nl): Hessian-weighted error rtn/gptq \(zip(g.reports, gain).map { "\($0.role) \(String(format: "%.2f", $1))x" }.joined(separator: " "))")
            } else {
                q = try LayerStep.quantized(scaled, options: options, backend: backend)
            }
            if !last {
                if options.sequential { try LayerStep.distort(q.block, inputs: walk, samples: samples, rope: rope, options: options) }
                try walk.advance()
            }
            try emit(l, q)
            let dt = Date().timeIntervalSince(t0)
            logger.info("[search] layer \(l + 1)/\(nl) done, elapsed \(elapsed()), ETA \(String(format: "%.1fs", dt / Double(l + 1) * Double(nl - l - 1)))")
        }
        seconds["search_apply_quantize"] = Date().timeIntervalSince(t0)
        return QuantizeResult(options: options, gradStats: stats, groups: groups, blocks: blocks, codes: codes, gptq: reports,
                              seconds: seconds)
    }
}
