import ArgumentParser
import Foundation
import MBQCUDABackend
import MBQDevice
import MBQFormats
import MBQMethods
import MBQModel

/// `mbq device`: opens a device the way a worker will (libraries, kernels compiled by
/// NVRTC for its architecture) and runs the per-op conformance against the CPU on it
/// (`OpConformance`), or with --model/--calib the layer-step conformance
/// (`BackendConformance`; issue 25). The first thing to run on a new GPU machine.
struct DeviceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "device",
        abstract: "Check a compute device: its libraries, its kernels, and every op against the CPU.",
        discussion: """
            --device cuda (or cuda:N) opens GPU N through libcuda, cuBLAS and NVRTC, found by dlopen in \
            $MBQ_CUDA_LIBS, the system's library paths, then the nvidia-* pip wheels. cuda-emulated runs the \
            same kernels' source on the host. Exit status 1 when a check fails or the device does not open.
            """)

    @Option(help: "cuda, cuda:N or cuda-emulated.")
    var device = "cuda"

    @Option(help: "Also write the report as JSON to this file.")
    var json: String?

    @Option(help: "With --calib: instead of the ops, the layer-step conformance (every backend entry a job uses) of this model's blocks on the first two samples.")
    var model: String?

    @Option(help: "Calibration bundle for --model.")
    var calib: String?

    @Option(help: "Layer-step conformance: largest difference allowed, relative to each quantity's scale.")
    var tolerance = 1e-4

    @OptionGroup var common: CommonOptions

    func run() throws {
        common.apply()
        try runReportingErrors {
            let selection = try DeviceSelection(parsing: device)
            guard let dev = try selection.open() else {
                throw ValidationError("--device cpu has no device ops to check: the CPU is the reference")
            }
            var report: [String: Any] = ["device": dev.name, "selection": selection.description]
            let mem = try dev.memoryInfo()
            print("device: \(dev.name) (\(selection)), \(gib(mem.free)) GiB free of \(gib(mem.total))")
            report["memory_free_bytes"] = mem.free
            report["memory_total_bytes"] = mem.total
            if let cuda = dev as? CUDADevice {
                let places = cuda.libraryFolders.sorted { $0.key < $1.key }.map { "\($0.key) from \($0.value ?? "the system's library paths")" }
                print("libraries: " + places.joined(separator: ", "))
                let k = cuda.compiled
                let maxRegisters = k.kernels.map(\.registers).max() ?? 0
                let spills = k.kernels.reduce(0) { $0 + $1.spillStores + $1.spillLoads }
                print("kernels: \(k.kernels.count) compiled for \(cuda.architecture) in \(String(format: "%.2f", k.seconds)) s, "
                      + "at most \(maxRegisters) registers, \(spills) bytes spilled")
                report["architecture"] = cuda.architecture
                report["kernels"] = k.kernels.map { ["name": $0.kernel, "registers": $0.registers, "spill_stores": $0.spillStores,
                                                    "spill_loads": $0.spillLoads, "ptxas_ms": $0.compileMilliseconds] as [String: Any] }
            }
            let failed: Int
            if let model {
                guard let calib else { throw ValidationError("--model needs --calib") }
                let ckpt = try Checkpoint(directory: model)
                let lm = try LanguageModel<Float>.load(ckpt)
                let bundle = try CalibrationBundle.load(path: calib, for: ckpt.config)
                let (checks, seconds) = try timed {
                    try BackendConformance.run(CUDABackend(device: dev), model: lm, samples: Array(bundle.samples.prefix(2)), tolerance: tolerance)
                }
                for c in checks { print(c) }
                failed = checks.filter { !$0.passed }.count
                print("layer-step conformance (\(model)): \(checks.count - failed) of \(checks.count) within tolerance \(tolerance) (\(String(format: "%.2f", seconds)) s)")
                report["model"] = model
                report["layer_conformance"] = checks.map { c -> [String: Any] in
                    var o: [String: Any] = ["check": c.name, "max_abs": c.maxAbs, "rel": c.rel, "tolerance": c.tolerance, "passed": c.passed]
                    if let f = c.firstDeviation { o["first_deviation"] = f }
                    return o
                }
            } else {
                let (checks, seconds) = try timed { try OpConformance.run(on: dev) }
                for c in checks { print(c) }
                failed = checks.filter { !$0.passed }.count
                print("per-op conformance: \(checks.count - failed) of \(checks.count) within tolerance (\(String(format: "%.2f", seconds)) s)")
                report["conformance"] = checks.map { c -> [String: Any] in
                    var o: [String: Any] = ["op": c.op, "shapes": c.shapes, "max_abs": c.maxAbs, "rel": c.rel,
                                            "tolerance": c.tolerance, "passed": c.passed]
                    if let f = c.firstDeviation { o["first_deviation"] = f }
                    return o
                }
            }
            report["passed"] = failed == 0
            if let json {
                let data = try JSONSerialization.data(withJSONObject: report, options: [.prettyPrinted, .sortedKeys])
                try AtomicFile.write(data: data, to: json)
            }
            if failed > 0 { throw ExitCode.failure }
        }
    }

    func gib(_ bytes: Int) -> String { String(format: "%.1f", Double(bytes) / Double(1 << 30)) }
}
