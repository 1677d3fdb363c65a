/// One decoder family: what the tool knows about how its checkpoints configure, name
/// and shape a decoder block (docs/DESIGN.md §4.1). Every other part asks the family
/// through `LanguageModelConfig.architecture`; adding a family is one file conforming to
/// this (plus its entry in `DecoderArchitectures.all` and in the calibration exporter).
public protocol DecoderArchitecture: Sendable {
    static var family: ModelFamily { get }
    /// The text `model_type`s this family decodes.
    static var textModelTypes: [String] { get }
    /// Which projections carry a bias, from the text config; throws for biases the
    /// family's block does not take.
    static func biases(_ text: HFTextConfig, path: String) throws -> (qkv: Bool, o: Bool)
    /// See `LanguageModelConfig.unscaledRoPETokens`.
    static func unscaledRoPETokens(_ text: HFTextConfig, path: String) throws -> Int?
    /// The M-RoPE sections (nil: 1-D RoPE). Throws for a rope type the family does not run.
    static func mropeSection(_ text: HFTextConfig, headDim: Int, path: String) throws -> [Int]?
    /// How the tensors around the blocks are named (embeddings, final norm, output).
    static var naming: DecoderNaming { get }
    /// The checkpoint names of decoder block `layer` (`names` holds the decoder's prefix),
    /// with how its linears are stored (one tensor each, or fused).
    static func blockNames(_ names: LanguageModelTensorNames, layer: Int, config: LanguageModelConfig) -> BlockTensorNames
}

extension DecoderArchitecture {
    /// The Hugging Face Llama layout (`self_attn.q_proj`, `mlp.gate_proj`, ...), which
    /// Llama, Qwen2 and Qwen2-VL share.
    public static func blockNames(_ names: LanguageModelTensorNames, layer: Int, config: LanguageModelConfig) -> BlockTensorNames {
        names.block(layer, config: config)
    }

    public static var naming: DecoderNaming { .huggingFace }

    public static func unscaledRoPETokens(_ text: HFTextConfig, path: String) throws -> Int? { nil }

    /// 1-D RoPE: only the default rope type.
    public static func defaultRoPE(_ text: HFTextConfig, path: String) throws -> [Int]? {
        _ = try text.ropeType(supported: ["default"], family: family, path: path)
        return nil
    }
}

/// Every family the engine runs.
public enum DecoderArchitectures {
    public static let all: [any DecoderArchitecture.Type] = [LlamaArchitecture.self, Qwen2Architecture.self, Qwen2VLArchitecture.self,
                                                             InternLM2Architecture.self]

    public static func forTextType(_ type: String) -> (any DecoderArchitecture.Type)? {
        all.first { $0.textModelTypes.contains(type) }
    }

    public static func forFamily(_ family: ModelFamily) -> any DecoderArchitecture.Type {
        all.first { $0.family == family }!
    }

    public static var textModelTypes: [String] { all.flatMap { $0.textModelTypes } }
}

extension LanguageModelConfig {
    public var architecture: any DecoderArchitecture.Type { DecoderArchitectures.forFamily(family) }

    /// The seven linears of a block, [out, in] each, by role.
    public var linearShapes: [(role: String, shape: [Int])] {
        let c = hiddenSize, i = intermediateSize, q = numHeads * headDim, kv = numKVHeads * headDim
        return [("q", [q, c]), ("k", [kv, c]), ("v", [kv, c]), ("o", [c, q]), ("gate", [i, c]), ("up", [i, c]), ("down", [c, i])]
    }
}
