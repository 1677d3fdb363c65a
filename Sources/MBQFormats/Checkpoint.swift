import Foundation
import Logging
import MBQTensor

/// A Hugging Face model directory: `config.json` plus one or more safetensors files
/// (sharded through `model.safetensors.index.json`). Opening it maps the files and reads
/// their headers only; tensors are read (and converted to fp32) one at a time, so a
/// worker that owns a few decoder blocks touches only their bytes.
public final class Checkpoint: @unchecked Sendable {
    public let directory: String
    public let config: LanguageModelConfig
    public let names: LanguageModelTensorNames
    /// What `quantization_config` says, for checkpoints mbq (or another tool) quantized.
    public let quantization: CheckpointQuantization?
    private let files: [SafetensorsFile]
    private let location: [String: Int]
    private let logger = Logger(label: "mbq.checkpoint")

    public var allTensorNames: [String] { location.keys.sorted() }
    /// The opened safetensors files, in shard order.
    public var shards: [SafetensorsFile] { files }

    public init(directory: String) throws {
        self.directory = directory
        config = try LanguageModelConfig.load(configPath: directory + "/config.json")
        quantization = try CheckpointQuantization.parse(try Data(contentsOf: URL(fileURLWithPath: directory + "/config.json")),
                                                        path: directory + "/config.json")
        let fm = FileManager.default
        let indexPath = directory + "/model.safetensors.index.json"
        var shardNames: [String]
        var declared: [String: String]? = nil
        if fm.fileExists(atPath: indexPath) {
            guard let data = fm.contents(atPath: indexPath),
                  let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let map = obj["weight_map"] as? [String: String] else {
                throw FormatsError.invalidConfig(path: indexPath, reason: "no weight_map object of tensor -> file")
            }
            declared = map
            shardNames = Array(Set(map.values)).sorted()
        } else if fm.fileExists(atPath: directory + "/model.safetensors") {
            // As transformers loads it: other safetensors files beside it (adapters, our
            // own mbq_scales.safetensors) are not part of the model.
            shardNames = ["model.safetensors"]
        } else {
            let listing = (try? fm.contentsOfDirectory(atPath: directory)) ?? []
            shardNames = listing.filter { $0.hasPrefix("model") && $0.hasSuffix(".safetensors") }.sorted()
        }
        guard !shardNames.isEmpty else {
            throw FormatsError.missingTensor(name: "model.safetensors, model.safetensors.index.json or model-*.safetensors", in: directory)
        }
        var files: [SafetensorsFile] = []
        var location: [String: Int] = [:]
        for (i, shard) in shardNames.enumerated() {
            let f = try SafetensorsFile(path: directory + "/" + shard)
            for name in f.entries.keys {
                if let other = location[name] {
                    throw FormatsError.invalidTensorEntry(path: f.path, tensor: name,
                        reason: "also present in \(files[other].path)")
                }
                location[name] = i
            }
            files.append(f)
        }
        if let declared {
            for (name, shard) in declared {
                guard let at = location[name], files[at].path.hasSuffix("/" + shard) else {
                    throw FormatsError.missingTensor(name: name, in: directory + "/" + shard + " (listed in model.safetensors.index.json)")
                }
            }
        }
        self.files = files
        self.location = location
        names = try LanguageModelTensorNames.detect(in: Set(location.keys), tied: config.tieWordEmbeddings, place: directory,
                                                    naming: config.architecture.naming)
        logger.debug("opened \(directory): \(files.count) file(s), \(location.count) tensors, decoder prefix '\(names.base)'")
    }

    public func contains(_ name: String) -> Bool { location[name] != nil }

    /// The checkpoint names of decoder block `layer`, as its family names them.
    public func blockNames(_ layer: Int) -> BlockTensorNames {
        config.architecture.blockNames(names, layer: layer, config: config)
    }

    public func entry(_ name: String) throws -> (file: SafetensorsFile, entry: TensorEntry) {
        guard let i = location[name] else { throw FormatsError.missingTensor(name: name, in: directory) }
        return (files[i], try files[i].entry(name))
    }

    /// Reads a tensor as fp32, checking its shape when one is given.
    public func tensor(_ name: String, shape: [Int]? = nil) throws -> Tensor<Float> {
        let (file, e) = try entry(name)
        if let shape, e.shape != shape {
            throw FormatsError.shapeMismatch(path: file.path, tensor: name, expected: shape, found: e.shape)
        }
        let t = try file.floatTensor(name)
        if let bad = firstNonFinite(t) {
            throw FormatsError.nonFinite(path: file.path, tensor: name, index: bad)
        }
        return t
    }

    /// A decoder linear's weight ("...q_proj.weight", [out, in]) as fp32: read as stored,
    /// or decoded from a packed format and dequantized as the engines compute it, in the
    /// precision of the stored scales.
    public func linearWeight(_ name: String, shape: [Int]) throws -> Tensor<Float> {
        guard let qc = quantization, qc.format != .fake else { return try tensor(name, shape: shape) }
        guard name.hasSuffix(".weight"), shape.count == 2 else {
            throw FormatsError.invalidTensorEntry(path: directory, tensor: name, reason: "not a linear layer's weight")
        }
        let module = String(name.dropLast(".weight".count))
        let q = try PackedLinear.read(module: module, rows: shape[0], cols: shape[1], quant: qc, from: self)
        let scaleName = module + (qc.format == .compressedTensors ? ".weight_scale" : ".scales")
        return q.dequantized(precision: try entry(scaleName).entry.dtype.scalePrecision)
    }

    /// The storage dtype of the decoder's weights (what the output keeps); for a packed
    /// checkpoint, that of its scales.
    public var weightDType: DType {
        let first = blockNames(0).linears[0]
        for name in [first.name, first.module + ".weight_scale", first.module + ".scales"] {
            if let e = try? entry(name).entry { return e.dtype }
        }
        return .f32
    }

    /// Releases the file pages of decoder block `i`'s tensors (`SafetensorsFile.releasePages`).
    public func releasePages(layer i: Int) {
        releasePages(blockNames(i).all)
    }

    public func releasePages(_ names: [String]) {
        for name in names {
            if let at = location[name] { files[at].releasePages(name) }
        }
    }

    /// Bytes of decoder block `i`'s tensors as stored (for planning, no data read).
    public func blockBytes(_ i: Int) -> Int {
        let prefix = names.layer(i)
        return location.keys.filter { $0.hasPrefix(prefix) }.reduce(0) { $0 + ((try? entry($1).entry.byteRange.count) ?? 0) }
    }
}
