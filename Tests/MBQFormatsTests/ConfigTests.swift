import Foundation
import MBQFormats
import XCTest

final class ConfigTests: XCTestCase {
    func parse(_ json: String) throws -> LanguageModelConfig {
        try LanguageModelConfig.parse(Data(json.utf8), path: "/m/config.json")
    }

    let llamaText = #""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100"#

    func testPlainLlama() throws {
        let c = try parse(#"{"model_type": "llama", \#(llamaText), "rms_norm_eps": 1e-5, "rope_theta": 500000.0}"#)
        XCTAssertEqual(c.family, .llama)
        XCTAssertEqual(c.numKVHeads, 4, "kv heads default to heads")
        XCTAssertEqual(c.headDim, 16)
        XCTAssertEqual(c.rmsNormEps, 1e-5)
        XCTAssertEqual(c.ropeTheta, 500000)
        XCTAssertFalse(c.qkvBias)
    }

    func testLlavaWrapperWithTransformers4RopeScalingAndAttentionBias() throws {
        let c = try parse(#"{"model_type": "llava", "text_config": {"model_type": "llama", \#(llamaText), "num_key_value_heads": 2, "attention_bias": true, "tie_word_embeddings": true}}"#)
        XCTAssertEqual(c.numKVHeads, 2)
        XCTAssertTrue(c.qkvBias && c.oBias)
        XCTAssertTrue(c.tieWordEmbeddings)
        XCTAssertEqual(c.ropeTheta, 10000)
    }

    func testLegacyFlatQwen2VLConfig() throws {
        // The layout of Qwen/Qwen2-VL-7B-Instruct's config.json (transformers 4).
        let c = try parse(#"{"model_type": "qwen2_vl", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "tie_word_embeddings": true, "vision_config": {"depth": 32}}"#)
        XCTAssertEqual(c.family, .qwen2VL)
        XCTAssertEqual(c.mropeSection, [4, 6, 6])
        XCTAssertEqual(c.ropeTheta, 1_000_000)
        XCTAssertTrue(c.qkvBias)
        XCTAssertFalse(c.oBias)
        XCTAssertTrue(c.tieWordEmbeddings)
    }

    func testTransformers5RopeParameters() throws {
        let c = try parse(#"{"model_type": "llava_onevision", "text_config": {"model_type": "qwen2", \#(llamaText), "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}}"#)
        XCTAssertEqual(c.family, .qwen2)
        XCTAssertEqual(c.ropeTheta, 1_000_000)
    }

    func testRefusals() {
        let cases: [(String, String)] = [
            (#"{"model_type": "mamba", \#(llamaText)}"#, "unsupported model_type 'mamba'"),
            (#"{"model_type": "llava", "text_config": {"model_type": "mistral", \#(llamaText)}}"#, "text model_type 'mistral'"),
            (#"{"model_type": "llava"}"#, "needs a text_config"),
            (#"{"model_type": "llama", "hidden_size": 64}"#, "missing field 'intermediate_size'"),
            (#"{"model_type": "llama", \#(llamaText), "num_key_value_heads": 3}"#, "not a multiple"),
            (#"{"model_type": "llama", \#(llamaText), "hidden_act": "gelu"}"#, "hidden_act 'gelu'"),
            (#"{"model_type": "llama", \#(llamaText), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#, "rope type 'yarn'"),
            (#"{"model_type": "qwen2_vl", \#(llamaText), "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}}"#, "mrope_section"),
            (#"{"model_type": "llama", "hidden_size": "big"}"#, "hidden_size"),
            ("not json", "not valid JSON"),
        ]
        for (json, needle) in cases {
            XCTAssertThrowsError(try parse(json), needle) { e in
                let msg = "\(e)"
                XCTAssert(msg.contains("/m/config.json") && msg.contains(needle), "expected '\(needle)' in: \(msg)")
            }
        }
    }
}
