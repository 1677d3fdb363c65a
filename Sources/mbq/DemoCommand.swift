import ArgumentParser
import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel

/// `mbq demo`: quantizes the committed demo VLM (`Demo/`, trained by
/// `Scripts/train_demo_vlm.py` to caption pictures of coloured shapes; docs/DEMO.md) with
/// rtn, awq and mbq at W3 g128, W4 g128 and W4A8 through the same code paths as `mbq
/// quantize`, reads each output back as a user would, and prints held-out caption-token
/// accuracy, caption loss and KL to the fp model, and the vision/caption gradient ratios
/// MBQ found.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo", abstract: "Quantize the demo VLM nine ways (--gptq: with GPTQ, 24) and compare caption accuracy on held-out pictures.")

    @Option(help: "The demo's model and bundles (Scripts/train_demo_vlm.py writes them).")
    var data = "Demo"

    @Option(help: "Directory for the quantized outputs.")
    var out = "demo-out"

    @Option(help: "Calibration bundles to run awq and mbq on, by seed (comma-separated, from 0 1 2); more than one prints the spread.")
    var calibSeeds = "0"

    @Flag(help: "Compare GPTQ instead: rtn, awq, mbq, gptq with each token weighting and mbq then gptq (none, modality), at W3 g128, W4 g128 and W2 g64.")
    var gptq = false

    @OptionGroup var common: CommonOptions

    var seeds: [Int] { calibSeeds.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }

    func validate() throws {
        let s = seeds
        if s.isEmpty || s.count != calibSeeds.split(separator: ",").count || Set(s).count != s.count {
            throw ValidationError("--calib-seeds takes distinct integers separated by commas, e.g. 0,1,2")
        }
    }

    /// One quantized output as evaluated.
    struct Row {
        var method: String, scheme: String, format: String
        var evals: [EvalResult]
        var seconds: Double
    }

    /// A method as the table names it, and the options it sets.
    struct Variant {
        var name: String
        var method: QuantMethod
        var then = false
        var weights: HessianWeights = .none
    }

    var variants: [Variant] {
        var v = [Variant(name: "rtn", method: .rtn), Variant(name: "awq", method: .awq), Variant(name: "mbq", method: .mbq)]
        if gptq {
            v += HessianWeights.allCases.map { Variant(name: "gptq/\($0.rawValue)", method: .gptq, weights: $0) }
            v += [HessianWeights.none, .modality].map { Variant(name: "mbq+gptq/\($0.rawValue)", method: .mbq, then: true, weights: $0) }
        }
        return v
    }

    var schemes: [(name: String, wBit: Int, group: Int, aBit: Int?)] {
        gptq ? [("W3 g128", 3, 128, nil), ("W4 g128", 4, 128, nil), ("W2 g64", 2, 64, nil)]
             : [("W3 g128", 3, 128, nil), ("W4 g128", 4, 128, nil), ("W4A8", 4, 128, 8)]
    }

    func run() throws {
        common.apply()
        try runReportingErrors {
            let logger = Logger(label: "mbq.demo")
            let start = Date()
            let modelDir = data + "/model", heldPath = data + "/heldout.safetensors"
            guard FileManager.default.fileExists(atPath: modelDir + "/config.json") else {
                throw ValidationError("the demo model \(modelDir) is not here: run mbq demo from the repository root, or pass --data DIR (Scripts/train_demo_vlm.py writes it)")
            }
            let ckpt = try Checkpoint(directory: modelDir)
            let fp = try LanguageModel<Float>.load(ckpt)
            let held = try CalibrationBundle.load(path: heldPath, for: ckpt.config)
            let calib = try seeds.map { try CalibrationBundle.load(path: data + "/calib-seed\($0).safetensors", for: ckpt.config) }
            logger.info("[demo] \(ckpt.config.modelType) model from \(modelDir) (\(ckpt.config.numLayers) layers, hidden \(ckpt.config.hiddenSize), \(ckpt.weightDType.rawValue)); \(calib[0].count) calibration samples per seed, seeds \(seeds); \(held.count) held-out samples")
            let base = try Evaluate.run(model: fp, actBits: nil, samples: held.samples)

            var rows: [Row] = []
            var mbqStats: GradientStatistics? = nil
            for (scheme, wBit, group, aBit) in schemes {
                for v in variants {
                    let method = v.method
                    var o = QuantizeOptions()
                    o.method = method; o.wBit = wBit; o.group = group; o.aBit = aBit
                    o.thenGPTQ = v.then; o.hessianWeights = v.weights
                    o.weightDType = ckpt.weightDType
                    var row = Row(method: v.name, scheme: scheme, format: o.resolvedFormat.rawValue, evals: [], seconds: 0)
                    // RTN reads no calibration data: one run stands for every seed.
                    for (i, seed) in seeds.enumerated() where method != .rtn || i == 0 {
                        let t0 = Date()
                        let r = try QuantizeJob.run(model: fp, samples: calib[i].samples, options: o, logger: logger)
                        if method == .mbq, mbqStats == nil { mbqStats = r.gradStats }
                        let name = "\(v.name.replacingOccurrences(of: "/", with: "-"))-\(scheme.replacingOccurrences(of: " ", with: "").lowercased())"
                        let dir = out + "/" + name + (method == .rtn || seeds.count == 1 ? "" : "-seed\(seed)")
                        try QuantizedCheckpointWriter.write(source: ckpt, result: r, to: dir, overwrite: true) { try ResultsFile.writeAll(r, into: $0) }
                        row.seconds += Date().timeIntervalSince(t0)
                        // Evaluate what was written (packed: as the engines dequantize it), as a user would.
                        let q = try LanguageModel<Float>.load(try Checkpoint(directory: dir))
                        row.evals.append(try Evaluate.run(model: q, actBits: aBit, samples: held.samples, reference: fp))
                    }
                    rows.append(row)
                }
            }
            print(table(base: base, rows: rows, dtype: ckpt.weightDType.rawValue.lowercased(), heldOut: held.count))
            if let sigma = channelSpread() {
                print("\nThe model's RMSNorm channels were spread after training (lognormal sigma \(sigma), folded into the "
                      + "linears that read them; fp function unchanged): what makes naive rtn lose here (docs/DEMO.md, \"The channel spread\").")
            }
            if let mbqStats { print(ratios(mbqStats)) }
            print(String(format: "\nTotal %.1f s.", Date().timeIntervalSince(start)) + " Outputs, mbq_results.json and report.md per run are under \(out)/.")
        }
    }

    /// The sigma of the channel spread Scripts/train_demo_vlm.py applied after training
    /// (training.json, channel_spread), when there was one; nil for data without it.
    func channelSpread() -> Double? {
        guard let data = FileManager.default.contents(atPath: self.data + "/training.json"),
              let info = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let spread = info["channel_spread"] as? [String: Any], let sigma = spread["sigma"] as? Double, sigma > 0
        else { return nil }
        return sigma
    }

    /// Accuracy as a percentage; over several seeds the mean and the range.
    func accuracy(_ e: [EvalResult]) -> String {
        let a = e.map { 100 * $0.captionAccuracy }
        let mean = a.reduce(0, +) / Double(a.count)
        return a.count == 1 ? String(format: "%.2f%%", mean) : String(format: "%.2f%% (%.2f-%.2f)", mean, a.min()!, a.max()!)
    }

    func table(base: EvalResult, rows: [Row], dtype: String, heldOut: Int) -> String {
        let widths = [gptq ? 17 : 7, 8, 19, 23, 13, 10, 11, 7]
        func line(_ cells: [String]) -> String {
            zip(cells, widths).enumerated().map { i, cw in
                let pad = String(repeating: " ", count: max(0, cw.1 - cw.0.count))
                return i < 3 ? cw.0 + pad : pad + cw.0
            }.joined(separator: " ")
        }
        func mean(_ e: [EvalResult], _ f: (EvalResult) -> Double) -> Double { e.map(f).reduce(0, +) / Double(e.count) }
        var lines = ["", "Held-out pictures (\(heldOut) samples, \(base.captionTokens) caption tokens): caption-token accuracy (teacher-forced greedy)"
                     + (seeds.count > 1 ? ", mean (range) over calibration seeds \(calibSeeds)" : "")
                     + "; caption loss = mean CE per caption token; KL = mean KL(fp || quantized) per next-token position.",
                     line(["method", "scheme", "written as", "caption accuracy", "caption loss", "KL all", "KL caption", "time"]),
                     line(["fp", dtype, "-", accuracy([base]), String(format: "%.4f", base.captionCE), "-", "-", "-"])]
        for r in rows {
            lines.append(line([r.method, r.scheme, r.format, accuracy(r.evals), String(format: "%.4f", mean(r.evals, \.captionCE)),
                               String(format: "%.5f", mean(r.evals) { $0.klAll! }), String(format: "%.5f", mean(r.evals) { $0.klCaption! }),
                               String(format: "%.1fs", r.seconds / Double(r.evals.count))]))
        }
        return lines.joined(separator: "\n")
    }

    /// The per-layer vision/caption gradient ratios MBQ weighted its search with (paper
    /// Eq. 6; docs/DESIGN.md §2), raw and after clamping to the median.
    func ratios(_ s: GradientStatistics) -> String {
        func fmt(_ v: [Double]) -> String { v.map { String(format: "%.3f", $0) }.joined(separator: " ") }
        return "\nMBQ's vision/caption gradient ratios per layer (calibration seed \(seeds[0]), \(s.samplesUsed) samples):\n"
            + "  attention  raw \(fmt(s.layers.map(\.rawAttnRatio)))   used \(fmt(s.layers.map(\.attnRatio)))\n"
            + "  mlp        raw \(fmt(s.layers.map(\.rawMlpRatio)))   used \(fmt(s.layers.map(\.mlpRatio)))"
    }
}

/// The random-weight VLM-shaped checkpoint and calibration bundle `mbq bench --cluster`
/// runs on (no downloads, no PyTorch).
enum SyntheticDemoData {
    static func write(to out: String, samples: Int = 32, tokens: Int = 128) throws -> (SyntheticModelSpec, String, String) {
        var spec = SyntheticModelSpec()
        spec.layout = .llava
        let modelDir = out + "/model", calibPath = out + "/calib.safetensors"
        try spec.write(to: modelDir)
        try CalibrationBundle.write(spec.calibrationSamples(count: samples, length: tokens, imageTokens: 48, captionTokens: 12,
                                                            leftPadding: false, seed: 7), to: calibPath)
        return (spec, modelDir, calibPath)
    }
}
