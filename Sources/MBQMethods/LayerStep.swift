import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// One decoder layer's quantization, the same arithmetic for the one-process job and
/// for the workers (docs/DESIGN.md §2.5): run the fp
/// layer on its inputs capturing what the search needs, search its groups (or take
/// SmoothQuant's scales), apply the scales in one canonical order, quantize; the next
/// layer's inputs are the fp layer's outputs or, with `--distort`, the quantized one's
/// (`LayerInputs` holds them). Every piece of
/// arithmetic goes through the backend, on the handles it holds.
public enum LayerStep {
    /// Whole samples in order, in chunks of at most `chunkTokens` tokens (a sample longer
    /// than that is a chunk of its own); nil: one chunk.
    public static func chunks(lengths: [Int], chunkTokens: Int?) -> [Range<Int>] {
        guard let limit = chunkTokens, !lengths.isEmpty else { return lengths.isEmpty ? [] : [0..<lengths.count] }
        var out: [Range<Int>] = [], start = 0, tokens = 0
        for (i, n) in lengths.enumerated() {
            if i > start && tokens + n > limit {
                out.append(start..<i)
                start = i; tokens = 0
            }
            tokens += n
        }
        out.append(start..<lengths.count)
        return out
    }

    /// The fp layer's scales — every group searched (awq, mbq) or SmoothQuant's
    /// migration (alpha 0.5, reported as results with no loss curve); none for rtn. The
    /// search reads sample `i`'s input from `input(i)` in chunks of at most `chunkTokens`
    /// tokens, capturing each chunk's module inputs and outputs as it reads them, so one
    /// chunk's captures exist at a time (nil: one chunk, read once); the chunking changes
    /// no result (`ScaleSearch.searchLayer`). Each sample's fp output goes to `output`
    /// (when given) as it is first computed.
    public static func search(layer l: Int, block b: BackendBlock, samples: [CalibrationSample],
                              input: @escaping (Int) throws -> BackendTensor, output: ((Int, BackendTensor) throws -> Void)?,
                              rope: @escaping (CalibrationSample) -> RoPETable<Float>, chunkTokens: Int?,
                              attnRatio: Double, mlpRatio: Double, options: QuantizeOptions,
                              backend: ComputeBackend) throws -> [GroupResult] {
        guard options.method != .rtn && options.method != .gptq else {
            if let output {
                for (i, s) in samples.enumerated() {
                    try output(i, try backend.blockForward(try input(i), b, rope: rope(s), mask: s.attention, save: false,
                                                           capture: false, actBits: nil).output)
                }
            }
            return []
        }
        // The outputs come with the first read of each chunk (every pass reads them all).
        final class Seen: @unchecked Sendable { var value: [Bool] = [] }
        let seen = Seen()
        seen.value = [Bool](repeating: false, count: samples.count)
        let read = captures(block: b, samples: samples, input: input, rope: rope, chunkTokens: chunkTokens, backend: backend) { i, y in
            if !seen.value[i] {
                seen.value[i] = true
                try output?(i, y)
            }
        }.map(\.sample)
        let results: [GroupResult]
        switch options.method {
        case .rtn, .gptq:
            results = []
        case .smoothquant:
            let s = try backend.smoothQuantScales(b, samples: read)
            results = [GroupResult(layer: l, group: .qkv, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.qkv),
                       GroupResult(layer: l, group: .gateUp, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.gateUp)]
        case .awq, .mbq:
            results = try backend.searchLayer(l, b, samples: read, attnRatio: attnRatio, mlpRatio: mlpRatio,
                                              options: options.searchOptions)
        }
        precondition(seen.value.allSatisfy { $0 }, "\(backend.name) returned from layer \(l)'s search without reading every chunk")
        return results
    }

    /// The samples as `block` sees them, in chunks of at most `chunkTokens` tokens: each
    /// chunk's captures made when it is read (so one chunk's exist at a time), each
    /// sample's output handed to `output` at every read.
    static func captures(block b: BackendBlock, samples: [CalibrationSample], input: @escaping (Int) throws -> BackendTensor,
                         rope: @escaping (CalibrationSample) -> RoPETable<Float>, chunkTokens: Int?, backend: ComputeBackend,
                         output: @escaping (Int, BackendTensor) throws -> Void) -> SampleChunks<(index: Int, sample: BackendLayerSample)> {
        let ranges = chunks(lengths: samples.map(\.length), chunkTokens: chunkTokens)
        return SampleChunks(count: ranges.count) { c in
            try ranges[c].map { i in
                let s = samples[i], r = rope(s)
                let f = try backend.blockForward(try input(i), b, rope: r, mask: s.attention, save: false, capture: true, actBits: nil)
                try output(i, f.output)
                return (i, BackendLayerSample(captures: f.captures!, rope: r, attention: s.attention, vision: s.vision, caption: s.caption))
            }
        }
    }

    /// GPTQ on the scaled layer (docs/DESIGN.md §2.7): its Hessians from its captures on
    /// `input` (the quantized layers' outputs before it), read in chunks of at most
    /// `chunkTokens` tokens, each sample's tokens weighted as `--hessian-weights` says
    /// (`GPTQLayer.tokenWeights`: the layer's ratios, or sample i's gradient norms
    /// `gradientNorms[i]`); the weights the output holds, every linear's codes, each
    /// linear's report.
    public static func gptq(layer l: Int, scaled b: BackendBlock, samples: [CalibrationSample],
                            input: @escaping (Int) throws -> BackendTensor, rope: @escaping (CalibrationSample) -> RoPETable<Float>,
                            chunkTokens: Int?, attnRatio: Double, mlpRatio: Double, gradientNorms: [Int: TokenWeightSet],
                            options: QuantizeOptions, backend: ComputeBackend) throws
        -> (block: BackendBlock, codes: [String: QuantizedWeight], reports: [GPTQLinearReport]) {
        let mode = options.hessianWeights
        let read = captures(block: b, samples: samples, input: input, rope: rope, chunkTokens: chunkTokens, backend: backend) { _, _ in }
            .map { c in
                let s = samples[c.index]
                return (sample: c.sample, weights: GPTQLayer.tokenWeights(mode, attention: s.attention, vision: s.vision, caption: s.caption,
                                                                          attnRatio: attnRatio, mlpRatio: mlpRatio,
                                                                          gradientNorms: gradientNorms[c.index]))
            }
        return try backend.gptqLayer(l, b, samples: read, settings: options.gptqSettings, perLinear: options.hessianWeights == .gradient,
                                     rtn: options.weightQuantizer, precision: options.scaleDType.scalePrecision)
    }

    /// `fp` with every group's scales folded in, always in `SearchGroup.allCases` order
    /// (it matters bit for bit: v_proj takes both the qkv column scales and the o row
    /// scales), whichever order the results arrived in.
    public static func applied(_ fp: BackendBlock, scales: [SearchGroup: [Float]], backend: ComputeBackend) throws -> BackendBlock {
        try backend.applyScales(SearchGroup.allCases.compactMap { g in scales[g].map { (g, $0) } }, to: fp)
    }

    public static func applied(_ fp: BackendBlock, results: [GroupResult], backend: ComputeBackend) throws -> BackendBlock {
        try applied(fp, scales: Dictionary(results.map { ($0.group, $0.scales) }, uniquingKeysWith: { a, _ in a }), backend: backend)
    }

    /// The scaled layer quantized: the weights the output holds (the codes dequantized
    /// with the output's scale precision) and every linear's codes by role.
    public static func quantized(_ scaled: BackendBlock, options: QuantizeOptions,
                                 backend: ComputeBackend) throws -> (block: BackendBlock, codes: [String: QuantizedWeight]) {
        try backend.quantize(scaled, with: options.weightQuantizer, precision: options.scaleDType.scalePrecision)
    }

    /// `--distort`: the quantized layer run on the current layer's inputs, activations
    /// quantized as the model will run them; its outputs are kept as the next layer's.
    public static func distort(_ q: BackendBlock, inputs: LayerInputs, samples: [CalibrationSample],
                               rope: (CalibrationSample) -> RoPETable<Float>, options: QuantizeOptions) throws {
        try inputs.forward(q, samples: samples, rope: rope, actBits: options.aBit)
    }
}
