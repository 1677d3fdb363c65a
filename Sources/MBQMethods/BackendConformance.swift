import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// Runs a compute backend against the CPU reference (`CPUBackend`, itself proven
/// against transformers by the parity tests) on a model and calibration samples, through
/// every entry of `ComputeBackend` a job uses: loading a block and reading it back, each
/// layer's forward with captures, the backward on the saved forward, the gradient means,
/// the loss head's gradient, the quantized forward with activation bits (`--distort`),
/// the search of every layer (the same grid point in every group; loss curves close),
/// SmoothQuant's scales, applying scales and quantizing (the same codes). Each layer
/// runs on the reference's inputs, so that a deviation is reported where it arises. A
/// new backend (CUDA) passes this before it runs jobs.
public enum BackendConformance {
    public struct Check: Sendable, CustomStringConvertible {
        public var name: String
        public var maxAbs: Double
        /// maxAbs relative to the reference's largest magnitude.
        public var rel: Double
        public var tolerance: Double
        /// Where it first deviated past the tolerance: "[row, col]" of the tensor (or
        /// "[i]" of a vector), with both values; nil when it did not.
        public var firstDeviation: String? = nil
        public var passed: Bool { rel <= tolerance && maxAbs.isFinite }
        public var description: String {
            "\(passed ? "ok  " : "FAIL") \(name): max abs \(String(format: "%.3e", maxAbs)), rel \(String(format: "%.3e", rel)) (tolerance \(tolerance))"
                + (passed ? "" : firstDeviation.map { ", first at \($0)" } ?? "")
        }
    }

    /// Accumulates the largest difference per named quantity, and where it first went
    /// past `tolerance` times the reference's scale (checked per call, against the scale
    /// seen so far).
    struct Diffs {
        var tolerance = 0.0
        var byName: [String: Deviation] = [:]
        /// Counts of things that must be equal exactly (grid points, codes): name -> (mismatches, total).
        var exact: [String: (bad: Int, total: Int)] = [:]

        /// `cols`: the row length, to name a deviation [row, col] (0: a vector, [i]).
        mutating func compare(_ name: String, _ got: [Float], _ want: [Float], cols: Int = 0) {
            byName[name, default: Deviation()].add(got, want, cols: cols, tolerance: tolerance)
        }
        mutating func compare(_ name: String, _ got: Tensor<Float>, _ want: Tensor<Float>) {
            compare(name, got.shape == want.shape ? got.data : [], want.data, cols: want.shape.count == 2 ? want.cols : 0)
        }
        mutating func compare(_ name: String, _ got: Double, _ want: Double) {
            compare(name, [Float(got)], [Float(want)])
        }
        mutating func count(_ name: String, equal: Bool) {
            var e = exact[name] ?? (0, 0)
            e.total += 1
            if !equal { e.bad += 1 }
            exact[name] = e
        }
        mutating func compare(_ name: String, _ got: DecoderBlockWeights<Float>, _ want: DecoderBlockWeights<Float>) {
            for (_, path) in ApplyScales.linears { compare(name, got[keyPath: path], want[keyPath: path]) }
            compare(name, got.inputNorm, want.inputNorm)
            compare(name, got.postAttentionNorm, want.postAttentionNorm)
            compare(name, got.vBias?.data ?? [], want.vBias?.data ?? [])
        }
    }

    /// `tolerance`: relative to each tensor's scale; grid points and codes must be identical.
    public static func run(_ backend: ComputeBackend, reference: ComputeBackend = CPUBackend(), model: LanguageModel<Float>,
                           samples: [CalibrationSample], tolerance: Double = 1e-5) throws -> [Check] {
        var d = Diffs(tolerance: tolerance)
        var rng = SeededRandom(seed: 17)
        let search = SearchOptions(weights: .groupAsymmetric(bits: 4, group: 128), reweight: true)
        let quantizer = WeightQuantizer.groupAsymmetric(bits: 4, group: 128)
        var xs = samples.map(\.embeds)
        for (l, w) in model.blocks.enumerated() {
            let rb = try reference.loadBlock(w), bb = try backend.loadBlock(w)
            d.compare("block loaded and read back", try backend.downloadBlock(bb), w)
            var refSamples: [BackendLayerSample] = [], gotSamples: [BackendLayerSample] = []
            for (s, x) in zip(samples, xs) {
                let rope = model.ropeTable(s.positions)
                let rx = try reference.upload(x), bx = try backend.upload(x)
                d.compare("upload and download", try backend.download(bx), x)
                let want = try reference.blockForward(rx, rb, rope: rope, mask: s.attention, save: true, capture: true, actBits: nil)
                let got = try backend.blockForward(bx, bb, rope: rope, mask: s.attention, save: true, capture: true, actBits: nil)
                d.compare("block output", try backend.download(got.output), try reference.download(want.output))
                guard let g = got.captures, let c = want.captures, let gs = got.saved, let ws = want.saved else {
                    d.count("forward returns captures and saved state", equal: false)
                    continue
                }
                for (name, a, b) in [("q/k/v input", g.qkvInput, c.qkvInput), ("o input", g.oInput, c.oInput),
                                     ("gate/up input", g.gateUpInput, c.gateUpInput), ("down input", g.downInput, c.downInput),
                                     ("attention output", g.attentionOutput, c.attentionOutput), ("MLP output", g.mlpOutput, c.mlpOutput)] {
                    d.compare("captured \(name)", try backend.download(a), try reference.download(b))
                }
                let dy: Tensor<Float> = rng.normalTensor(x.shape)
                let gw = try reference.blockBackward(try reference.upload(dy), ws, rb, rope: rope, mask: s.attention, outputNorms: true)
                let gg = try backend.blockBackward(try backend.upload(dy), gs, bb, rope: rope, mask: s.attention, outputNorms: true)
                for (role, _) in ApplyScales.linears {
                    d.compare("linear output-gradient norms", gg.outputSquaredNorms[role] ?? [], gw.outputSquaredNorms[role] ?? [])
                }
                d.compare("backward dL/dx", try backend.download(gg.input), try reference.download(gw.input))
                d.compare("backward dL/d(o_proj out)", try backend.download(gg.attentionOutput), try reference.download(gw.attentionOutput))
                d.compare("backward dL/d(down_proj out)", try backend.download(gg.mlpOutput), try reference.download(gw.mlpOutput))
                for rows in [s.attendedVision, s.attendedCaption] where rows.contains(true) {
                    d.compare("gradient means", try backend.meanAbs(gg.mlpOutput, rows: rows), try reference.meanAbs(gw.mlpOutput, rows: rows))
                }
                let q8 = try reference.blockForward(rx, rb, rope: rope, mask: s.attention, save: false, capture: false, actBits: 8)
                let g8 = try backend.blockForward(bx, bb, rope: rope, mask: s.attention, save: false, capture: false, actBits: 8)
                d.compare("forward with 8-bit activations", try backend.download(g8.output), try reference.download(q8.output))
                refSamples.append(BackendLayerSample(captures: c, rope: rope, attention: s.attention, vision: s.vision, caption: s.caption))
                gotSamples.append(BackendLayerSample(captures: g, rope: rope, attention: s.attention, vision: s.vision, caption: s.caption))
                if l == model.blocks.count - 1 {
                    let head = (try reference.loadHead(norm: model.finalNorm, lmHead: model.lmHead, eps: Float(model.config.rmsNormEps)),
                                try backend.loadHead(norm: model.finalNorm, lmHead: model.lmHead, eps: Float(model.config.rmsNormEps)))
                    let lw = try reference.lossGradient(want.output, head.0, labels: s.labels)
                    let lg = try backend.lossGradient(got.output, head.1, labels: s.labels)
                    d.compare("caption loss", Double(lg.loss), Double(lw.loss))
                    d.compare("caption loss gradient", try backend.download(lg.grad), try reference.download(lw.grad))
                }
            }
            guard refSamples.count == samples.count else { continue }
            let want = try reference.searchLayer(l, rb, samples: .captured(refSamples), attnRatio: 0.5, mlpRatio: 0.5, options: search)
            let got = try backend.searchLayer(l, bb, samples: .captured(gotSamples), attnRatio: 0.5, mlpRatio: 0.5, options: search)
            for (g, r) in zip(got, want) {
                d.count("search grid points", equal: g.group == r.group && g.bestIndex == r.bestIndex)
                d.compare("search loss curves (w4 g128, reweighted)", g.losses.map(Float.init), r.losses.map(Float.init))
            }
            for _ in 0..<abs(got.count - want.count) { d.count("search grid points", equal: false) }
            let sw = try reference.smoothQuantScales(rb, samples: .captured(refSamples)), sg = try backend.smoothQuantScales(bb, samples: .captured(gotSamples))
            d.compare("SmoothQuant scales", sg.qkv + sg.gateUp, sw.qkv + sw.gateUp)
            // Apply and quantize with the reference's scales, so that both start equal.
            let scales = SearchGroup.allCases.compactMap { g in want.first { $0.group == g }.map { (group: g, scales: $0.scales) } }
            let aw = try reference.applyScales(scales, to: rb), ag = try backend.applyScales(scales, to: bb)
            d.compare("scales applied", try backend.downloadBlock(ag), try reference.downloadBlock(aw))
            let qw = try reference.quantize(aw, with: quantizer, precision: .f16), qg = try backend.quantize(ag, with: quantizer, precision: .f16)
            d.compare("quantized weights (w4 g128, fp16 scales)", try backend.downloadBlock(qg.block), try reference.downloadBlock(qw.block))
            for (role, _) in ApplyScales.linears { d.count("quantized codes", equal: qg.codes[role] == qw.codes[role]) }
            // GPTQ (w3 g128, modality weights from the masks) on the scaled block.
            let gptq = GPTQSettings(bits: 3, group: 128)
            func weighted(_ ss: [BackendLayerSample]) -> SampleChunks<(sample: BackendLayerSample, weights: TokenWeightSet)> {
                .captured(ss.map { ($0, GPTQLayer.tokenWeights(.modality, attention: $0.attention, vision: $0.vision, caption: $0.caption,
                                                              attnRatio: 2, mlpRatio: 3, gradientNorms: nil)) })
            }
            let gqw = try reference.gptqLayer(l, aw, samples: weighted(refSamples), settings: gptq, perLinear: false, rtn: quantizer, precision: .f16)
            let gqg = try backend.gptqLayer(l, ag, samples: weighted(gotSamples), settings: gptq, perLinear: false, rtn: quantizer, precision: .f16)
            d.compare("GPTQ weights (w3 g128, modality)", try backend.downloadBlock(gqg.block), try reference.downloadBlock(gqw.block))
            for (role, _) in ApplyScales.linears { d.count("GPTQ codes", equal: gqg.codes[role] == gqw.codes[role]) }
            xs = try zip(samples, xs).map { s, x in
                try reference.download(try reference.blockForward(try reference.upload(x), rb, rope: model.ropeTable(s.positions),
                                                                  mask: s.attention, save: false, capture: false, actBits: nil).output)
            }
        }
        var finite = xs[0]
        let okFinite = try backend.allFinite(try backend.upload(finite))
        finite.data[finite.count / 2] = .nan
        let okNaN = try backend.allFinite(try backend.upload(finite))
        d.count("allFinite", equal: okFinite && !okNaN)

        var checks = d.byName.sorted { $0.key < $1.key }.map { name, v in
            Check(name: name, maxAbs: v.maxAbs, rel: v.rel, tolerance: tolerance, firstDeviation: v.first)
        }
        for (name, e) in d.exact.sorted(by: { $0.key < $1.key }) {
            checks.append(Check(name: "\(name): \(e.total - e.bad) of \(e.total) identical", maxAbs: Double(e.bad), rel: Double(e.bad),
                                tolerance: 0))
        }
        return checks
    }
}
