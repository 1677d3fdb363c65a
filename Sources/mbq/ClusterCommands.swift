import ArgumentParser
import Foundation
import Logging
import MBQCluster
import MBQFormats
import MBQMethods
import MBQTensor

extension ClusterCoordinator.LogFormat: ExpressibleByArgument {}

/// `mbq worker`: joins a coordinator and works on the blocks it is given.
struct WorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker", abstract: "Run a worker that joins a coordinator.")

    @Option(help: "Coordinator endpoint, e.g. tcp://10.0.0.1:5555.") var connect: String
    @Option(help: "This worker's name (default: host-pid).") var id: String?
    @Option(help: "Where to receive activations from neighbouring workers (tcp://IP:* picks a port).") var dataBind = "tcp://127.0.0.1:*"
    @Option(help: "Memory budget, e.g. 20GiB.") var maxMemory = "20GiB"
    @Option(help: "Compute device (cpu).") var device = "cpu"
    @Option(help: "Shared secret (or MBQ_SECRET).") var secret: String?
    @OptionGroup var common: CommonOptions

    func validate() throws {
        guard device == "cpu" else { throw ValidationError("--device \(device): only cpu is built in") }
        guard parseBytes(maxMemory) != nil else { throw ValidationError("--max-memory \(maxMemory): use e.g. 64GiB, 512MiB") }
    }

    func run() throws {
        common.apply()
        var status: Int32 = 0
        try runReportingErrors {
            var o = WorkerOptions(connect: connect, workerID: id ?? "\(ProcessInfo.processInfo.hostName)-\(getpid())")
            o.dataBind = dataBind
            o.maxMemoryBytes = parseBytes(maxMemory)!
            o.threads = BLASRuntime.threads
            o.secret = secret ?? ProcessInfo.processInfo.environment["MBQ_SECRET"]
            status = try Worker(options: o).run()
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

/// Options shared by `mbq coordinator` and `mbq quantize --workers`.
struct ClusterOptions: ParsableArguments {
    @Option(help: "Job directory: journal, log, plan (default: OUT.job).") var jobDir: String?
    @Flag(help: "Continue the job recorded in --job-dir.") var resume = false
    @Option(help: "Coordinator log format: text or json.") var logFormat: ClusterCoordinator.LogFormat = .text
    @Option(help: "Shared secret workers must present (or MBQ_SECRET).") var secret: String?
}

/// `mbq coordinator`: plans the job and drives the workers that connect to it.
struct CoordinatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "coordinator",
                                                    abstract: "Coordinate a distributed quantization job.")

    @OptionGroup var quantize: QuantizeArguments
    @Option(help: "Endpoint to bind (default loopback).") var bind = "tcp://127.0.0.1:5555"
    @Option(help: "Workers to wait for before planning.") var workers = 1
    @Flag(help: "Allow binding a non-loopback address without a --secret.") var allowInsecure = false
    @OptionGroup var cluster: ClusterOptions
    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let secret = cluster.secret ?? ProcessInfo.processInfo.environment["MBQ_SECRET"]
            if !bind.contains("127.0.0.1") && !bind.contains("localhost") && secret == nil && !allowInsecure {
                throw MethodsError.invalidOptions("binding \(bind) beyond loopback without --secret: pass --secret (or MBQ_SECRET), or --allow-insecure")
            }
            let (ckpt, bundle) = try quantize.prepare()
            let spec = try DistributedJob.spec(ckpt: ckpt, calibPath: quantize.calib, samples: bundle.count,
                                               options: quantize.options, workers: workers)
            let coord = try ClusterCoordinator(spec: spec, bind: bind, jobDir: cluster.jobDir ?? quantize.out + ".job",
                                               resume: cluster.resume, secret: secret, logFormat: cluster.logFormat)
            try DistributedJob.coordinate(coord, ckpt: ckpt, options: quantize.options, out: quantize.out,
                                          overwrite: quantize.overwrite)
        }
    }
}
