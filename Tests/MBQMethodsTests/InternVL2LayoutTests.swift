import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import XCTest

/// InternVL2 as released (`internvl_chat`, InternLM2 text with `attention.wqkv` fused per
/// KV head): the LLaVA-1.5 fixture (Llama text, 4 heads over 2 KV heads) re-laid out as
/// InternVL2 must quantize to the same grid points and, once split, the same weights as
/// the original, in every output format, with the fused tensors re-fused in their layout.
final class InternVL2LayoutTests: XCTestCase {
    static let fixtures = MethodsTests.fixtures

    /// Writes `source` (a LLaVA-1.5 checkpoint) as InternVL2: names, fused wqkv, config.
    /// The fused layout is written here from InternLM2's modeling code, independently of
    /// the engine's `StoredLinear`: rows [kv_heads, groups + 2, head_dim] of [.., hidden].
    static func relayout(_ source: Checkpoint, to dir: String) throws {
        let cfg = source.config
        let base = source.names.base, d = cfg.headDim, kv = cfg.numKVHeads, groups = cfg.numHeads / cfg.numKVHeads
        let c = cfg.hiddenSize
        var w = SafetensorsWriter()
        func copy(_ from: String, _ to: String) throws {
            w.add(to, try source.tensor(from), as: try source.entry(from).entry.dtype)
        }
        for l in 0..<cfg.numLayers {
            let p = base + "layers.\(l).", n = "language_model.model.layers.\(l)."
            try copy(p + "input_layernorm.weight", n + "attention_norm.weight")
            try copy(p + "post_attention_layernorm.weight", n + "ffn_norm.weight")
            try copy(p + "self_attn.o_proj.weight", n + "attention.wo.weight")
            try copy(p + "mlp.gate_proj.weight", n + "feed_forward.w1.weight")
            try copy(p + "mlp.up_proj.weight", n + "feed_forward.w3.weight")
            try copy(p + "mlp.down_proj.weight", n + "feed_forward.w2.weight")
            let q = try source.tensor(p + "self_attn.q_proj.weight"), k = try source.tensor(p + "self_attn.k_proj.weight")
            let v = try source.tensor(p + "self_attn.v_proj.weight")
            var fused: [Float] = []
            let head = d * c  // values per head
            for h in 0..<kv {
                for g in 0..<groups {
                    let qh = h * groups + g
                    fused += q.data[qh * head..<(qh + 1) * head]
                }
                fused += k.data[h * head..<(h + 1) * head]
                fused += v.data[h * head..<(h + 1) * head]
            }
            w.add(n + "attention.wqkv.weight", Tensor(shape: [(cfg.numHeads + 2 * kv) * d, c], data: fused),
                  as: try source.entry(p + "self_attn.q_proj.weight").entry.dtype)
        }
        try copy(base + "embed_tokens.weight", "language_model.model.tok_embeddings.weight")
        try copy(base + "norm.weight", "language_model.model.norm.weight")
        try copy(source.names.lmHead!, "language_model.output.weight")
        for name in source.allTensorNames where !name.hasPrefix(base) && name != source.names.lmHead {
            try copy(name, (name.contains("projector") ? "mlp1." : "vision_model.") + name.split(separator: ".").dropFirst(1).joined(separator: "."))
        }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        w.sortByName()
        try Data(try w.serialized(metadata: ["format": "pt"])).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        let config = """
        {
          "architectures": ["InternVLChatModel"],
          "model_type": "internvl_chat",
          "downsample_ratio": 0.5,
          "template": "internlm2-chat",
          "llm_config": {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "bias": false,
            "hidden_act": "silu",
            "hidden_size": \(c),
            "intermediate_size": \(cfg.intermediateSize),
            "max_position_embeddings": 256,
            "num_attention_heads": \(cfg.numHeads),
            "num_hidden_layers": \(cfg.numLayers),
            "num_key_value_heads": \(kv),
            "rms_norm_eps": \(cfg.rmsNormEps),
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "rope_theta": \(cfg.ropeTheta),
            "tie_word_embeddings": false,
            "vocab_size": \(cfg.vocabSize)
          },
          "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 32}
        }
        """
        try config.write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
    }

    func testLLaVARelaidOutAsInternVL2QuantizesToTheSameGridPointsAndWeights() throws {
        let llava = try Checkpoint(directory: Self.fixtures + "/llava15/model")
        let dir = NSTemporaryDirectory() + "mbq-internvl2-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.relayout(llava, to: dir + "/model")
        let intern = try Checkpoint(directory: dir + "/model")
        XCTAssertEqual(intern.config.family, .internLM2)
        XCTAssertEqual(intern.config.modelType, "internvl_chat")
        XCTAssertEqual(intern.names.base, "language_model.model.")
        XCTAssertEqual(intern.names.outputProjection, "language_model.output.weight")
        XCTAssertEqual(try intern.nonDecoderModules(), ["lm_head", "mlp1", "output", "vision_model"])
        let bundle = try CalibrationBundle.load(path: Self.fixtures + "/llava15/calib.safetensors", for: intern.config)
        let samples = Array(bundle.samples.prefix(3))
        let (ml, mi) = (try LanguageModel<Float>.load(llava), try LanguageModel<Float>.load(intern))
        for l in 0..<ml.blocks.count {
            for (role, path) in ApplyScales.linears {
                XCTAssertEqual(mi.blocks[l][keyPath: path].data, ml.blocks[l][keyPath: path].data, "layer \(l) \(role) split from wqkv")
            }
        }

        for (method, wBit, aBit, format) in [(QuantMethod.mbq, 3, Int?.none, CheckpointFormat.gptq), (.awq, 4, nil, .awq),
                                             (.mbq, 4, 8, .compressedTensors), (.mbq, 3, nil, .fake)] {
            var outs: [String] = [], runs: [QuantizeResult] = []
            for (name, ckpt, model) in [("llava", llava, ml), ("internvl2", intern, mi)] {
                var o = QuantizeOptions()
                o.method = method; o.wBit = wBit; o.aBit = aBit; o.format = format; o.weightDType = ckpt.weightDType
                let r = try QuantizeJob.run(model: model, samples: samples, options: o)
                let out = dir + "/\(name)-\(method)-w\(wBit)\(aBit.map { "a\($0)" } ?? "")-\(format.rawValue)"
                try QuantizedCheckpointWriter.write(source: ckpt, result: r, to: out, overwrite: false) { _ in }
                outs.append(out); runs.append(r)
            }
            let what = "\(method) w\(wBit) a\(aBit.map(String.init) ?? "-") \(format.rawValue)"
            XCTAssertEqual(runs[0].groups.map(\.bestIndex), runs[1].groups.map(\.bestIndex), "\(what): grid points")
            XCTAssertEqual(runs[0].groups.map(\.scales), runs[1].groups.map(\.scales), "\(what): scales")
            XCTAssertFalse(runs[0].groups.isEmpty)
            // Read back through each output's own layout: the same weights once split.
            let (ql, qi) = (try Checkpoint(directory: outs[0]), try Checkpoint(directory: outs[1]))
            XCTAssertEqual(qi.config.modelType, "internvl_chat")
            XCTAssertTrue(qi.contains("language_model.model.layers.0.attention.wqkv." + (format == .fake ? "weight" : format == .compressedTensors ? "weight_packed" : "qweight")),
                          "\(what): \(qi.allTensorNames.filter { $0.contains("layers.0.attention") })")
            let (bl, bi) = (try LanguageModel<Float>.load(ql), try LanguageModel<Float>.load(qi))
            for l in 0..<bl.blocks.count {
                for (role, path) in ApplyScales.linears {
                    let a = bl.blocks[l][keyPath: path].data, b = bi.blocks[l][keyPath: path].data
                    XCTAssertEqual(a, b, "\(what): layer \(l) \(role), max abs diff \(zip(a, b).map { abs($0 - $1) }.max() ?? 0)")
                }
            }
            let (el, ei) = (try Evaluate.run(model: bl, actBits: aBit, samples: samples), try Evaluate.run(model: bi, actBits: aBit, samples: samples))
            XCTAssertEqual(el.captionCE, ei.captionCE, "\(what): caption loss")
            // The output config keeps what the input had, quantization_config added.
            let config = try String(contentsOfFile: outs[1] + "/config.json", encoding: .utf8)
            let input = try String(contentsOfFile: dir + "/model/config.json", encoding: .utf8)
            if format != .fake {
                XCTAssertTrue(config.hasPrefix(String(input.dropLast(2))), "\(what): config.json not kept as it was:\n\(config)")
                XCTAssertTrue(config.contains("\"quantization_config\""))
            }
        }
    }

    func testInternLM2ConfigErrorsNameWhatIsWrong() throws {
        let dir = NSTemporaryDirectory() + "mbq-internlm2-cfg-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        func parse(_ llm: String) throws -> LanguageModelConfig {
            let text = """
            {"model_type": "internvl_chat", "llm_config": {"model_type": "internlm2", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, \(llm)}}
            """
            return try LanguageModelConfig.parse(Data(text.utf8), path: dir + "/config.json")
        }
        XCTAssertNil(try parse("\"bias\": false").unscaledRoPETokens)
        XCTAssertEqual(try parse("\"bias\": false, \"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2.0}, \"max_position_embeddings\": 64").unscaledRoPETokens, 64)
        XCTAssertThrowsError(try parse("\"bias\": true")) { XCTAssertTrue("\($0)".contains("bias = true"), "\($0)") }
        XCTAssertThrowsError(try parse("\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}")) {
            XCTAssertTrue("\($0)".contains("rope type 'linear'"), "\($0)")
        }
        // A bundle longer than the dynamic-scaling limit is refused (llava15's samples have 32 tokens? more than 16).
        var cfg = try parse("\"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2.0}, \"max_position_embeddings\": 8")
        cfg.hiddenSize = 128; cfg.vocabSize = 256
        XCTAssertThrowsError(try CalibrationBundle.load(path: Self.fixtures + "/llava15/calib.safetensors", for: cfg)) {
            XCTAssertTrue("\($0)".contains("max_position_embeddings 8"), "\($0)")
        }
    }

    func testFusedLayoutSplitsAndFusesBack() {
        // InternLM2 with 6 query heads over 2 KV heads (groups 3), head_dim 2, hidden 1:
        // stored rows per KV head are its 3 query heads, then k, then v.
        let cfg = LanguageModelConfig(family: .internLM2, modelType: "internvl_chat", hiddenSize: 1, intermediateSize: 2, numLayers: 1,
                                      numHeads: 6, numKVHeads: 2, headDim: 2, rmsNormEps: 1e-6, ropeTheta: 1e4, mropeSection: nil,
                                      vocabSize: 4, tieWordEmbeddings: false, qkvBias: false, oBias: false)
        let names = InternLM2Architecture.blockNames(LanguageModelTensorNames(base: "m.", lmHead: nil), layer: 0, config: cfg)
        let s = names.stored("k")!
        XCTAssertEqual(s.name, "m.layers.0.attention.wqkv.weight")
        XCTAssertEqual(s.rows, 20)
        // Rows named by what they hold: q0..q11 (6 heads x 2), k0..k3, v0..v3.
        let stored = ["q0", "q1", "q2", "q3", "q4", "q5", "k0", "k1", "v0", "v1", "q6", "q7", "q8", "q9", "q10", "q11", "k2", "k3", "v2", "v3"]
        let roles = s.split(stored, cols: 1, roleRows: ["q": 12, "k": 4, "v": 4], zero: "")
        XCTAssertEqual(roles["q"]!, (0..<12).map { "q\($0)" })
        XCTAssertEqual(roles["k"]!, (0..<4).map { "k\($0)" })
        XCTAssertEqual(roles["v"]!, (0..<4).map { "v\($0)" })
        XCTAssertEqual(s.fuse(roles, cols: 1), stored)
    }
}
