import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import XCTest

/// GPTQ as a job: its options refused where they cannot work, the chunking of the
/// samples changing no bit, the token weights of each mode, and `--then gptq` rounding
/// the scaled layer.
final class GPTQJobTests: XCTestCase {
    func fixture(_ arch: String) throws -> (LanguageModel<Float>, CalibrationBundle) {
        let ckpt = try Checkpoint(directory: MethodsTests.fixtures + "/\(arch)/model")
        return (try LanguageModel<Float>.load(ckpt), try CalibrationBundle.load(path: MethodsTests.fixtures + "/\(arch)/calib.safetensors"))
    }

    func testOptionsThatCannotWorkAreRefusedSayingWhy() throws {
        let (model, _) = try fixture("llava15")
        func refused(_ change: (inout QuantizeOptions) -> Void, _ needle: String) {
            var o = QuantizeOptions()
            o.method = .gptq
            change(&o)
            XCTAssertThrowsError(try o.validate(for: model.config), needle) { XCTAssertTrue("\($0)".contains(needle), "\($0)") }
        }
        refused({ $0.method = .rtn; $0.thenGPTQ = true }, "--then gptq follows a scale search")
        refused({ $0.aBit = 8; $0.wBit = 8 }, "weights only")
        refused({ $0.wBit = 5; $0.format = .fake }, "2, 3, 4 and 8 bits")
        refused({ $0.damp = 0 }, "--damp")
        refused({ $0.blockSize = 100 }, "--block-size 100")
        refused({ $0.method = .mbq; $0.actOrder = true }, "--act-order is a GPTQ option")
        refused({ $0.method = .awq; $0.hessianWeights = .modality }, "--hessian-weights is a GPTQ option")
        var ok = QuantizeOptions()
        ok.method = .mbq; ok.thenGPTQ = true; ok.hessianWeights = .gradient; ok.actOrder = true; ok.wBit = 3
        XCTAssertNoThrow(try ok.validate(for: model.config))
        ok.blockSize = 32   // blocks inside a group of 128, as the reference allows
        XCTAssertNoThrow(try ok.validate(for: model.config))
        XCTAssertTrue(ok.sequential && ok.needsGradientPass && ok.usesGPTQ)
    }

    /// Samples read one at a time give the same bits as all at once (the Hessians sum
    /// sample by sample).
    func testChunkingChangesNoBit() throws {
        let (model, bundle) = try fixture("qwen2vl")
        var o = QuantizeOptions()
        o.method = .gptq; o.wBit = 3; o.hessianWeights = .modality; o.format = .fake
        let whole = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        let chunked = try QuantizeJob.run(model: model, samples: bundle.samples, options: o, chunkTokens: 1)
        XCTAssertEqual(whole.codes, chunked.codes)
        XCTAssertEqual(whole.gptq, chunked.gptq)
    }

    func testTokenWeightsOfEachMode() {
        let attention = [false, true, true, true, true], vision = [false, true, true, false, false], caption = [false, false, false, true, false]
        let norms: TokenWeightSet = Dictionary(uniqueKeysWithValues: ["q", "k", "v", "o", "gate", "up", "down"].enumerated().map { i, r in
            (r, [9, 1, 2, 3, Float(i)])
        })
        let none = GPTQLayer.tokenWeights(.none, attention: attention, vision: vision, caption: caption, attnRatio: 0.3, mlpRatio: 0.6, gradientNorms: nil)
        XCTAssertEqual(none["down"], [0, 1, 1, 1, 1])
        let m = GPTQLayer.tokenWeights(.modality, attention: attention, vision: vision, caption: caption, attnRatio: 0.3, mlpRatio: 0.6, gradientNorms: nil)
        XCTAssertEqual(m["q"], [0, 0.3, 0.3, 1, 0], "vision tokens weigh the attention ratio, caption 1, the prompt 0")
        XCTAssertEqual(m["up"], [0, 0.6, 0.6, 1, 0])
        let g = GPTQLayer.tokenWeights(.gradient, attention: attention, vision: vision, caption: caption, attnRatio: 1, mlpRatio: 1, gradientNorms: norms)
        XCTAssertEqual(g["k"], [0, 1, 2, 3, 1], "padding weighs 0 whatever its gradient")
        let left = GPTQLayer.tokenWeights(.gradient, attention: attention, vision: vision, caption: caption, attnRatio: 1, mlpRatio: 1, gradientNorms: nil)
        XCTAssertEqual(left["down"], [0, 0, 0, 0, 0], "a sample the gradient pass left out")
    }

    /// The gradient pass's per-token norms are the norms of each linear's output gradient:
    /// checked against the sum of squares of the gradient that reaches o_proj's output.
    func testGradientNormsAreEachLinearsOutputGradient() throws {
        let (model, bundle) = try fixture("llava15")
        let s = bundle.samples[0]
        let cpu = CPUBackend(), b = cpu.loadBlock(model.blocks[0])
        let rope = model.ropeTable(s.positions)
        let f = cpu.blockForward(cpu.upload(s.embeds), b, rope: rope, mask: s.attention, save: true, capture: false, actBits: nil)
        var rng = SeededRandom(seed: 3)
        let dy: Tensor<Float> = rng.normalTensor(s.embeds.shape)
        let g = cpu.blockBackward(cpu.upload(dy), f.saved!, b, rope: rope, mask: s.attention, outputNorms: true)
        XCTAssertEqual(Set(g.outputSquaredNorms.keys), ["q", "k", "v", "o", "gate", "up", "down"])
        XCTAssertEqual(g.outputSquaredNorms["o"]!, GPTQLayer.rowSquaredNorms(cpu.download(g.attentionOutput)))
        XCTAssertEqual(g.outputSquaredNorms["down"]!, GPTQLayer.rowSquaredNorms(dy))
        XCTAssertTrue(g.outputSquaredNorms["q"]!.contains { $0 > 0 })
    }

    /// mbq then gptq: the scales are MBQ's (layer 0's equal to `--distort` mbq's), the
    /// rounding GPTQ's (other codes), and GPTQ lowers every linear's Hessian-weighted
    /// error below round-to-nearest's.
    func testThenGPTQRoundsTheScaledLayer() throws {
        let (model, bundle) = try fixture("onevision")
        var o = QuantizeOptions()
        o.method = .mbq; o.wBit = 3; o.format = .fake; o.distort = true
        let mbq = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        o.thenGPTQ = true; o.distort = false
        let then = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
        XCTAssertEqual(then.groups.count, mbq.groups.count)
        // Layer 0 reads the embeddings in both; later layers read differently rounded layers.
        XCTAssertEqual(then.groups.filter { $0.layer == 0 }.map(\.scales), mbq.groups.filter { $0.layer == 0 }.map(\.scales),
                       "layer 0: the same inputs, the same scales")
        XCTAssertNotEqual(then.codes, mbq.codes)
        XCTAssertEqual(then.gptq.count, 7 * model.config.numLayers)
        for r in then.gptq { XCTAssertLessThan(r.errorAfter, r.errorBefore, "layer \(r.layer) \(r.role)") }
    }
}
