import MBQFormats
import MBQModel
import MBQTensor

/// Where a job reads the model from, one decoder block at a time: a checkpoint (blocks
/// read from the mmap'd files in their stored precision, widened to fp32 for the layer
/// being computed, and their file pages released after use), or a model already in memory
/// (tests, the demo). The one-process job holds at most the layer it works on, plus the
/// head during the gradient pass.
public struct ModelSource: @unchecked Sendable {
    public let config: LanguageModelConfig
    private let loadBlock: (Int) throws -> DecoderBlockWeights<Float>
    private let loadHead: () throws -> (norm: Tensor<Float>, lmHead: Tensor<Float>)
    private let release: (Int) -> Void

    public init(config: LanguageModelConfig, block: @escaping (Int) throws -> DecoderBlockWeights<Float>,
                head: @escaping () throws -> (norm: Tensor<Float>, lmHead: Tensor<Float>), release: @escaping (Int) -> Void = { _ in }) {
        self.config = config; self.loadBlock = block; self.loadHead = head; self.release = release
    }

    public static func checkpoint(_ ckpt: Checkpoint) -> ModelSource {
        let cfg = ckpt.config
        return ModelSource(config: cfg, block: { try DecoderBlockWeights<Float>.load(from: ckpt, layer: $0) },
                           head: {
                               defer { ckpt.releasePages([ckpt.names.finalNorm, ckpt.names.outputProjection]) }
                               return (try ckpt.tensor(ckpt.names.finalNorm, shape: [cfg.hiddenSize]),
                                       try ckpt.tensor(ckpt.names.outputProjection, shape: [cfg.vocabSize, cfg.hiddenSize]))
                           },
                           release: { ckpt.releasePages(layer: $0) })
    }

    public static func model(_ m: LanguageModel<Float>) -> ModelSource {
        ModelSource(config: m.config, block: { m.blocks[$0] }, head: { (m.finalNorm, m.lmHead) })
    }

    /// Block `l` loaded into `backend`; its file pages are released once it is in.
    public func block(_ l: Int, into backend: ComputeBackend) throws -> BackendBlock {
        let b = try backend.loadBlock(try loadBlock(l))
        release(l)
        return b
    }

    public func head(into backend: ComputeBackend) throws -> BackendHead {
        let h = try loadHead()
        return try backend.loadHead(norm: h.norm, lmHead: h.lmHead, eps: Float(config.rmsNormEps))
    }

    public func ropeTable(_ positions: [[Int]]) -> RoPETable<Float> {
        RoPETable(positions: positions, config: config)
    }
}
