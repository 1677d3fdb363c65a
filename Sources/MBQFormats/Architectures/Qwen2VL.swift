/// Qwen2-VL's and Qwen2.5-VL's language model: Qwen2's block with M-RoPE (temporal,
/// height and width position rows over `mrope_section` frequency bands; transformers'
/// default [16, 24, 24]). Qwen2.5-VL differs in its vision tower and in the position ids
/// its processor computes, which the calibration bundle carries.
public enum Qwen2VLArchitecture: DecoderArchitecture {
    public static let family = ModelFamily.qwen2VL
    public static let textModelTypes = ["qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"]

    public static func biases(_ text: HFTextConfig, path: String) -> (qkv: Bool, o: Bool) { (true, false) }

    public static func mropeSection(_ text: HFTextConfig, headDim: Int, path: String) throws -> [Int]? {
        let m = text.rope?.mropeSection ?? [16, 24, 24]
        guard m.count == 3, m.reduce(0, +) == headDim / 2 else {
            throw FormatsError.invalidConfig(path: path, reason: "mrope_section \(m) must have 3 entries summing to head_dim/2 = \(headDim / 2)")
        }
        return m
    }
}
