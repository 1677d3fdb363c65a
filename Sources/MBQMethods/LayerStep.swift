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
    /// The fp layer on `inputs` (one [T, C] per sample), capturing every searched
    /// module's input and output. -> the search's samples and the layer's fp outputs.
    public static func capture(_ b: BackendBlock, inputs: [BackendTensor], samples: [CalibrationSample],
                               rope: (CalibrationSample) -> RoPETable<Float>,
                               backend: ComputeBackend) throws -> (samples: [BackendLayerSample], outputs: [BackendTensor]) {
        precondition(inputs.count == samples.count, "\(inputs.count) inputs for \(samples.count) samples")
        var layerSamples: [BackendLayerSample] = [], outputs: [BackendTensor] = []
        for (x, s) in zip(inputs, samples) {
            let r = rope(s)
            let f = try backend.blockForward(x, b, rope: r, mask: s.attention, save: false, capture: true, actBits: nil)
            layerSamples.append(BackendLayerSample(captures: f.captures!, rope: r, attention: s.attention, vision: s.vision, caption: s.caption))
            outputs.append(f.output)
        }
        return (layerSamples, outputs)
    }

    /// The layer's scales: every group searched (awq, mbq), or SmoothQuant's migration
    /// (alpha 0.5, reported as results with no loss curve). rtn has none.
    public static func scales(layer l: Int, block b: BackendBlock, samples: [BackendLayerSample],
                              attnRatio: Double, mlpRatio: Double, options: QuantizeOptions,
                              backend: ComputeBackend) throws -> [GroupResult] {
        switch options.method {
        case .rtn:
            return []
        case .smoothquant:
            let s = try backend.smoothQuantScales(b, samples: samples)
            return [GroupResult(layer: l, group: .qkv, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.qkv),
                    GroupResult(layer: l, group: .gateUp, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.gateUp)]
        case .awq, .mbq:
            return try backend.searchLayer(l, b, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio,
                                           options: options.searchOptions)
        }
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
