import MBQFormats
import MBQModel
import MBQTensor
import XCTest

/// Every backward function against central differences in Double on tiny shapes.
/// Objective L = sum(f(x) * R) for a fixed random R, so dL/df = R.
final class GradientCheckTests: XCTestCase {
    static let step = 1e-5
    static let tolerance = 1e-6

    /// Compares `analytic` to (L(x + h e_i) - L(x - h e_i)) / 2h at every coordinate.
    func check(_ what: String, at x: Tensor<Double>, analytic: Tensor<Double>, _ loss: (Tensor<Double>) -> Double,
               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(x.shape, analytic.shape, "\(what): gradient shape", file: file, line: line)
        var worst = 0.0, scale = 0.0
        for i in 0..<x.count {
            var xp = x, xm = x
            xp.data[i] += Self.step
            xm.data[i] -= Self.step
            let numeric = (loss(xp) - loss(xm)) / (2 * Self.step)
            worst = max(worst, abs(numeric - analytic.data[i]))
            scale = max(scale, abs(numeric))
        }
        let rel = worst / max(scale, 1e-12)
        XCTAssert(rel < Self.tolerance && scale > 0,
                  "\(what): max abs diff \(worst) vs numeric scale \(scale) (rel \(rel))", file: file, line: line)
    }

    func dot(_ a: Tensor<Double>, _ b: Tensor<Double>) -> Double {
        zip(a.data, b.data).reduce(0) { $0 + $1.0 * $1.1 }
    }

    func testLinearBackward() {
        var rng = SeededRandom(seed: 1)
        let x: Tensor<Double> = rng.normalTensor([5, 7])
        let w: Tensor<Double> = rng.normalTensor([4, 7])
        let b: Tensor<Double> = rng.normalTensor([4])
        let r: Tensor<Double> = rng.normalTensor([5, 4])
        check("linear", at: x, analytic: linearBackward(r, weight: w)) { dot(linearForward($0, weight: w, bias: b), r) }
    }

    func testRMSNormBackward() {
        var rng = SeededRandom(seed: 2)
        let x: Tensor<Double> = rng.normalTensor([4, 9])
        let w: Tensor<Double> = rng.normalTensor([9])
        let r: Tensor<Double> = rng.normalTensor([4, 9])
        let (_, inv) = rmsNormForward(x, weight: w, eps: 1e-6)
        check("rmsnorm", at: x, analytic: rmsNormBackward(r, x: x, weight: w, invRms: inv)) {
            dot(rmsNormForward($0, weight: w, eps: 1e-6).y, r)
        }
    }

    func testRoPEBackward() {
        var rng = SeededRandom(seed: 3)
        for mrope in [nil, [2, 1, 1] as [Int]?] {
            let positions = mrope == nil ? [[0, 1, 2, 5, 9]] : [[0, 1, 1, 1, 4], [0, 1, 2, 2, 4], [0, 2, 1, 3, 4]]
            let table = RoPETable<Double>(positions: positions, headDim: 8, theta: 10000, mropeSection: mrope)
            let x: Tensor<Double> = rng.normalTensor([5, 16])
            let r: Tensor<Double> = rng.normalTensor([5, 16])
            var g = r
            ropeBackward(&g, table: table)
            check("rope \(mrope.map { "mrope \($0)" } ?? "1-D")", at: x, analytic: g) {
                var y = $0
                ropeForward(&y, table: table)
                return dot(y, r)
            }
        }
    }

    func testAttentionCoreBackwardWithGQAAndPadding() {
        var rng = SeededRandom(seed: 4)
        let shape = AttentionShape(heads: 4, kvHeads: 2, headDim: 3)
        for mask in [[true, true, true, true, true, true],
                     [false, false, true, true, true, true],
                     [true, true, true, true, false, false]] {
            let t = mask.count
            let q: Tensor<Double> = rng.normalTensor([t, 12])
            let k: Tensor<Double> = rng.normalTensor([t, 6])
            let v: Tensor<Double> = rng.normalTensor([t, 6])
            let r: Tensor<Double> = rng.normalTensor([t, 12])
            let (ctx, lse) = attentionCoreForward(q: q, k: k, v: v, mask: mask, shape: shape)
            let saved = AttentionSaved(q: q, k: k, v: v, ctx: ctx, lse: lse)
            let (dq, dk, dv) = attentionCoreBackward(dctx: r, saved: saved, mask: mask, shape: shape)
            check("attention dq mask \(mask)", at: q, analytic: dq) {
                dot(attentionCoreForward(q: $0, k: k, v: v, mask: mask, shape: shape).ctx, r)
            }
            check("attention dk mask \(mask)", at: k, analytic: dk) {
                dot(attentionCoreForward(q: q, k: $0, v: v, mask: mask, shape: shape).ctx, r)
            }
            check("attention dv mask \(mask)", at: v, analytic: dv) {
                dot(attentionCoreForward(q: q, k: k, v: $0, mask: mask, shape: shape).ctx, r)
            }
        }
    }

    /// Row blocks smaller than the sequence (the path every real sequence takes) give the
    /// same context and gradients as one block, and pass the finite-difference check.
    func testAttentionRowBlocking() {
        var rng = SeededRandom(seed: 9)
        let shape = AttentionShape(heads: 2, kvHeads: 1, headDim: 3)
        let mask = [false, true, true, true, true, true, true, false]
        let q: Tensor<Double> = rng.normalTensor([8, 6])
        let k: Tensor<Double> = rng.normalTensor([8, 3])
        let v: Tensor<Double> = rng.normalTensor([8, 3])
        let r: Tensor<Double> = rng.normalTensor([8, 6])
        let whole = attentionCoreForward(q: q, k: k, v: v, mask: mask, shape: shape, rowBlock: 8)
        for rb in [1, 3] {
            let f = attentionCoreForward(q: q, k: k, v: v, mask: mask, shape: shape, rowBlock: rb)
            XCTAssertLessThan(f.ctx.maxDifference(to: whole.ctx).abs, 1e-12, "row block \(rb)")
            let saved = AttentionSaved(q: q, k: k, v: v, ctx: f.ctx, lse: f.lse)
            let (dq, dk, dv) = attentionCoreBackward(dctx: r, saved: saved, mask: mask, shape: shape, rowBlock: rb)
            check("blocked dq rb \(rb)", at: q, analytic: dq) {
                dot(attentionCoreForward(q: $0, k: k, v: v, mask: mask, shape: shape).ctx, r)
            }
            check("blocked dk rb \(rb)", at: k, analytic: dk) {
                dot(attentionCoreForward(q: q, k: $0, v: v, mask: mask, shape: shape).ctx, r)
            }
            check("blocked dv rb \(rb)", at: v, analytic: dv) {
                dot(attentionCoreForward(q: q, k: k, v: $0, mask: mask, shape: shape).ctx, r)
            }
        }
    }

    func testMLPBackward() {
        var rng = SeededRandom(seed: 5)
        let x: Tensor<Double> = rng.normalTensor([3, 6])
        let g: Tensor<Double> = rng.normalTensor([10, 6])
        let u: Tensor<Double> = rng.normalTensor([10, 6])
        let d: Tensor<Double> = rng.normalTensor([6, 10])
        let r: Tensor<Double> = rng.normalTensor([3, 6])
        let f = mlpForward(x, gate: g, up: u, down: d)
        check("mlp", at: x, analytic: mlpBackward(r, saved: f.saved, gate: g, up: u, down: d)) {
            dot(mlpForward($0, gate: g, up: u, down: d).y, r)
        }
    }

    static func tinyBlock(_ rng: inout SeededRandom, bias: Bool, heads: Int = 4, kv: Int = 2, d: Int = 4, c: Int = 8,
                          inter: Int = 12) -> DecoderBlockWeights<Double> {
        func n(_ s: [Int], _ std: Double) -> Tensor<Double> { rng.normalTensor(s, std: std) }
        var norm1 = n([c], 0.2), norm2 = n([c], 0.2)
        for i in 0..<c { norm1.data[i] += 1; norm2.data[i] += 1 }
        return DecoderBlockWeights(
            inputNorm: norm1, postAttentionNorm: norm2,
            q: n([heads * d, c], 0.5), k: n([kv * d, c], 0.5), v: n([kv * d, c], 0.5), o: n([c, heads * d], 0.5),
            qBias: bias ? n([heads * d], 0.1) : nil, kBias: bias ? n([kv * d], 0.1) : nil,
            vBias: bias ? n([kv * d], 0.1) : nil, oBias: nil,
            gate: n([inter, c], 0.4), up: n([inter, c], 0.4), down: n([c, inter], 0.4),
            shape: AttentionShape(heads: heads, kvHeads: kv, headDim: d), rmsNormEps: 1e-6)
    }

    func testDecoderBlockBackward() {
        var rng = SeededRandom(seed: 6)
        let w = Self.tinyBlock(&rng, bias: true)
        let mask = [false, true, true, true, true]
        let positions = [[0, 1, 1, 2, 3], [0, 1, 2, 2, 3], [0, 1, 1, 3, 3]]
        let rope = RoPETable<Double>(positions: positions, headDim: 4, theta: 10000, mropeSection: [1, 1, 0])
        let x: Tensor<Double> = rng.normalTensor([5, 8])
        let r: Tensor<Double> = rng.normalTensor([5, 8])
        let f = decoderBlockForward(x, weights: w, rope: rope, mask: mask, save: true)
        let g = decoderBlockBackward(r, saved: f.saved!, weights: w, rope: rope, mask: mask)
        check("block dx", at: x, analytic: g.input) {
            dot(decoderBlockForward($0, weights: w, rope: rope, mask: mask).output, r)
        }
        // dL/d(o_proj out): perturb the attention output inside the block.
        let eps = 1e-6
        let (n1, _) = rmsNormForward(x, weight: w.inputNorm, eps: eps)
        let attn = selfAttentionForward(n1, weights: w, rope: rope, mask: mask).out
        check("block d(o_proj out)", at: attn, analytic: g.attentionOutput) { a in
            let h = add(x, a)
            let (n2, _) = rmsNormForward(h, weight: w.postAttentionNorm, eps: eps)
            return dot(add(h, mlpForward(n2, gate: w.gate, up: w.up, down: w.down).y), r)
        }
        XCTAssertEqual(g.mlpOutput.data, r.data, "d(down_proj out) is the block's output gradient")
    }

    func testLossHeadBackward() {
        var rng = SeededRandom(seed: 7)
        let h: Tensor<Double> = rng.normalTensor([6, 8])
        let norm: Tensor<Double> = rng.normalTensor([8])
        let head: Tensor<Double> = rng.normalTensor([11, 8])
        let labels = [-100, -100, 3, 7, -100, 10]
        let f = lossHeadForward(h, norm: norm, lmHead: head, labels: labels, eps: 1e-6)
        XCTAssertEqual(f.count, 3)
        check("loss head", at: h, analytic: lossHeadBackward(saved: f.saved, norm: norm, lmHead: head)) {
            lossHeadForward($0, norm: norm, lmHead: head, labels: labels, eps: 1e-6).loss
        }
    }

    func testWholeModelInputGradient() throws {
        var rng = SeededRandom(seed: 8)
        let cfg = LanguageModelConfig(family: .qwen2, modelType: "qwen2", hiddenSize: 8, intermediateSize: 12,
                                      numLayers: 2, numHeads: 4, numKVHeads: 2, headDim: 4, rmsNormEps: 1e-6,
                                      ropeTheta: 10000, mropeSection: nil, vocabSize: 11, tieWordEmbeddings: false,
                                      qkvBias: true, oBias: false)
        let model = LanguageModel<Double>(config: cfg, blocks: [Self.tinyBlock(&rng, bias: true), Self.tinyBlock(&rng, bias: true)],
                                          finalNorm: rng.normalTensor([8]), lmHead: rng.normalTensor([11, 8]))
        let input = SequenceInput<Double>(embeds: rng.normalTensor([6, 8]), mask: [true, true, true, true, true, false],
                                          positions: [[0, 1, 2, 3, 4, 1]], labels: [-100, -100, 2, 5, 9, -100])
        let g = try model.lossAndGradients(input)
        check("whole model d(inputs_embeds)", at: input.embeds, analytic: g.input) { e in
            var i = input
            i.embeds = e
            return try! model.lossAndGradients(i).loss
        }
    }
}
