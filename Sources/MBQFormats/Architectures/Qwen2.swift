/// Qwen2 text models (LLaVA-OneVision's language model): q/k/v bias, no o bias, 1-D RoPE.
public enum Qwen2Architecture: DecoderArchitecture {
    public static let family = ModelFamily.qwen2
    public static let textModelTypes = ["qwen2"]

    public static func biases(_ text: HFTextConfig, path: String) -> (qkv: Bool, o: Bool) { (true, false) }

    public static func mropeSection(_ text: HFTextConfig, headDim: Int, path: String) throws -> [Int]? {
        try defaultRoPE(text, path: path)
    }
}
