import ArgumentParser
import Foundation
import Logging
import MBQFormats
import MBQModel

/// `mbq demo`: writes a small VLM-shaped checkpoint and calibration bundle from a seed
/// (no downloads, no PyTorch), loads them back through the real loaders and runs the
/// language model forward and backward: caption loss and the per-layer gradient
/// magnitudes at image vs caption tokens that MBQ's reweighting is built from.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo", abstract: "Generate a small demo VLM and calibration set, then run the engine on it.")

    @Option(help: "Directory for the demo model and bundle (kept afterwards).")
    var out = "demo-out"

    @Option(help: "Calibration samples.")
    var samples = 16

    @Option(help: "Tokens per sample.")
    var tokens = 128

    @OptionGroup var common: CommonOptions

    func validate() throws {
        if samples < 1 { throw ValidationError("--samples must be at least 1") }
        if tokens < 64 { throw ValidationError("--tokens must be at least 64 (48 image tokens + 12 caption tokens + prompt)") }
    }

    func run() throws {
        common.apply()
        try runReportingErrors {
            let logger = Logger(label: "mbq.demo")
            var spec = SyntheticModelSpec()
            spec.layout = .llava
            let modelDir = out + "/model", calibPath = out + "/calib.safetensors"
            let (_, genT) = try timed {
                try spec.write(to: modelDir)
                let s = spec.calibrationSamples(count: samples, length: tokens, imageTokens: 48, captionTokens: 12,
                                                leftPadding: false, seed: 7)
                try CalibrationBundle.write(s, to: calibPath)
            }
            logger.info("wrote demo model (\(spec.layout.rawValue), \(spec.layers) layers, hidden \(spec.hiddenSize), \(spec.dtype.rawValue)) and \(samples) x \(tokens)-token bundle to \(out) in \(String(format: "%.2f", genT)) s")
            let report = try ModelRun.run(modelDir: modelDir, calibPath: calibPath, limit: nil, gradients: true)
            print(report.table)
            print("""

            The demo model's image tokens carry larger, shifted activations than its text;
            the vis/cap columns are the per-layer gradient ratios MBQ weights its scale
            search by. Quantization (rtn / awq / mbq) arrives with `mbq quantize`.
            """)
        }
    }
}
