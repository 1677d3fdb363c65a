import Foundation
import Logging
import MBQCoordinator
import MBQFormats
import MBQMessages
import MBQMethods
import MBQModel
import MBQTensor
import MBQWire
import MBQWorker

/// Builds a job from a checkpoint, bundle and options; runs the coordinator; writes the
/// output exactly as the single-process `mbq quantize` does.
public enum DistributedJob {
    public static func spec(ckpt: Checkpoint, calib: CalibrationBundle, options: QuantizeOptions, workers: Int,
                            out: String, outputVia: String = "auto") throws -> JobSpec {
        guard let routing = Mbq_OutputRouting(option: outputVia) else {
            throw ClusterError.invalidOption("--output-via \(outputVia): use auto, shared or coordinator")
        }
        let cfg = ckpt.config
        let opts = Mbq_JobOptions(options)
        let json = opts.canonicalText
        // Workers open these paths, from their own working directories: absolute.
        let modelDir = OutputGuard.absolute(ckpt.directory)
        let calibPath = OutputGuard.absolute(calib.path)
        let identity = JobIdentity(modelDir: modelDir, calibPath: calibPath, modelContent: try ckpt.fingerprint(),
                                   calibContent: calib.fingerprint, options: json, samples: calib.count)
        var spec = JobSpec(jobID: identity.jobID, modelDir: modelDir, calibPath: calibPath, options: opts, layers: cfg.numLayers,
                           samples: calib.count, needsStats: options.needsGradientPass,
                           needsForward: options.method != .rtn,
                           groupsPerLayer: options.method == .smoothquant ? 2 : (options.method == .gptq ? 0 : ScaleSearch.groups(for: cfg).count),
                           expectedWorkers: workers)
        let shape = CostModel.Shape(cfg)
        let tokens = calib.samples.map(\.length).max() ?? 0
        let weightBytes = MemoryBudget.heldWeightBytes(stored: ckpt.weightDType)
        spec.memory = MemoryNeeds(shape: shape, inputRows: calib.samples.reduce(0) { $0 + $1.length }, tokens: tokens,
                                  weightBytes: weightBytes)
        if options.usesGPTQ {
            // One layer's Hessians and GPTQ's working set, held while the layer is rounded;
            // and each held layer's codes (a byte per weight) until the apply phase.
            spec.memory.fixedBytes += Double(LayerHessians.predictedBytes(cfg, perLinear: options.hessianWeights == .gradient))
            spec.memory.layerWeightBytes += Double(cfg.linearShapes.reduce(0) { $0 + $1.shape[0] * $1.shape[1] })
        }
        spec.identity = identity
        let absOut = OutputGuard.absolute(out)
        spec.outputDir = absOut + ".partial-" + spec.jobID
        spec.outputToken = String(SHA256.hex(Array("\(spec.jobID)|\(UUID().uuidString)".utf8)).prefix(24))
        spec.outputVia = routing
        spec.distort = options.sequential
        spec.gptq = options.usesGPTQ
        spec.tokenGradients = options.usesGPTQ && options.hessianWeights == .gradient
        spec.shape = shape
        var load = CostModel.Workload(samples: calib.count, tokens: tokens)
        let weighted = options.effectiveReweight && options.method != .rtn
        let rows = calib.samples.map { s in (0..<s.length).filter { s.attention[$0] && (!weighted || s.vision[$0] || s.caption[$0]) }.count }
        load.lossRowFraction = Double(rows.reduce(0, +)) / Double(max(1, calib.count * tokens))
        load.labelRows = Double(calib.samples.map { $0.labels.filter { $0 != -100 }.count }.reduce(0, +)) / Double(max(1, calib.count))
        load.needsStats = spec.needsStats
        load.searchEvaluations = options.method == .rtn ? nil : (options.method == .smoothquant ? 0 : Double(SearchOptions.defaultGrid))
        load.distort = options.sequential
        load.weightBytes = weightBytes
        spec.workload = load
        return spec
    }

    /// Runs the coordinator to the end and writes `out`: the layers workers wrote into
    /// the temporary output directory are checked, the streamed ones written here, then
    /// everything else as in one process, and the directory renamed into place.
    public static func coordinate(_ coord: ClusterCoordinator, ckpt: Checkpoint, options: QuantizeOptions, out: String,
                                  overwrite: Bool, deadline: Double = .infinity) throws {
        let t0 = Date()
        let spec = coord.state.spec
        let tmp = spec.outputDir
        try QuantizedCheckpointWriter.begin(out: out, overwrite: overwrite, tmp: tmp)
        do {
            try AtomicFile.write(data: Data(spec.outputToken.utf8), to: tmp + "/" + OutputMarker.name)
            try coord.run(deadline: deadline)
            // Every layer's shard, written by its worker or streamed and written here.
            for (l, b) in coord.state.written.sorted(by: { $0.key < $1.key }) {
                try QuantizedCheckpointWriter.verifyLayer(ckpt, layer: l, in: tmp, bytes: b.bytes, options: options)
            }
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw error
        }
        let result = try coord.result(options: options, seconds: ["distributed_job": Date().timeIntervalSince(t0)])
        try QuantizedCheckpointWriter.finish(source: ckpt, tmp: tmp, out: out, overwrite: overwrite,
                                             options: options) { dir in try ResultsFile.writeAll(result, into: dir) }
        coord.log(.wrote(path: out, seconds: Date().timeIntervalSince(t0)))
    }
}
