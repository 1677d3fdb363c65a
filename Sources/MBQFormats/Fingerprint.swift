import Foundation
import MBQTensor

/// Content fingerprints that are cheap on a 140 GB checkpoint (docs/OPERATIONS.md, "Job
/// identity and --resume"): they read headers and a fixed sample of the data, never whole tensors.
/// A job's identity and a bundle's record of its model are built from them, so that a
/// resumed job cannot mix two runs and a bundle cannot feed another model.
public enum Fingerprint {
    /// Blocks sampled per file, evenly spaced over its data section, and their size.
    public static let blocks = 16
    public static let blockBytes = 4096
    /// Embedding rows sampled for `ModelRecord.embedding`.
    public static let embeddingRows = 16

    /// One safetensors file: SHA-256 over its size, its whole header and `blocks` blocks
    /// of `blockBytes` bytes spread evenly from the start of the data section to the end.
    public static func of(_ f: SafetensorsFile) -> String {
        let size = f.fileSize
        let headerEnd = min(size, 8 + Int(UInt64(littleEndian: f.fileBytes(0..<8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })))
        var bytes = Array("safetensors|\(size)|".utf8) + f.fileBytes(0..<headerEnd)
        let data = size - headerEnd
        for i in 0..<blocks where data > 0 {
            let start = headerEnd + (blocks == 1 ? 0 : (data - min(data, blockBytes)) * i / (blocks - 1))
            bytes += f.fileBytes(start..<(start + blockBytes))
        }
        return SHA256.hex(bytes)
    }

    /// Row indices sampled from a table of `rows` rows: 0, ..., rows - 1, evenly.
    public static func sampledRows(_ rows: Int) -> [Int] {
        rows <= 1 ? [0] : (0..<embeddingRows).map { $0 * (rows - 1) / (embeddingRows - 1) }
    }
}

extension Checkpoint {
    /// The checkpoint's content: config.json's bytes and every weight shard's fingerprint
    /// (`Fingerprint.of`), by file name.
    public func fingerprint() throws -> String {
        let cfg = directory + "/config.json"
        guard let config = FileManager.default.contents(atPath: cfg) else {
            throw FormatsError.unreadable(path: cfg, reason: "cannot read")
        }
        var text = "config|" + SHA256.hex(Array(config))
        for f in shards.sorted(by: { $0.path < $1.path }) {
            text += "|" + (f.path as NSString).lastPathComponent + "=" + Fingerprint.of(f)
        }
        return SHA256.hex(Array(text.utf8))
    }
}

/// What a calibration bundle records of the model it was exported for, in its safetensors
/// metadata (docs/OPERATIONS.md, "Bundles record their model"): the model type, the token embedding table's vocabulary and
/// hidden sizes and its fingerprint, so that a bundle of another model of the same
/// shapes is refused. The embedding fingerprint is SHA-256 over `Fingerprint.embeddingRows`
/// rows (`Fingerprint.sampledRows`), each converted to fp32 little-endian bytes: the same
/// value whether the table is stored in bf16, fp16 or fp32 and whatever it is loaded as.
/// `Scripts/make_calibration.py` (`embedding_fingerprint`) computes it the same way.
public struct ModelRecord: Equatable, Sendable {
    public var modelType: String
    public var hiddenSize: Int
    public var vocabSize: Int
    public var embedding: String

    public static let keys = (modelType: "model_type", hidden: "hidden_size", vocab: "vocab_size", embedding: "embed_fingerprint")

    public init(modelType: String, hiddenSize: Int, vocabSize: Int, embedding: String) {
        self.modelType = modelType; self.hiddenSize = hiddenSize; self.vocabSize = vocabSize; self.embedding = embedding
    }

    /// The record of `ckpt` (reads `Fingerprint.embeddingRows` rows of its embeddings).
    public init(_ ckpt: Checkpoint) throws {
        let name = ckpt.names.embedTokens
        let (file, e) = try ckpt.entry(name)
        guard e.shape.count == 2 else {
            throw FormatsError.invalidTensorEntry(path: file.path, tensor: name, reason: "the token embeddings have shape \(e.shape), expected [vocab, hidden]")
        }
        var bytes: [UInt8] = []
        for r in Fingerprint.sampledRows(e.shape[0]) {
            for v in try file.floatRow(name, row: r) { withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 } }
        }
        // Sizes from the table itself, as the exporter reads them (no config defaults).
        self.init(modelType: ckpt.config.modelType, hiddenSize: e.shape[1], vocabSize: e.shape[0], embedding: SHA256.hex(bytes))
    }

    /// The record in a bundle's metadata, or nil when the bundle has none (an exporter
    /// older than the record).
    public init?(metadata m: [String: String]) {
        let k = Self.keys
        guard let t = m[k.modelType], let h = m[k.hidden].flatMap(Int.init), let v = m[k.vocab].flatMap(Int.init),
              let e = m[k.embedding] else { return nil }
        self.init(modelType: t, hiddenSize: h, vocabSize: v, embedding: e)
    }

    public var metadata: [String: String] {
        let k = Self.keys
        return [k.modelType: modelType, k.hidden: String(hiddenSize), k.vocab: String(vocabSize), k.embedding: embedding]
    }

    /// What differs from `other`, one phrase per field ("model_type llava vs qwen2_vl").
    public func differences(from other: ModelRecord) -> [String] {
        var d: [String] = []
        if modelType != other.modelType { d.append("model_type \(modelType) vs \(other.modelType)") }
        if hiddenSize != other.hiddenSize { d.append("hidden_size \(hiddenSize) vs \(other.hiddenSize)") }
        if vocabSize != other.vocabSize { d.append("vocab_size \(vocabSize) vs \(other.vocabSize)") }
        if embedding != other.embedding { d.append("token embeddings \(embedding.prefix(12)) vs \(other.embedding.prefix(12))") }
        return d
    }
}
