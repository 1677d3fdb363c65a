import MBQFormats

/// How a process's memory budget is spent (docs/DESIGN.md §1), written once for the
/// one-process job (`mbq quantize`), the workers (`Worker.assign`) and the planner
/// (`MemoryNeeds`): the held weights and a fixed working part come first; of what they
/// leave ("free"), the search's chunk takes a quarter (or `--chunk-tokens`), and the
/// block inputs kept for the gradient pass get the rest.
public enum MemoryBudget {
    /// The search's chunk and the block inputs' share of `free`.
    public struct Split: Sendable, Equatable {
        /// Tokens the search holds captures for at a time (whole samples, at least the longest).
        public var chunkTokens: Int
        public var chunkBytes: Double
        /// What is left for block inputs kept in memory (past it they spill or are recomputed).
        public var inputBytes: Double
    }

    /// `free`: the budget less weights and working set. `inMemoryInputs`: block inputs
    /// that stay in memory whatever the split (two layers' for every sample on a worker
    /// with nothing to spill to, else 0); the default chunk is a quarter of what they
    /// leave. `chunkTokens`: the user's chunk, if any; `longest`: the longest sample.
    public static func split(free: Double, inMemoryInputs: Double = 0, chunkTokens: Int?, longest: Int,
                             bytesPerToken: Double) -> Split {
        let quarter = bytesPerToken > 0 ? Swift.max(0, free - inMemoryInputs) / 4 / bytesPerToken : 0
        let tokens = Swift.max(longest, chunkTokens ?? Int(Swift.min(quarter, Double(Int32.max))))
        let bytes = Double(tokens) * bytesPerToken
        return Split(chunkTokens: tokens, chunkBytes: bytes, inputBytes: Swift.max(0, free - bytes))
    }

    /// Bytes per token of a search chunk: the captured inputs of q/k/v, o, gate/up and
    /// down and the attention and MLP outputs ((5 C + I) floats), plus one group's rows
    /// gathered for its GEMMs and their output (C + I floats at most).
    public static func searchBytesPerToken(hidden: Int, intermediate: Int) -> Double {
        Double(6 * hidden + 2 * intermediate) * 4
    }

    public static func searchBytesPerToken(_ cfg: LanguageModelConfig) -> Double {
        searchBytesPerToken(hidden: cfg.hiddenSize, intermediate: cfg.intermediateSize)
    }

    /// Bytes per weight a worker holds a checkpoint's blocks in: its CPU backend keeps a
    /// bf16 checkpoint's linears as bf16 (`CPUBackend(keepStoredPrecision:)`); fp16
    /// values are generally not bf16 values, so anything else is held in fp32.
    public static func heldWeightBytes(stored: DType) -> Int { stored == .bf16 ? 2 : 4 }

    /// The fp32 copies of the layer being worked on: widened from storage, scaled,
    /// quantized (the apply step holds all three at once).
    public static func layerWorkingBytes(params: Double) -> Double { 3 * params * 4 }

    /// Head weights plus one sample's largest intermediates through one block (q/k/v/o,
    /// MLP and the saved attention probabilities).
    public static func headAndActivations(hidden: Int, intermediate: Int, heads: Int, vocab: Int, tokens: Int) -> Double {
        let t = Double(tokens)
        let head = Double(vocab * hidden + hidden) * 4 + t * Double(vocab) * 4 * 2
        let working = t * Double(8 * hidden + 4 * intermediate) * 4 + Double(heads) * t * t * 4
        return head + working
    }

    /// What one process needs besides its held weights and the block inputs: the head,
    /// one sample's working set at `tokens`, one layer's fp32 working copies.
    public static func working(_ cfg: LanguageModelConfig, tokens: Int) -> Double {
        let params = cfg.linearShapes.reduce(0.0) { $0 + Double($1.shape[0] * $1.shape[1]) }
        return headAndActivations(hidden: cfg.hiddenSize, intermediate: cfg.intermediateSize, heads: cfg.numHeads,
                                  vocab: cfg.vocabSize, tokens: tokens) + layerWorkingBytes(params: params)
    }

    /// GPTQ's share: one layer's Hessians and factorization while it is rounded, and the
    /// codes (a byte per weight) of `heldLayers` layers kept until the apply phase (a
    /// worker's; the one-process job writes each layer as it goes: 0).
    public static func gptqBytes(_ cfg: LanguageModelConfig, options o: QuantizeOptions, heldLayers: Int = 0) -> Double {
        guard o.usesGPTQ else { return 0 }
        let codes = heldLayers * cfg.linearShapes.reduce(0) { $0 + $1.shape[0] * $1.shape[1] }
        return Double(LayerHessians.predictedBytes(cfg, perLinear: o.hessianWeights == .gradient) + codes)
    }
}
