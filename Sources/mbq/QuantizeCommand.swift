import ArgumentParser
import Foundation
import Logging
import MBQCluster
import MBQCoordinator
import MBQDevice
import MBQFormats
import MBQMethods
import MBQModel
import MBQTensor
import MBQWire
import MBQWorker

extension QuantMethod: ExpressibleByArgument {}
extension SearchLoss: ExpressibleByArgument {}
extension CheckpointFormat: ExpressibleByArgument {}
extension HessianWeights: ExpressibleByArgument {}

/// The options of a quantization job, shared by `quantize` and `coordinator`.
struct QuantizeArguments: ParsableArguments {
    @Option(help: "Hugging Face model directory.") var model: String
    @Option(help: "Calibration bundle (mbq-calib safetensors).") var calib: String
    @Option(help: "mbq, awq, rtn, smoothquant or gptq.") var method: QuantMethod = .mbq
    @Option(help: ArgumentHelp("gptq: after the scale search (mbq, awq), round with GPTQ instead of to nearest.", valueName: "gptq"))
    var then: String?
    @Option(name: .customLong("hessian-weights"), help: "GPTQ's token weights: none (plain GPTQ), modality (MBQ's vision/caption ratios) or gradient (|dL/dy|^2 per token).")
    var hessianWeights: HessianWeights = .none
    @Option(parsing: .unconditional, help: "GPTQ: dampening, a fraction of the mean Hessian diagonal.") var damp = 0.01
    @Option(name: .customLong("block-size"), parsing: .unconditional, help: "GPTQ: columns per lazy batch update.") var blockSize = 128
    @Flag(name: .customLong("act-order"), help: "GPTQ: quantize columns by decreasing Hessian diagonal (GPTQ format: g_idx / desc_act; compressed-tensors: static groups).")
    var actOrder = false
    // Numbers parse unconditionally, so that "-1" and "-5" reach validation as values.
    @Option(name: .customLong("w-bit"), parsing: .unconditional, help: "Weight bits.") var wBit = 4
    @Option(parsing: .unconditional, help: "Weight group size along the input dim (weight-only; -1 = per row).") var group = 128
    @Option(name: .customLong("a-bit"), parsing: .unconditional, help: "Activation bits (8 for W4A8 / W8A8; weights then per output channel).") var aBit: Int?
    @Option(help: "Search loss: mae or mse.") var loss: SearchLoss = .mae
    @Flag(inversion: .prefixedNo, help: "Modality-reweighted search loss (default: on for mbq).") var reweight: Bool?
    @Flag(help: "Feed each block the already-quantized blocks' output (a pipeline).") var distort = false
    @Option(parsing: .unconditional, help: "Use only the first N calibration samples.") var samples: Int?
    @Flag(help: "Use a calibration bundle that records another model (its model_type, sizes or token embeddings differ).")
    var allowOtherModel = false
    @Option(help: "Output format: fake, compressed-tensors, awq or gptq (default: what vLLM serves for the scheme; see the README).")
    var format: CheckpointFormat?
    @Option(help: "Output directory.") var out: String
    @Flag(help: "Replace --out if it exists.") var overwrite = false

    /// The options for this checkpoint (the output keeps its weight dtype).
    func options(_ ckpt: Checkpoint) -> QuantizeOptions {
        var o = QuantizeOptions()
        o.method = method; o.wBit = wBit; o.group = group; o.aBit = aBit; o.loss = loss
        o.reweight = reweight; o.distort = distort; o.format = format
        o.weightDType = ckpt.weightDType
        o.thenGPTQ = then != nil
        o.hessianWeights = hessianWeights; o.damp = damp; o.blockSize = blockSize; o.actOrder = actOrder
        return o
    }

    /// Everything that can be refused is refused here, before any weight is read: the
    /// options, the output path (`OutputGuard`), the bundle against the model.
    func prepare() throws -> (Checkpoint, CalibrationBundle) {
        if let samples, samples < 1 { throw MethodsError.invalidOptions("--samples \(samples): must be at least 1") }
        if let then, then != "gptq" { throw MethodsError.invalidOptions("--then \(then): the step after the scale search is gptq") }
        let ckpt = try Checkpoint(directory: model)
        if let q = ckpt.quantization {
            throw MethodsError.invalidOptions("\(model) is already quantized (\(q.description)): quantize the original checkpoint")
        }
        let opts = options(ckpt)
        try opts.validate(for: ckpt.config)
        try OutputGuard.check(out: out, inputs: [("model directory", model), ("calibration bundle", calib)],
                              predictedBytes: try QuantizedCheckpointWriter.predictedBytes(ckpt, options: opts))
        if FileManager.default.fileExists(atPath: out) && !overwrite {
            throw MethodsError.output(path: out, reason: "already exists (pass --overwrite to replace it)")
        }
        let bundle = try CalibrationBundle.load(path: calib, for: ckpt.config)
        if let why = try bundle.mismatch(with: ckpt) {
            guard allowOtherModel else { throw MethodsError.invalidOptions(why + "; pass --allow-other-model to use it anyway") }
            Logger(label: "mbq.quantize").warning("\(why); used anyway (--allow-other-model)")
        } else if bundle.model == nil {
            Logger(label: "mbq.quantize").warning("\(calib) records no model (made by an exporter before the record): it cannot be checked against \(model)")
        }
        if let samples, samples > bundle.count {
            throw MethodsError.invalidOptions("--samples \(samples): \(calib) holds \(bundle.count) samples")
        }
        return (ckpt, bundle.prefix(samples ?? bundle.count))
    }
}

/// `mbq quantize`: MBQ / AWQ / SmoothQuant / RTN, in this process or over local workers.
struct QuantizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quantize", abstract: "Quantize the language model of a VLM checkpoint (compressed-tensors, AWQ, GPTQ or fake-quantized output).")

    @OptionGroup var job: QuantizeArguments
    @Option(help: "Start N local worker processes and run distributed (0: in this process).") var workers = 0
    @Option(help: "Compute device: cpu, cuda (GPU 0; with --workers N, worker i on GPU i), cuda:N, or cuda-emulated (the CUDA backend run on the host, for checks).")
    var device = "cpu"
    @Option(help: "With a CUDA device: strict (fp32 GEMMs, the CPU's results up to rounding order) or bf16 (bf16 GEMM inputs, fp32 sums: faster, may move near-tie grid points).")
    var precision: GEMMPrecision = .strict
    @Option(help: "With --workers: each local worker's memory budget (block inputs past it spill to JOB-DIR/scratch).")
    var workerMaxMemory = "20GiB"
    @Option(help: "In this process: the memory budget (default: 3/4 of physical memory); block inputs kept for the gradient pass past what it leaves go to --scratch.")
    var maxMemory: String?
    @Option(help: "In this process: where block inputs past --max-memory go (default: OUT.scratch, removed at the end).")
    var scratch: String?
    @Option(help: "Tokens the search holds captures for at a time, whole samples (default: what a quarter of the budget left after weights and working set holds; with --workers, each worker sizes its own). Changes no result.")
    var chunkTokens: Int?
    @OptionGroup var cluster: ClusterOptions
    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let logger = Logger(label: "mbq.quantize")
            // The device first: without a driver, one line and nothing read or written.
            let backend = try computeBackend(workers > 0 ? "cpu" : device, storedPrecision: false, precision: workers > 0 ? .strict : precision)
            if workers > 0 { _ = try computeBackend(try localWorkerDevice(device, worker: 0), storedPrecision: true, precision: precision) }
            let (ckpt, bundle) = try job.prepare()
            if workers > 0 {
                try runLocalCluster(ckpt: ckpt, bundle: bundle)
                return
            }
            let options = job.options(ckpt)
            let cfg = ckpt.config
            let budget: UInt64
            if let maxMemory {
                guard let b = parseBytes(maxMemory) else { throw MethodsError.invalidOptions("--max-memory \(maxMemory): use e.g. 24GiB, 512MiB") }
                budget = b
            } else {
                budget = ProcessInfo.processInfo.physicalMemory / 4 * 3
            }
            // What the budget leaves once one layer's fp32 weights three times over (fp,
            // scaled, quantized), the head and one sample's working set are counted: the
            // search's chunk (a quarter of it unless --chunk-tokens says), then cached
            // block inputs.
            // GPTQ also holds the layer's Hessians (fp64, in x in per captured input, or per
            // linear with gradient weights).
            let tokens = bundle.samples.map(\.length).max() ?? 0
            let free = max(0, Double(budget) - MemoryBudget.working(cfg, tokens: tokens) - MemoryBudget.gptqBytes(cfg, options: options))
            let split = MemoryBudget.split(free: free, chunkTokens: chunkTokens, longest: tokens, bytesPerToken: MemoryBudget.searchBytesPerToken(cfg))
            let inputBudget = Int(split.inputBytes)
            let scratchDir = scratch ?? job.out + ".scratch"
            let inputs = ActivationStore(budgetBytes: inputBudget, scratch: scratchDir, owner: "quantize")
            defer {
                inputs.removeFiles()
                if scratch == nil { try? FileManager.default.removeItem(atPath: scratchDir) }
            }
            let total = bundle.samples.reduce(0) { $0 + $1.length }
            let chunks = LayerStep.chunks(lengths: bundle.samples.map(\.length), chunkTokens: split.chunkTokens).count
            logger.info("[load] \(cfg.modelType): \(cfg.numLayers) layers, read one at a time; \(bundle.count) calibration samples (\(total) tokens, searched in \(chunks) chunk(s) of at most \(split.chunkTokens) tokens, \(String(format: "%.2f", split.chunkBytes / 1073741824)) GiB); block inputs past \(String(format: "%.1f", Double(inputBudget) / 1073741824)) GiB go to \(scratchDir)")
            logger.info("[format] \(options.resolvedFormat.rawValue), scales in \(options.scaleDType.rawValue)")
            let t0 = Date()
            try QuantizedCheckpointWriter.write(source: ckpt, options: options, to: job.out, overwrite: job.overwrite) { sink in
                try QuantizeJob.run(source: .checkpoint(ckpt), samples: bundle.samples, options: options, backend: backend,
                                    chunkTokens: split.chunkTokens,
                                    inputs: inputs, logger: logger, sink: sink)
            } extras: { dir, result in
                try ResultsFile.writeAll(result, into: dir)
            }
            logger.info("[write] \(job.out): done \(String(format: "%.1fs", Date().timeIntervalSince(t0))) after loading")
        }
    }

    /// The one-machine cluster: a coordinator here, `workers` worker processes beside it.
    func runLocalCluster(ckpt: Checkpoint, bundle: CalibrationBundle) throws {
        let spec = try DistributedJob.spec(ckpt: ckpt, calib: bundle, options: job.options(ckpt), workers: workers, out: job.out,
                                           outputVia: cluster.outputVia)
        guard let perWorker = parseBytes(workerMaxMemory) else { throw MethodsError.invalidOptions("--worker-max-memory \(workerMaxMemory): use e.g. 64GiB, 512MiB") }
        // No other worker can join a local cluster: if these cannot hold the model, say so
        // now instead of waiting for one (each has a scratch directory, so inputs spill).
        let layers = spec.memory.capacity(memory: perWorker, spills: true, layers: spec.layers)
        guard layers * workers >= spec.layers else {
            throw MethodsError.invalidOptions(String(format: "--workers %d --worker-max-memory %@ hold %d of %d layers (%.3f GiB per layer, %.3f GiB fixed per worker): raise --worker-max-memory to %.2f GiB or add workers",
                                                     workers, workerMaxMemory, layers * workers, spec.layers, spec.memory.layerWeightBytes / 1073741824,
                                                     spec.memory.bytes(layers: 0, spills: true) / 1073741824,
                                                     spec.memory.bytes(layers: (spec.layers + workers - 1) / workers, spills: true) / 1073741824 + 0.005))
        }
        let jobDir = cluster.jobDir ?? job.out + ".job"
        // Loopback is reachable by every user of this machine: the local workers prove
        // themselves with a secret made for this run (or the given one), passed to them
        // in their environment, never on their command lines.
        let secret = try cluster.secret.load() ?? SharedSecret.generate()
        let coord = try ClusterCoordinator(spec: spec, bind: "tcp://127.0.0.1:*", jobDir: jobDir,
                                           resume: cluster.resume, secret: secret, logFormat: cluster.logFormat)
        let threads = max(1, (common.threads ?? EngineThreads.count) / workers)
        var children: [Process] = []
        defer {
            for c in children where c.isRunning { c.terminate() }
            for c in children { c.waitUntilExit() }
            for i in 0..<workers { try? FileManager.default.removeItem(atPath: jobDir + "/scratch-w\(i)") }
        }
        for i in 0..<workers {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
            let scratch = jobDir + "/scratch-w\(i)"
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            p.arguments = ["worker", "--connect", coord.endpoint, "--id", "w\(i)", "--threads", "\(threads)",
                           "--max-memory", workerMaxMemory, "--scratch", scratch, "--device", try localWorkerDevice(device, worker: i),
                           "--precision", precision.rawValue]
                + (chunkTokens.map { ["--chunk-tokens", "\($0)"] } ?? [])
            p.environment = ProcessInfo.processInfo.environment.merging([SharedSecret.environmentVariable: secret]) { $1 }
            try p.run()
            children.append(p)
        }
        try DistributedJob.coordinate(coord, ckpt: ckpt, options: job.options(ckpt), out: job.out, overwrite: job.overwrite)
    }
}

/// `mbq eval`: caption CE / perplexity and KL against a reference model.
struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval", abstract: "Caption-token accuracy (teacher-forced greedy), caption cross-entropy and perplexity, and KL(reference || model) with --reference.")

    @Option(help: "Model directory: any checkpoint, or a quantized one in any format mbq writes (read as the engines dequantize it).") var model: String
    @Option(help: "Calibration / evaluation bundle.") var calib: String
    @Option(help: "Reference model directory (e.g. the fp model).") var reference: String?
    @Flag(help: "Print one JSON object.") var json = false
    @Option(help: "Compute device for the blocks: cpu, cuda, cuda:N or cuda-emulated.") var device = "cpu"
    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let backend = try computeBackend(device, storedPrecision: false)
            let ckpt = try Checkpoint(directory: model)
            let bundle = try CalibrationBundle.load(path: calib, for: ckpt.config)
            let lm = try LanguageModel<Float>.load(ckpt)
            var ref: LanguageModel<Float>? = nil
            var refBits: Int? = nil
            if let reference {
                let rc = try Checkpoint(directory: reference)
                guard rc.config.hiddenSize == ckpt.config.hiddenSize, rc.config.vocabSize == ckpt.config.vocabSize else {
                    throw MethodsError.invalidOptions("--reference \(reference) is not the same architecture as --model \(model)")
                }
                ref = try LanguageModel<Float>.load(rc)
                refBits = rc.quantization?.activationBits
            }
            let r = try Evaluate.run(model: lm, actBits: ckpt.quantization?.activationBits, samples: bundle.samples,
                                     reference: ref, referenceActBits: refBits, backend: backend)
            if json {
                print(String(decoding: try JSONSerialization.data(withJSONObject: r.json, options: [.sortedKeys]), as: UTF8.self))
            } else {
                print(String(format: "caption accuracy %.2f%% (%d of %d tokens, teacher-forced greedy), caption CE %.5f, ppl %.4f",
                             100 * r.captionAccuracy, r.captionCorrect, r.captionTokens, r.captionCE, r.captionPPL))
                if let a = r.klAll, let c = r.klCaption {
                    print(String(format: "KL(reference || model): all positions %.6f, caption positions %.6f", a, c))
                }
            }
        }
    }
}
