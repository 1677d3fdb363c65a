import ArgumentParser
import Foundation
import Logging
import MBQCluster
import MBQCoordinator
import MBQDevice
import MBQFormats
import MBQMethods
import MBQTensor
import MBQWire
import MBQWorker

extension ClusterCoordinator.LogFormat: ExpressibleByArgument {}

/// `mbq worker`: joins a coordinator and works on the blocks it is given.
struct WorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker", abstract: "Run a worker that joins a coordinator.")

    @Option(help: "Coordinator endpoint, e.g. tcp://10.0.0.1:5555.") var connect: String
    @Option(help: "This worker's name (default: host-pid).") var id: String?
    @Option(help: "Where to receive activations from neighbouring workers (tcp://IP:* picks a port).") var dataBind = "tcp://127.0.0.1:*"
    @Option(help: "Tokens the search holds captures for at a time, whole samples (default: what a quarter of the budget left after weights and working set holds). Changes no result.") var chunkTokens: Int?
    @Option(help: "Memory budget, e.g. 20GiB: the plan gives this worker no more layers than fit.") var maxMemory = "20GiB"
    @Option(help: "Directory for block inputs past --max-memory (local disk; default: they stay in memory and count against the budget).")
    var scratch: String?
    @Option(help: "Compute device: cpu, cuda (GPU 0), cuda:N, or cuda-emulated (the CUDA backend on the host, for checks).") var device = "cpu"
    @Option(help: "With a CUDA device: strict (fp32 GEMMs) or bf16 (bf16 GEMM inputs, fp32 sums).") var precision: GEMMPrecision = .strict
    @Option(help: "Seconds without any coordinator before the worker exits (it registers again every 3 s meanwhile).")
    var giveUpAfter = 600.0
    @OptionGroup var secret: SecretOptions
    @Option(help: "CurveZMQ: the coordinator's public key file (NAME.pub from `mbq keygen`).") var curveServerKey: String?
    @Option(help: "CurveZMQ: this worker's key file (NAME.key from `mbq keygen`).") var curveKey: String?
    @OptionGroup var common: CommonOptions

    func validate() throws {
        if (curveServerKey == nil) != (curveKey == nil) {
            throw ValidationError("--curve-server-key and --curve-key go together")
        }
        do { _ = try DeviceSelection(parsing: device) } catch { throw ValidationError("\(error)") }
        guard parseBytes(maxMemory) != nil else { throw ValidationError("--max-memory \(maxMemory): use e.g. 64GiB, 512MiB") }
    }

    func run() throws {
        common.apply()
        var status: Int32 = 0
        try runReportingErrors {
            var o = WorkerOptions(connect: connect, workerID: id ?? "\(ProcessInfo.processInfo.hostName)-\(getpid())")
            o.dataBind = dataBind
            o.maxMemoryBytes = parseBytes(maxMemory)!
            o.giveUpAfter = giveUpAfter
            if let scratch {
                var isDir: ObjCBool = false
                guard FileManager.default.fileExists(atPath: scratch, isDirectory: &isDir), isDir.boolValue else {
                    throw MethodsError.invalidOptions("--scratch \(scratch): not a directory")
                }
                o.scratch = (scratch as NSString).standardizingPath
            }
            o.threads = BLASRuntime.threads
            o.chunkTokens = chunkTokens
            o.secret = try secret.load()
            if let serverKey = curveServerKey, let keyFile = curveKey {
                let (pub, sec) = try Curve.readKeypair(keyFile)
                o.curve = (try Curve.readKey(serverKey), pub, sec)
            }
            status = try Worker(options: o, backend: try computeBackend(device, storedPrecision: true, precision: precision)).run()
        }
        if status != 0 { throw ExitCode(status) }
    }
}

func parseBytes(_ s: String) -> UInt64? {
    let units: [(String, UInt64)] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)]
    for (u, m) in units where s.hasSuffix(u) {
        guard let v = Double(s.dropLast(u.count)), v > 0 else { return nil }
        return UInt64(v * Double(m))
    }
    return UInt64(s)
}

/// The job's shared secret: from a file or MBQ_SECRET (`SharedSecret`), never from the
/// command line, where `ps` shows it to every user of the machine.
struct SecretOptions: ParsableArguments {
    @Option(help: "File holding the job's shared secret (mode 600; `mbq keygen` makes one). Or set MBQ_SECRET.")
    var secretFile: String?
    @Option(help: .hidden) var secret: String?

    func load() throws -> String? {
        if secret != nil {
            throw MethodsError.invalidOptions("--secret puts the secret on the command line, where `ps` shows it to every user: use --secret-file FILE (see `mbq keygen`) or the MBQ_SECRET environment variable")
        }
        return try SharedSecret.load(file: secretFile)
    }
}

/// Options shared by `mbq coordinator` and `mbq quantize --workers`.
struct ClusterOptions: ParsableArguments {
    @Option(help: "Job directory: journal, log, plan (default: OUT.job).") var jobDir: String?
    @Flag(help: "Continue the job recorded in --job-dir.") var resume = false
    @Option(help: "Coordinator log format: text or json.") var logFormat: ClusterCoordinator.LogFormat = .text
    @OptionGroup var secret: SecretOptions
    @Option(help: "CurveZMQ: this coordinator's key file (NAME.key from `mbq keygen`).") var curveKey: String?
    @Option(parsing: .upToNextOption, help: "CurveZMQ: authorized workers' public key files (NAME.pub).") var authorizedKeys: [String] = []
    @Option(help: "How quantized blocks reach --out: auto (workers that see the output directory write their blocks into it, others stream them here), shared, or coordinator.")
    var outputVia = "auto"

    /// The CURVE setup, or nil.
    func curve() throws -> (secretKey: String, authorized: [String])? {
        guard let curveKey else {
            if !authorizedKeys.isEmpty { throw MethodsError.invalidOptions("--authorized-keys needs --curve-key") }
            return nil
        }
        guard Curve.available else { throw MethodsError.invalidOptions("this libzmq has no CURVE support: use --secret") }
        guard !authorizedKeys.isEmpty else { throw MethodsError.invalidOptions("--curve-key needs --authorized-keys (workers' NAME.pub files)") }
        return (try Curve.readKeypair(curveKey).secret, try authorizedKeys.map(Curve.readKey))
    }
}

/// `mbq keygen`: a shared-secret file and CurveZMQ keypairs, readable only by their owner.
struct KeygenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keygen", abstract: "Make a shared-secret file (DIR/secret) and CurveZMQ keypairs (DIR/NAME.key, DIR/NAME.pub).",
        discussion: "Example: mbq keygen --dir ~/.mbq --curve coordinator w0 w1. Existing files are never overwritten.")

    @Option(help: "Directory to write into (created with mode 700).") var dir: String
    @Flag(inversion: .prefixedNo, help: "Write DIR/secret, 32 random bytes as hex (mode 600).") var secret = true
    @Option(parsing: .upToNextOption, help: "CurveZMQ keypairs to make, one per name: the coordinator's and each worker's.")
    var curve: [String] = []

    func run() throws {
        try runReportingErrors {
            guard secret || !curve.isEmpty else { throw MethodsError.invalidOptions("nothing to make: drop --no-secret or name --curve keys") }
            if !curve.isEmpty && !Curve.available { throw MethodsError.invalidOptions("this libzmq has no CURVE support") }
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            if secret {
                try SharedSecret.write(to: dir + "/secret")
                print("wrote \(dir)/secret (mode 600): pass it as --secret-file to the coordinator and every worker")
            }
            for name in curve {
                guard !name.isEmpty, !name.contains("/") else { throw MethodsError.invalidOptions("--curve '\(name)': a key name, not a path") }
                let (key, pub) = try Curve.writeKeypair(name: name, dir: dir)
                print("wrote \(key) (secret, mode 600: keep it on its machine) and \(pub) (public)")
            }
        }
    }
}

/// `mbq coordinator`: plans the job and drives the workers that connect to it.
struct CoordinatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "coordinator",
                                                    abstract: "Coordinate a distributed quantization job.")

    @OptionGroup var quantize: QuantizeArguments
    @Option(help: "Endpoint to bind (default loopback).") var bind = "tcp://127.0.0.1:5555"
    @Option(help: "Workers to wait for before planning.") var workers = 1
    @Flag(help: "Allow binding a non-loopback address without authentication (anyone who reaches the port can join).") var allowInsecure = false
    @OptionGroup var cluster: ClusterOptions
    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let secret = try cluster.secret.load()
            let curve = try cluster.curve()
            if !Endpoint.isLoopback(bind) && secret == nil && curve == nil && !allowInsecure {
                throw MethodsError.invalidOptions("binding \(bind) beyond loopback without authentication: pass --secret-file (or MBQ_SECRET) or --curve-key, or --allow-insecure")
            }
            let (ckpt, bundle) = try quantize.prepare()
            let spec = try DistributedJob.spec(ckpt: ckpt, calib: bundle, options: quantize.options(ckpt), workers: workers,
                                               out: quantize.out, outputVia: cluster.outputVia)
            let coord = try ClusterCoordinator(spec: spec, bind: bind, jobDir: cluster.jobDir ?? quantize.out + ".job",
                                               resume: cluster.resume, secret: secret, logFormat: cluster.logFormat, curve: curve)
            try DistributedJob.coordinate(coord, ckpt: ckpt, options: quantize.options(ckpt), out: quantize.out,
                                          overwrite: quantize.overwrite)
        }
    }
}

/// `mbq status`: the plan, what is done, what each worker holds, the ETA.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Show a distributed job's progress.")

    @Option(help: "The job directory.") var jobDir: String

    func run() throws {
        try runReportingErrors {
            let path = jobDir + "/status.json"
            guard let data = FileManager.default.contents(atPath: path),
                  let o = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
                throw FormatsError.unreadable(path: path, reason: "no status (is this a job directory?)")
            }
            let layers = o["layers"] as? Int ?? 0
            let done = (o["finished_layers"] as? [Int]) ?? []
            let phase = o["phase"] as? String ?? "?"
            print("job \(o["job_id"] ?? "?"): phase \(phase) (plan epoch \(o["epoch"] ?? 0)), elapsed \(String(format: "%.0f", o["elapsed_s"] as? Double ?? 0)) s")
            // The coordinator rewrites status.json twice a second while it runs: an old
            // file, or its pid gone from this host, means nobody drives the job.
            let age = (o["updated_unix"] as? Double).map { max(0, Date().timeIntervalSince1970 - $0) }
            let pid = (o["pid"] as? Int).map(Int32.init), host = o["host"] as? String
            var coordinatorUp = true
            if phase == "failed" {
                coordinatorUp = false
                print("job FAILED: \(o["failure"] as? String ?? "see coordinator.log")")
            } else if phase == "done" {
                coordinatorUp = false
                print("job finished")
            } else if let pid, host == ProcessInfo.processInfo.hostName, !OutputGuard.running(pid) {
                coordinatorUp = false
                print("coordinator NOT RUNNING: pid \(pid) is gone\(age.map { String(format: " (last update %.0f s ago)", $0) } ?? ""); restart it with the same command and --resume")
            } else if let age, age > 10 {
                coordinatorUp = false
                print(String(format: "coordinator SILENT for %.0f s (pid %@ on %@): it may have died; restart it with --resume if so", age,
                             pid.map { "\($0)" } ?? "?", host ?? "?"))
            } else {
                print("coordinator running (pid \(pid.map { "\($0)" } ?? "?") on \(host ?? "?"))")
            }
            print("model \(o["model"] ?? "?"), calibration \(o["calib"] ?? "?") (\(o["samples"] ?? 0) samples)")
            print("gradient statistics: \((o["gradient_statistics"] as? Bool) == true ? "done" : "pending")")
            print("searched layers: \(done.count)/\(layers)" + ((coordinatorUp ? o["search_eta_s"] as? Double : nil).map { String(format: ", ETA %.0f s", $0) } ?? ""))
            if let predicted = o["predicted_s"] as? [String: Double] {
                let measured = o["phase_s"] as? [String: Double] ?? [:]
                let order = ["forward", "backward", "search", "apply"].filter { predicted[$0] != nil }
                print("cost model: " + order.map { ph in
                    String(format: "%@ %@ of %.1f s predicted", ph, measured[ph].map { String(format: "%.1f s", $0) } ?? "-", predicted[ph]!)
                }.joined(separator: ", "))
            }
            print("workers:")
            for w in o["workers"] as? [[String: Any]] ?? [] {
                let r = (w["layers"] as? [Int]).map { "layers \($0[0])..<\($0[1])" } ?? "no layers"
                let alive = (w["alive"] as? Bool) != true ? "lost" : coordinatorUp ? "alive" : "last known alive"
                print(String(format: "  %@ on %@ (%@): %@, %@, %.0f GFLOP/s, heard %.1f s ago", (w["id"] as? String ?? "?"),
                             (w["host"] as? String ?? "?"), (w["device"] as? String ?? "?"), alive, r, w["gflops"] as? Double ?? 0,
                             (w["seconds_since_heard"] as? Double ?? 0) + (age ?? 0)))
            }
        }
    }
}

/// `mbq plan`: the block assignment and predicted time per phase for a cluster, from the
/// model's config (no weights read) or a preset shape.
struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plan",
        abstract: "Predict the plan, memory and time per phase of a distributed job.",
        discussion: "Example: mbq plan --preset qwen2-72b --workers 16x64GiB@1000 --bandwidth-gbit 10")

    @Option(help: "Model directory (config and headers only).") var model: String?
    @Option(help: "A shape instead of a model: \(CostModel.presets.keys.sorted().joined(separator: ", ")).") var preset: String?
    @Option(help: "Workers: COUNTxMEMORY@GFLOPS, e.g. 16x64GiB@1000, or COUNTxGPU for \(CostModel.gpuKinds.keys.sorted().joined(separator: ", ")) (stated rates, not measured), e.g. 8xH100 (comma-separate different kinds).") var workers = "1x20GiB@200"
    @Option(help: "Network bandwidth between workers, Gbit/s.") var bandwidthGbit = 10.0
    @Option(help: "Calibration samples.") var samples = 128
    @Option(help: "Tokens per sample.") var tokens = 2048
    @Flag(help: "No backward pass (awq / rtn).") var noStats = false
    @Option(help: "Share of rows the search loss reads (vision + caption tokens).") var lossRows = 0.6
    @Option(help: "Compute threads per worker (its non-GEMM loops use them on large tensors).") var workerThreads = 8
    @Flag(help: "Workers have --scratch: block inputs spill to disk instead of counting against memory.") var scratch = false
    @Option(help: ArgumentHelp("GPTQ jobs: count a layer's Hessians, one per captured input (none, modality weights) or per linear (gradient weights), and each held layer's codes.",
                               valueName: "per-input|per-linear"))
    var gptq: String?
    @Option(help: "Take --samples and --tokens from this calibration bundle (its header only).") var calib: String?
    @Flag(help: "Print only a Slurm time limit (D-HH:MM:SS): the predicted total times 1.5, plus 30 minutes.") var slurmTime = false

    func run() throws {
        try runReportingErrors {
            var samples = samples, tokens = tokens
            if let calib {
                let shape = try SafetensorsFile(path: calib).entry("inputs_embeds").shape
                guard shape.count == 3 else { throw FormatsError.invalidBundle(path: calib, reason: "inputs_embeds has shape \(shape)") }
                (samples, tokens) = (shape[0], shape[1])
            }
            let shape: CostModel.Shape
            var weightBytes = MemoryBudget.heldWeightBytes(stored: .bf16)  // the presets are bf16 checkpoints
            if let model {
                let ckpt = try Checkpoint(directory: model)
                shape = CostModel.Shape(ckpt.config)
                weightBytes = MemoryBudget.heldWeightBytes(stored: ckpt.weightDType)
            } else if let preset, let s = CostModel.presets[preset] {
                shape = s
            } else {
                throw MethodsError.invalidOptions("give --model DIR or --preset (\(CostModel.presets.keys.sorted().joined(separator: ", ")))")
            }
            var ws: [CostModel.Worker] = []
            var stated: [String] = []
            for part in workers.split(separator: ",") {
                let a = part.split(separator: "x", maxSplits: 1), b = a.count == 2 ? a[1].split(separator: "@") : []
                var w: CostModel.Worker
                if a.count == 2, let n = Int(a[0]), n > 0, let gpu = CostModel.gpuKinds[String(a[1]).uppercased()] {
                    // One process per GPU; its loops run on the GPU at the stated bandwidth.
                    w = CostModel.Worker(gflops: gpu.gflops, memoryBytes: gpu.memoryBytes, threads: 1)
                    w.loopGBps = gpu.loopGBps
                    stated.append(String(format: "%@: %.0f GiB, %.0f GFLOP/s fp32 GEMM, %.0f GB/s (stated, not measured)",
                                         String(a[1]).uppercased(), gpu.memoryBytes / 1073741824, gpu.gflops, gpu.loopGBps))
                    w.spills = scratch
                    ws += Array(repeating: w, count: n)
                    continue
                }
                guard a.count == 2, let n = Int(a[0]), n > 0, b.count == 2, let mem = parseBytes(String(b[0])), let g = Double(b[1]) else {
                    throw MethodsError.invalidOptions("--workers '\(part)': expected COUNTxMEMORY@GFLOPS, e.g. 16x64GiB@1000, or COUNTxGPU (\(CostModel.gpuKinds.keys.sorted().joined(separator: ", ")))")
                }
                w = CostModel.Worker(gflops: g, memoryBytes: Double(mem), threads: workerThreads)
                w.spills = scratch
                ws += Array(repeating: w, count: n)
            }
            var load = CostModel.Workload(samples: samples, tokens: tokens)
            load.needsStats = !noStats
            load.lossRowFraction = lossRows
            load.labelRows = Double(tokens) * 0.1
            load.weightBytes = weightBytes
            var needs = MemoryNeeds(shape: shape, inputRows: samples * tokens, tokens: tokens, weightBytes: weightBytes)
            if let gptq {
                guard gptq == "per-input" || gptq == "per-linear" else { throw MethodsError.invalidOptions("--gptq \(gptq): per-input or per-linear") }
                needs.fixedBytes += Double(LayerHessians.predictedBytes(hidden: shape.hidden, intermediate: shape.intermediate,
                                                                        attention: shape.heads * shape.headDim, kv: shape.kvHeads * shape.headDim,
                                                                        perLinear: gptq == "per-linear"))
                needs.layerWeightBytes += shape.paramsPerLayer   // each held layer's codes until the apply phase
            }
            let candidates = ws.enumerated().map { i, w in
                ("\(i)", w.gflops, needs.capacity(memory: UInt64(w.memoryBytes), spills: scratch, layers: shape.layers))
            }
            guard let plan = Planner.plan(layers: shape.layers, workers: candidates) else {
                let held = candidates.reduce(0) { $0 + $1.2 }
                throw MethodsError.invalidOptions(String(format: "these workers' memory holds %d of %d layers (%.2f GiB per layer, %.2f GiB fixed%@): add workers or memory",
                                                         min(held, shape.layers), shape.layers, needs.layerWeightBytes / 1073741824,
                                                         needs.bytes(layers: 0, spills: scratch) / 1073741824,
                                                         scratch ? "" : " of which block inputs; --scratch lets them spill"))
            }
            let used = plan.map { p in ws[Int(p.worker)!] }
            let p = CostModel().predict(shape, workers: used, workload: load, bandwidthBytesPerSecond: bandwidthGbit * 1e9 / 8,
                                        plan: plan.map(\.range), memory: needs)
            if slurmTime {
                let t = Int((p.total * 1.5 + 1800).rounded(.up))
                print(String(format: "%d-%02d:%02d:%02d", t / 86400, t % 86400 / 3600, t % 3600 / 60, t % 60))
                return
            }
            print("model: \(shape.layers) layers, hidden \(shape.hidden), intermediate \(shape.intermediate), \(shape.heads) heads / \(shape.kvHeads) kv; \(String(format: "%.2f", shape.paramsPerLayer * Double(shape.layers) / 1e9))B decoder parameters")
            print("calibration: \(samples) samples x \(tokens) tokens; \(ws.count) workers; \(bandwidthGbit) Gbit/s")
            for s in Set(stated).sorted() { print("  GPU \(s)") }
            for (i, r) in p.plan.enumerated() {
                let inputs = scratch ? 2 * needs.stageInputBytes : 0
                let kept = needs.inputLayersKept(memory: used[i].memoryBytes, layers: r.count, spills: scratch)
                print(String(format: "  w%@: layers %3d..<%3d  memory %.1f GiB of %.1f GiB%@", plan[i].worker, r.lowerBound, r.upperBound,
                             needs.bytes(layers: r.count, spills: scratch) / 1073741824, used[i].memoryBytes / 1073741824,
                             scratch ? String(format: " (+%.1f GiB of inputs in scratch)", inputs / 1073741824)
                                     : kept < r.count ? "; the backward recomputes \(r.count - kept) layer(s)' inputs" : ""))
            }
            if used.count < ws.count { print("  \(ws.count - used.count) worker(s) left as spares") }
            func pad(_ s: String) -> String { s + String(repeating: " ", count: max(0, 16 - s.count)) }
            for (phase, s) in p.seconds { print("  " + pad(phase) + String(format: "%10.1f s", s)) }
            print("  " + pad("total") + String(format: "%10.1f s (%.2f h); %.1f GB over the network", p.total, p.total / 3600, p.transferBytes / 1e9))
        }
    }
}
