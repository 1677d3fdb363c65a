import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import XCTest

/// Every output format: written from the codes, read back by `mbq eval`'s loader to
/// exactly the weights the run computed, codes equal to the reference quantizer's, and
/// bad packed checkpoints refused with an error naming the tensor.
final class OutputFormatTests: XCTestCase {
    static let fixtures = MethodsTests.fixtures

    func fixture(_ arch: String) throws -> (Checkpoint, LanguageModel<Float>, CalibrationBundle) {
        let ckpt = try Checkpoint(directory: Self.fixtures + "/\(arch)/model")
        return (ckpt, try LanguageModel<Float>.load(ckpt), try CalibrationBundle.load(path: Self.fixtures + "/\(arch)/calib.safetensors"))
    }

    struct Case { let format: CheckpointFormat; let wBit: Int; let aBit: Int? }
    static let cases = [Case(format: .compressedTensors, wBit: 4, aBit: nil), Case(format: .compressedTensors, wBit: 4, aBit: 8),
                        Case(format: .compressedTensors, wBit: 8, aBit: 8), Case(format: .awq, wBit: 4, aBit: nil),
                        Case(format: .gptq, wBit: 3, aBit: nil), Case(format: .gptq, wBit: 4, aBit: nil),
                        Case(format: .fake, wBit: 3, aBit: nil)]

    func write(_ ckpt: Checkpoint, _ model: LanguageModel<Float>, _ bundle: CalibrationBundle, _ c: Case,
               method: QuantMethod = .rtn) throws -> (QuantizeResult, String) {
        var o = QuantizeOptions()
        o.method = method; o.wBit = c.wBit; o.aBit = c.aBit; o.format = c.format; o.weightDType = ckpt.weightDType
        try o.validate(for: ckpt.config)
        let r = try QuantizeJob.run(model: model, samples: Array(bundle.samples.prefix(2)), options: o)
        let out = NSTemporaryDirectory() + "mbq-fmt-" + UUID().uuidString
        try QuantizedCheckpointWriter.write(source: ckpt, result: r, to: out, overwrite: false) { _ in }
        return (r, out)
    }

    func testEveryFormatReadsBackToTheRunsWeightsAndTheReferenceCodes() throws {
        for arch in ["llava15", "onevision", "qwen2vl"] {
            let (ckpt, model, bundle) = try fixture(arch)
            for c in Self.cases {
                let label = "\(arch) \(c.format.rawValue) w\(c.wBit)" + (c.aBit.map { "a\($0)" } ?? "")
                let (r, out) = try write(ckpt, model, bundle, c)
                defer { try? FileManager.default.removeItem(atPath: out) }
                let q = try Checkpoint(directory: out)
                XCTAssertEqual(q.quantization?.format, c.format, label)
                XCTAssertEqual(q.quantization?.activationBits, c.aBit, label)
                let back = try LanguageModel<Float>.load(q)
                let precision = r.options.scaleDType.scalePrecision
                for l in 0..<ckpt.config.numLayers {
                    for (role, path) in ApplyScales.linears {
                        // RTN scales nothing: the codes are the reference quantizer's on the source weight.
                        let src = model.blocks[l][keyPath: path]
                        let ref = c.aBit == nil ? QuantReference.groupAsymmetricCodes(src, bits: c.wBit, group: 128)
                                                : QuantReference.rowSymmetricCodes(src, bits: c.wBit)
                        XCTAssertEqual(r.codes[l][role], ref, "\(label) layer \(l) \(role): codes")
                        let got = back.blocks[l][keyPath: path].data, want = r.blocks[l][keyPath: path].data
                        XCTAssertEqual(got, want, "\(label) layer \(l) \(role): read back, max abs diff \(zip(got, want).map { abs($0 - $1) }.max() ?? 0)")
                        XCTAssertEqual(want, ref.dequantized(precision: precision).data, "\(label): dequantized with \(precision) scales")
                    }
                    XCTAssertEqual(back.blocks[l].inputNorm.data, r.blocks[l].inputNorm.data, label)
                }
                // Untouched: the vision side, the embeddings and the head.
                for n in ckpt.allTensorNames where !n.contains(".layers.") || n.contains("vision") || n.hasPrefix("visual") {
                    XCTAssertEqual(try q.entry(n).file.rawBytes(n).elementsEqual(ckpt.entry(n).file.rawBytes(n)), true, "\(label): \(n)")
                }
            }
        }
    }

    /// config.json: the input's text survives byte for byte, only quantization_config is
    /// added, naming the modules left alone by this architecture's own names.
    /// GPTQ's outputs: with activation order the GPTQ format stores g_idx (desc_act) and
    /// compressed-tensors static groups (actorder "weight"); both read back to exactly the
    /// weights the run computed; AWQ refuses activation order.
    func testGPTQOutputsReadBackWithTheirGroupOrder() throws {
        let (ckpt, model, bundle) = try fixture("qwen2vl")
        for (format, bits, act) in [(CheckpointFormat.gptq, 3, true), (.gptq, 4, false), (.compressedTensors, 4, true), (.awq, 4, false)] {
            let label = "\(format.rawValue) w\(bits) act-order \(act)"
            var o = QuantizeOptions()
            o.method = .gptq; o.wBit = bits; o.format = format; o.actOrder = act; o.hessianWeights = .modality
            o.weightDType = ckpt.weightDType
            try o.validate(for: ckpt.config)
            let r = try QuantizeJob.run(model: model, samples: Array(bundle.samples.prefix(3)), options: o)
            let out = NSTemporaryDirectory() + "mbq-gptq-" + UUID().uuidString
            defer { try? FileManager.default.removeItem(atPath: out) }
            try QuantizedCheckpointWriter.write(source: ckpt, result: r, to: out, overwrite: false) { _ in }
            let q = try Checkpoint(directory: out)
            XCTAssertEqual(q.quantization?.format, format, label)
            let config = try String(contentsOfFile: out + "/config.json", encoding: .utf8)
            if format == .gptq { XCTAssertTrue(config.contains("\"desc_act\": \(act)"), "\(label): \(config)") }
            if format == .compressedTensors { XCTAssertTrue(config.contains("\"actorder\": \"weight\""), label) }
            let back = try LanguageModel<Float>.load(q)
            var reordered = 0
            for l in 0..<ckpt.config.numLayers {
                for (role, path) in ApplyScales.linears {
                    XCTAssertEqual(back.blocks[l][keyPath: path].data, r.blocks[l][keyPath: path].data, "\(label) layer \(l) \(role)")
                    let c = try XCTUnwrap(r.codes[l][role])
                    if format == .gptq && act {
                        let gi = try XCTUnwrap(c.gIdx, "\(label) \(role): g_idx")
                        if gi != (0..<c.cols).map({ Int32($0 / 128) }) { reordered += 1 }
                    } else {
                        XCTAssertNil(c.gIdx, "\(label) \(role): no g_idx")
                    }
                }
            }
            if format == .gptq && act { XCTAssertGreaterThan(reordered, 0, "activation order moved some column out of its group") }
        }
        var o = QuantizeOptions()
        o.method = .gptq; o.wBit = 4; o.format = .awq; o.actOrder = true
        XCTAssertThrowsError(try o.validate(for: ckpt.config)) { XCTAssertTrue("\($0)".contains("g_idx"), "\($0)") }
    }

    func testConfigIsEditedAndNamesTheIgnoredModules() throws {
        for (arch, ignored) in [("llava15", ["lm_head", "multi_modal_projector", "vision_tower"]), ("qwen2vl", ["lm_head", "visual"])] {
            let (ckpt, model, bundle) = try fixture(arch)
            XCTAssertEqual(try ckpt.nonDecoderModules(), ignored, arch)
            for c in [Self.cases[0], Self.cases[3], Self.cases[4]] {
                let (_, out) = try write(ckpt, model, bundle, c)
                defer { try? FileManager.default.removeItem(atPath: out) }
                let input = try String(contentsOfFile: ckpt.directory + "/config.json", encoding: .utf8)
                let output = try String(contentsOfFile: out + "/config.json", encoding: .utf8)
                let body = input.trimmingCharacters(in: .whitespacesAndNewlines).dropLast()
                XCTAssertTrue(output.hasPrefix(body.trimmingCharacters(in: .whitespacesAndNewlines)), "\(arch): the input text is kept")
                let qc = (try JSONSerialization.jsonObject(with: Data(output.utf8)) as! [String: Any])["quantization_config"] as! [String: Any]
                switch c.format {
                case .compressedTensors: XCTAssertEqual(qc["ignore"] as? [String], ignored.map { "re:.*\($0).*" })
                default: XCTAssertEqual(qc["modules_to_not_convert"] as? [String], ignored)
                }
            }
        }
    }

    func testSchemesAFormatCannotHoldAreRefused() throws {
        let (ckpt, _, _) = try fixture("llava15")
        var o = QuantizeOptions()
        o.wBit = 3; o.format = .compressedTensors
        XCTAssertThrowsError(try o.validate(for: ckpt.config)) { XCTAssertTrue("\($0)".contains("--format compressed-tensors cannot hold w3 g128"), "\($0)") }
        o.format = .awq
        XCTAssertThrowsError(try o.validate(for: ckpt.config)) { XCTAssertTrue("\($0)".contains("AutoAWQ"), "\($0)") }
        o.wBit = 4; o.aBit = 8; o.format = .gptq
        XCTAssertThrowsError(try o.validate(for: ckpt.config)) { XCTAssertTrue("\($0)".contains("GPTQ"), "\($0)") }
        // Defaults: what vLLM serves for each scheme.
        o.format = nil
        XCTAssertEqual(o.resolvedFormat, .compressedTensors)
        o.aBit = nil; o.wBit = 3
        XCTAssertEqual(o.resolvedFormat, .gptq)
        o.wBit = 5
        XCTAssertEqual(o.resolvedFormat, .fake)
        // ... but a scheme no engine serves is written as fake weights only on request.
        XCTAssertThrowsError(try o.validate(for: ckpt.config)) { XCTAssertTrue("\($0)".contains("pass --format fake"), "\($0)") }
        o.format = .fake
        XCTAssertNoThrow(try o.validate(for: ckpt.config))
    }

    /// A damaged packed checkpoint: each fault gives an error naming the tensor.
    func testBadPackedCheckpointsNameTheTensor() throws {
        let (ckpt, model, bundle) = try fixture("llava15")
        let (_, ct) = try write(ckpt, model, bundle, Self.cases[0])
        let (_, gptq) = try write(ckpt, model, bundle, Self.cases[5])
        defer { for d in [ct, gptq] { try? FileManager.default.removeItem(atPath: d) } }
        let q = "language_model.model.layers.0.self_attn.q_proj"
        let shard = QuantizedCheckpointWriter.layout(ckpt).layerFiles[0]

        /// A copy of `dir` whose layer-0 shard went through `edit` (name -> replacement).
        func damaged(_ dir: String, config: ((String) -> String)? = nil,
                     _ edit: (String, TensorEntry, [UInt8]) -> (DType, [Int], [UInt8])?) throws -> String {
            let d = NSTemporaryDirectory() + "mbq-bad-" + UUID().uuidString
            try FileManager.default.copyItem(atPath: dir, toPath: d)
            let f = try SafetensorsFile(path: dir + "/" + shard)
            var w = SafetensorsWriter()
            for n in f.tensorNames {
                let e = try f.entry(n)
                if let (dt, shape, bytes) = edit(n, e, Array(try f.rawBytes(n))) { w.add(n, dtype: dt, shape: shape, bytes: bytes) }
            }
            try w.write(to: d + "/" + shard)
            if let config {
                let c = try String(contentsOfFile: d + "/config.json", encoding: .utf8)
                try config(c).write(toFile: d + "/config.json", atomically: true, encoding: .utf8)
            }
            return d
        }
        func expectError(_ dir: String, _ needles: [String], file: StaticString = #filePath, line: UInt = #line) {
            defer { try? FileManager.default.removeItem(atPath: dir) }
            XCTAssertThrowsError(try LanguageModel<Float>.load(try Checkpoint(directory: dir)), file: file, line: line) { e in
                for n in needles { XCTAssertTrue("\(e)".contains(n), "\(e) should name \(n)", file: file, line: line) }
            }
        }
        // The index lists every tensor: drop the index so a removed tensor is "missing", not an index mismatch.
        func withoutIndex(_ d: String) -> String { try? FileManager.default.removeItem(atPath: d + "/model.safetensors.index.json"); return d }

        // A wrong shape.
        expectError(try damaged(ct) { n, e, b in n == q + ".weight_packed" ? (e.dtype, [e.shape[1], e.shape[0]], b) : (e.dtype, e.shape, b) },
                    [q + ".weight_packed", "shape"])
        // A missing scale.
        expectError(withoutIndex(try damaged(ct) { n, e, b in n == q + ".weight_scale" ? nil : (e.dtype, e.shape, b) }),
                    [q + ".weight_scale", "missing"])
        // A wrong dtype.
        expectError(try damaged(ct) { n, e, b in
            n == q + ".weight_packed" ? (.i8, [e.shape[0], e.shape[1] * 4], b) : (e.dtype, e.shape, b)
        }, [q + ".weight_packed", "I32"])
        // Codes out of range: a GPTQ v1 checkpoint stores z - 1, so an all-ones nibble means z = 16.
        expectError(try damaged(gptq, config: { $0.replacingOccurrences(of: "\"gptq_v2\"", with: "\"gptq\"") }) { n, e, b in
            n == q + ".qzeros" ? (e.dtype, e.shape, [UInt8](repeating: 0xFF, count: b.count)) : (e.dtype, e.shape, b)
        }, [q + ".qzeros", "out of range"])
        // A scale that is not positive.
        expectError(try damaged(gptq) { n, e, b in n == q + ".scales" ? (e.dtype, e.shape, [UInt8](repeating: 0, count: b.count)) : (e.dtype, e.shape, b) },
                    [q + ".scales", "not positive"])
        // An unknown format.
        expectError(try damaged(ct, config: { $0.replacingOccurrences(of: "\"quant_method\": \"compressed-tensors\"", with: "\"quant_method\": \"hqq\"") }) { n, e, b in
            (e.dtype, e.shape, b)
        }, ["config.json", "unknown quant_method 'hqq'"])
    }
}
