import ArgumentParser
import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel

/// `mbq synth`: a random checkpoint of a real model's shape (bf16, sharded as hub
/// checkpoints are, index included) and a matching calibration bundle, to rehearse and
/// benchmark a real-size job without downloading a model.
struct SynthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "synth", abstract: "Write a random checkpoint of a real model's shape and a matching calibration bundle.")

    @Option(help: "Shape: \(SyntheticModelSpec.Preset.allCases.map(\.rawValue).joined(separator: ", ")).")
    var preset: String
    @Option(help: "Decoder layers (default: the real model's).") var layers: Int?
    @Option(help: "Calibration samples.") var samples = 2
    @Option(help: "Tokens per sample.") var tokens = 512
    @Option(help: "Image tokens per sample (default: half the tokens).") var imageTokens: Int?
    @Option(help: "Output directory: DIR/model and DIR/calib.safetensors.") var out: String
    @Option(help: "Seed of the weights and the samples.") var seed: UInt64 = 2024
    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            guard let p = SyntheticModelSpec.Preset(rawValue: preset) else {
                throw MethodsError.invalidOptions("--preset \(preset): use one of \(SyntheticModelSpec.Preset.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            var spec = p.spec
            if let layers {
                guard layers >= 1 else { throw MethodsError.invalidOptions("--layers must be at least 1") }
                spec.layers = layers
            }
            spec.seed = seed
            let image = imageTokens ?? tokens / 2
            let caption = max(1, tokens / 8)
            guard samples >= 1, image >= 1, image + caption + 4 <= tokens else {
                throw MethodsError.invalidOptions("--samples \(samples), --tokens \(tokens), --image-tokens \(image): need at least one sample and room for \(image) image + \(caption) caption tokens")
            }
            let logger = Logger(label: "mbq.synth")
            let t0 = Date()
            try spec.write(to: out + "/model")
            let params = spec.layers * (2 * spec.hiddenSize + spec.hiddenSize * (spec.heads + 2 * spec.kvHeads) * spec.headDim
                                        + spec.heads * spec.headDim * spec.hiddenSize + 3 * spec.hiddenSize * spec.intermediateSize)
            logger.info("[synth] \(p.rawValue): \(spec.layers) layers (\(String(format: "%.2f", Double(params) / 1e9))B decoder parameters, bf16) in \(out)/model, \(String(format: "%.0f", Date().timeIntervalSince(t0))) s")
            let calib = spec.calibrationSamples(count: samples, length: tokens, imageTokens: image, captionTokens: caption,
                                                leftPadding: false, seed: seed &+ 1, textFromTable: false)
            try CalibrationBundle.write(calib, to: out + "/calib.safetensors")
            logger.info("[synth] \(samples) samples of \(tokens) tokens (\(image) image, \(caption) caption) in \(out)/calib.safetensors")
        }
    }
}
