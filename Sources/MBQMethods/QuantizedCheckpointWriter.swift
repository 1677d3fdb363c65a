import Foundation
import MBQFormats
import MBQModel
import MBQTensor

/// Writes the quantized model as a directory that loads like the input (DESIGN.md §4):
/// same tensor names and dtypes, decoder weights replaced by their scaled and
/// fake-quantized values, `quantization_config` added to config.json, other files
/// copied.
///
/// Layout: one shard per decoder layer and, for every source shard, one shard with its
/// other tensors (embeddings, lm_head, vision tower, ...), named
/// `model-XXXXX-of-YYYYY.safetensors` and tied together by
/// `model.safetensors.index.json`. A layer's shard depends only on that layer, so a
/// worker writes the layers it owns straight into the output and the result is
/// byte-identical whoever wrote what (one process, or any number of workers).
///
/// Everything is written into a temporary directory beside `out` that is renamed into
/// place at the end, so a crash never leaves a half-written model.
public enum QuantizedCheckpointWriter {
    public struct Layout {
        /// Per source shard holding non-decoder tensors: the output file and those names.
        public var rest: [(file: String, source: SafetensorsFile, names: [String])]
        public var layerFiles: [String]
    }

    public static func layout(_ ckpt: Checkpoint) -> Layout {
        let cfg = ckpt.config
        let blockNames = Set((0..<cfg.numLayers).flatMap { ckpt.names.block($0, qkvBias: cfg.qkvBias, oBias: cfg.oBias).all })
        let rest = ckpt.shards.map { s in (s, s.tensorNames.filter { !blockNames.contains($0) }) }.filter { !$0.1.isEmpty }
        let total = rest.count + cfg.numLayers
        func file(_ i: Int) -> String { String(format: "model-%05d-of-%05d.safetensors", i + 1, total) }
        return Layout(rest: rest.enumerated().map { (file($0.offset), $0.element.0, $0.element.1) },
                      layerFiles: (0..<cfg.numLayers).map { file(rest.count + $0) })
    }

    /// The decoder tensors of one quantized block, by checkpoint name.
    public static func tensors(_ ckpt: Checkpoint, layer l: Int, block w: DecoderBlockWeights<Float>) -> [String: Tensor<Float>] {
        let cfg = ckpt.config
        let n = ckpt.names.block(l, qkvBias: cfg.qkvBias, oBias: cfg.oBias)
        var r: [String: Tensor<Float>] = [:]
        r[n.inputNorm] = w.inputNorm; r[n.postAttentionNorm] = w.postAttentionNorm
        r[n.q] = w.q; r[n.k] = w.k; r[n.v] = w.v; r[n.o] = w.o
        r[n.gate] = w.gate; r[n.up] = w.up; r[n.down] = w.down
        if let b = n.qBias, let t = w.qBias { r[b] = t }
        if let b = n.kBias, let t = w.kBias { r[b] = t }
        if let b = n.vBias, let t = w.vBias { r[b] = t }
        if let b = n.oBias, let t = w.oBias { r[b] = t }
        return r
    }

    /// Writes layer `l`'s shard into `dir` (atomically) in the source dtypes.
    /// -> the file name and its size in bytes.
    @discardableResult
    public static func writeLayer(_ ckpt: Checkpoint, layer l: Int, block: DecoderBlockWeights<Float>,
                                  into dir: String) throws -> (file: String, bytes: UInt64) {
        let file = layout(ckpt).layerFiles[l]
        var w = SafetensorsWriter()
        for (name, t) in tensors(ckpt, layer: l, block: block).sorted(by: { $0.key < $1.key }) {
            let e = try ckpt.entry(name).entry
            guard t.shape == e.shape else {
                throw MethodsError.output(path: dir + "/" + file, reason: "tensor '\(name)' would change shape \(e.shape) -> \(t.shape)")
            }
            w.add(name, t, as: e.dtype)
        }
        let path = dir + "/" + file
        try w.write(to: path, metadata: ["format": "pt"])
        return (file, fileSize(path))
    }

    static func fileSize(_ path: String) -> UInt64 {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)??.uint64Value ?? 0
    }

    /// Checks a layer shard someone else wrote: present, a valid safetensors file, and
    /// holding exactly the layer's tensors with the source shapes.
    public static func verifyLayer(_ ckpt: Checkpoint, layer l: Int, in dir: String, bytes: UInt64) throws {
        let path = dir + "/" + layout(ckpt).layerFiles[l]
        let f = try SafetensorsFile(path: path)
        let size = fileSize(path)
        guard size == bytes else { throw MethodsError.output(path: path, reason: "\(size) bytes on disk, the worker wrote \(bytes)") }
        let cfg = ckpt.config
        let want = ckpt.names.block(l, qkvBias: cfg.qkvBias, oBias: cfg.oBias).all.sorted()
        guard f.tensorNames == want else {
            throw MethodsError.output(path: path, reason: "holds \(f.tensorNames.count) tensors, layer \(l) has \(want.count)")
        }
        for n in want where try f.entry(n).shape != ckpt.entry(n).entry.shape {
            throw MethodsError.output(path: path, reason: "tensor '\(n)' has the wrong shape")
        }
    }

    /// Creates the temporary output directory (removing a stale one of the same name).
    public static func begin(out: String, overwrite: Bool, tmp: String) throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: out) && !overwrite {
            throw MethodsError.output(path: out, reason: "already exists (pass --overwrite to replace it)")
        }
        try? fm.removeItem(atPath: tmp)
        do {
            try fm.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        } catch {
            throw MethodsError.output(path: tmp, reason: "cannot create: \(error.localizedDescription)")
        }
    }

    /// Writes everything but the layer shards (already in `tmp`), then renames `tmp` to
    /// `out`. `extras` adds files (results, report) before the rename.
    public static func finish(source ckpt: Checkpoint, tmp: String, out: String, overwrite: Bool,
                              quantizationConfig: [String: Any], extras: (String) throws -> Void) throws {
        let fm = FileManager.default
        do {
            let lay = layout(ckpt)
            var weightMap: [String: String] = [:]
            var totalSize = 0
            for (file, source, names) in lay.rest {
                var w = SafetensorsWriter()
                for name in names {
                    let e = try source.entry(name)
                    w.add(name, dtype: e.dtype, shape: e.shape, bytes: Array(try source.rawBytes(name)))
                    weightMap[name] = file
                    totalSize += e.shape.reduce(1, *) * e.dtype.byteSize
                }
                try w.write(to: tmp + "/" + file, metadata: source.metadata)
            }
            let cfg = ckpt.config
            for l in 0..<cfg.numLayers {
                guard fm.fileExists(atPath: tmp + "/" + lay.layerFiles[l]) else {
                    throw MethodsError.output(path: tmp, reason: "layer \(l)'s shard \(lay.layerFiles[l]) was never written")
                }
                for name in ckpt.names.block(l, qkvBias: cfg.qkvBias, oBias: cfg.oBias).all {
                    let e = try ckpt.entry(name).entry
                    weightMap[name] = lay.layerFiles[l]
                    totalSize += e.shape.reduce(1, *) * e.dtype.byteSize
                }
            }
            let index: [String: Any] = ["metadata": ["total_size": totalSize], "weight_map": weightMap]
            try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: index, options: [.prettyPrinted, .sortedKeys]),
                                 to: tmp + "/model.safetensors.index.json")
            // Every other file (tokenizer, processor, chat template, generation config) is copied.
            for f in try fm.contentsOfDirectory(atPath: ckpt.directory).sorted()
            where !f.hasSuffix(".safetensors") && !f.hasPrefix(".") && f != "config.json" && f != "model.safetensors.index.json" {
                var isDir: ObjCBool = false
                let src = ckpt.directory + "/" + f
                if fm.fileExists(atPath: src, isDirectory: &isDir) {
                    try fm.copyItem(atPath: src, toPath: tmp + "/" + f)
                }
            }
            let cfgPath = ckpt.directory + "/config.json"
            guard var json = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: cfgPath)))) as? [String: Any] else {
                throw FormatsError.invalidConfig(path: cfgPath, reason: "not a JSON object")
            }
            json["quantization_config"] = quantizationConfig
            try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]),
                                 to: tmp + "/config.json")
            // Markers and leftovers of the workers' writes do not belong in the model.
            for f in try fm.contentsOfDirectory(atPath: tmp) where f.hasPrefix(".") { try? fm.removeItem(atPath: tmp + "/" + f) }
            try extras(tmp)
            if fm.fileExists(atPath: out) { try fm.removeItem(atPath: out) }
            guard rename(tmp, out) == 0 else {
                throw MethodsError.output(path: out, reason: "rename from \(tmp) failed: \(String(cString: strerror(errno)))")
            }
        } catch {
            try? fm.removeItem(atPath: tmp)
            throw error
        }
    }

    /// The one-process path: every layer, then the rest.
    public static func write(source ckpt: Checkpoint, blocks: [DecoderBlockWeights<Float>],
                             quantizationConfig: [String: Any], to out: String, overwrite: Bool,
                             extras: (String) throws -> Void) throws {
        let tmp = out + ".partial-\(getpid())"
        try begin(out: out, overwrite: overwrite, tmp: tmp)
        do {
            for (l, b) in blocks.enumerated() { try writeLayer(ckpt, layer: l, block: b, into: tmp) }
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw error
        }
        try finish(source: ckpt, tmp: tmp, out: out, overwrite: overwrite, quantizationConfig: quantizationConfig, extras: extras)
    }
}
