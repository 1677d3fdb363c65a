import Foundation
import MBQFormats
import MBQModel
import MBQTensor
import XCTest

/// The engine against transformers, on the fixtures of Scripts/reference/make_fixtures.py.
/// Tolerances: per module ~1e-5 of the tensor's scale, end to end (after all blocks,
/// loss and the whole backward) 1e-4.
final class ParityTests: XCTestCase {
    static let perModuleTolerance: Float = 2e-5
    static let endToEndTolerance: Float = 1e-4

    func testConfigsResolve() throws {
        let llava = try Fixture("llava15").checkpoint.config
        XCTAssertEqual(llava.family, .llama)
        XCTAssertEqual(llava.numKVHeads, 2)
        XCTAssertFalse(llava.qkvBias)
        XCTAssertNil(llava.mropeSection)
        let ov = try Fixture("onevision").checkpoint.config
        XCTAssertEqual(ov.family, .qwen2)
        XCTAssertTrue(ov.qkvBias)
        XCTAssertFalse(ov.oBias)
        XCTAssertEqual(ov.ropeTheta, 1_000_000)
        let qv = try Fixture("qwen2vl").checkpoint
        XCTAssertEqual(qv.config.family, .qwen2VL)
        XCTAssertEqual(qv.config.mropeSection, [4, 6, 6])
        XCTAssertEqual(qv.names.base, "model.")
        XCTAssertEqual(qv.weightDType, .bf16)
        XCTAssertEqual(try Fixture("llava15").checkpoint.names.base, "language_model.model.")
        XCTAssertEqual(try Fixture("llava15").checkpoint.names.lmHead, "language_model.lm_head.weight")
        let q25 = try Fixture("qwen2_5_vl").checkpoint
        XCTAssertEqual(q25.config.family, .qwen2VL)
        XCTAssertEqual(q25.config.modelType, "qwen2_5_vl")
        XCTAssertEqual(q25.config.mropeSection, [4, 6, 6])
        XCTAssertEqual(q25.weightDType, .bf16)
        let ivl = try Fixture("internvl").checkpoint
        XCTAssertEqual(ivl.config.family, .qwen2)
        XCTAssertTrue(ivl.config.tieWordEmbeddings)
        XCTAssertNil(ivl.names.lmHead)
        XCTAssertEqual(ivl.names.outputProjection, ivl.names.embedTokens)
        let ivl2 = try Fixture("internvl2").checkpoint
        XCTAssertEqual(ivl2.config.family, .internLM2)
        XCTAssertEqual(ivl2.config.modelType, "internvl_chat")
        XCTAssertEqual(ivl2.config.numKVHeads, 2)
        XCTAssertEqual(ivl2.config.unscaledRoPETokens, 256)
        XCTAssertEqual(ivl2.blockNames(0).linears.map(\.name).first, "language_model.model.layers.0.attention.wqkv.weight")
    }

    /// Each block fed the reference input of that block: isolates per-module error.
    func testBlockByBlockAgainstTransformers() throws {
        for arch in Fixture.architectures {
            let fx = try Fixture(arch)
            let model = try LanguageModel<Float>.load(fx.checkpoint)
            var diffs: [String: Diff] = [:]
            for (s, sample) in fx.bundle.samples.enumerated() {
                let rope = model.ropeTable(sample.positions)
                for l in 0..<model.config.numLayers {
                    let x = l == 0 ? sample.embeds : try fx.expected("layers.\(l - 1).output", sample: s)
                    let f = decoderBlockForward(x, weights: model.blocks[l], rope: rope, mask: sample.attention, capture: true)
                    let c = f.captures!
                    let pairs: [(String, Tensor<Float>)] = [
                        ("output", f.output), ("in_qkv", c.qkvInput), ("in_o", c.oInput), ("in_gate_up", c.gateUpInput),
                        ("in_down", c.downInput), ("attn_out", c.attentionOutput), ("mlp_out", c.mlpOutput),
                    ]
                    for (name, got) in pairs {
                        let d = Diff.of(got, try fx.expected("layers.\(l).\(name)", sample: s), rows: sample.attention)
                        diffs[name, default: Diff()].merge(d)
                    }
                }
            }
            for (name, d) in diffs.sorted(by: { $0.key < $1.key }) {
                print("parity \(arch) block \(name): \(d)")
                assertClose(d, rel: Self.perModuleTolerance, "\(arch) \(name)")
            }
        }
    }

    /// The whole language model, forward and backward, from the embeddings.
    func testEndToEndLossAndGradients() throws {
        for arch in Fixture.architectures {
            let fx = try Fixture(arch)
            let model = try LanguageModel<Float>.load(fx.checkpoint)
            let refLoss = try fx.expected.floatTensor("loss")
            let refCount = try fx.expected.intValues("loss_count").values
            var out = Diff(), gin = Diff(), gattn = Diff(), gmlp = Diff(), loss = Diff()
            for (s, sample) in fx.bundle.samples.enumerated() {
                let input = SequenceInput(sample)
                let outs = try model.forward(input)
                let last = model.config.numLayers - 1
                out.merge(Diff.of(outs[last], try fx.expected("layers.\(last).output", sample: s), rows: sample.attention))
                let g = try model.lossAndGradients(input)
                XCTAssertEqual(Int64(g.count), refCount[s], "\(arch) sample \(s) loss token count")
                loss.merge(Diff.of(Tensor(shape: [1, 1], data: [g.loss]), Tensor(shape: [1, 1], data: [refLoss.data[s]])))
                gin.merge(Diff.of(g.input, try fx.expected("grad_inputs_embeds", sample: s)))
                for l in 0...last {
                    gattn.merge(Diff.of(g.attentionOutput[l], try fx.expected("layers.\(l).grad_attn_out", sample: s)))
                    gmlp.merge(Diff.of(g.mlpOutput[l], try fx.expected("layers.\(l).grad_mlp_out", sample: s)))
                }
            }
            for (name, d) in [("last block output", out), ("loss", loss), ("dL/d inputs_embeds", gin),
                              ("dL/d o_proj out", gattn), ("dL/d down_proj out", gmlp)] {
                print("parity \(arch) end-to-end \(name): \(d)")
                assertClose(d, rel: Self.endToEndTolerance, "\(arch) \(name)")
            }
        }
    }
}
