import ArgumentParser
import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel

extension QuantMethod: ExpressibleByArgument {}
extension SearchLoss: ExpressibleByArgument {}

/// `mbq quantize`: MBQ / AWQ / SmoothQuant / RTN on one machine.
struct QuantizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quantize", abstract: "Quantize the language model of a VLM checkpoint (fake-quantized output).")

    @Option(help: "Hugging Face model directory.") var model: String
    @Option(help: "Calibration bundle (mbq-calib safetensors).") var calib: String
    @Option(help: "mbq, awq, rtn or smoothquant.") var method: QuantMethod = .mbq
    @Option(name: .customLong("w-bit"), help: "Weight bits.") var wBit = 4
    @Option(help: "Weight group size along the input dim (weight-only; -1 = per row).") var group = 128
    @Option(name: .customLong("a-bit"), help: "Activation bits (8 for W4A8 / W8A8; weights then per output channel).") var aBit: Int?
    @Option(help: "Search loss: mae or mse.") var loss: SearchLoss = .mae
    @Flag(inversion: .prefixedNo, help: "Modality-reweighted search loss (default: on for mbq).") var reweight: Bool?
    @Flag(help: "Feed each block the already-quantized blocks' output (a pipeline).") var distort = false
    @Option(help: "Use only the first N calibration samples.") var samples: Int?
    @Option(help: "Output directory.") var out: String
    @Flag(help: "Replace --out if it exists.") var overwrite = false
    @OptionGroup var common: CommonOptions

    var options: QuantizeOptions {
        var o = QuantizeOptions()
        o.method = method; o.wBit = wBit; o.group = group; o.aBit = aBit; o.loss = loss
        o.reweight = reweight; o.distort = distort
        return o
    }

    func run() throws {
        common.apply()
        try runReportingErrors {
            let logger = Logger(label: "mbq.quantize")
            // Everything that can be refused is refused before any weight is read.
            let ckpt = try Checkpoint(directory: model)
            try options.validate(for: ckpt.config)
            if FileManager.default.fileExists(atPath: out) && !overwrite {
                throw MethodsError.output(path: out, reason: "already exists (pass --overwrite to replace it)")
            }
            let bundle = try CalibrationBundle.load(path: calib, hiddenSize: ckpt.config.hiddenSize,
                                                    vocabSize: ckpt.config.vocabSize,
                                                    positionRows: ckpt.config.mropeSection == nil ? 1 : 3)
            let chosen = Array(bundle.samples.prefix(samples ?? bundle.count))
            let (lm, loadT) = try timed { try LanguageModel<Float>.load(ckpt) }
            logger.info("[load] \(ckpt.config.modelType): \(ckpt.config.numLayers) layers in \(String(format: "%.1fs", loadT)); \(chosen.count) calibration samples")
            let result = try QuantizeJob.run(model: lm, samples: chosen, options: options, logger: logger)
            let (_, writeT) = try timed {
                try QuantizedCheckpointWriter.write(source: ckpt, blocks: result.blocks, quantizationConfig: options.configBlock,
                                                    to: out, overwrite: overwrite) { dir in
                    try ResultsFile.writeAll(result, into: dir)
                }
            }
            logger.info("[write] \(out) in \(String(format: "%.1fs", writeT))")
        }
    }
}

/// `mbq eval`: caption CE / perplexity and KL against a reference model.
struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval", abstract: "Caption cross-entropy and perplexity, and KL(reference || model) with --reference.")

    @Option(help: "Model directory (a quantized output or any checkpoint).") var model: String
    @Option(help: "Calibration / evaluation bundle.") var calib: String
    @Option(help: "Reference model directory (e.g. the fp model).") var reference: String?
    @Flag(help: "Print one JSON object.") var json = false
    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let ckpt = try Checkpoint(directory: model)
            let bundle = try CalibrationBundle.load(path: calib, hiddenSize: ckpt.config.hiddenSize, vocabSize: ckpt.config.vocabSize,
                                                    positionRows: ckpt.config.mropeSection == nil ? 1 : 3)
            let lm = try LanguageModel<Float>.load(ckpt)
            var ref: LanguageModel<Float>? = nil
            var refBits: Int? = nil
            if let reference {
                let rc = try Checkpoint(directory: reference)
                guard rc.config.hiddenSize == ckpt.config.hiddenSize, rc.config.vocabSize == ckpt.config.vocabSize else {
                    throw MethodsError.invalidOptions("--reference \(reference) is not the same architecture as --model \(model)")
                }
                ref = try LanguageModel<Float>.load(rc)
                refBits = try activationBits(reference)
            }
            let r = try Evaluate.run(model: lm, actBits: try activationBits(model), samples: bundle.samples,
                                     reference: ref, referenceActBits: refBits)
            if json {
                print(String(decoding: try JSONSerialization.data(withJSONObject: r.json, options: [.sortedKeys]), as: UTF8.self))
            } else {
                print(String(format: "caption CE %.5f, ppl %.4f over %d tokens", r.captionCE, r.captionPPL, r.captionTokens))
                if let a = r.klAll, let c = r.klCaption {
                    print(String(format: "KL(reference || model): all positions %.6f, caption positions %.6f", a, c))
                }
            }
        }
    }
}

/// The activation bits a checkpoint's `quantization_config` asks for (nil: none).
func activationBits(_ dir: String) throws -> Int? {
    let path = dir + "/config.json"
    guard let obj = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path)))) as? [String: Any] else {
        throw FormatsError.invalidConfig(path: path, reason: "not a JSON object")
    }
    guard let q = obj["quantization_config"] as? [String: Any], let a = q["a_bit"] as? Int, a < 16 else { return nil }
    return a
}
