import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel

/// Builds a job from a checkpoint, bundle and options; runs the coordinator; writes the
/// output exactly as the single-process `mbq quantize` does.
public enum DistributedJob {
    public static func spec(ckpt: Checkpoint, calibPath: String, samples: Int, options: QuantizeOptions,
                            workers: Int) throws -> JobSpec {
        if options.method == .smoothquant || options.distort {
            throw MethodsError.invalidOptions("\(options.distort ? "--distort" : "smoothquant") is not distributed yet: run it without --workers")
        }
        let cfg = ckpt.config
        let json = QuantizeOptionsCodec.encode(options)
        let modelDir = (ckpt.directory as NSString).standardizingPath
        let calib = (calibPath as NSString).standardizingPath
        let id = Auth.sha256(Array("\(modelDir)|\(calib)|\(json)".utf8)).prefix(6).map { String(format: "%02x", $0) }.joined()
        let mha = cfg.numKVHeads * cfg.headDim == cfg.hiddenSize && cfg.numHeads * cfg.headDim == cfg.hiddenSize
        return JobSpec(jobID: "mbq-" + id, modelDir: modelDir, calibPath: calib, optionsJSON: json, layers: cfg.numLayers,
                       samples: samples, needsStats: options.method != .rtn && options.effectiveReweight,
                       needsForward: options.method != .rtn, groupsPerLayer: mha ? 4 : 3,
                       tensorsPerBlock: 9 + (cfg.qkvBias ? 3 : 0) + (cfg.oBias ? 1 : 0), expectedWorkers: workers)
    }

    /// Runs the coordinator to the end and writes `out`.
    public static func coordinate(_ coord: ClusterCoordinator, ckpt: Checkpoint, options: QuantizeOptions, out: String,
                                  overwrite: Bool, deadline: Double = .infinity) throws {
        let t0 = Date()
        try coord.run(deadline: deadline)
        let result = try coord.result(options: options, model: ckpt, seconds: ["distributed_job": Date().timeIntervalSince(t0)])
        try QuantizedCheckpointWriter.write(source: ckpt, blocks: result.blocks, quantizationConfig: options.configBlock,
                                            to: out, overwrite: overwrite) { dir in try ResultsFile.writeAll(result, into: dir) }
        coord.log("wrote \(out) in \(String(format: "%.1f", Date().timeIntervalSince(t0))) s total")
    }
}
