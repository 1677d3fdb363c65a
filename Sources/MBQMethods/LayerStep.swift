import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// One decoder layer's quantization, the same arithmetic for the one-process job and
/// for the workers (docs/DESIGN.md "The layer step"; ../shared/DESIGN.md §2): run the fp
/// layer on its inputs capturing what the search needs, search its groups (or take
/// SmoothQuant's scales), apply the scales in one canonical order, quantize, and with
/// `--distort` run the quantized layer on the inputs for the next layer. Every piece of
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
    /// migration (alpha 0.5, reported as results with no loss curve); none for rtn — and
    /// its outputs on `inputs` (one [T, C] per sample). The search reads the samples in
    /// chunks of at most `chunkTokens` tokens, capturing each chunk's module inputs and
    /// outputs as it reads them, so one chunk's captures exist at a time (nil: one chunk,
    /// read once). The chunking changes no result (`ScaleSearch.searchLayer`).
    public static func search(layer l: Int, block b: BackendBlock, inputs: [BackendTensor], samples: [CalibrationSample],
                              rope: @escaping (CalibrationSample) -> RoPETable<Float>, chunkTokens: Int?,
                              attnRatio: Double, mlpRatio: Double, options: QuantizeOptions,
                              backend: ComputeBackend) throws -> (results: [GroupResult], outputs: [BackendTensor]) {
        precondition(inputs.count == samples.count, "\(inputs.count) inputs for \(samples.count) samples")
        guard options.method != .rtn else {
            return ([], try zip(inputs, samples).map { x, s in
                try backend.blockForward(x, b, rope: rope(s), mask: s.attention, save: false, capture: false, actBits: nil).output
            })
        }
        let ranges = chunks(lengths: samples.map(\.length), chunkTokens: chunkTokens)
        // The outputs come with the first read of each chunk (every pass reads them all).
        final class Outputs: @unchecked Sendable { var value: [BackendTensor?] = [] }
        let outputs = Outputs()
        outputs.value = [BackendTensor?](repeating: nil, count: samples.count)
        let read = SampleChunks<BackendLayerSample>(count: ranges.count) { c in
            try ranges[c].map { i in
                let s = samples[i], r = rope(s)
                let f = try backend.blockForward(inputs[i], b, rope: r, mask: s.attention, save: false, capture: true, actBits: nil)
                if outputs.value[i] == nil { outputs.value[i] = f.output }
                return BackendLayerSample(captures: f.captures!, rope: r, attention: s.attention, vision: s.vision, caption: s.caption)
            }
        }
        let results: [GroupResult]
        switch options.method {
        case .rtn:
            results = []
        case .smoothquant:
            let s = try backend.smoothQuantScales(b, samples: read)
            results = [GroupResult(layer: l, group: .qkv, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.qkv),
                       GroupResult(layer: l, group: .gateUp, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.gateUp)]
        case .awq, .mbq:
            results = try backend.searchLayer(l, b, samples: read, attnRatio: attnRatio, mlpRatio: mlpRatio,
                                              options: options.searchOptions)
        }
        return (results, outputs.value.map { o in
            guard let o else { preconditionFailure("\(backend.name) returned from layer \(l)'s search without reading every chunk") }
            return o
        })
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

    /// `--distort`: the quantized layer run on `inputs`, activations quantized as the
    /// model will run them. -> the next layer's inputs.
    public static func distorted(_ q: BackendBlock, inputs: [BackendTensor], samples: [CalibrationSample],
                                 rope: (CalibrationSample) -> RoPETable<Float>, options: QuantizeOptions,
                                 backend: ComputeBackend) throws -> [BackendTensor] {
        try zip(inputs, samples).map { x, s in
            try backend.blockForward(x, q, rope: rope(s), mask: s.attention, save: false, capture: false, actBits: options.aBit).output
        }
    }
}
