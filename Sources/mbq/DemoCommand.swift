import ArgumentParser
import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel

/// `mbq demo`: writes a small VLM-shaped checkpoint and a calibration + held-out bundle
/// from a seed (no downloads, no PyTorch), then quantizes it with rtn, awq and mbq at
/// W3 g128 and W4A8 through the same code paths as `mbq quantize`, and prints held-out
/// caption perplexity and KL to the fp model for each.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo", abstract: "Generate a demo VLM and calibration data, quantize it six ways, compare on held-out data.")

    @Option(help: "Directory for the demo model, bundles and quantized outputs.")
    var out = "demo-out"

    @Option(help: "Calibration samples.")
    var samples = 32

    @Option(help: "Held-out samples.")
    var heldOut = 16

    @Option(help: "Tokens per sample.")
    var tokens = 128

    @OptionGroup var common: CommonOptions

    func validate() throws {
        if samples < 1 || heldOut < 1 { throw ValidationError("--samples and --held-out must be at least 1") }
        if tokens < 64 { throw ValidationError("--tokens must be at least 64 (48 image tokens + 12 caption tokens + prompt)") }
    }

    /// The demo model and calibration bundle (also what `mbq bench --cluster` runs on).
    static func writeData(to out: String, samples: Int = 32, tokens: Int = 128) throws -> (SyntheticModelSpec, String, String) {
        var spec = SyntheticModelSpec()
        spec.layout = .llava
        let modelDir = out + "/model", calibPath = out + "/calib.safetensors"
        try spec.write(to: modelDir)
        try CalibrationBundle.write(spec.calibrationSamples(count: samples, length: tokens, imageTokens: 48, captionTokens: 12,
                                                            leftPadding: false, seed: 7), to: calibPath)
        return (spec, modelDir, calibPath)
    }

    func run() throws {
        common.apply()
        try runReportingErrors {
            let logger = Logger(label: "mbq.demo")
            let start = Date()
            let (spec, modelDir, calibPath) = try Self.writeData(to: out, samples: samples, tokens: tokens)
            let heldPath = out + "/heldout.safetensors"
            try CalibrationBundle.write(spec.calibrationSamples(count: heldOut, length: tokens, imageTokens: 48, captionTokens: 12,
                                                                leftPadding: false, seed: 8), to: heldPath)
            logger.info("[demo] wrote \(spec.layout.rawValue) model (\(spec.layers) layers, hidden \(spec.hiddenSize), \(spec.dtype.rawValue)), \(samples) calibration and \(heldOut) held-out samples of \(tokens) tokens to \(out)")

            let ckpt = try Checkpoint(directory: modelDir)
            let fp = try LanguageModel<Float>.load(ckpt)
            let calib = try CalibrationBundle.load(path: calibPath, hiddenSize: ckpt.config.hiddenSize, vocabSize: ckpt.config.vocabSize)
            let held = try CalibrationBundle.load(path: heldPath, hiddenSize: ckpt.config.hiddenSize, vocabSize: ckpt.config.vocabSize)
            let base = try Evaluate.run(model: fp, actBits: nil, samples: held.samples)

            func row(_ cells: [String]) -> String {
                let widths = [8, 9, 19, 12, 10, 11, 8]
                return zip(cells, widths).enumerated().map { i, cw in
                    let pad = String(repeating: " ", count: max(0, cw.1 - cw.0.count))
                    return i < 3 ? cw.0 + pad : pad + cw.0
                }.joined(separator: " ")
            }
            var rows = [row(["method", "scheme", "written as", "caption ppl", "KL all", "KL caption", "time"]),
                        row(["fp", spec.dtype.rawValue.lowercased(), "-", String(format: "%.3f", base.captionPPL), "-", "-", "-"])]
            for (scheme, wBit, aBit) in [("W3 g128", 3, nil as Int?), ("W4A8", 4, 8 as Int?)] {
                for method in [QuantMethod.rtn, .awq, .mbq] {
                    var o = QuantizeOptions()
                    o.method = method; o.wBit = wBit; o.group = 128; o.aBit = aBit
                    o.weightDType = ckpt.weightDType
                    let t0 = Date()
                    let r = try QuantizeJob.run(model: fp, samples: calib.samples, options: o)
                    let dir = out + "/\(method.rawValue)-\(scheme.replacingOccurrences(of: " ", with: "").lowercased())"
                    try QuantizedCheckpointWriter.write(source: ckpt, result: r, to: dir, overwrite: true) { try ResultsFile.writeAll(r, into: $0) }
                    let secs = Date().timeIntervalSince(t0)
                    // Evaluate what was written (packed: as the engines dequantize it), as a user would.
                    let q = try LanguageModel<Float>.load(try Checkpoint(directory: dir))
                    let e = try Evaluate.run(model: q, actBits: aBit, samples: held.samples, reference: fp)
                    rows.append(row([method.rawValue, scheme, o.resolvedFormat.rawValue, String(format: "%.3f", e.captionPPL), String(format: "%.5f", e.klAll!),
                                     String(format: "%.5f", e.klCaption!), String(format: "%.1fs", secs)]))
                }
            }
            print("\nHeld-out evaluation (\(heldOut) samples x \(tokens) tokens; KL = mean KL(fp || quantized) per next-token position)")
            print(rows.joined(separator: "\n"))
            print(String(format: "\nTotal %.1f s.", Date().timeIntervalSince(start)) + " Outputs, mbq_results.json and report.md per run are under \(out)/.")
            print("The demo model has random weights with outlier input channels: KL to fp is the measure that means something here;\nperplexities of a random model sit near its vocabulary size.")
        }
    }
}
