import Foundation
import MBQTensor

/// One calibration sequence as it enters decoder block 0.
public struct CalibrationSample: Sendable {
    /// inputs_embeds: [T, H]
    public var embeds: Tensor<Float>
    /// attention_mask: [T], false = padding
    public var attention: [Bool]
    /// position ids: [rows][T]; rows = 1 (RoPE) or 3 (Qwen2-VL M-RoPE: t, h, w)
    public var positions: [[Int]]
    /// vision_mask: [T], true = an image token
    public var vision: [Bool]
    /// labels: [T], -100 = no loss
    public var labels: [Int]

    public init(embeds: Tensor<Float>, attention: [Bool], positions: [[Int]], vision: [Bool], labels: [Int]) {
        self.embeds = embeds; self.attention = attention; self.positions = positions
        self.vision = vision; self.labels = labels
    }

    public var length: Int { attention.count }
    /// caption_mask = labels != -100 (docs/DESIGN.md §2).
    public var caption: [Bool] { labels.map { $0 != -100 } }
    /// Vision and caption positions that are not padding (what statistics and losses read).
    public var attendedVision: [Bool] { zip(vision, attention).map { $0 && $1 } }
    public var attendedCaption: [Bool] { zip(caption, attention).map { $0 && $1 } }
}

/// The `mbq-calib` v1 bundle (docs/DESIGN.md §4): one safetensors file with inputs_embeds
/// [N, T, H], attention_mask [N, T], position_ids [N, T] or [3, N, T], vision_mask
/// [N, T], labels [N, T]; metadata {"format": "mbq-calib", "version": "1"}.
public struct CalibrationBundle: Sendable {
    public static let format = "mbq-calib"
    public static let version = "1"

    public let path: String
    public let samples: [CalibrationSample]
    public var count: Int { samples.count }
    public var hiddenSize: Int { samples.first?.embeds.cols ?? 0 }
    /// The file's content fingerprint (`Fingerprint.of`; part of a job's identity).
    public var fingerprint = ""
    /// The model the bundle was exported for, when its exporter recorded it.
    public var model: ModelRecord?

    public init(path: String, samples: [CalibrationSample], fingerprint: String = "", model: ModelRecord? = nil) {
        self.path = path
        self.samples = samples
        self.fingerprint = fingerprint
        self.model = model
    }

    /// The first `n` samples, the rest of the bundle's description kept.
    public func prefix(_ n: Int) -> CalibrationBundle {
        CalibrationBundle(path: path, samples: Array(samples.prefix(n)), fingerprint: fingerprint, model: model)
    }

    /// Why this bundle cannot feed `ckpt` (it records another model), or nil when it can
    /// or records none (`model == nil`: made by an exporter older than the record).
    public func mismatch(with ckpt: Checkpoint) throws -> String? {
        guard let model else { return nil }
        let d = model.differences(from: try ModelRecord(ckpt))
        return d.isEmpty ? nil : "\(path) was exported for another model (bundle vs \(ckpt.directory): \(d.joined(separator: ", ")))"
    }

    /// Reads and validates a bundle. `hiddenSize`/`vocabSize`/`positionRows`, when given,
    /// are checked against the model that will consume it.
    /// Loads a bundle for a model with this config: hidden size, vocabulary, position
    /// rows (3 for M-RoPE) and, under dynamic RoPE scaling, the sequence length.
    public static func load(path: String, for config: LanguageModelConfig) throws -> CalibrationBundle {
        try load(path: path, hiddenSize: config.hiddenSize, vocabSize: config.vocabSize,
                 positionRows: config.mropeSection == nil ? 1 : 3, maxTokens: config.unscaledRoPETokens)
    }

    public static func load(path: String, hiddenSize: Int? = nil, vocabSize: Int? = nil,
                            positionRows: Int? = nil, maxTokens: Int? = nil) throws -> CalibrationBundle {
        let f = try SafetensorsFile(path: path)
        func fail(_ why: String) -> FormatsError { .invalidBundle(path: path, reason: why) }
        guard f.metadata["format"] == format else {
            throw fail("__metadata__.format is \(f.metadata["format"].map { "'\($0)'" } ?? "missing"), expected '\(format)'")
        }
        guard f.metadata["version"] == version else {
            throw fail("__metadata__.version is \(f.metadata["version"].map { "'\($0)'" } ?? "missing"), expected '\(version)'")
        }
        for name in ["inputs_embeds", "attention_mask", "position_ids", "vision_mask", "labels"] where f.entries[name] == nil {
            throw FormatsError.missingTensor(name: name, in: path)
        }
        let emb = try f.floatTensor("inputs_embeds")
        guard emb.rank == 3 else { throw fail("inputs_embeds has shape \(emb.shape), expected [N, T, H]") }
        let (n, t, h) = (emb.shape[0], emb.shape[1], emb.shape[2])
        guard n > 0, t > 0, h > 0 else { throw fail("inputs_embeds has an empty dimension: \(emb.shape)") }
        if let maxTokens, t > maxTokens {
            // InternLM2's dynamic NTK scaling rescales RoPE for sequences longer than this.
            throw fail("samples of \(t) tokens are longer than max_position_embeddings \(maxTokens), past which the model's dynamic RoPE scaling changes the frequencies (not implemented)")
        }
        if let hiddenSize, hiddenSize != h {
            throw FormatsError.shapeMismatch(path: path, tensor: "inputs_embeds", expected: [n, t, hiddenSize], found: emb.shape)
        }
        if let bad = firstNonFinite(emb) {
            throw FormatsError.nonFinite(path: path, tensor: "inputs_embeds", index: bad)
        }
        func intTensor(_ name: String, shapes: [[Int]]) throws -> [Int64] {
            let (shape, values) = try f.intValues(name)
            guard shapes.contains(shape) else {
                throw FormatsError.shapeMismatch(path: path, tensor: name, expected: shapes[0], found: shape)
            }
            return values
        }
        let mask = try intTensor("attention_mask", shapes: [[n, t]])
        let vis = try intTensor("vision_mask", shapes: [[n, t]])
        let labels = try intTensor("labels", shapes: [[n, t]])
        let posShape = try f.entry("position_ids").shape
        let rows = posShape.count == 3 ? posShape[0] : 1
        let pos = try intTensor("position_ids", shapes: [[n, t], [3, n, t]])
        if let positionRows, positionRows != rows {
            throw FormatsError.shapeMismatch(path: path, tensor: "position_ids",
                expected: positionRows == 3 ? [3, n, t] : [n, t], found: posShape)
        }
        if let i = mask.firstIndex(where: { $0 != 0 && $0 != 1 }) {
            throw fail("attention_mask holds \(mask[i]) at flat index \(i); only 0 and 1 are allowed")
        }
        if let i = vis.firstIndex(where: { $0 != 0 && $0 != 1 }) {
            throw fail("vision_mask holds \(vis[i]) at flat index \(i); only 0 and 1 are allowed")
        }
        if let i = labels.firstIndex(where: { $0 != -100 && ($0 < 0 || (vocabSize != nil && $0 >= Int64(vocabSize!))) }) {
            throw fail("labels holds \(labels[i]) at flat index \(i); expected -100 or a token id in [0, \(vocabSize.map(String.init) ?? "vocab"))")
        }
        if let i = pos.firstIndex(where: { $0 < 0 || $0 > 1 << 24 }) {
            throw fail("position_ids holds \(pos[i]) at flat index \(i); expected 0 ..< 2^24")
        }
        var samples: [CalibrationSample] = []
        samples.reserveCapacity(n)
        for s in 0..<n {
            let r = (s * t)..<((s + 1) * t)
            let att = mask[r].map { $0 == 1 }
            let v = vis[r].map { $0 == 1 }
            let lab = labels[r].map { Int($0) }
            for j in 0..<t where !att[j] && (v[j] || lab[j] != -100) {
                throw fail("sample \(s) position \(j) is padding (attention_mask 0) but is marked as vision or has a label")
            }
            guard att.contains(true) else { throw fail("sample \(s) is all padding") }
            let p = (0..<rows).map { row in pos[(row * n * t + s * t)..<(row * n * t + (s + 1) * t)].map { Int($0) } }
            samples.append(CalibrationSample(embeds: emb.rowSlice(s * t, t), attention: att, positions: p,
                                             vision: v, labels: lab))
        }
        return CalibrationBundle(path: path, samples: samples, fingerprint: Fingerprint.of(f), model: ModelRecord(metadata: f.metadata))
    }

    /// Writes samples (all of one length) as a bundle, atomically; `model`: the model they
    /// were made for, recorded in the metadata.
    public static func write(_ samples: [CalibrationSample], to path: String, embedsDType: DType = .f32,
                             model: ModelRecord? = nil) throws {
        precondition(!samples.isEmpty, "a bundle needs at least one sample")
        let n = samples.count, t = samples[0].length, h = samples[0].embeds.cols
        let rows = samples[0].positions.count
        precondition(samples.allSatisfy { $0.length == t && $0.embeds.shape == [t, h] && $0.positions.count == rows },
                     "all samples of a bundle share T, H and position rows")
        var w = SafetensorsWriter()
        w.add("inputs_embeds", floats: samples.flatMap { $0.embeds.data }, shape: [n, t, h], as: embedsDType)
        w.add("attention_mask", int64: samples.flatMap { $0.attention.map { $0 ? 1 : 0 } }, shape: [n, t])
        w.add("vision_mask", int64: samples.flatMap { $0.vision.map { $0 ? 1 : 0 } }, shape: [n, t])
        w.add("labels", int64: samples.flatMap { $0.labels.map(Int64.init) }, shape: [n, t])
        let pos: [Int64] = (0..<rows).flatMap { r in samples.flatMap { $0.positions[r].map(Int64.init) } }
        w.add("position_ids", int64: pos, shape: rows == 1 ? [n, t] : [rows, n, t])
        try w.write(to: path, metadata: ["format": format, "version": version].merging(model?.metadata ?? [:]) { a, _ in a })
    }
}
