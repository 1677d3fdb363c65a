/// Llama text models (LLaVA-1.5's language model; InternVL2-40B/76B's later): optional
/// q/k/v/o bias (`attention_bias`), 1-D RoPE.
public enum LlamaArchitecture: DecoderArchitecture {
    public static let family = ModelFamily.llama
    public static let textModelTypes = ["llama"]

    public static func biases(_ text: HFTextConfig, path: String) -> (qkv: Bool, o: Bool) {
        (text.attentionBias ?? false, text.attentionBias ?? false)
    }

    public static func mropeSection(_ text: HFTextConfig, headDim: Int, path: String) throws -> [Int]? {
        try defaultRoPE(text, path: path)
    }
}
