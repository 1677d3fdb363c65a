/// InternLM2, the language model of InternVL2-2B, -8B and -26B as released
/// (`internvl_chat`, text under `llm_config`, tensors under `language_model.`).
/// Its block computes as Llama's; it stores q, k and v fused in `attention.wqkv`, laid
/// out per KV head as [kv_heads, groups + 2, head_dim, hidden]: that KV head's `groups`
/// query heads, then its key head, then its value head (InternLM2's
/// modeling_internlm2.py, `InternLM2Attention.forward`). The MLP is `feed_forward.w1`
/// (gate), `w3` (up), `w2` (down).
public enum InternLM2Architecture: DecoderArchitecture {
    public static let family = ModelFamily.internLM2
    public static let textModelTypes = ["internlm2"]

    public static let naming = DecoderNaming(inputNorm: "attention_norm.weight", embedTokens: "tok_embeddings.weight",
                                             finalNorm: "norm.weight", lmHeads: ["language_model.output.weight", "output.weight"])

    public static func biases(_ text: HFTextConfig, path: String) throws -> (qkv: Bool, o: Bool) {
        // No released InternVL2 checkpoint sets `bias`; a fused wqkv bias would need its
        // own split.
        if text.bias == true {
            throw FormatsError.invalidConfig(path: path, reason: "internlm2 with bias = true is not supported (wqkv/wo biases)")
        }
        return (false, false)
    }

    public static func mropeSection(_ text: HFTextConfig, headDim: Int, path: String) throws -> [Int]? {
        _ = try text.ropeType(supported: ["default", "dynamic"], family: family, path: path)
        return nil
    }

    /// Dynamic NTK scaling leaves sequences up to max_position_embeddings unscaled.
    public static func unscaledRoPETokens(_ text: HFTextConfig, path: String) throws -> Int? {
        guard text.ropeType == "dynamic" else { return nil }
        guard let limit = text.maxPositionEmbeddings, limit > 0 else {
            throw FormatsError.invalidConfig(path: path, reason: "dynamic rope scaling needs max_position_embeddings")
        }
        return limit
    }

    public static func blockNames(_ names: LanguageModelTensorNames, layer: Int, config: LanguageModelConfig) -> BlockTensorNames {
        let p = names.layer(layer)
        let d = config.headDim, kv = config.numKVHeads, groups = config.numHeads / config.numKVHeads
        var qkv: [StoredLinear.Piece] = []
        for h in 0..<kv {
            qkv.append(.init(role: "q", rows: h * groups * d..<(h + 1) * groups * d))
            qkv.append(.init(role: "k", rows: h * d..<(h + 1) * d))
            qkv.append(.init(role: "v", rows: h * d..<(h + 1) * d))
        }
        let shapes = Dictionary(uniqueKeysWithValues: config.linearShapes.map { ($0.role, $0.shape) })
        return BlockTensorNames(
            inputNorm: p + "attention_norm.weight", postAttentionNorm: p + "ffn_norm.weight",
            linears: [StoredLinear(name: p + "attention.wqkv.weight", pieces: qkv),
                      StoredLinear(name: p + "attention.wo.weight", role: "o", rows: shapes["o"]![0]),
                      StoredLinear(name: p + "feed_forward.w1.weight", role: "gate", rows: shapes["gate"]![0]),
                      StoredLinear(name: p + "feed_forward.w3.weight", role: "up", rows: shapes["up"]![0]),
                      StoredLinear(name: p + "feed_forward.w2.weight", role: "down", rows: shapes["down"]![0])],
            qBias: nil, kBias: nil, vBias: nil, oBias: nil)
    }
}
