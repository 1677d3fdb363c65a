import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// One decoder layer's quantization, the same arithmetic for the one-process job and
/// for the workers (docs/DESIGN.md "The layer step"; ../shared/DESIGN.md §2): run the fp
/// layer on its inputs capturing what the search needs, search its groups (or take
/// SmoothQuant's scales), apply the scales in one canonical order, quantize, and with
/// `--distort` run the quantized layer on the inputs for the next layer.
public enum LayerStep {
    /// The fp layer on `inputs` (one [T, C] per sample), capturing every searched
    /// module's input and output. -> the search's samples and the layer's fp outputs.
    public static func capture(_ w: DecoderBlockWeights<Float>, inputs: [Tensor<Float>], samples: [CalibrationSample],
                               rope: (CalibrationSample) -> RoPETable<Float>,
                               backend: ComputeBackend) -> (samples: [LayerSample], outputs: [Tensor<Float>]) {
        precondition(inputs.count == samples.count, "\(inputs.count) inputs for \(samples.count) samples")
        var layerSamples: [LayerSample] = [], outputs: [Tensor<Float>] = []
        for (x, s) in zip(inputs, samples) {
            let r = rope(s)
            let f = backend.blockForward(x, w, rope: r, mask: s.attention, save: false, capture: true, actBits: nil)
            layerSamples.append(LayerSample(captures: f.captures!, rope: r, attention: s.attention, vision: s.vision, caption: s.caption))
            outputs.append(f.output)
        }
        return (layerSamples, outputs)
    }

    /// The layer's scales: every group searched (awq, mbq), or SmoothQuant's migration
    /// (alpha 0.5, reported as results with no loss curve). rtn has none.
    public static func scales(layer l: Int, weights fp: DecoderBlockWeights<Float>, samples: [LayerSample],
                              attnRatio: Double, mlpRatio: Double, options: QuantizeOptions,
                              backend: ComputeBackend) -> [GroupResult] {
        switch options.method {
        case .rtn:
            return []
        case .smoothquant:
            let s = ApplyScales.smoothQuantLayer(fp, samples: samples)
            return [GroupResult(layer: l, group: .qkv, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.qkv),
                    GroupResult(layer: l, group: .gateUp, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.gateUp)]
        case .awq, .mbq:
            return backend.searchLayer(l, fp, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio,
                                       options: options.searchOptions)
        }
    }

    /// `fp` with every group's scales folded in, always in `SearchGroup.allCases` order
    /// (it matters bit for bit: v_proj takes both the qkv column scales and the o row
    /// scales), whichever order the results arrived in.
    public static func applied(_ fp: DecoderBlockWeights<Float>, scales: [SearchGroup: [Float]]) -> DecoderBlockWeights<Float> {
        var w = fp
        for g in SearchGroup.allCases {
            if let s = scales[g] { ApplyScales.apply(g, scales: s, to: &w) }
        }
        return w
    }

    public static func applied(_ fp: DecoderBlockWeights<Float>, results: [GroupResult]) -> DecoderBlockWeights<Float> {
        applied(fp, scales: Dictionary(results.map { ($0.group, $0.scales) }, uniquingKeysWith: { a, _ in a }))
    }

    /// The scaled layer quantized: the weights the output holds (the codes dequantized
    /// with the output's scale precision) and every linear's codes by role.
    public static func quantized(_ scaled: DecoderBlockWeights<Float>,
                                 options: QuantizeOptions) -> (block: DecoderBlockWeights<Float>, codes: [String: QuantizedWeight]) {
        var w = scaled
        let codes = ApplyScales.quantizeLinears(&w, with: options.weightQuantizer, precision: options.scaleDType.scalePrecision)
        return (w, codes)
    }

    /// `--distort`: the quantized layer run on `inputs`, activations quantized as the
    /// model will run them. -> the next layer's inputs.
    public static func distorted(_ q: DecoderBlockWeights<Float>, inputs: [Tensor<Float>], samples: [CalibrationSample],
                                 rope: (CalibrationSample) -> RoPETable<Float>, options: QuantizeOptions,
                                 backend: ComputeBackend) -> [Tensor<Float>] {
        zip(inputs, samples).map { x, s in
            backend.blockForward(x, q, rope: rope(s), mask: s.attention, save: false, capture: false, actBits: options.aBit).output
        }
    }
}
