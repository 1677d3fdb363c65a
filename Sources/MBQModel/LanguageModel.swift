import Logging
import MBQFormats
import MBQTensor

/// One sequence in the engine's precision.
public struct SequenceInput<T: BLASScalar>: Sendable {
    public var embeds: Tensor<T>     // [T, C]
    public var mask: [Bool]          // [T]
    public var positions: [[Int]]    // [rows][T]
    public var labels: [Int]         // [T]

    public init(embeds: Tensor<T>, mask: [Bool], positions: [[Int]], labels: [Int]) {
        self.embeds = embeds; self.mask = mask; self.positions = positions; self.labels = labels
    }
}

extension SequenceInput where T == Float {
    public init(_ s: CalibrationSample) {
        self.init(embeds: s.embeds, mask: s.attention, positions: s.positions, labels: s.labels)
    }
}

/// Loss and activation gradients of one sequence.
public struct SequenceGradients<T: BLASScalar>: Sendable {
    public var loss: T
    public var count: Int                  // predicted tokens in the loss
    public var input: Tensor<T>            // dL/d(inputs_embeds)  [T, C]
    public var attentionOutput: [Tensor<T>] // per layer, dL/d(o_proj out)   [T, C]
    public var mlpOutput: [Tensor<T>]      // per layer, dL/d(down_proj out) [T, C]
}

/// The whole language model held in memory: used by tests, the demo and single-process
/// runs on models that fit. (Workers hold block ranges instead.)
public final class LanguageModel<T: BLASScalar>: @unchecked Sendable {
    public let config: LanguageModelConfig
    public let blocks: [DecoderBlockWeights<T>]
    public let finalNorm: Tensor<T>
    public let lmHead: Tensor<T>

    public init(config: LanguageModelConfig, blocks: [DecoderBlockWeights<T>], finalNorm: Tensor<T>, lmHead: Tensor<T>) {
        self.config = config; self.blocks = blocks; self.finalNorm = finalNorm; self.lmHead = lmHead
    }

    public func converted<U: BLASScalar>(to _: U.Type) -> LanguageModel<U> {
        LanguageModel<U>(config: config, blocks: blocks.map { $0.converted(to: U.self) },
                         finalNorm: finalNorm.converted(to: U.self), lmHead: lmHead.converted(to: U.self))
    }

    public func ropeTable(_ positions: [[Int]]) -> RoPETable<T> {
        RoPETable(positions: positions, config: config)
    }

    /// Shapes and finiteness of one sequence's inputs against the model.
    public func check(_ input: SequenceInput<T>) throws {
        let t = input.mask.count
        guard input.embeds.shape == [t, config.hiddenSize] else {
            throw ModelError.inputShape(what: "inputs_embeds", expected: [t, config.hiddenSize], found: input.embeds.shape)
        }
        let rows = config.mropeSection == nil ? 1 : 3
        guard input.positions.count == rows, input.positions.allSatisfy({ $0.count == t }) else {
            throw ModelError.inputShape(what: "position_ids", expected: rows == 1 ? [t] : [3, t],
                                        found: [input.positions.count, input.positions.first?.count ?? 0])
        }
        guard input.labels.count == t else {
            throw ModelError.inputShape(what: "labels", expected: [t], found: [input.labels.count])
        }
        guard allFinite(input.embeds) else { throw ModelError.nonFinite(what: "inputs_embeds", layer: nil) }
    }

    /// Every block's output. -> [layers] of [T, C]
    /// `actBits` fake-quantizes every linear's input per token (W-A checkpoints).
    public func forward(_ input: SequenceInput<T>, actBits: Int? = nil) throws -> [Tensor<T>] {
        try check(input)
        let rope = ropeTable(input.positions)
        var x = input.embeds
        var outs: [Tensor<T>] = []
        for (l, w) in blocks.enumerated() {
            x = decoderBlockForward(x, weights: w, rope: rope, mask: input.mask, actBits: actBits).output
            guard allFinite(x) else { throw ModelError.nonFinite(what: "block output", layer: l) }
            outs.append(x)
        }
        return outs
    }

    /// Caption loss and its gradients w.r.t. the embeddings and every module output.
    public func lossAndGradients(_ input: SequenceInput<T>) throws -> SequenceGradients<T> {
        try check(input)
        let rope = ropeTable(input.positions)
        var x = input.embeds
        var saved: [DecoderBlockSaved<T>] = []
        for (l, w) in blocks.enumerated() {
            let f = decoderBlockForward(x, weights: w, rope: rope, mask: input.mask, save: true)
            x = f.output
            guard allFinite(x) else { throw ModelError.nonFinite(what: "block output", layer: l) }
            saved.append(f.saved!)
        }
        let (loss, count, headSaved) = lossHeadForward(x, norm: finalNorm, lmHead: lmHead, labels: input.labels,
                                                       eps: T(config.rmsNormEps))
        var dy = lossHeadBackward(saved: headSaved, norm: finalNorm, lmHead: lmHead)
        var attn = [Tensor<T>](), mlp = [Tensor<T>]()
        for l in stride(from: blocks.count - 1, through: 0, by: -1) {
            let g = decoderBlockBackward(dy, saved: saved[l], weights: blocks[l], rope: rope, mask: input.mask)
            attn.append(g.attentionOutput)
            mlp.append(g.mlpOutput)
            dy = g.input
            saved.removeLast()
        }
        return SequenceGradients(loss: loss, count: count, input: dy, attentionOutput: attn.reversed(),
                                 mlpOutput: mlp.reversed())
    }
}

extension LanguageModel where T == Float {
    /// Loads every block, the final norm and the output projection.
    public static func load(_ ckpt: Checkpoint) throws -> LanguageModel<Float> {
        let cfg = ckpt.config
        let blocks = try (0..<cfg.numLayers).map { try DecoderBlockWeights<Float>.load(from: ckpt, layer: $0) }
        let norm = try ckpt.tensor(ckpt.names.finalNorm, shape: [cfg.hiddenSize])
        let head = try ckpt.tensor(ckpt.names.outputProjection, shape: [cfg.vocabSize, cfg.hiddenSize])
        return LanguageModel(config: cfg, blocks: blocks, finalNorm: norm, lmHead: head)
    }
}
