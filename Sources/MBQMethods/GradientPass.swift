import MBQFormats
import MBQModel
import MBQTensor

/// MBQ's gradient pass over a run of consecutive layers (docs/DESIGN.md §2 "Gradient
/// statistics"), the same arithmetic for the one-process job (all layers, one stage) and
/// for each pipeline stage of a distributed job. The forward keeps only each layer's
/// input; the backward recomputes the layer's forward from it with `save` and runs its
/// backward, so that memory holds one layer's saved forward at a time, not all of them.
public enum GradientPass {
    /// x: [T, C], the input of `layers.lowerBound`. Each layer's input is handed to `keep`
    /// before the layer runs. `actBits`: per-token activation quantization of every
    /// linear's input (evaluating a W-A model). -> the output of the last layer.
    public static func forward(_ x: BackendTensor, layers: Range<Int>, blocks: (Int) -> BackendBlock, rope: RoPETable<Float>,
                               mask: [Bool], backend: ComputeBackend, actBits: Int? = nil,
                               keep: (Int, BackendTensor) throws -> Void = { _, _ in }) throws -> BackendTensor {
        var x = x
        for l in layers {
            try keep(l, x)
            x = try backend.blockForward(x, blocks(l), rope: rope, mask: mask, save: false, capture: false, actBits: actBits).output
            guard try backend.allFinite(x) else { throw ModelError.nonFinite(what: "block output", layer: l) }
        }
        return x
    }

    /// Sample `s` through every block of `model` (loaded in `backend` as `blocks`), after
    /// checking its shapes against the model: what `mbq eval` and `mbq forward` read the
    /// head from. -> the final hidden states [T, C]
    public static func modelForward(_ s: CalibrationSample, model: LanguageModel<Float>, blocks: [BackendBlock],
                                    backend: ComputeBackend, actBits: Int? = nil) throws -> BackendTensor {
        try model.check(SequenceInput(s))
        return try forward(try backend.upload(s.embeds), layers: 0..<blocks.count, blocks: { blocks[$0] },
                           rope: model.ropeTable(s.positions), mask: s.attention, backend: backend, actBits: actBits)
    }

    /// Sample `sample`'s inputs of `layers` for the backward: each layer's from `cached` when
    /// it has it, else recomputed by running the layer below on its input, as `forward`
    /// did (a worker keeps its first layer's inputs and as many others as its budget
    /// holds). -> [layers.count] of x: [T, C]
    public static func inputs(sample: Int, layers: Range<Int>, blocks: (Int) -> BackendBlock, rope: RoPETable<Float>, mask: [Bool],
                              backend: ComputeBackend, cached: (Int) throws -> BackendTensor?) throws -> [BackendTensor] {
        var out: [BackendTensor] = []
        for l in layers {
            if let x = try cached(l) { out.append(x); continue }
            guard let below = out.last else { throw MethodsError.missingInput(layer: l, sample: sample) }
            out.append(try backend.blockForward(below, blocks(l - 1), rope: rope, mask: mask, save: false, capture: false, actBits: nil).output)
        }
        return out
    }

    /// dy: [T, C], the loss's gradient w.r.t. the last layer's output; `input(l)` gives
    /// back what `forward` kept. Adds the sample's vision and caption means of
    /// |dL/d(o_proj out)| and |dL/d(down_proj out)| to `sums[l - layers.lowerBound]`;
    /// with `outputNorms`, hands it each layer's per-token squared output-gradient norms
    /// of every linear (GPTQ's gradient token weights).
    /// -> dL/d(input of layers.lowerBound) [T, C]
    public static func backward(_ dy: BackendTensor, layers: Range<Int>, blocks: (Int) -> BackendBlock,
                                input: (Int) throws -> BackendTensor, sample s: CalibrationSample, rope: RoPETable<Float>,
                                backend: ComputeBackend, sums: inout [GradientStatistics.Layer],
                                outputNorms: ((Int, [String: [Float]]) throws -> Void)? = nil) throws -> BackendTensor {
        precondition(sums.count == layers.count, "\(sums.count) sums for layers \(layers)")
        let vis = s.attendedVision, cap = s.attendedCaption
        var dy = dy
        for l in layers.reversed() {
            let f = try backend.blockForward(try input(l), blocks(l), rope: rope, mask: s.attention, save: true, capture: false, actBits: nil)
            let g = try backend.blockBackward(dy, f.saved!, blocks(l), rope: rope, mask: s.attention, outputNorms: outputNorms != nil)
            try outputNorms?(l, g.outputSquaredNorms)
            sums[l - layers.lowerBound].add(attnVis: try backend.meanAbs(g.attentionOutput, rows: vis),
                                            attnCap: try backend.meanAbs(g.attentionOutput, rows: cap),
                                            mlpVis: try backend.meanAbs(g.mlpOutput, rows: vis),
                                            mlpCap: try backend.meanAbs(g.mlpOutput, rows: cap))
            dy = g.input
        }
        return dy
    }
}
