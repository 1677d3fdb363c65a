import ArgumentParser
import Foundation
import MBQFormats

/// `mbq inspect`: what the tool makes of a model directory, reading headers only.
struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect", abstract: "Show the language model found in a checkpoint (headers only, no weights read).")

    @Option(help: "Hugging Face model directory.")
    var model: String

    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let c = try Checkpoint(directory: model)
            let cfg = c.config
            var total = 0
            for l in 0..<cfg.numLayers { total += c.blockBytes(l) }
            print("""
            model_type        \(cfg.modelType) (\(cfg.family.rawValue) decoder)
            decoder prefix    \(c.names.base)
            output projection \(c.names.outputProjection)\(c.names.lmHead == nil ? " (tied)" : "")
            layers            \(cfg.numLayers)
            hidden / inter    \(cfg.hiddenSize) / \(cfg.intermediateSize)
            heads / kv heads  \(cfg.numHeads) / \(cfg.numKVHeads) (head_dim \(cfg.headDim))
            rope              theta \(cfg.ropeTheta)\(cfg.mropeSection.map { ", M-RoPE sections \($0)" } ?? "")
            q/k/v bias        \(cfg.qkvBias)
            quantization      \(c.quantization?.description ?? "none")
            weight dtype      \(c.weightDType.rawValue)\(c.quantization.map { $0.format == .fake ? "" : " (scales)" } ?? "")
            decoder bytes     \(total) (\(String(format: "%.2f", Double(total) / 1e9)) GB as stored)
            tensors           \(c.allTensorNames.count)
            """)
        }
    }
}
