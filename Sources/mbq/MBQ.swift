import ArgumentParser
import Foundation
import Logging
import MBQTensor

@main
struct MBQ: ParsableCommand {
    static func main() {
        BLASCoreSelection.prepareEnvironment()
        LargeBufferReuse.enable()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            exit(withError: error)
        }
    }

    static let configuration = CommandConfiguration(
        commandName: "mbq",
        abstract: "Modality-balanced quantization (MBQ) of the language model inside vision-language models.",
        discussion: "Start with `mbq demo`. Numbers are fp32 on the CPU through OpenBLAS.",
        subcommands: [DemoCommand.self, QuantizeCommand.self, EvalCommand.self, CoordinatorCommand.self, WorkerCommand.self,
                      StatusCommand.self, PlanCommand.self, KeygenCommand.self,
                      ForwardCommand.self, InspectCommand.self, BenchCommand.self, SynthCommand.self, DeviceCommand.self])
}

/// Options every command shares.
struct CommonOptions: ParsableArguments {
    @Option(help: "Threads for BLAS and the engine's own loops (default: all cores).")
    var threads: Int?

    @Flag(name: .shortAndLong, help: "Log debug detail to stderr.")
    var verbose = false

    func apply() {
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = verbose ? .debug : .info
            return h
        }
        if let threads {
            BLASRuntime.setThreads(threads)
            EngineThreads.count = max(1, threads)
        }
    }
}

/// Runs a command body; any error becomes one clear line on stderr and exit status 1.
func runReportingErrors(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as ExitCode {
        throw e
    } catch {
        FileHandle.standardError.write(Data("mbq: error: \(error)\n".utf8))
        throw ExitCode.failure
    }
}

/// Wall-clock seconds of `body`.
func timed<R>(_ body: () throws -> R) rethrows -> (R, Double) {
    let t0 = DispatchTime.now().uptimeNanoseconds
    let r = try body()
    return (r, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
}
