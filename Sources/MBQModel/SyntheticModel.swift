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
    /// When set, shards are cut at this many bytes (hub-style) instead of `shards`.
    public var shardBytes: Int? = nil
    public var seed: UInt64 = 2024
    /// Input channels whose norm gain is multiplied by `outlierGain`.
    public var outlierChannels = [7, 100, 201]
    public var outlierGain = 12.0

    public init() {}

    /// Real shapes, for rehearsing and benchmarking a real-size job without downloading a
    /// model (`mbq synth`): random bf16 weights with the outlier channels above.
    public enum Preset: String, Sendable, CaseIterable {
        case llama7b = "llama-7b"    // LLaVA-1.5-7B's language model
        case qwen27b = "qwen2-7b"    // LLaVA-OneVision-7B's / Qwen2-VL-7B's shape (as Qwen2 text)
        case qwen272b = "qwen2-72b"  // LLaVA-OneVision-72B's

        public var spec: SyntheticModelSpec {
            var s = SyntheticModelSpec()
            s.dtype = .bf16
            s.shardBytes = 2 << 30
            switch self {
            case .llama7b:
                s.layout = .llava; s.hiddenSize = 4096; s.intermediateSize = 11008; s.layers = 32; s.heads = 32; s.kvHeads = 32
                s.vocabSize = 32000
            case .qwen27b:
                s.layout = .onevision; s.hiddenSize = 3584; s.intermediateSize = 18944; s.layers = 28; s.heads = 28; s.kvHeads = 4
                s.vocabSize = 152064
            case .qwen272b:
                s.layout = .onevision; s.hiddenSize = 8192; s.intermediateSize = 29568; s.layers = 80; s.heads = 64; s.kvHeads = 8
                s.vocabSize = 152064
            }
            s.outlierChannels = [7, 100, 201, s.hiddenSize / 2 + 3]
            return s
        }
    }

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

    /// One tensor of the checkpoint: its values drawn in order, element by element, when
    /// its shard is written (a real-size model is never whole in memory).
    struct PlannedTensor {
        var name: String
        var shape: [Int]
        var draw: (Int) -> Float   // element index -> value; called in index order
        var bytes: Int { shape.reduce(1, *) }
    }

    /// Every tensor in file order, drawing from one generator seeded with `seed` (the
    /// order fixes the values: embeddings, then each layer, then the head).
    func plan() -> [PlannedTensor] {
        final class Generator { var rng: SeededRandom; init(_ seed: UInt64) { rng = SeededRandom(seed: seed) } }
        let g = Generator(seed)
        let c = hiddenSize, i = intermediateSize, qd = heads * headDim, kvd = kvHeads * headDim
        func linear(_ name: String, _ out: Int, _ inp: Int) -> PlannedTensor {
            let std = 1 / Double(inp).squareRoot()
            return PlannedTensor(name: name, shape: [out, inp]) { _ in Float(g.rng.normal() * std) }
        }
        func normal(_ name: String, _ shape: [Int], std: Double) -> PlannedTensor {
            PlannedTensor(name: name, shape: shape) { _ in Float(g.rng.normal() * std) }
        }
        func norm(_ name: String, _ n: Int, outliers: Bool) -> PlannedTensor {
            let gain = Float(outlierGain), chans = Set(outliers ? outlierChannels : [])
            return PlannedTensor(name: name, shape: [n]) { j in
                var v = Float(g.rng.normal() * 0.1)
                v += 1
                return chans.contains(j) ? v * gain : v
            }
        }
        var tensors = [normal(prefix + "embed_tokens.weight", [vocabSize, c], std: 1)]
        for l in 0..<layers {
            let p = prefix + "layers.\(l)."
            tensors.append(norm(p + "input_layernorm.weight", c, outliers: true))
            tensors.append(norm(p + "post_attention_layernorm.weight", c, outliers: true))
            tensors.append(linear(p + "self_attn.q_proj.weight", qd, c))
            tensors.append(linear(p + "self_attn.k_proj.weight", kvd, c))
            tensors.append(linear(p + "self_attn.v_proj.weight", kvd, c))
            tensors.append(linear(p + "self_attn.o_proj.weight", c, qd))
            if layout != .llava {
                tensors.append(normal(p + "self_attn.q_proj.bias", [qd], std: 0.1))
                tensors.append(normal(p + "self_attn.k_proj.bias", [kvd], std: 0.1))
                tensors.append(normal(p + "self_attn.v_proj.bias", [kvd], std: 0.1))
            }
            tensors.append(linear(p + "mlp.gate_proj.weight", i, c))
            tensors.append(linear(p + "mlp.up_proj.weight", i, c))
            tensors.append(linear(p + "mlp.down_proj.weight", c, i))
        }
        tensors.append(norm(prefix + "norm.weight", c, outliers: false))
        tensors.append(linear(lmHeadName, vocabSize, c))
        // A token vision tower and projector: present as in real checkpoints, never read.
        let vision = layout == .qwen2vl ? "visual." : "vision_tower.vision_model."
        tensors.append(linear(vision + "encoder.layers.0.self_attn.q_proj.weight", 32, 32))
        tensors.append(norm(vision + "encoder.layers.0.layer_norm1.weight", 32, outliers: false))
        if layout != .qwen2vl {
            tensors.append(linear("multi_modal_projector.linear_1.weight", c, 32))
        }
        return tensors
    }

    /// Writes config.json and the safetensors file(s) into `directory` (created): `shards`
    /// files of about equal tensor counts, or with `shardBytes` files of at most that many
    /// bytes as hub checkpoints are cut (each file written as its tensors are drawn).
    public func write(to directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let tensors = plan()
        var groups: [[PlannedTensor]] = []
        if let limit = shardBytes {
            for t in tensors {
                let size = t.bytes * dtype.byteSize
                if groups.isEmpty || groups[groups.count - 1].reduce(0, { $0 + $1.bytes * dtype.byteSize }) + size > limit {
                    groups.append([])
                }
                groups[groups.count - 1].append(t)
            }
        } else {
            let n = max(1, shards), per = (tensors.count + n - 1) / n
            groups = (0..<n).map { Array(tensors[($0 * per)..<min(tensors.count, ($0 + 1) * per)]) }
        }
        var map: [String: String] = [:]
        var total = 0
        for (s, group) in groups.enumerated() {
            let file = groups.count == 1 ? "model.safetensors" : String(format: "model-%05d-of-%05d.safetensors", s + 1, groups.count)
            var w = SafetensorsWriter()
            for t in group {
                w.add(t.name, dtype: dtype, shape: t.shape, bytes: Self.encode(count: t.bytes, dtype: dtype, t.draw))
                map[t.name] = file
                total += t.bytes * dtype.byteSize
            }
            try w.write(to: directory + "/" + file, metadata: ["format": "pt"])
        }
        if groups.count > 1 {
            let index: [String: Any] = ["metadata": ["total_size": total], "weight_map": map]
            try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: index, options: [.sortedKeys]),
                                 to: directory + "/model.safetensors.index.json")
        }
        let config = try JSONSerialization.data(withJSONObject: configJSON(), options: [.prettyPrinted, .sortedKeys])
        try AtomicFile.write(data: config, to: directory + "/config.json")
    }

    /// `count` values stored as `dtype` (bf16/f16 rounded to nearest even, as
    /// `SafetensorsWriter` stores floats).
    static func encode(count: Int, dtype: DType, _ draw: (Int) -> Float) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count * dtype.byteSize)
        out.withUnsafeMutableBytes { raw in
            switch dtype {
            case .bf16:
                let p = raw.bindMemory(to: UInt16.self)
                for i in 0..<count { p[i] = HalfPrecision.floatToBF16(draw(i)).littleEndian }
            case .f16:
                let p = raw.bindMemory(to: UInt16.self)
                for i in 0..<count { p[i] = HalfPrecision.floatToFP16(draw(i)).littleEndian }
            case .f32:
                let p = raw.bindMemory(to: UInt32.self)
                for i in 0..<count { p[i] = draw(i).bitPattern.littleEndian }
            default:
                preconditionFailure("synthetic weights cannot be stored as \(dtype.rawValue)")
            }
        }
        return out
    }

    /// Calibration samples for this model: each has a short prompt, `imageTokens` image
    /// tokens (embeddings with a larger scale and an offset, as projected vision features
    /// differ from text embeddings), more prompt, and a caption of `captionTokens`
    /// labelled tokens; `padding` left- or right-pads every other sample.
    /// With `textFromTable`, text embeddings are rows of the model's embedding table (it
    /// is regenerated, so only for small vocabularies); otherwise N(0, 1), its distribution.
    public func calibrationSamples(count: Int, length: Int, imageTokens: Int, captionTokens: Int,
                                   leftPadding: Bool, seed: UInt64, textFromTable: Bool = true) -> [CalibrationSample] {
        precondition(imageTokens + captionTokens + 4 <= length, "sequence too short for its parts")
        var rng = SeededRandom(seed: seed)
        // Token embeddings come from the model's table so text inputs look like the real thing.
        // (write(to:) draws embed_tokens first from the same seed.)
        var table = Tensor<Float>(zeros: [0, hiddenSize])
        if textFromTable {
            var tableRng = SeededRandom(seed: self.seed)
            table = tableRng.normalTensor([vocabSize, hiddenSize], std: 1)
            if dtype != .f32 { table.data = table.data.map { HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16($0)) } }
        }
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
                    if textFromTable {
                        for j in 0..<hiddenSize { emb.data[p * hiddenSize + j] = table.data[tok * hiddenSize + j] }
                    } else {
                        for j in 0..<hiddenSize { emb.data[p * hiddenSize + j] = Float(rng.normal()) }
                    }
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
