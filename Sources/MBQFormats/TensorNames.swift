/// Where the language model's tensors live in a checkpoint. VLM wrappers put the same
/// Llama/Qwen2 decoder under different prefixes depending on the family and on the
/// transformers version that saved them; this is the one place that knows them.
public struct LanguageModelTensorNames: Sendable, Equatable {
    /// Prefix of the decoder, e.g. "language_model.model." — layers are "\(base)layers.N."
    public let base: String
    /// The output projection, or nil when the embeddings are tied to it.
    public let lmHead: String?

    /// Decoder prefixes in the order they are tried.
    /// - `language_model.model.`  LLaVA / LLaVA-OneVision saved by transformers < 4.52
    /// - `model.language_model.`  the same families saved by transformers >= 4.52
    /// - `model.`                  Llama, Qwen2, Qwen2-VL (classic names)
    /// - `language_model.`         transformers >= 4.52 base-model checkpoints
    public static let decoderPrefixes = ["language_model.model.", "model.language_model.", "model.", "language_model.", ""]
    public static let lmHeadNames = ["lm_head.weight", "language_model.lm_head.weight"]

    /// Finds the prefix from the tensor list: the first candidate that has layer 0's
    /// `input_layernorm` (vision towers name their norms differently, so a CLIP or
    /// SigLIP encoder's `layers.0.` is never taken for the decoder).
    public static func detect(in names: Set<String>, tied: Bool, place: String) throws -> LanguageModelTensorNames {
        guard let base = decoderPrefixes.first(where: { names.contains("\($0)layers.0.input_layernorm.weight") }) else {
            throw FormatsError.missingTensor(name: "layers.0.input_layernorm.weight (under any of \(decoderPrefixes.filter { !$0.isEmpty }))", in: place)
        }
        let head = lmHeadNames.first { names.contains($0) }
        if head == nil && !tied {
            throw FormatsError.missingTensor(name: "lm_head.weight (and tie_word_embeddings is false)", in: place)
        }
        return LanguageModelTensorNames(base: base, lmHead: head)
    }

    public var embedTokens: String { "\(base)embed_tokens.weight" }
    public var finalNorm: String { "\(base)norm.weight" }
    /// lm_head, or the embedding matrix when tied.
    public var outputProjection: String { lmHead ?? embedTokens }

    public func layer(_ i: Int) -> String { "\(base)layers.\(i)." }

    /// The tensors of decoder block `i`, by role.
    public func block(_ i: Int, qkvBias: Bool, oBias: Bool) -> BlockTensorNames {
        let p = layer(i)
        return BlockTensorNames(
            inputNorm: p + "input_layernorm.weight",
            postAttentionNorm: p + "post_attention_layernorm.weight",
            q: p + "self_attn.q_proj.weight", k: p + "self_attn.k_proj.weight",
            v: p + "self_attn.v_proj.weight", o: p + "self_attn.o_proj.weight",
            qBias: qkvBias ? p + "self_attn.q_proj.bias" : nil,
            kBias: qkvBias ? p + "self_attn.k_proj.bias" : nil,
            vBias: qkvBias ? p + "self_attn.v_proj.bias" : nil,
            oBias: oBias ? p + "self_attn.o_proj.bias" : nil,
            gate: p + "mlp.gate_proj.weight", up: p + "mlp.up_proj.weight",
            down: p + "mlp.down_proj.weight")
    }
}

/// Checkpoint names of one decoder block's tensors.
public struct BlockTensorNames: Sendable, Equatable {
    public let inputNorm, postAttentionNorm, q, k, v, o: String
    public let qBias, kBias, vBias, oBias: String?
    public let gate, up, down: String

    /// The linear layers' weights by role, in the order the formats list them.
    public var linears: [(role: String, name: String)] {
        [("q", q), ("k", k), ("v", v), ("o", o), ("gate", gate), ("up", up), ("down", down)]
    }

    public var all: [String] {
        [inputNorm, postAttentionNorm, q, k, v, o, gate, up, down] + [qBias, kBias, vBias, oBias].compactMap { $0 }
    }
}
