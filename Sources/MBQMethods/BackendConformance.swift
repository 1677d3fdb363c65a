import MBQFormats
import MBQModel
import MBQTensor

/// Runs a compute backend against the CPU reference (`CPUBackend`, itself proven
/// against transformers by the parity tests) on a model and calibration samples, through
/// every entry of `ComputeBackend` a job uses: each layer's forward with captures on the
/// reference's inputs, the backward on the saved forward, the quantized forward with
/// activation bits (`--distort`), and the search of every layer (the same grid point in
/// every group; loss curves close). A new backend (CUDA) passes this before it runs jobs.
public enum BackendConformance {
    public struct Check: Sendable, CustomStringConvertible {
        public var name: String
        public var maxAbs: Double
        /// maxAbs relative to the reference's largest magnitude.
        public var rel: Double
        public var tolerance: Double
        public var passed: Bool { rel <= tolerance && maxAbs.isFinite }
        public var description: String {
            "\(passed ? "ok  " : "FAIL") \(name): max abs \(String(format: "%.3e", maxAbs)), rel \(String(format: "%.3e", rel)) (tolerance \(tolerance))"
        }
    }

    /// `tolerance`: relative to each tensor's scale; the grid points must be identical.
    public static func run(_ backend: ComputeBackend, reference: ComputeBackend = CPUBackend(), model: LanguageModel<Float>,
                           samples: [CalibrationSample], tolerance: Double = 1e-5) -> [Check] {
        var diffs: [String: (maxAbs: Double, scale: Double)] = [:]
        func compare(_ name: String, _ got: Tensor<Float>, _ want: Tensor<Float>) {
            var d = diffs[name] ?? (0, 0)
            if got.shape != want.shape {
                d.maxAbs = .infinity
            } else {
                for (a, b) in zip(got.data, want.data) {
                    d.maxAbs = max(d.maxAbs, Double(abs(a - b)))
                    d.scale = max(d.scale, Double(abs(b)))
                }
            }
            diffs[name] = d
        }
        var rng = SeededRandom(seed: 17)
        var gridMismatches = 0, groups = 0, lossDiff = (maxAbs: 0.0, scale: 0.0)
        var xs = samples.map(\.embeds)
        for (l, w) in model.blocks.enumerated() {
            var layerSamples: [LayerSample] = []
            for (s, x) in zip(samples, xs) {
                let rope = model.ropeTable(s.positions)
                let want = reference.blockForward(x, w, rope: rope, mask: s.attention, save: true, capture: true, actBits: nil)
                let got = backend.blockForward(x, w, rope: rope, mask: s.attention, save: true, capture: true, actBits: nil)
                compare("block output", got.output, want.output)
                if let g = got.captures, let c = want.captures {
                    compare("captured q/k/v input", g.qkvInput, c.qkvInput); compare("captured o input", g.oInput, c.oInput)
                    compare("captured gate/up input", g.gateUpInput, c.gateUpInput); compare("captured down input", g.downInput, c.downInput)
                    compare("captured attention output", g.attentionOutput, c.attentionOutput)
                    compare("captured MLP output", g.mlpOutput, c.mlpOutput)
                } else {
                    compare("captures", Tensor(shape: [1], data: [0]), Tensor(shape: [2], data: [0, 0]))
                }
                let dy: Tensor<Float> = rng.normalTensor(want.output.shape)
                let gw = reference.blockBackward(dy, want.saved!, w, rope: rope, mask: s.attention)
                let gg = backend.blockBackward(dy, got.saved ?? want.saved!, w, rope: rope, mask: s.attention)
                compare("backward dL/dx", gg.input, gw.input)
                compare("backward dL/d(o_proj out)", gg.attentionOutput, gw.attentionOutput)
                compare("backward dL/d(down_proj out)", gg.mlpOutput, gw.mlpOutput)
                let q8 = reference.blockForward(x, w, rope: rope, mask: s.attention, save: false, capture: false, actBits: 8)
                compare("forward with 8-bit activations", backend.blockForward(x, w, rope: rope, mask: s.attention, save: false,
                                                                                capture: false, actBits: 8).output, q8.output)
                layerSamples.append(LayerSample(captures: want.captures!, rope: rope, attention: s.attention, vision: s.vision, caption: s.caption))
            }
            let options = SearchOptions(weights: .groupAsymmetric(bits: 4, group: 128), reweight: true)
            let want = reference.searchLayer(l, w, samples: layerSamples, attnRatio: 0.5, mlpRatio: 0.5, options: options)
            let got = backend.searchLayer(l, w, samples: layerSamples, attnRatio: 0.5, mlpRatio: 0.5, options: options)
            for (g, r) in zip(got, want) {
                groups += 1
                if g.group != r.group || g.bestIndex != r.bestIndex { gridMismatches += 1 }
                for (a, b) in zip(g.losses, r.losses) {
                    lossDiff.maxAbs = max(lossDiff.maxAbs, abs(a - b)); lossDiff.scale = max(lossDiff.scale, abs(b))
                }
            }
            if got.count != want.count { gridMismatches += abs(got.count - want.count) }
            xs = zip(samples, xs).map { s, x in
                reference.blockForward(x, w, rope: model.ropeTable(s.positions), mask: s.attention, save: false, capture: false, actBits: nil).output
            }
        }
        var checks = diffs.sorted { $0.key < $1.key }.map { name, d in
            Check(name: name, maxAbs: d.maxAbs, rel: d.maxAbs / max(d.scale, 1e-30), tolerance: tolerance)
        }
        checks.append(Check(name: "search loss curves (w4 g128, reweighted)", maxAbs: lossDiff.maxAbs,
                            rel: lossDiff.maxAbs / max(lossDiff.scale, 1e-30), tolerance: tolerance))
        checks.append(Check(name: "search grid points: \(groups - gridMismatches) of \(groups) identical", maxAbs: Double(gridMismatches),
                            rel: Double(gridMismatches), tolerance: 0))
        return checks
    }
}
