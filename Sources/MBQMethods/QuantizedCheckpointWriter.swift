import Foundation
import MBQFormats
import MBQModel
import MBQTensor

/// Writes the quantized model as a directory that loads like the input: same files,
/// same tensor names and dtypes, decoder weights replaced by their scaled and
/// fake-quantized values, `quantization_config` added to config.json. Everything is
/// written under a temporary name beside `out` and renamed into place at the end, so a
/// crash never leaves a half-written model.
public enum QuantizedCheckpointWriter {
    /// The decoder tensors of the quantized blocks, by checkpoint name.
    public static func replacements(_ ckpt: Checkpoint, blocks: [DecoderBlockWeights<Float>]) -> [String: Tensor<Float>] {
        var r: [String: Tensor<Float>] = [:]
        let cfg = ckpt.config
        for (l, w) in blocks.enumerated() {
            let n = ckpt.names.block(l, qkvBias: cfg.qkvBias, oBias: cfg.oBias)
            r[n.inputNorm] = w.inputNorm; r[n.postAttentionNorm] = w.postAttentionNorm
            r[n.q] = w.q; r[n.k] = w.k; r[n.v] = w.v; r[n.o] = w.o
            r[n.gate] = w.gate; r[n.up] = w.up; r[n.down] = w.down
            if let b = n.qBias, let t = w.qBias { r[b] = t }
            if let b = n.kBias, let t = w.kBias { r[b] = t }
            if let b = n.vBias, let t = w.vBias { r[b] = t }
            if let b = n.oBias, let t = w.oBias { r[b] = t }
        }
        return r
    }

    /// Writes everything; `extras` adds files (results, report) into the temporary
    /// directory before it is renamed to `out`.
    public static func write(source ckpt: Checkpoint, blocks: [DecoderBlockWeights<Float>],
                             quantizationConfig: [String: Any], to out: String, overwrite: Bool,
                             extras: (String) throws -> Void) throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: out) && !overwrite {
            throw MethodsError.output(path: out, reason: "already exists (pass --overwrite to replace it)")
        }
        let tmp = out + ".partial-\(getpid())"
        try? fm.removeItem(atPath: tmp)
        do {
            try fm.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        } catch {
            throw MethodsError.output(path: tmp, reason: "cannot create: \(error.localizedDescription)")
        }
        do {
            let repl = replacements(ckpt, blocks: blocks)
            var written = Set<String>()
            for shard in ckpt.shards {
                var w = SafetensorsWriter()
                for name in shard.tensorNames {
                    let e = try shard.entry(name)
                    if let t = repl[name] {
                        guard t.shape == e.shape else {
                            throw MethodsError.output(path: shard.path, reason: "tensor '\(name)' would change shape \(e.shape) -> \(t.shape)")
                        }
                        w.add(name, t, as: e.dtype)
                        written.insert(name)
                    } else {
                        w.add(name, dtype: e.dtype, shape: e.shape, bytes: Array(try shard.rawBytes(name)))
                    }
                }
                try w.write(to: tmp + "/" + (shard.path as NSString).lastPathComponent, metadata: shard.metadata)
            }
            let missing = Set(repl.keys).subtracting(written)
            guard missing.isEmpty else {
                throw MethodsError.output(path: ckpt.directory, reason: "tensors not found in any shard: \(missing.sorted().prefix(3))")
            }
            // Every other file (tokenizer, processor, chat template, generation config, index) is copied.
            for f in try fm.contentsOfDirectory(atPath: ckpt.directory).sorted()
            where !f.hasSuffix(".safetensors") && !f.hasPrefix(".") && f != "config.json" {
                var isDir: ObjCBool = false
                let src = ckpt.directory + "/" + f
                if fm.fileExists(atPath: src, isDirectory: &isDir) {
                    try fm.copyItem(atPath: src, toPath: tmp + "/" + f)
                }
            }
            let cfgPath = ckpt.directory + "/config.json"
            guard var cfg = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: cfgPath)))) as? [String: Any] else {
                throw FormatsError.invalidConfig(path: cfgPath, reason: "not a JSON object")
            }
            cfg["quantization_config"] = quantizationConfig
            try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: cfg, options: [.prettyPrinted, .sortedKeys]),
                                 to: tmp + "/config.json")
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
}
