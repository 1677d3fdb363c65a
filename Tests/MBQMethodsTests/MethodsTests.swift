import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import XCTest

final class MethodsTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("MBQModelTests/Fixtures").path

    func fixture(_ arch: String) throws -> (Checkpoint, LanguageModel<Float>, CalibrationBundle) {
        let ckpt = try Checkpoint(directory: Self.fixtures + "/\(arch)/model")
        return (ckpt, try LanguageModel<Float>.load(ckpt), try CalibrationBundle.load(path: Self.fixtures + "/\(arch)/calib.safetensors"))
    }

    /// Scaling is an identity of the fp function: every group's scales folded into the
    /// block leave its output unchanged (docs/DESIGN.md §2 "Apply").
    func testApplyingScalesPreservesTheBlockFunction() throws {
        let (_, model, bundle) = try fixture("onevision_mha")
        var rng = SeededRandom(seed: 3)
        let fp = model.blocks[1]
        var w = fp
        for g in SearchGroup.allCases {
            let n = g == .down ? fp.intermediateSize : fp.hiddenSize
            ApplyScales.apply(g, scales: (0..<n).map { _ in Float(0.25 + 2 * rng.uniform()) }, to: &w)
        }
        XCTAssertNotEqual(w.q.data, fp.q.data)
        let s = bundle.samples[1]
        let rope = model.ropeTable(s.positions)
        let a = decoderBlockForward(s.embeds, weights: fp, rope: rope, mask: s.attention).output
        let b = decoderBlockForward(s.embeds, weights: w, rope: rope, mask: s.attention).output
        var maxDiff: Float = 0, scale: Float = 0
        for r in 0..<a.rows where s.attention[r] {
            for j in 0..<a.cols {
                maxDiff = max(maxDiff, abs(a.data[r * a.cols + j] - b.data[r * a.cols + j]))
                scale = max(scale, abs(a.data[r * a.cols + j]))
            }
        }
        XCTAssertLessThan(maxDiff / scale, 1e-5, "max abs diff \(maxDiff)")
    }

    func testRefusedOptions() throws {
        let (ckpt, _, _) = try fixture("llava15")
        func refuse(_ edit: (inout QuantizeOptions) -> Void, _ needle: String) {
            var o = QuantizeOptions()
            edit(&o)
            XCTAssertThrowsError(try o.validate(for: ckpt.config), needle) { e in
                XCTAssert("\(e)".contains(needle), "'\(needle)' not in: \(e)")
            }
        }
        refuse({ $0.group = 96 }, "--group 96")
        refuse({ $0.wBit = 9 }, "--w-bit 9")
        refuse({ $0.aBit = 4 }, "--a-bit 4")
        refuse({ $0.method = .smoothquant; $0.wBit = 4 }, "smoothquant is a W8A8 method")
        refuse({ $0.method = .smoothquant; $0.wBit = 8 }, "smoothquant is a W8A8 method")
        refuse({ $0.method = .rtn; $0.reweight = true }, "--reweight")
        refuse({ $0.method = .rtn; $0.distort = true }, "--distort")
        var cfg = ckpt.config
        cfg.intermediateSize = 320
        var o = QuantizeOptions()
        o.group = 128
        XCTAssertThrowsError(try o.validate(for: cfg)) { e in XCTAssert("\(e)".contains("intermediate_size = 320"), "\(e)") }
        o.aBit = 8  // per-channel: group does not apply
        XCTAssertNoThrow(try o.validate(for: cfg))
    }

    func testMedianClampAndSkippedSamples() throws {
        var sums: [GradientStatistics.Layer] = []
        for (v, c) in [(1.0, 2.0), (3.0, 2.0), (0.0, 1.0), (2.0, 1.0)] {
            var l = GradientStatistics.Layer()
            l.attnVis = v; l.attnCap = c; l.mlpVis = v; l.mlpCap = c
            sums.append(l)
        }
        let s = GradientStatistics.finalize(sums: sums, used: 1, skipped: [])
        // Raw ratios 0.5, 1.5, 0, 2 -> median (0.5 + 1.5) / 2 = 1.0 -> clamped 1, 1.5, 1, 2.
        XCTAssertEqual(s.layers.map(\.attnRatio), [1.0, 1.5, 1.0, 2.0])
        XCTAssertEqual(s.layers.map(\.rawAttnRatio), [0.5, 1.5, 0.0, 2.0])

        let (_, model, bundle) = try fixture("llava15")
        var samples = bundle.samples
        samples[1].vision = samples[1].vision.map { _ in false }
        samples[2].labels = samples[2].labels.map { _ in -100 }
        let g = try GradientStatistics.compute(model: model, samples: samples)
        XCTAssertEqual(g.samplesUsed, 1)
        XCTAssertEqual(g.skipped, ["sample 1: no vision positions", "sample 2: no caption positions"])
        XCTAssertEqual(g.layers.last!.rawAttnRatio, 0, "the last layer's vision outputs reach no caption prediction")
        XCTAssertGreaterThan(g.layers.last!.attnRatio, 0, "the median clamp lifts it")
        samples[0].vision = samples[0].vision.map { _ in false }
        XCTAssertThrowsError(try GradientStatistics.compute(model: model, samples: samples)) { e in
            XCTAssert("\(e)".contains("no usable calibration samples"), "\(e)")
        }
    }

    /// The one-process job as `mbq quantize` runs it: blocks read one at a time from the
    /// checkpoint, block inputs of the gradient pass and the search spilled to scratch (a zero budget),
    /// each quantized layer handed to the sink as it is done. The same numbers as the job
    /// on a model in memory.
    func testStreamedJobWithSpilledInputsMatchesTheInMemoryJob() throws {
        let (ckpt, model, bundle) = try fixture("qwen2vl")
        var o = QuantizeOptions()
        o.method = .mbq; o.wBit = 3; o.distort = true
        let want = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        let scratch = NSTemporaryDirectory() + "mbq-spill-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let inputs = ActivationStore(budgetBytes: 0, scratch: scratch, owner: "test")
        var streamed: [Int: (DecoderBlockWeights<Float>, [String: QuantizedWeight])] = [:]
        let got = try QuantizeJob.run(source: .checkpoint(ckpt), samples: bundle.samples, options: o, inputs: inputs) { l, b, c in
            XCTAssertNil(streamed[l], "layer \(l) emitted twice")
            XCTAssertEqual(streamed.count, l, "layers arrive in order")
            streamed[l] = (b, c)
        }
        // Every layer's inputs twice: the gradient pass keeps them for the backward, the
        // search's walk (`LayerInputs`) holds them again, layer by layer.
        XCTAssertEqual(inputs.lifetimeSpilledBytes, 2 * bundle.samples.count * model.config.numLayers * bundle.samples[0].length * model.config.hiddenSize * 4,
                       "every block input went to scratch, in the gradient pass and in the search")
        XCTAssertTrue(got.blocks.isEmpty, "a streamed job keeps no blocks")
        XCTAssertEqual(got.gradStats, want.gradStats)
        XCTAssertEqual(got.groups.map(\.bestIndex), want.groups.map(\.bestIndex))
        XCTAssertEqual(got.groups.map(\.scales), want.groups.map(\.scales))
        for l in 0..<model.config.numLayers {
            for (role, path) in ApplyScales.linears {
                XCTAssertEqual(streamed[l]!.0[keyPath: path].data, want.blocks[l][keyPath: path].data, "layer \(l) \(role)")
                XCTAssertEqual(streamed[l]!.1[role], want.codes[l][role], "layer \(l) \(role) codes")
            }
        }
    }

    func testRTNIsTheGridPointZeroOfTheSearch() throws {
        let (_, model, bundle) = try fixture("onevision")
        var o = QuantizeOptions()
        o.method = .rtn
        let rtn = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        XCTAssertEqual(rtn.blocks[0].q.data, Quantize.groupAsymmetric(model.blocks[0].q, bits: 4, group: 128).data)
        XCTAssertEqual(rtn.blocks[0].inputNorm.data, model.blocks[0].inputNorm.data, "rtn scales nothing")
        // a = 0 gives s = 1: the loss at grid point 0 is RTN's error on that module.
        o.method = .awq
        let awq = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        let g = awq.groups.first { $0.layer == 0 && $0.group == .down }!
        XCTAssertEqual(ScaleSearch.scales([0.5, 2, 8], alpha: 0), [1, 1, 1])
        XCTAssertEqual(g.losses.count, 20)
        // RTN's error on down_proj, computed here without the search: the fp layer's
        // down_proj input through the RTN weight against its fp output, mean |diff| over
        // every element of every attended position (awq: no reweighting).
        let fp = model.blocks[0]
        var sum = 0.0, count = 0
        for s in bundle.samples {
            let f = decoderBlockForward(s.embeds, weights: fp, rope: model.ropeTable(s.positions), mask: s.attention, capture: true)
            let out = linearForward(f.captures!.downInput, weight: rtn.blocks[0].down)
            let ref = f.captures!.mlpOutput
            for r in 0..<out.rows where s.attention[r] {
                var rs: Float = 0
                for j in 0..<out.cols { rs += abs(out.data[r * out.cols + j] - ref.data[r * out.cols + j]) }
                sum += Double(rs)
                count += out.cols
            }
        }
        let rtnLoss = sum / Double(count)
        XCTAssertEqual(g.losses[0], rtnLoss, accuracy: 1e-6 * rtnLoss, "grid point 0 is RTN: \(g.losses[0]) vs \(rtnLoss)")
        XCTAssertLessThan(g.losses.min()!, g.losses[0], "the search finds a better grid point than RTN here")
    }

    func testDistortAndSmoothQuantRun() throws {
        let (_, model, bundle) = try fixture("qwen2vl")
        var o = QuantizeOptions()
        o.method = .mbq; o.wBit = 3
        let plain = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        o.distort = true
        let distorted = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        XCTAssertEqual(plain.groups.filter { $0.layer == 0 }.map(\.bestIndex), distorted.groups.filter { $0.layer == 0 }.map(\.bestIndex),
                       "layer 0 sees the same inputs either way")
        XCTAssertNotEqual(plain.groups.filter { $0.layer > 0 }.map(\.losses), distorted.groups.filter { $0.layer > 0 }.map(\.losses),
                          "later layers see the quantized model's activations")
        var sq = QuantizeOptions()
        sq.method = .smoothquant; sq.wBit = 8; sq.aBit = 8
        let r = try QuantizeJob.run(model: model, samples: bundle.samples, options: sq)
        XCTAssertNotEqual(r.blocks[0].inputNorm.data, model.blocks[0].inputNorm.data, "migration moved scale into the norm")
        let e = try Evaluate.run(model: LanguageModel(config: model.config, blocks: r.blocks, finalNorm: model.finalNorm,
                                                      lmHead: model.lmHead),
                                 actBits: 8, samples: bundle.samples, reference: model)
        XCTAssertLessThan(e.klAll!, 0.01, "W8A8 stays close to fp")
    }

    func testOutputDirectoryLoadsLikeTheInput() throws {
        let (ckpt, model, bundle) = try fixture("llava15")
        let out = NSTemporaryDirectory() + "mbq-out-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: out) }
        // An extra file the tool must carry over.
        let src = NSTemporaryDirectory() + "mbq-src-" + UUID().uuidString
        try FileManager.default.copyItem(atPath: ckpt.directory, toPath: src)
        defer { try? FileManager.default.removeItem(atPath: src) }
        try Data("{\"chat_template\": \"x\"}".utf8).write(to: URL(fileURLWithPath: src + "/tokenizer_config.json"))
        let source = try Checkpoint(directory: src)
        var o = QuantizeOptions()
        o.wBit = 3
        o.format = .fake
        o.weightDType = source.weightDType
        let r = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        try QuantizedCheckpointWriter.write(source: source, result: r, to: out, overwrite: false) { try ResultsFile.writeAll(r, into: $0) }
        let q = try Checkpoint(directory: out)
        XCTAssertEqual(q.allTensorNames, source.allTensorNames)
        for n in q.allTensorNames { XCTAssertEqual(try q.entry(n).entry.dtype, try source.entry(n).entry.dtype, n) }
        XCTAssertEqual(try q.tensor("vision_tower.post_layernorm.weight").data, try source.tensor("vision_tower.post_layernorm.weight").data)
        XCTAssertEqual(try q.tensor("language_model.model.layers.2.mlp.down_proj.weight").data, r.blocks[2].down.data)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/tokenizer_config.json"))
        let cfg = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/config.json"))) as! [String: Any]
        let qc = cfg["quantization_config"] as! [String: Any]
        XCTAssertEqual(qc["method"] as? String, "mbq")
        XCTAssertEqual(qc["bits"] as? Int, 3)
        XCTAssertEqual(qc["group_size"] as? Int, 128)
        let res = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/mbq_results.json"))) as! [String: Any]
        XCTAssertEqual(res["method"] as? String, "mbq")
        XCTAssertEqual(res["w_bit"] as? Int, 3)
        XCTAssertEqual(res["reweight"] as? Bool, true)
        let layers = (res["grad_stats"] as! [String: Any])["layers"] as! [[String: Any]]
        XCTAssertEqual(Set(layers[0].keys).isSuperset(of: ["layer", "attn_vis", "attn_cap", "mlp_vis", "mlp_cap", "attn_ratio", "mlp_ratio"]), true)
        let groups = res["groups"] as! [[String: Any]]
        XCTAssertEqual(groups.count, 9)
        XCTAssertEqual((groups[0]["loss"] as! [Double]).count, 20)
        let scales = try SafetensorsFile(path: out + "/mbq_scales.safetensors")
        XCTAssertEqual(try scales.floatTensor("layers.0.qkv.scales").shape, [128])
        XCTAssertTrue(try String(contentsOfFile: out + "/report.md", encoding: .utf8).contains("| 2 |"))
        XCTAssertTrue(try String(contentsOfFile: out + "/ratios.svg", encoding: .utf8).hasPrefix("<svg"))
        // It evaluates like any checkpoint, close to the fp model.
        let e = try Evaluate.run(model: try LanguageModel<Float>.load(q), actBits: nil, samples: bundle.samples, reference: model)
        XCTAssertGreaterThan(e.klAll!, 0)
        // An existing output is refused; a failed write leaves nothing behind.
        XCTAssertThrowsError(try QuantizedCheckpointWriter.write(source: source, result: r, to: out,
                                                                 overwrite: false) { _ in }) { e in XCTAssert("\(e)".contains("already exists")) }
        let out2 = out + "-2"
        XCTAssertThrowsError(try QuantizedCheckpointWriter.write(source: source, result: r, to: out2,
                                                                 overwrite: false) { _ in throw MethodsError.output(path: "x", reason: "boom") })
        XCTAssertFalse(FileManager.default.fileExists(atPath: out2))
        // Nothing of this write is left beside it (other tests' temporaries may be).
        let name = (out2 as NSString).lastPathComponent
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: (out2 as NSString).deletingLastPathComponent)
            .filter { $0.hasPrefix(name + ".partial-") }
        XCTAssertEqual(leftovers, [])
    }
}
