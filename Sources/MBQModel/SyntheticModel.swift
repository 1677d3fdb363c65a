import Foundation
import MBQFormats
import MBQTensor

/// Writes small VLM-shaped Hugging Face checkpoints and calibration bundles from a seed,
/// with no PyTorch: the built-in demo and the tests' bad-input cases stand on them.
/// The weights carry what makes activation-aware quantization matter in real models: a
/// few input channels with much larger activations (large RMSNorm gains, as LLaMA-family
/// models show), and image-token embeddings with a different scale than text's.
public struct SyntheticModelSpec: Sendable {
    public enum Layout: String, Sendable, CaseIterable {
        /// LLaVA-1.5: `llava` wrapper, Llama text, names under `language_model.model.`
        case llava
        /// LLaVA-OneVision: `llava_onevision` wrapper, Qwen2 text (q/k/v bias)
        case onevision
        /// Qwen2-VL: M-RoPE, names under `model.`
        case qwen2vl
    }

    public var layout: Layout = .llava
    public var hiddenSize = 256
    public var intermediateSize = 512
    public var layers = 4
    public var heads = 4
    public var kvHeads = 4
    public var vocabSize = 512
    public var dtype: DType = .bf16
    public var shards = 1
    public var seed: UInt64 = 2024
    /// Input channels whose norm gain is multiplied by `outlierGain`.
    public var outlierChannels = [7, 100, 201]
    public var outlierGain = 12.0

    public init() {}

    public var headDim: Int { hiddenSize / heads }

    public var mropeSection: [Int]? {
        guard layout == .qwen2vl else { return nil }
        let half = headDim / 2
        let t = half / 4
        let h = (half - t) / 2
        return [t, h, half - t - h]
    }

    var textModelType: String {
        switch layout {
        case .llava: return "llama"
        case .onevision: return "qwen2"
        case .qwen2vl: return "qwen2_vl_text"
        }
    }

    var prefix: String { layout == .qwen2vl ? "model." : "language_model.model." }
    var lmHeadName: String { layout == .qwen2vl ? "lm_head.weight" : "language_model.lm_head.weight" }

    /// config.json contents, in transformers 5's layout (text_config, rope_parameters).
    public func configJSON() -> [String: Any] {
        var rope: [String: Any] = ["rope_type": "default", "rope_theta": layout == .llava ? 10000.0 : 1_000_000.0]
        if let m = mropeSection { rope["mrope_section"] = m }
        let text: [String: Any] = [
            "model_type": textModelType, "hidden_size": hiddenSize, "intermediate_size": intermediateSize,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kvHeads,
            "rms_norm_eps": 1e-6, "vocab_size": vocabSize, "hidden_act": "silu", "tie_word_embeddings": false,
            "rope_parameters": rope, "max_position_embeddings": 4096,
        ]
        let top: String
        switch layout {
        case .llava: top = "llava"
        case .onevision: top = "llava_onevision"
        case .qwen2vl: top = "qwen2_vl"
        }
        return ["model_type": top, "text_config": text, "tie_word_embeddings": false,
                "image_token_index": vocabSize - 1, "mbq_synthetic": ["seed": seed]]
    }

    /// Writes config.json and the safetensors file(s) into `directory` (created).
    public func write(to directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var rng = SeededRandom(seed: seed)
        var tensors: [(String, Tensor<Float>)] = []
        let c = hiddenSize, i = intermediateSize, qd = heads * headDim, kvd = kvHeads * headDim
        func linear(_ out: Int, _ inp: Int) -> Tensor<Float> { rng.normalTensor([out, inp], std: 1 / Double(inp).squareRoot()) }
        func norm(_ n: Int, outliers: Bool) -> Tensor<Float> {
            var t: Tensor<Float> = rng.normalTensor([n], std: 0.1)
            for j in 0..<n { t.data[j] += 1 }
            if outliers { for ch in outlierChannels where ch < n { t.data[ch] *= Float(outlierGain) } }
            return t
        }
        tensors.append((prefix + "embed_tokens.weight", rng.normalTensor([vocabSize, c], std: 1)))
        for l in 0..<layers {
            let p = prefix + "layers.\(l)."
            tensors.append((p + "input_layernorm.weight", norm(c, outliers: true)))
            tensors.append((p + "post_attention_layernorm.weight", norm(c, outliers: true)))
            tensors.append((p + "self_attn.q_proj.weight", linear(qd, c)))
            tensors.append((p + "self_attn.k_proj.weight", linear(kvd, c)))
            tensors.append((p + "self_attn.v_proj.weight", linear(kvd, c)))
            tensors.append((p + "self_attn.o_proj.weight", linear(c, qd)))
            if layout != .llava {
                tensors.append((p + "self_attn.q_proj.bias", rng.normalTensor([qd], std: 0.1)))
                tensors.append((p + "self_attn.k_proj.bias", rng.normalTensor([kvd], std: 0.1)))
                tensors.append((p + "self_attn.v_proj.bias", rng.normalTensor([kvd], std: 0.1)))
            }
            tensors.append((p + "mlp.gate_proj.weight", linear(i, c)))
            tensors.append((p + "mlp.up_proj.weight", linear(i, c)))
            tensors.append((p + "mlp.down_proj.weight", linear(c, i)))
        }
        tensors.append((prefix + "norm.weight", norm(c, outliers: false)))
        tensors.append((lmHeadName, linear(vocabSize, c)))
        // A token vision tower and projector: present as in real checkpoints, never read.
        let vision = layout == .qwen2vl ? "visual." : "vision_tower.vision_model."
        tensors.append((vision + "encoder.layers.0.self_attn.q_proj.weight", linear(32, 32)))
        tensors.append((vision + "encoder.layers.0.layer_norm1.weight", norm(32, outliers: false)))
        if layout != .qwen2vl {
            tensors.append(("multi_modal_projector.linear_1.weight", linear(c, 32)))
        }
        try writeShards(tensors, to: directory)
        let config = try JSONSerialization.data(withJSONObject: configJSON(), options: [.prettyPrinted, .sortedKeys])
        try AtomicFile.write(data: config, to: directory + "/config.json")
    }

    private func writeShards(_ tensors: [(String, Tensor<Float>)], to directory: String) throws {
        let n = max(1, shards)
        if n == 1 {
            var w = SafetensorsWriter()
            for (name, t) in tensors { w.add(name, t, as: dtype) }
            try w.write(to: directory + "/model.safetensors", metadata: ["format": "pt"])
            return
        }
        var map: [String: String] = [:]
        let per = (tensors.count + n - 1) / n
        for s in 0..<n {
            let file = String(format: "model-%05d-of-%05d.safetensors", s + 1, n)
            var w = SafetensorsWriter()
            for (name, t) in tensors[(s * per)..<min(tensors.count, (s + 1) * per)] {
                w.add(name, t, as: dtype)
                map[name] = file
            }
            try w.write(to: directory + "/" + file, metadata: ["format": "pt"])
        }
        let index: [String: Any] = ["metadata": ["total_size": 0], "weight_map": map]
        try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: index, options: [.sortedKeys]),
                             to: directory + "/model.safetensors.index.json")
    }

    /// Calibration samples for this model: each has a short prompt, `imageTokens` image
    /// tokens (embeddings with a larger scale and an offset, as projected vision features
    /// differ from text embeddings), more prompt, and a caption of `captionTokens`
    /// labelled tokens; `padding` left- or right-pads every other sample.
    public func calibrationSamples(count: Int, length: Int, imageTokens: Int, captionTokens: Int,
                                   leftPadding: Bool, seed: UInt64) -> [CalibrationSample] {
        precondition(imageTokens + captionTokens + 4 <= length, "sequence too short for its parts")
        var rng = SeededRandom(seed: seed)
        // Token embeddings come from the model's table so text inputs look like the real thing.
        // (write(to:) draws embed_tokens first from the same seed.)
        var tableRng = SeededRandom(seed: self.seed)
        var table: Tensor<Float> = tableRng.normalTensor([vocabSize, hiddenSize], std: 1)
        if dtype != .f32 { table.data = table.data.map { HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16($0)) } }
        var samples: [CalibrationSample] = []
        for s in 0..<count {
            let pad = s % 2 == 1 ? Int(rng.uniform() * Double(length / 8)) + 1 : 0
            let real = length - pad
            let start = leftPadding ? pad : 0
            var emb = Tensor<Float>(zeros: [length, hiddenSize])
            var att = [Bool](repeating: false, count: length)
            var vis = [Bool](repeating: false, count: length)
            var labels = [Int](repeating: -100, count: length)
            let imgStart = start + 2
            let captionStart = start + real - captionTokens
            for p in start..<(start + real) {
                att[p] = true
                if p >= imgStart && p < imgStart + imageTokens {
                    vis[p] = true
                    for j in 0..<hiddenSize { emb.data[p * hiddenSize + j] = Float(2.5 * rng.normal() + 0.3) }
                } else {
                    let tok = Int(rng.uniform() * Double(vocabSize - 2))
                    for j in 0..<hiddenSize { emb.data[p * hiddenSize + j] = table.data[tok * hiddenSize + j] }
                    if p >= captionStart { labels[p] = tok }
                }
            }
            // Positions: 1-D counts over real tokens; M-RoPE gives the image a 2-D grid.
            let rows = mropeSection == nil ? 1 : 3
            var pos = [[Int]](repeating: [Int](repeating: 1, count: length), count: rows)
            var k = 0
            var p = start
            let gridW = max(1, Int(Double(imageTokens).squareRoot()))
            while p < start + real {
                if rows == 3 && p == imgStart {
                    for j in 0..<imageTokens {
                        pos[0][p + j] = k; pos[1][p + j] = k + j / gridW; pos[2][p + j] = k + j % gridW
                    }
                    k += max(imageTokens / gridW, gridW)
                    p += imageTokens
                    continue
                }
                for r in 0..<rows { pos[r][p] = k }
                k += 1
                p += 1
            }
            samples.append(CalibrationSample(embeds: emb, attention: att, positions: pos, vision: vis, labels: labels))
        }
        return samples
    }
}
