import Foundation
import MBQFormats
import MBQModel
import MBQTensor
import XCTest

/// Nothing lost, nothing mixed (docs/OPERATIONS.md): every check that can fail runs
/// before any work, and refuses with one line naming what is at fault.
final class OutputSafetyTests: XCTestCase {
    var tmp = ""

    override func setUp() {
        tmp = NSTemporaryDirectory() + "mbq-safety-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        tmp = URL(fileURLWithPath: tmp).resolvingSymlinksInPath().path  // the paths mbq prints
        // A copy of a fixture, so that the refusals below are checked against a model
        // the test could lose.
        try! FileManager.default.copyItem(atPath: CLITests.fixtures + "/onevision_mha", toPath: tmp + "/fx")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: tmp) }

    /// The pid of a process that has exited.
    func deadPid() throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/true")
        try p.run()
        p.waitUntilExit()
        return p.processIdentifier
    }

    var model: String { tmp + "/fx/model" }
    var calib: String { tmp + "/fx/calib.safetensors" }
    func quantize(_ extra: [String]) -> [String] { ["quantize", "--model", model, "--calib", calib, "--method", "rtn"] + extra }

    /// The sha256 of every file under the fixture, to show nothing was touched.
    func snapshot() throws -> [String: String] {
        var out: [String: String] = [:]
        for f in FileManager.default.enumerator(atPath: tmp + "/fx")?.allObjects as? [String] ?? [] {
            if let d = FileManager.default.contents(atPath: tmp + "/fx/" + f) { out[f] = SHA256.hex(Array(d)) }
        }
        return out
    }

    func testOutputNeverOverlapsTheModelOrTheBundle() throws {
        let before = try snapshot()
        XCTAssertFalse(before.isEmpty)
        try assertFails(quantize(["--out", model, "--overwrite"]), mentioning: ["is the model directory", "nothing was written"])
        try assertFails(quantize(["--out", tmp + "/fx", "--overwrite"]), mentioning: ["contains the model directory", "--overwrite would delete it"])
        try assertFails(quantize(["--out", tmp, "--overwrite"]), mentioning: ["contains the model directory"])
        // Through another spelling of the same place (.., a symbolic link).
        try FileManager.default.createSymbolicLink(atPath: tmp + "/link", withDestinationPath: tmp + "/fx/model")
        try assertFails(quantize(["--out", tmp + "/link", "--overwrite"]), mentioning: ["is the model directory"])
        try assertFails(quantize(["--out", tmp + "/fx/model/../model/q"]), mentioning: ["is inside the model directory"])
        try assertFails(quantize(["--out", calib, "--overwrite"]), mentioning: ["is the calibration bundle"])
        try assertFails(quantize(["--out", tmp + "/none/out"]), mentioning: ["its directory", "does not exist"])
        XCTAssertEqual(try snapshot(), before, "the model and the bundle are untouched")
        // A directory nobody may write: refused before the search, not at the write.
        if getuid() != 0 {
            try FileManager.default.createDirectory(atPath: tmp + "/ro", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o555])
            try assertFails(quantize(["--out", tmp + "/ro/out"]), mentioning: ["is not writable"])
        }
    }

    func testOptionsAreRefusedNotSilentlyChanged() throws {
        let out = tmp + "/out"
        try assertFails(quantize(["--out", out, "--samples", "-5"]), mentioning: ["--samples -5", "at least 1"])
        try assertFails(quantize(["--out", out, "--samples", "1000000000"]), mentioning: ["--samples 1000000000", "holds 3 samples"])
        try assertFails(quantize(["--out", out, "--w-bit", "5"]), mentioning: ["w5 g128", "pass --format fake"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        // What the help documents works: --group -1 is per row, --format fake on request.
        let r = try mbq(quantize(["--out", out, "--group", "-1", "--w-bit", "5", "--format", "fake"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let cfg = try String(contentsOfFile: out + "/config.json", encoding: .utf8)
        XCTAssertTrue(cfg.contains("\"group_size\": -1") || cfg.contains("\"group_size\":-1"), cfg)
    }

    /// A killed one-process run leaves OUT.partial-PID with its owner file; the next run to
    /// the same output removes it and says so. A live process's directory, and a folder
    /// with such a name but no owner file, are left alone.
    func testPartialOutputsOfDeadProcessesAreRemoved() throws {
        let dead = try deadPid()
        let out = tmp + "/out"
        let orphan = out + ".partial-\(dead)", live = out + ".partial-\(getpid())"
        // What a killed run leaves: a shard and the owner file naming its process.
        for (d, pid) in [(orphan, dead), (live, getpid())] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
            FileManager.default.createFile(atPath: d + "/model-00001-of-00004.safetensors", contents: Data(count: 100))
            try "\(ProcessInfo.processInfo.hostName) \(pid)\n".write(toFile: d + "/.mbq-owner", atomically: true, encoding: .utf8)
        }
        // A user's folder that only has such a name is never removed.
        let mine = out + ".partial-99999"
        try FileManager.default.createDirectory(atPath: mine, withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: mine + "/notes.txt", contents: Data("precious".utf8))
        let r = try mbq(quantize(["--out", out]))
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: orphan), r.stderr)
        XCTAssertTrue(r.stderr.contains("removed \(orphan)"), r.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: live), "the directory of a running process stays")
        XCTAssertTrue(r.stderr.contains("pid \(getpid()) still writes it"), r.stderr)
        XCTAssertEqual(FileManager.default.contents(atPath: mine + "/notes.txt"), Data("precious".utf8))
        XCTAssertTrue(r.stderr.contains("left \(mine): it has the name of a temporary output but no owner file"), r.stderr)
        XCTAssertFalse((try FileManager.default.contentsOfDirectory(atPath: out)).contains { $0.hasPrefix(".") }, "no owner file in the output")
    }

    /// A bundle records the model it was made for; another model of the same shapes
    /// (onevision's bundle on onevision_mha: same hidden size and vocabulary) is refused
    /// unless asked for.
    func testBundleOfAnotherModelIsRefused() throws {
        let other = try Checkpoint(directory: CLITests.fixtures + "/onevision/model")
        let mine = try Checkpoint(directory: model)
        XCTAssertEqual(other.config.hiddenSize, mine.config.hiddenSize)
        XCTAssertEqual(other.config.vocabSize, mine.config.vocabSize)
        let b = try CalibrationBundle.load(path: calib)
        XCTAssertNil(b.model, "the fixtures' bundles predate the record")
        try CalibrationBundle.write(b.samples, to: tmp + "/theirs.safetensors", model: try ModelRecord(other))
        try CalibrationBundle.write(b.samples, to: tmp + "/mine.safetensors", model: try ModelRecord(mine))
        XCTAssertEqual(try CalibrationBundle.load(path: tmp + "/mine.safetensors").model, try ModelRecord(mine))
        let base = ["quantize", "--model", model, "--method", "rtn"]
        try assertFails(base + ["--calib", tmp + "/theirs.safetensors", "--out", tmp + "/o1"],
                            mentioning: ["theirs.safetensors was exported for another model", "token embeddings", "--allow-other-model"])
        let forced = try mbq(base + ["--calib", tmp + "/theirs.safetensors", "--out", tmp + "/o2", "--allow-other-model"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        XCTAssertTrue(forced.stderr.contains("used anyway"), forced.stderr)
        let ok = try mbq(base + ["--calib", tmp + "/mine.safetensors", "--out", tmp + "/o3"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertFalse(ok.stderr.contains("warning"), ok.stderr)
        // A bundle without a record is used with a warning that says it cannot be checked.
        let old = try mbq(base + ["--calib", calib, "--out", tmp + "/o4"])
        XCTAssertEqual(old.status, 0, old.stderr)
        XCTAssertTrue(old.stderr.contains("records no model"), old.stderr)
    }

    /// `mbq status` of a job whose coordinator died, and of a failed job.
    func testStatusKnowsADeadCoordinatorAndAFailedJob() throws {
        let dead = try deadPid()
        let job = tmp + "/job"
        try FileManager.default.createDirectory(atPath: job, withIntermediateDirectories: true)
        func write(_ o: [String: Any]) throws {
            try JSONSerialization.data(withJSONObject: o).write(to: URL(fileURLWithPath: job + "/status.json"))
        }
        var o: [String: Any] = ["job_id": "mbq-x", "phase": "search", "epoch": 1, "layers": 4, "finished_layers": [0], "search_eta_s": 5.0,
                                "pid": Int(dead), "host": ProcessInfo.processInfo.hostName,
                                "updated_unix": Date().timeIntervalSince1970 - 30,
                                "workers": [["id": "w0", "host": "h", "alive": true, "gflops": 10.0, "seconds_since_heard": 0.0, "layers": [0, 4]]]]
        try write(o)
        var r = try mbq(["status", "--job-dir", job])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("coordinator NOT RUNNING: pid \(dead) is gone"), r.stdout)
        XCTAssertFalse(r.stdout.contains("ETA"), r.stdout)
        XCTAssertTrue(r.stdout.contains("last known alive") && r.stdout.contains("heard 30"), r.stdout)
        o["phase"] = "failed"; o["failure"] = "worker w0: cannot read calib.safetensors"
        try write(o)
        r = try mbq(["status", "--job-dir", job])
        XCTAssertTrue(r.stdout.contains("job FAILED: worker w0: cannot read calib.safetensors"), r.stdout)
        o["phase"] = "search"; o["pid"] = Int(getpid()); o["updated_unix"] = Date().timeIntervalSince1970
        try write(o)
        r = try mbq(["status", "--job-dir", job])
        XCTAssertTrue(r.stdout.contains("coordinator running (pid \(getpid())"), r.stdout)
        XCTAssertTrue(r.stdout.contains("ETA 5 s"), r.stdout)
    }
}

/// The exporter (Scripts/make_calibration.py, `model_record`, plain Python) and mbq
/// (`ModelRecord`) compute the same record of every fixture family's checkpoint, so the
/// bundles the exporter writes pass mbq's check.
final class ModelRecordParityTests: XCTestCase {
    func testExporterAndMbqRecordTheSameModel() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("no python3") }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let families = ["llava15", "onevision", "onevision_mha", "qwen2vl", "qwen2_5_vl", "internvl", "internvl2"]
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = ["-c", "import json, sys; sys.path.insert(0, sys.argv[1]); import make_calibration as m; "
                       + "print(json.dumps({f: m.model_record(sys.argv[2] + '/' + f + '/model') for f in sys.argv[3:]}))",
                       root + "/Scripts", CLITests.fixtures] + families
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        let python = try JSONSerialization.jsonObject(with: data) as! [String: [String: String]]
        var seen = Set<String>()
        for f in families {
            let swift = try ModelRecord(Checkpoint(directory: CLITests.fixtures + "/" + f + "/model"))
            XCTAssertEqual(ModelRecord(metadata: python[f] ?? [:]), swift, f)
            seen.insert(swift.embedding)
        }
        XCTAssertEqual(seen.count, families.count, "every fixture's embeddings differ")
    }
}

/// `mbq plan --slurm-time`: the time limit Cluster/submit.sh gives sbatch, from the plan's
/// own prediction (1.5 times the total, plus 30 minutes).
final class PlanTimeLimitTests: XCTestCase {
    func testSlurmTimeIsThePredictionWithMargin() throws {
        let args = ["plan", "--preset", "qwen2-72b", "--workers", "8x128GiB@1000"]
        let plain = try mbq(args), limit = try mbq(args + ["--slurm-time"])
        XCTAssertEqual(plain.status, 0, plain.stderr)
        XCTAssertEqual(limit.status, 0, limit.stderr)
        let total = plain.stdout.split(separator: "\n").first { $0.contains("total") }
            .flatMap { $0.split(separator: " ").compactMap { Double($0) }.first }
        let parts = limit.stdout.trimmingCharacters(in: .whitespacesAndNewlines).split(whereSeparator: { $0 == "-" || $0 == ":" }).compactMap { Int($0) }
        XCTAssertEqual(parts.count, 4, limit.stdout)
        let seconds = Double(parts[0] * 86400 + parts[1] * 3600 + parts[2] * 60 + parts[3])
        XCTAssertEqual(seconds, (total ?? 0) * 1.5 + 1800, accuracy: 1.5, "\(plain.stdout)\n\(limit.stdout)")
    }

    /// GPTQ's Hessians count against each worker's memory: a 72B's down_proj alone takes
    /// 29568² × 8 bytes (6.5 GiB), per linear more; workers that hold the model without
    /// them are refused with them.
    func testGPTQHessiansCountInThePlan() throws {
        func memory(_ extra: [String]) throws -> [Double] {
            let r = try mbq(["plan", "--preset", "qwen2-72b", "--workers", "8x128GiB@1000", "--scratch"] + extra)
            XCTAssertEqual(r.status, 0, r.stderr)
            // "  wN: layers ...  memory X GiB of Y GiB"
            return r.stdout.split(separator: "\n").filter { $0.contains("memory") && $0.contains("GiB of") }.compactMap { line in
                line.components(separatedBy: "memory ").last?.split(separator: " ").first.flatMap { Double($0) }
            }
        }
        let plain = try memory([]), shared = try memory(["--gptq", "per-input"]), perLinear = try memory(["--gptq", "per-linear"])
        XCTAssertEqual(plain.count, 8)
        XCTAssertEqual(shared.count, 8)
        // Shared: 8192² (q/k/v) + 8192² (o) + 8192² (gate/up) + 29568² (down) fp64, and the down factorization's working set.
        let hessians = Double((3 * 8192 * 8192 + 29568 * 29568) * 8) / 1073741824
        for (a, b) in zip(plain, shared) { XCTAssertGreaterThan(b - a, hessians - 0.1, "\(plain) vs \(shared)") }
        for (b, c) in zip(shared, perLinear) { XCTAssertGreaterThan(c, b) }
        let small = try mbq(["plan", "--preset", "qwen2-72b", "--workers", "8x24GiB@1000", "--scratch", "--gptq", "per-linear"])
        XCTAssertNotEqual(small.status, 0)
        XCTAssertTrue(small.stderr.contains("add workers or memory"), small.stderr)
    }

    /// GPUs by name: 8xH100 is eight 80 GiB workers whose rates are stated as such; a
    /// 72B's 80 layers do not fit on two of them, and an unknown kind is refused naming
    /// the known ones.
    func testGPUWorkersByName() throws {
        let eight = try mbq(["plan", "--preset", "qwen2-72b", "--workers", "8xH100"])
        XCTAssertEqual(eight.status, 0, eight.stderr)
        XCTAssertTrue(eight.stdout.contains("GPU H100: 80 GiB, 50000 GFLOP/s fp32 GEMM, 2000 GB/s (stated, not measured)"), eight.stdout)
        let lines = eight.stdout.split(separator: "\n").filter { $0.contains("GiB of 80.0 GiB") }
        XCTAssertEqual(lines.count, 8, eight.stdout)
        // The same memory and rates as numbers give the same plan and times.
        let numbers = try mbq(["plan", "--preset", "qwen2-72b", "--workers", "8x80GiB@50000", "--worker-threads", "1"])
        XCTAssertEqual(numbers.stdout.split(separator: "\n").filter { $0.contains("GiB of") }, lines)
        let two = try mbq(["plan", "--preset", "qwen2-72b", "--workers", "2xh100"])
        XCTAssertNotEqual(two.status, 0)
        XCTAssertTrue(two.stderr.contains("memory holds 50 of 80 layers"), two.stderr)
        let unknown = try mbq(["plan", "--preset", "qwen2-72b", "--workers", "8xB300"])
        XCTAssertNotEqual(unknown.status, 0)
        XCTAssertTrue(unknown.stderr.contains("COUNTxGPU (A100, H100, H200)"), unknown.stderr)
    }
}
