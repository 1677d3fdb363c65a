import Foundation

/// RoPE settings as Hugging Face writes them: `rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5, which also moves `rope_theta` inside).
public struct RopeParameters: Codable, Sendable, Equatable {
    public var ropeType: String?
    public var type: String?
    public var ropeTheta: Double?
    public var mropeSection: [Int]?
    public var factor: Double?

    enum CodingKeys: String, CodingKey {
        case ropeType = "rope_type", type, ropeTheta = "rope_theta"
        case mropeSection = "mrope_section", factor
    }
}

/// The text (language-model) part of a config: a plain `llama`/`qwen2` config, a VLM's
/// `text_config`, or the top level of an older flat `qwen2_vl` config.
public struct HFTextConfig: Codable, Sendable {
    public var modelType: String?
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int?
    public var headDim: Int?
    public var rmsNormEps: Double?
    public var ropeTheta: Double?
    public var ropeScaling: RopeParameters?
    public var ropeParameters: RopeParameters?
    public var vocabSize: Int
    public var tieWordEmbeddings: Bool?
    public var attentionBias: Bool?
    public var mlpBias: Bool?
    public var hiddenAct: String?
    /// InternLM2: one switch for every projection's bias.
    public var bias: Bool?
    public var maxPositionEmbeddings: Int?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type", hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size", numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads", numKeyValueHeads = "num_key_value_heads"
        case headDim = "head_dim", rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta"
        case ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
        case vocabSize = "vocab_size", tieWordEmbeddings = "tie_word_embeddings"
        case attentionBias = "attention_bias", mlpBias = "mlp_bias", hiddenAct = "hidden_act"
        case bias, maxPositionEmbeddings = "max_position_embeddings"
    }
}

extension HFTextConfig {
    /// The RoPE settings in force: transformers 5's `rope_parameters`, else 4's
    /// `rope_scaling` (the one place either is read).
    public var rope: RopeParameters? { ropeParameters ?? ropeScaling }

    /// The rope type: `rope_type` (or the older `type`); "default" when neither is set.
    public var ropeType: String { rope?.ropeType ?? rope?.type ?? "default" }

    /// The rope type, when `family` runs it (one of `supported`); else a config error.
    public func ropeType(supported: [String], family: ModelFamily, path: String) throws -> String {
        let type = ropeType
        guard supported.contains(type) else {
            throw FormatsError.invalidConfig(path: path, reason: "rope type '\(type)' is not supported for \(family.rawValue) (\(supported.joined(separator: ", ")))")
        }
        return type
    }
}

/// The top level of `config.json`, just enough to find the language model.
public struct HFModelConfig: Codable, Sendable {
    public var modelType: String
    public var textConfig: HFTextConfig?
    /// InternVL2 as released (`internvl_chat`) puts the language model here.
    public var llmConfig: HFTextConfig?
    public var tieWordEmbeddings: Bool?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type", textConfig = "text_config", llmConfig = "llm_config"
        case tieWordEmbeddings = "tie_word_embeddings"
    }
}

/// Decoder-block families the engine runs.
public enum ModelFamily: String, Sendable {
    case llama, qwen2, qwen2VL = "qwen2_vl", internLM2 = "internlm2"

    /// Top-level `model_type`s the tool accepts.
    public static let supportedTypes = ["llava", "llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl_chat", "internvl",
                                        "llama", "qwen2"]
}

/// The language model's shape and numerics, resolved from whatever config layout the
/// checkpoint uses. Everything the blocks need and nothing else.
public struct LanguageModelConfig: Sendable, Equatable {
    public var family: ModelFamily
    public var modelType: String
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numLayers: Int
    public var numHeads: Int
    public var numKVHeads: Int
    public var headDim: Int
    public var rmsNormEps: Double
    public var ropeTheta: Double
    /// Qwen2-VL M-RoPE: how many of the head_dim/2 frequencies follow the temporal,
    /// height and width position rows. nil = ordinary 1-D RoPE.
    public var mropeSection: [Int]?
    public var vocabSize: Int
    public var tieWordEmbeddings: Bool
    public var qkvBias: Bool
    public var oBias: Bool
    /// Dynamic NTK RoPE scaling (InternLM2) changes the frequencies of sequences longer
    /// than this; shorter ones compute as unscaled RoPE. nil: no such limit.
    public var unscaledRoPETokens: Int?

    public init(family: ModelFamily, modelType: String, hiddenSize: Int, intermediateSize: Int,
                numLayers: Int, numHeads: Int, numKVHeads: Int, headDim: Int, rmsNormEps: Double,
                ropeTheta: Double, mropeSection: [Int]?, vocabSize: Int, tieWordEmbeddings: Bool,
                qkvBias: Bool, oBias: Bool, unscaledRoPETokens: Int? = nil) {
        self.family = family; self.modelType = modelType; self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize; self.numLayers = numLayers
        self.numHeads = numHeads; self.numKVHeads = numKVHeads; self.headDim = headDim
        self.rmsNormEps = rmsNormEps; self.ropeTheta = ropeTheta; self.mropeSection = mropeSection
        self.vocabSize = vocabSize; self.tieWordEmbeddings = tieWordEmbeddings
        self.qkvBias = qkvBias; self.oBias = oBias; self.unscaledRoPETokens = unscaledRoPETokens
    }

    /// Reads `config.json` and resolves the language model's settings.
    public static func load(configPath path: String) throws -> LanguageModelConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FormatsError.unreadable(path: path, reason: "no such file or not readable")
        }
        return try parse(data, path: path)
    }

    public static func parse(_ data: Data, path: String) throws -> LanguageModelConfig {
        let top: HFModelConfig
        do {
            top = try JSONDecoder().decode(HFModelConfig.self, from: data)
        } catch {
            throw FormatsError.invalidConfig(path: path, reason: describe(error))
        }
        guard ModelFamily.supportedTypes.contains(top.modelType) else {
            throw FormatsError.unsupportedModelType(path: path, modelType: top.modelType)
        }
        let text: HFTextConfig
        if let t = top.textConfig ?? top.llmConfig {
            text = t
        } else if ["qwen2_vl", "qwen2_5_vl", "llama", "qwen2"].contains(top.modelType) {
            do {
                text = try JSONDecoder().decode(HFTextConfig.self, from: data)
            } catch {
                throw FormatsError.invalidConfig(path: path, reason: describe(error))
            }
        } else {
            throw FormatsError.invalidConfig(path: path, reason: "model_type '\(top.modelType)' needs a text_config")
        }
        let textType = text.modelType ?? top.modelType
        guard let arch = DecoderArchitectures.forTextType(textType) else {
            throw FormatsError.invalidConfig(path: path,
                reason: "text model_type '\(textType)' is not supported (\(DecoderArchitectures.textModelTypes.joined(separator: ", ")))")
        }
        if let act = text.hiddenAct, act != "silu" {
            throw FormatsError.invalidConfig(path: path, reason: "hidden_act '\(act)' is not supported (silu)")
        }
        if text.mlpBias == true {
            throw FormatsError.invalidConfig(path: path, reason: "mlp_bias = true is not supported")
        }
        let heads = text.numAttentionHeads
        let kv = text.numKeyValueHeads ?? heads
        guard text.hiddenSize > 0, text.intermediateSize > 0, text.numHiddenLayers > 0, heads > 0, kv > 0,
              text.vocabSize > 0 else {
            throw FormatsError.invalidConfig(path: path, reason: "sizes must be positive")
        }
        guard heads % kv == 0 else {
            throw FormatsError.invalidConfig(path: path,
                reason: "num_attention_heads \(heads) is not a multiple of num_key_value_heads \(kv)")
        }
        let headDim = text.headDim ?? text.hiddenSize / heads
        guard headDim > 0, headDim % 2 == 0 else {
            throw FormatsError.invalidConfig(path: path, reason: "head_dim \(headDim) must be positive and even")
        }
        let mrope = try arch.mropeSection(text, headDim: headDim, path: path)
        let theta = text.ropeParameters?.ropeTheta ?? text.ropeTheta ?? text.rope?.ropeTheta ?? 10000
        let eps = text.rmsNormEps ?? 1e-6
        let (qkvBias, oBias) = try arch.biases(text, path: path)
        return LanguageModelConfig(
            family: arch.family, modelType: top.modelType, hiddenSize: text.hiddenSize,
            intermediateSize: text.intermediateSize, numLayers: text.numHiddenLayers,
            numHeads: heads, numKVHeads: kv, headDim: headDim, rmsNormEps: eps, ropeTheta: theta,
            mropeSection: mrope, vocabSize: text.vocabSize,
            // Either level may tie the output to the embeddings: transformers' InternVL
            // ties from the top-level flag (true by default) while its text_config says false.
            tieWordEmbeddings: (text.tieWordEmbeddings ?? false) || (top.tieWordEmbeddings ?? false),
            qkvBias: qkvBias, oBias: oBias, unscaledRoPETokens: try arch.unscaledRoPETokens(text, path: path))
    }

    static func describe(_ error: Error) -> String {
        switch error {
        case let DecodingError.keyNotFound(key, ctx):
            return "missing field '\((ctx.codingPath + [key]).map(\.stringValue).joined(separator: "."))'"
        case let DecodingError.typeMismatch(_, ctx), let DecodingError.valueNotFound(_, ctx):
            return "field '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))': \(ctx.debugDescription)"
        case let DecodingError.dataCorrupted(ctx):
            return "not valid JSON: \(ctx.debugDescription)"
        default:
            return "\(error)"
        }
    }
}
