import ArgumentParser
import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel
import MBQTensor

/// `mbq forward`: the language model's caption loss on a calibration bundle, and the
/// per-layer gradient magnitudes at vision and caption positions that MBQ reweights by.
struct ForwardCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward",
        abstract: "Run the language model on a calibration bundle: caption loss, and |grad| per layer at vision vs caption tokens.")

    @Option(help: "Hugging Face model directory (config.json + *.safetensors).")
    var model: String

    @Option(help: "Calibration bundle (mbq-calib safetensors).")
    var calib: String

    @Option(help: "Use only the first N samples.")
    var samples: Int?

    @Flag(help: "Also run the backward pass and print per-layer gradient statistics.")
    var gradients = false

    @Flag(help: "Print one JSON object instead of tables.")
    var json = false

    @Option(help: "Compute device: cpu, cuda, cuda:N or cuda-emulated.")
    var device = "cpu"

    @OptionGroup var common: CommonOptions

    func validate() throws {
        if let samples, samples < 1 { throw ValidationError("--samples must be at least 1") }
    }

    func run() throws {
        common.apply()
        try runReportingErrors {
            let backend = try computeBackend(device, storedPrecision: false)
            let report = try ModelRun.run(modelDir: model, calibPath: calib, limit: samples, gradients: gradients, backend: backend)
            if json {
                let data = try JSONSerialization.data(withJSONObject: report.json, options: [.prettyPrinted, .sortedKeys])
                print(String(decoding: data, as: UTF8.self))
            } else {
                print(report.table)
            }
        }
    }
}

/// Loads a model and a bundle and runs forward (and optionally backward) on every sample.
struct ModelRun {
    typealias LayerStats = GradientStatistics.Layer

    var modelType = ""
    var layers = 0
    var samples = 0
    var skipped: [String] = []
    var meanLoss = 0.0
    var lossTokens = 0
    var stats: [LayerStats] = []
    var loadSeconds = 0.0
    var runSeconds = 0.0
    var gradients = false

    static func run(modelDir: String, calibPath: String, limit: Int?, gradients: Bool, backend: ComputeBackend) throws -> ModelRun {
        let logger = Logger(label: "mbq.forward")
        var r = ModelRun()
        r.gradients = gradients
        let ((lm, bundle), loadT) = try timed { () throws -> (LanguageModel<Float>, CalibrationBundle) in
            let ckpt = try Checkpoint(directory: modelDir)
            let b = try CalibrationBundle.load(path: calibPath, for: ckpt.config)
            return (try LanguageModel<Float>.load(ckpt), b)
        }
        r.loadSeconds = loadT
        r.modelType = lm.config.modelType
        r.layers = lm.config.numLayers
        let samples = Array(bundle.samples.prefix(limit ?? bundle.count))
        logger.info("loaded \(modelDir) (\(lm.config.modelType), \(lm.config.numLayers) layers) and \(samples.count) samples in \(String(format: "%.2f", loadT)) s")
        // With --gradients the statistics as the job computes them (`GradientStatistics.compute`,
        // which skips samples without vision or caption) and, from its head step, those
        // samples' caption losses; every other sample's loss from a forward through the
        // backend (`GradientPass.modelForward`). The mean sums them in sample order.
        var perSample = [(loss: Float, count: Int)?](repeating: nil, count: samples.count)
        let (_, runT) = try timed {
            if gradients {
                do {
                    let stats = try GradientStatistics.compute(model: lm, samples: samples, backend: backend,
                                                               losses: { perSample[$0] = ($1, $2) }) { phase, done, of in
                        logger.info("gradient statistics: \(phase) layer \(done)/\(of)")
                    }
                    r.stats = stats.layers
                    r.skipped = stats.skipped
                } catch let MethodsError.noUsableSamples(why) {
                    r.skipped = ["every sample: \(why)"]   // the losses below still stand
                }
            }
            let blocks = try lm.blocks.map { try backend.loadBlock($0) }
            let head = try backend.loadHead(norm: lm.finalNorm, lmHead: lm.lmHead, eps: Float(lm.config.rmsNormEps))
            for (i, s) in samples.enumerated() where perSample[i] == nil {
                let t0 = DispatchTime.now().uptimeNanoseconds
                let h = try GradientPass.modelForward(s, model: lm, blocks: blocks, backend: backend)
                let (loss, count, _) = try backend.lossGradient(h, head, labels: s.labels)
                perSample[i] = (loss, count)
                let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
                logger.info("sample \(i + 1)/\(samples.count): \(String(format: "%.2f", dt)) s")
            }
        }
        var lossSum = 0.0
        for case let (loss, count)? in perSample {
            lossSum += Double(loss) * Double(count)
            r.lossTokens += count
        }
        r.runSeconds = runT
        r.samples = samples.count
        r.meanLoss = r.lossTokens > 0 ? lossSum / Double(r.lossTokens) : .nan
        return r
    }

    var table: String {
        var lines = [String(format: "%@: %d layers, %d samples, caption CE %.4f over %d tokens (ppl %.2f); load %.2f s, run %.2f s",
                            modelType, layers, samples, meanLoss, lossTokens, exp(meanLoss), loadSeconds, runSeconds)]
        if !stats.isEmpty {
            lines.append("layer  attn |g| vis   attn |g| cap   vis/cap   mlp |g| vis    mlp |g| cap    vis/cap")
            for (l, s) in stats.enumerated() {
                lines.append(String(format: "%5d  %12.4e  %12.4e  %8.4f  %12.4e  %12.4e  %8.4f", l, s.attnVis, s.attnCap,
                                    s.attnVis / s.attnCap, s.mlpVis, s.mlpCap, s.mlpVis / s.mlpCap))
            }
        }
        for s in skipped { lines.append("skipped \(s)") }
        return lines.joined(separator: "\n")
    }

    var json: [String: Any] {
        var o: [String: Any] = ["model_type": modelType, "layers": layers, "samples": samples, "caption_ce": meanLoss,
                                "caption_ppl": exp(meanLoss), "loss_tokens": lossTokens, "load_s": loadSeconds,
                                "run_s": runSeconds, "skipped": skipped]
        if !stats.isEmpty {
            o["grad_stats"] = stats.enumerated().map { l, s in
                ["layer": l, "attn_vis": s.attnVis, "attn_cap": s.attnCap, "mlp_vis": s.mlpVis, "mlp_cap": s.mlpCap] as [String: Any]
            }
        }
        return o
    }
}
