import Foundation
import Logging
import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// Writes the quantized model as a directory that loads like the input (docs/DESIGN.md §4):
/// the decoder's linears in the chosen format (fake: dequantized weights under the same
/// names and dtypes; compressed-tensors, AWQ, GPTQ: packed codes and scales, see
/// `PackedLinear`), norms and biases with their scales folded in, `quantization_config`
/// added to config.json by editing its text, other files copied.
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
        let blockNames = Set((0..<cfg.numLayers).flatMap { ckpt.blockNames($0).all })
        let rest = ckpt.shards.map { s in (s, s.tensorNames.filter { !blockNames.contains($0) }) }.filter { !$0.1.isEmpty }
        let total = rest.count + cfg.numLayers
        func file(_ i: Int) -> String { String(format: "model-%05d-of-%05d.safetensors", i + 1, total) }
        return Layout(rest: rest.enumerated().map { (file($0.offset), $0.element.0, $0.element.1) },
                      layerFiles: (0..<cfg.numLayers).map { file(rest.count + $0) })
    }

    /// The names layer `l`'s shard holds in the output format: the source's block names,
    /// each linear's `.weight` replaced by the format's tensors.
    public static func outputNames(_ ckpt: Checkpoint, layer l: Int, options: QuantizeOptions) -> [String] {
        let n = ckpt.blockNames(l)
        let linear = Set(n.linears.map(\.name))
        var names = n.all.filter { !linear.contains($0) }
        for s in n.linears {
            names += PackedLinear.tensorNames(module: s.module, format: options.resolvedFormat, bits: options.wBit, symmetric: options.aBit != nil)
        }
        return names.sorted()
    }

    /// Layer `l`'s shard: norms and biases in the source dtypes, linears in the output
    /// format (from their codes; the fake format stores the dequantized weights of
    /// `block`). -> its file name in the output and the file's bytes. Whoever computes a
    /// layer (this process, a worker) makes the same bytes.
    public static func layerShard(_ ckpt: Checkpoint, layer l: Int, block b: DecoderBlockWeights<Float>,
                                  codes: [String: QuantizedWeight], options: QuantizeOptions) throws -> (file: String, bytes: [UInt8]) {
        let file = layout(ckpt).layerFiles[l]
        let n = ckpt.blockNames(l)
        var w = SafetensorsWriter()
        func add(_ name: String?, _ t: Tensor<Float>?) throws {
            guard let name, let t else { return }
            let e = try ckpt.entry(name).entry
            guard t.shape == e.shape else {
                throw MethodsError.output(path: file, reason: "tensor '\(name)' would change shape \(e.shape) -> \(t.shape)")
            }
            w.add(name, t, as: e.dtype)
        }
        try add(n.inputNorm, b.inputNorm); try add(n.postAttentionNorm, b.postAttentionNorm)
        try add(n.qBias, b.qBias); try add(n.kBias, b.kBias); try add(n.vBias, b.vBias); try add(n.oBias, b.oBias)
        let format = options.resolvedFormat
        let paths = Dictionary(uniqueKeysWithValues: ApplyScales.linears.map { ($0.role, $0.path) })
        for s in n.linears {
            // Fused families store several linears' rows in one tensor, in the order
            // they were read (`StoredLinear`); packed formats pack the fused codes.
            if format == .fake {
                try add(s.name, fused(s, s.roles.map { b[keyPath: paths[$0]!] }))
                continue
            }
            guard let q = fused(s, s.roles.map { codes[$0] }), [q.rows, q.cols] == (try ckpt.entry(s.name).entry.shape) else {
                throw MethodsError.output(path: file, reason: "no codes of the source's shape for '\(s.name)'")
            }
            PackedLinear.add(q, module: s.module, format: format, scaleDType: options.scaleDType, to: &w)
        }
        w.sortByName()
        return (file, try w.serialized(metadata: ["format": "pt"]))
    }

    /// The stored tensor from its roles' weights ([out, in] each, in `s.roles` order).
    static func fused(_ s: StoredLinear, _ parts: [Tensor<Float>]) -> Tensor<Float> {
        if parts.count == 1 && parts[0].rows == s.rows { return parts[0] }
        let cols = parts[0].cols
        return Tensor(shape: [s.rows, cols], data: s.fuse(Dictionary(uniqueKeysWithValues: zip(s.roles, parts.map(\.data))), cols: cols))
    }

    /// The stored tensor's codes from its roles' codes (nil when one is missing or they
    /// were quantized differently).
    static func fused(_ s: StoredLinear, _ parts: [QuantizedWeight?]) -> QuantizedWeight? {
        let parts = parts.compactMap { $0 }
        guard parts.count == s.roles.count, let p = parts.first else { return nil }
        if parts.count == 1 && p.rows == s.rows { return p }
        guard parts.allSatisfy({ $0.cols == p.cols && $0.bits == p.bits && $0.group == p.group && $0.symmetric == p.symmetric }) else {
            return nil
        }
        func rows<E>(_ values: (QuantizedWeight) -> [E], cols: Int) -> [E] {
            s.fuse(Dictionary(uniqueKeysWithValues: zip(s.roles, parts.map(values))), cols: cols)
        }
        return QuantizedWeight(rows: s.rows, cols: p.cols, bits: p.bits, group: p.group, symmetric: p.symmetric,
                               codes: rows(\.codes, cols: p.cols), scales: rows(\.scales, cols: p.groupsPerRow),
                               zeros: rows(\.zeros, cols: p.groupsPerRow))
    }

    /// Writes layer `l`'s shard into `dir` (atomically). -> the file name and its size.
    @discardableResult
    public static func writeLayer(_ ckpt: Checkpoint, layer l: Int, block: DecoderBlockWeights<Float>,
                                  codes: [String: QuantizedWeight], options: QuantizeOptions,
                                  into dir: String) throws -> (file: String, bytes: UInt64) {
        let shard = try layerShard(ckpt, layer: l, block: block, codes: codes, options: options)
        try writeShard(shard.file, shard.bytes, into: dir)
        return (shard.file, UInt64(shard.bytes.count))
    }

    /// Writes a shard's bytes into `dir` atomically, refusing a name that is not one of
    /// the output's shard names (a streamed shard's name comes from the network).
    public static func writeShard(_ file: String, _ bytes: [UInt8], into dir: String) throws {
        guard file.range(of: #"^model-\d{5}-of-\d{5}\.safetensors$"#, options: .regularExpression) != nil else {
            throw MethodsError.output(path: dir, reason: "'\(file)' is not a shard name of the output")
        }
        try AtomicFile.write(data: Data(bytes), to: dir + "/" + file)
    }

    static func fileSize(_ path: String) -> UInt64 {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)??.uint64Value ?? 0
    }

    /// Checks a layer shard someone else wrote: present, a valid safetensors file, and
    /// holding exactly the layer's tensors in the output format, those the source also
    /// has (norms, biases, fake weights) with the source shapes.
    public static func verifyLayer(_ ckpt: Checkpoint, layer l: Int, in dir: String, bytes: UInt64,
                                   options: QuantizeOptions) throws {
        let path = dir + "/" + layout(ckpt).layerFiles[l]
        let f = try SafetensorsFile(path: path)
        let size = fileSize(path)
        guard size == bytes else { throw MethodsError.output(path: path, reason: "\(size) bytes on disk, the worker wrote \(bytes)") }
        let want = outputNames(ckpt, layer: l, options: options)
        guard f.tensorNames == want else {
            throw MethodsError.output(path: path, reason: "holds \(f.tensorNames.count) tensors, layer \(l) has \(want.count)")
        }
        for n in want where ckpt.contains(n) {
            guard try f.entry(n).shape == ckpt.entry(n).entry.shape else {
                throw MethodsError.output(path: path, reason: "tensor '\(n)' has the wrong shape")
            }
        }
    }

    /// Creates the temporary output directory, owned by this process (`OutputGuard`),
    /// after removing a stale one of the same name and those of dead processes.
    public static func begin(out: String, overwrite: Bool, tmp: String, logger: Logger? = nil) throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: out) && !overwrite {
            throw MethodsError.output(path: out, reason: "already exists (pass --overwrite to replace it)")
        }
        OutputGuard.removeOrphans(of: out, logger: logger ?? Logger(label: "mbq.output"))
        try? fm.removeItem(atPath: tmp)
        do {
            try fm.createDirectory(atPath: tmp, withIntermediateDirectories: true)
            try OutputGuard.claim(tmp)
        } catch {
            throw MethodsError.output(path: tmp, reason: "cannot create: \(error)")
        }
    }

    /// The output's size in bytes, estimated from the source's headers: the tensors copied
    /// as they are, and each linear in the output format (codes, scales, zero points and
    /// indices at their stored widths). For the free-space check before any work.
    public static func predictedBytes(_ ckpt: Checkpoint, options: QuantizeOptions) throws -> UInt64 {
        let lay = layout(ckpt)
        var total = 0
        for (_, source, names) in lay.rest { for n in names { total += try source.entry(n).byteRange.count } }
        let bits = options.wBit, scale = options.scaleDType.byteSize
        for l in 0..<ckpt.config.numLayers {
            let n = ckpt.blockNames(l)
            let linear = Set(n.linears.map(\.name))
            for name in n.all where !linear.contains(name) { total += try ckpt.entry(name).entry.byteRange.count }
            for s in n.linears {
                let shape = try ckpt.entry(s.name).entry.shape
                let (rows, cols) = (shape[0], shape.dropFirst().reduce(1, *))
                if options.resolvedFormat == .fake { total += rows * cols * options.weightDType.byteSize; continue }
                let groups = options.aBit == nil && options.group > 0 ? (cols + options.group - 1) / options.group : 1
                total += rows * (cols * bits + 31) / 32 * 4 + rows * groups * (scale + 4) + cols * 4
            }
        }
        return UInt64(total)
    }

    /// Writes everything but the layer shards (already in `tmp`), then renames `tmp` to
    /// `out`. `extras` adds files (results, report) before the rename.
    public static func finish(source ckpt: Checkpoint, tmp: String, out: String, overwrite: Bool,
                              options: QuantizeOptions, extras: (String) throws -> Void) throws {
        let fm = FileManager.default
        do {
            let lay = layout(ckpt)
            var weightMap: [String: String] = [:]
            var totalSize = 0
            for (file, source, names) in lay.rest {
                var w = SafetensorsWriter()
                for name in names {
                    let e = try source.entry(name)
                    try w.add(copying: name, from: source)
                    weightMap[name] = file
                    totalSize += e.shape.reduce(1, *) * e.dtype.byteSize
                }
                try w.write(to: tmp + "/" + file, metadata: source.metadata)
            }
            for l in 0..<ckpt.config.numLayers {
                let path = tmp + "/" + lay.layerFiles[l]
                guard fm.fileExists(atPath: path) else {
                    throw MethodsError.output(path: tmp, reason: "layer \(l)'s shard \(lay.layerFiles[l]) was never written")
                }
                let shard = try SafetensorsFile(path: path)
                for name in shard.tensorNames {
                    weightMap[name] = lay.layerFiles[l]
                    totalSize += try shard.entry(name).byteRange.count
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
            // config.json is edited as text: every input key and value stays as written.
            let cfgPath = ckpt.directory + "/config.json"
            guard let text = try? String(contentsOfFile: cfgPath, encoding: .utf8) else {
                throw FormatsError.unreadable(path: cfgPath, reason: "not readable as UTF-8")
            }
            let edited = try ConfigEdit.addingTopLevelKey("quantization_config",
                                                          value: options.configBlock(ignore: try ckpt.nonDecoderModules()),
                                                          to: text, path: cfgPath)
            try AtomicFile.write(data: Data(edited.utf8), to: tmp + "/config.json")
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

    /// The one-process streaming path: `run` gets a sink that writes each quantized
    /// layer's shard into the temporary directory as soon as it exists (so the job
    /// never holds more than one quantized layer); then the rest, and `extras` with the
    /// run's result, before the rename.
    @discardableResult
    public static func write(source ckpt: Checkpoint, options: QuantizeOptions, to out: String, overwrite: Bool,
                             run: (@escaping QuantizedLayerSink) throws -> QuantizeResult,
                             extras: (String, QuantizeResult) throws -> Void) throws -> QuantizeResult {
        let tmp = out + ".partial-\(getpid())"
        try begin(out: out, overwrite: overwrite, tmp: tmp)
        do {
            var written = Set<Int>()
            let result = try run { l, block, codes in
                try writeLayer(ckpt, layer: l, block: block, codes: codes, options: options, into: tmp)
                written.insert(l)
            }
            guard written.count == ckpt.config.numLayers else {
                throw MethodsError.output(path: out, reason: "\(written.count) quantized layers written for a model of \(ckpt.config.numLayers) layers")
            }
            try finish(source: ckpt, tmp: tmp, out: out, overwrite: overwrite, options: options) { try extras($0, result) }
            return result
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw error
        }
    }

    /// The one-process path: every layer, then the rest.
    public static func write(source ckpt: Checkpoint, result r: QuantizeResult, to out: String, overwrite: Bool,
                             extras: (String) throws -> Void) throws {
        guard r.blocks.count == ckpt.config.numLayers, r.codes.count == r.blocks.count else {
            throw MethodsError.output(path: out, reason: "\(r.blocks.count) quantized blocks (\(r.codes.count) with codes) for a model of \(ckpt.config.numLayers) layers")
        }
        let tmp = out + ".partial-\(getpid())"
        try begin(out: out, overwrite: overwrite, tmp: tmp)
        do {
            for (l, b) in r.blocks.enumerated() {
                try writeLayer(ckpt, layer: l, block: b, codes: r.codes[l], options: r.options, into: tmp)
            }
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw error
        }
        try finish(source: ckpt, tmp: tmp, out: out, overwrite: overwrite, options: r.options, extras: extras)
    }
}
