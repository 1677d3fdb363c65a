import Foundation
import MBQFormats
import MBQModel
import MBQTensor
import XCTest

final class CheckpointTests: XCTestCase {
    func smallSpec(_ layout: SyntheticModelSpec.Layout = .llava) -> SyntheticModelSpec {
        var s = SyntheticModelSpec()
        s.layout = layout
        s.hiddenSize = 32; s.intermediateSize = 64; s.layers = 2; s.heads = 4; s.kvHeads = 2; s.vocabSize = 40
        s.outlierChannels = [3]
        return s
    }

    func testShardedCheckpointLoadsLikeSingleFile() throws {
        let dir = TempDir()
        var one = smallSpec(), three = smallSpec()
        three.shards = 3
        try one.write(to: dir.file("one"))
        try three.write(to: dir.file("three"))
        let a = try Checkpoint(directory: dir.file("one")), b = try Checkpoint(directory: dir.file("three"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.file("three/model.safetensors.index.json")))
        XCTAssertEqual(a.allTensorNames, b.allTensorNames)
        XCTAssertEqual(a.names.base, "language_model.model.")
        for name in a.allTensorNames { XCTAssertEqual(try a.tensor(name).data, try b.tensor(name).data, name) }
        let block = try DecoderBlockWeights<Float>.load(from: b, layer: 1)
        XCTAssertEqual(block.k.shape, [16, 32])
        XCTAssertGreaterThan(b.blockBytes(0), 0)
        _ = one
    }

    func testEveryLayoutFindsItsTensors() throws {
        let dir = TempDir()
        for layout in SyntheticModelSpec.Layout.allCases {
            try smallSpec(layout).write(to: dir.file(layout.rawValue))
            let c = try Checkpoint(directory: dir.file(layout.rawValue))
            let m = try LanguageModel<Float>.load(c)
            XCTAssertEqual(m.blocks.count, 2)
            XCTAssertEqual(c.config.mropeSection != nil, layout == .qwen2vl)
            XCTAssertEqual(m.blocks[0].qBias != nil, layout != .llava)
        }
    }

    /// Rewrites one tensor of a written checkpoint.
    func replace(_ dir: String, _ name: String, with t: Tensor<Float>?, shape: [Int]? = nil) throws {
        let f = try SafetensorsFile(path: dir + "/model.safetensors")
        var w = SafetensorsWriter()
        for n in f.tensorNames where n != name || t != nil {
            if n == name { w.add(n, t!, as: .f32) } else { w.add(n, try f.floatTensor(n), as: f.entries[n]!.dtype) }
        }
        try w.write(to: dir + "/model.safetensors")
    }

    func testBadCheckpointsAreRefusedNamingTheTensor() throws {
        let dir = TempDir()
        let spec = smallSpec()
        let q1 = "language_model.model.layers.1.self_attn.q_proj.weight"
        // Missing tensor.
        try spec.write(to: dir.file("missing"))
        try replace(dir.file("missing"), q1, with: nil)
        let c1 = try Checkpoint(directory: dir.file("missing"))
        XCTAssertThrowsError(try DecoderBlockWeights<Float>.load(from: c1, layer: 1)) { e in
            XCTAssert("\(e)".contains("missing tensor '\(q1)'"), "\(e)")
        }
        // Wrong shape.
        try spec.write(to: dir.file("shape"))
        try replace(dir.file("shape"), q1, with: Tensor(zeros: [32, 31]))
        XCTAssertThrowsError(try DecoderBlockWeights<Float>.load(from: try Checkpoint(directory: dir.file("shape")), layer: 1)) { e in
            XCTAssert("\(e)".contains(q1) && "\(e)".contains("[32, 31]") && "\(e)".contains("expected [32, 32]"), "\(e)")
        }
        // NaN in a weight.
        try spec.write(to: dir.file("nan"))
        var bad = Tensor<Float>(zeros: [32, 32])
        bad.data[37] = .nan
        try replace(dir.file("nan"), q1, with: bad)
        XCTAssertThrowsError(try DecoderBlockWeights<Float>.load(from: try Checkpoint(directory: dir.file("nan")), layer: 1)) { e in
            XCTAssert("\(e)".contains(q1) && "\(e)".contains("NaN or Inf at flat index 37"), "\(e)")
        }
        // No decoder at all.
        try spec.write(to: dir.file("nodecoder"))
        try replace(dir.file("nodecoder"), "language_model.model.layers.0.input_layernorm.weight", with: nil)
        XCTAssertThrowsError(try Checkpoint(directory: dir.file("nodecoder"))) { e in
            XCTAssert("\(e)".contains("layers.0.input_layernorm.weight"), "\(e)")
        }
        // No safetensors.
        try FileManager.default.createDirectory(atPath: dir.file("empty"), withIntermediateDirectories: true)
        try Data(#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8}"#.utf8)
            .write(to: URL(fileURLWithPath: dir.file("empty/config.json")))
        XCTAssertThrowsError(try Checkpoint(directory: dir.file("empty"))) { e in XCTAssert("\(e)".contains("model.safetensors"), "\(e)") }
        // Missing config.
        XCTAssertThrowsError(try Checkpoint(directory: dir.file("nowhere"))) { e in XCTAssert("\(e)".contains("config.json"), "\(e)") }
        // Index that lists a tensor its shard lacks.
        var sharded = spec
        sharded.shards = 2
        try sharded.write(to: dir.file("index"))
        let indexPath = dir.file("index/model.safetensors.index.json")
        var index = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: indexPath))) as! [String: Any]
        var map = index["weight_map"] as! [String: String]
        map["ghost.weight"] = "model-00001-of-00002.safetensors"
        index["weight_map"] = map
        try JSONSerialization.data(withJSONObject: index).write(to: URL(fileURLWithPath: indexPath))
        XCTAssertThrowsError(try Checkpoint(directory: dir.file("index"))) { e in XCTAssert("\(e)".contains("ghost.weight"), "\(e)") }
    }

    func testTiedEmbeddingsUseEmbedTokens() throws {
        let dir = TempDir()
        let spec = smallSpec(.qwen2vl)
        try spec.write(to: dir.path)
        try replace(dir.path, "lm_head.weight", with: nil)
        XCTAssertThrowsError(try Checkpoint(directory: dir.path)) { e in XCTAssert("\(e)".contains("lm_head.weight"), "\(e)") }
        var cfg = spec.configJSON()
        var text = cfg["text_config"] as! [String: Any]
        text["tie_word_embeddings"] = true
        cfg["text_config"] = text
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: dir.file("config.json")))
        let c = try Checkpoint(directory: dir.path)
        XCTAssertNil(c.names.lmHead)
        XCTAssertEqual(c.names.outputProjection, "model.embed_tokens.weight")
        XCTAssertEqual(try LanguageModel<Float>.load(c).lmHead.shape, [40, 32])
    }
}
