import Foundation
import MBQCluster
import MBQCoordinator
import MBQFormats
import MBQModel
import MBQWire
import MBQWorker
import XCTest

/// The distributed job as real processes over ZeroMQ: same output as one process with
/// 1, 2 and 3 workers; workers killed with SIGKILL in each phase; the coordinator killed
/// mid-search and resumed; an unauthorized worker refused.
final class ClusterProcessTests: XCTestCase {
    static let model = CLITests.fixtures + "/onevision_mha/model"
    static let calib = CLITests.fixtures + "/onevision_mha/calib.safetensors"
    var tmp = ""

    override func setUp() {
        tmp = NSTemporaryDirectory() + "mbq-cluster-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: tmp) }

    func spawn(_ args: [String], log: String, env extra: [String: String] = [:], cwd: String? = nil) throws -> Process {
        let p = Process()
        if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        p.executableURL = URL(fileURLWithPath: CLITests.binary)
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        env["MBQ_KEEP_BLAS_ENV"] = "1"
        for (k, v) in extra { env[k] = v }
        p.environment = env
        FileManager.default.createFile(atPath: log, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: log)
        p.standardOutput = FileHandle(forWritingAtPath: log)
        try p.run()
        return p
    }

    func text(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }


    func waitExit(_ p: Process, timeout: Double = 90) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < end { Thread.sleep(forTimeInterval: 0.05) }
        if p.isRunning { p.terminate(); return false }
        return true
    }

    /// The coordinator's events in a `--log-format json` log (other lines, such as the
    /// workers' or swift-log's, are skipped): what the tests read, never the text log.
    func events(_ path: String, _ name: String? = nil) -> [[String: Any]] {
        text(path).split(separator: "\n").compactMap { line -> [String: Any]? in
            guard line.hasPrefix("{"), let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { return nil }
            return name == nil || o["event"] as? String == name ? o : nil
        }
    }

    func hasEvent(_ path: String, _ name: String, _ match: ([String: Any]) -> Bool = { _ in true }) -> Bool {
        events(path, name).contains(where: match)
    }

    func waitForEvent(_ path: String, _ name: String, timeout: Double = 60, _ match: @escaping ([String: Any]) -> Bool = { _ in true }) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            if hasEvent(path, name, match) { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return false
    }

    /// A plan's ranges as "w0=0..<1" strings.
    static func plan(_ e: [String: Any]) -> [String] {
        (e["plan"] as? [[String: Any]] ?? []).map { p in
            let r = p["layers"] as? [Int] ?? []
            return "\(p["worker"] as? String ?? "?")=\(r.first ?? -1)..<\(r.last ?? -1)"
        }
    }

    /// The single-process output for `options`, computed once per option set.
    static var references: [[String]: String] = [:]
    static func reference(_ options: [String]) -> String {
        if let r = references[options] { return r }
        let out = NSTemporaryDirectory() + "mbq-cluster-ref-" + UUID().uuidString
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLITests.binary)
        p.arguments = ["quantize", "--model", model, "--calib", calib, "--out", out] + options
        p.environment = ProcessInfo.processInfo.environment.merging(["MBQ_KEEP_BLAS_ENV": "1"]) { $1 }
        p.standardError = FileHandle.nullDevice
        try! p.run()
        p.waitUntilExit()
        references[options] = out
        return out
    }

    /// Bit-identical files (every shard, the index, scales, config); results JSON
    /// identical but for timings.
    func assertSameAsReference(_ out: String, options: [String] = ["--w-bit", "3"], file: StaticString = #filePath, line: UInt = #line) throws {
        let ref = Self.reference(options)
        let files = try FileManager.default.contentsOfDirectory(atPath: ref).sorted()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: out).sorted(), files, "the same files", file: file, line: line)
        XCTAssertTrue(files.contains("model.safetensors.index.json"), "\(files)", file: file, line: line)
        for f in files where f != "mbq_results.json" && f != "report.md" {
            let a = FileManager.default.contents(atPath: ref + "/" + f), b = FileManager.default.contents(atPath: out + "/" + f)
            XCTAssertNotNil(b, "\(out)/\(f) missing", file: file, line: line)
            XCTAssert(a == b, "\(f) differs from the single-process run", file: file, line: line)
        }
        func results(_ d: String) throws -> NSDictionary {
            var o = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: d + "/mbq_results.json"))) as! [String: Any]
            o["seconds"] = nil
            return o as NSDictionary
        }
        XCTAssertEqual(try results(ref), try results(out), "mbq_results.json differs (timings aside)", file: file, line: line)
    }

    func port() -> Int { Int.random(in: 20000..<60000) }

    func testOneTwoThreeWorkersGiveTheSingleProcessOutput() throws {
        for n in [1, 2, 3] {
            let out = tmp + "/out\(n)"
            let q = try spawn(["quantize", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", out,
                               "--workers", "\(n)", "--threads", "\(max(1, n))", "--log-format", "json"], log: tmp + "/q\(n).log")
            XCTAssertTrue(waitExit(q), "job with \(n) workers did not finish: \(text(tmp + "/q\(n).log").suffix(2000))")
            XCTAssertEqual(q.terminationStatus, 0, text(tmp + "/q\(n).log"))
            XCTAssertTrue(hasEvent(tmp + "/q\(n).log", "planned") { $0["plan_epoch"] as? Int == 1 && $0["reason"] as? String == "\(n) worker(s) ready" },
                          "planned over \(n) workers")
            XCTAssertTrue(hasEvent(tmp + "/q\(n).log", "job_done") { $0["written_by_workers"] as? Int == 3 && $0["streamed"] as? Int == 0 },
                          text(tmp + "/q\(n).log"))
            try assertSameAsReference(out)
        }
    }

    /// The CUDA backend on the emulated device (its kernels' source and cuBLAS's contract
    /// run on the host): in one process, and as one of two workers beside a CPU worker,
    /// the output is the one-process CPU output, bit for bit; the worker registers its device.
    func testEmulatedCUDAWorkerBesideACPUWorkerGivesTheSingleProcessOutput() throws {
        let single = tmp + "/out-emulated"
        let q = try spawn(["quantize", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", single,
                           "--device", "cuda-emulated"], log: tmp + "/q-emulated.log")
        XCTAssertTrue(waitExit(q), text(tmp + "/q-emulated.log"))
        XCTAssertEqual(q.terminationStatus, 0, text(tmp + "/q-emulated.log"))
        try assertSameAsReference(single)

        let p = port()
        let out = tmp + "/out", clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", out,
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "2", "--job-dir", tmp + "/job", "--log-format", "json"], log: clog)
        let w0 = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w0", "--threads", "1", "--device", "cuda-emulated"],
                           log: tmp + "/w0.log")
        let w1 = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w1", "--threads", "1"], log: tmp + "/w1.log")
        defer { for x in [coord, w0, w1] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog))
        // Each registers its device; the emulated device's 16 GiB bound w0's budget below
        // the default --max-memory of 20 GiB, as a GPU's memory bounds a GPU worker's.
        XCTAssertTrue(hasEvent(clog, "worker_registered") {
            $0["worker"] as? String == "w0" && ($0["device"] as? String ?? "").hasPrefix("emulated CUDA device on ")
                && $0["memory_bytes"] as? Int == 16 << 30
        }, text(clog))
        XCTAssertTrue(hasEvent(clog, "worker_registered") {
            $0["worker"] as? String == "w1" && !($0["device"] as? String ?? "emulated").contains("emulated") && $0["memory_bytes"] as? Int == 20 << 30
        }, text(clog))
        XCTAssertTrue(hasEvent(clog, "planned") { Self.plan($0).count == 2 }, text(clog))
        try assertSameAsReference(out)
    }

    /// GPTQ with MBQ's modality token weights: each worker builds the Hessians of its own
    /// layers from the inputs it holds, the stages run as a pipeline (each layer reads the
    /// quantized layers' outputs), and 1, 2 and 3 workers write the one-process output.
    func testGPTQOverOneTwoThreeWorkersGivesTheSingleProcessOutput() throws {
        let options = ["--method", "gptq", "--hessian-weights", "modality", "--w-bit", "3"]
        for n in [1, 2, 3] {
            let out = tmp + "/gptq\(n)", log = tmp + "/gptq\(n).log"
            let q = try spawn(["quantize", "--model", Self.model, "--calib", Self.calib, "--out", out, "--workers", "\(n)",
                               "--threads", "\(max(1, n))", "--log-format", "json"] + options, log: log)
            XCTAssertTrue(waitExit(q), "GPTQ job with \(n) workers did not finish: \(text(log).suffix(2000))")
            XCTAssertEqual(q.terminationStatus, 0, text(log))
            XCTAssertEqual(events(log, "layer_searched").count, 3, "every layer reported once: \(text(log).suffix(2000))")
            try assertSameAsReference(out, options: options)
        }
    }

    /// MBQ's scales then GPTQ with gradient token weights and activation order (g_idx),
    /// streamed to the coordinator; and a worker killed in the GPTQ pipeline: the survivor
    /// rounds the finished layers again (the same bits) and the output is unchanged.
    func testGPTQAfterScalesWithGradientWeightsAndAKilledWorker() throws {
        let options = ["--method", "mbq", "--then", "gptq", "--hessian-weights", "gradient", "--act-order", "--w-bit", "3"]
        let out = tmp + "/gptq-streamed", log = tmp + "/gptq-streamed.log"
        let q = try spawn(["quantize", "--model", Self.model, "--calib", Self.calib, "--out", out, "--workers", "2", "--threads", "2",
                           "--output-via", "coordinator", "--log-format", "json", "--chunk-tokens", "1"] + options, log: log)
        XCTAssertTrue(waitExit(q), "job did not finish: \(text(log).suffix(2000))")
        XCTAssertEqual(q.terminationStatus, 0, text(log))
        try assertSameAsReference(out, options: options)
        let config = text(out + "/config.json")
        XCTAssertTrue(config.contains("\"desc_act\": true"), config)
        try killWorker(during: "search", options: ["--method", "gptq", "--hessian-weights", "gradient", "--w-bit", "4", "--group", "-1",
                                                   "--format", "gptq"], afterLayer: 0)
    }

    /// --distort (a pipeline across stages) and SmoothQuant, over 2 workers; blocks
    /// streamed to the coordinator instead of written by the workers. The default formats
    /// make these GPTQ (W3) and compressed-tensors int-quantized (W8A8); AutoAWQ and
    /// compressed-tensors pack-quantized W4A8 are added, so every packed layout is
    /// written once through the streamed path (the 1/2/3-worker test writes GPTQ from
    /// the workers).
    func testDistortSmoothQuantAndStreamedOutputMatchOneProcess() throws {
        for (name, options) in [("distort", ["--w-bit", "3", "--distort"]),
                                ("smoothquant", ["--method", "smoothquant", "--w-bit", "8", "--a-bit", "8"]),
                                ("awq", ["--method", "rtn", "--w-bit", "4", "--format", "awq"]),
                                ("w4a8", ["--method", "awq", "--w-bit", "4", "--a-bit", "8", "--format", "compressed-tensors"])] {
            let out = tmp + "/out-" + name, log = tmp + "/q-\(name).log"
            // The workers search one sample at a time; the reference reads all at once.
            let q = try spawn(["quantize", "--model", Self.model, "--calib", Self.calib, "--out", out, "--workers", "2",
                               "--threads", "2", "--output-via", "coordinator", "--log-format", "json", "--chunk-tokens", "1"] + options, log: log)
            XCTAssertTrue(waitExit(q), "\(name) job did not finish: \(text(log).suffix(2000))")
            XCTAssertEqual(q.terminationStatus, 0, text(log))
            XCTAssertTrue(hasEvent(log, "job_done") { $0["written_by_workers"] as? Int == 0 && $0["streamed"] as? Int == 3 }, text(log))
            // The reference runs at the default thread count, the workers at one BLAS
            // thread each: products do not depend on threads (TiledGEMM).
            try assertSameAsReference(out, options: options)
        }
    }

    /// Workers whose memory holds one layer each: 2 cannot hold the model (the plan
    /// waits and says why), 3 can, with block inputs spilled to --scratch.
    func testMemoryBudgetsPlanAndSpillToScratch() throws {
        // A budget of one layer's weights + the fixed part + room for one sample's
        // block input (8 KiB of 24): the other two inputs spill.
        let ckpt = try Checkpoint(directory: Self.model)
        let cfg = ckpt.config
        // (Workers hold a bf16 checkpoint's layers as bf16, an fp32 one's as fp32.)
        let needs = MemoryNeeds(shape: CostModel.Shape(cfg), inputRows: 0, tokens: 16, weightBytes: ckpt.weightDType == .bf16 ? 2 : 4)
        let budget = "\(Int(needs.layerWeightBytes + needs.fixedBytes) + 12_000)"
        let p = port()
        let out = tmp + "/out", clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", out,
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "2", "--job-dir", tmp + "/job", "--log-format", "json"], log: clog)
        var workers: [Process] = []
        defer { for x in [coord] + workers where x.isRunning { x.terminate() } }
        for i in 0..<3 {
            let scratch = tmp + "/scratch\(i)"
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            workers.append(try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w\(i)", "--threads", "1",
                                      "--max-memory", budget, "--scratch", scratch], log: tmp + "/w\(i).log"))
            if i == 1 {
                XCTAssertTrue(waitForEvent(clog, "waiting_for_memory") { $0["layers_held"] as? Int == 2 && $0["layers"] as? Int == 3 }, text(clog))
            }
        }
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog))
        XCTAssertTrue(hasEvent(clog, "planned") { Self.plan($0) == ["w0=0..<1", "w1=1..<2", "w2=2..<3"] }, text(clog))
        XCTAssertTrue(hasEvent(clog, "worker_finished_phase") { $0["of_phase"] as? String == "forward" && ($0["spilled_bytes"] as? Int ?? 0) > 0 },
                      text(clog))
        XCTAssertTrue(text(tmp + "/w1.log").contains("spilled to scratch"), text(tmp + "/w1.log"))
        try assertSameAsReference(out)
    }

    /// A worker without --scratch whose budget holds all three layers' weights but only
    /// two layers' block inputs (the plan's arithmetic, `MemoryNeeds`): its forward keeps
    /// the first layer's inputs and what else fits, its backward recomputes the rest from
    /// the layer below, its search walks the layers two inputs at a time; the output is
    /// the one-process run's.
    func testWorkerWithoutScratchRecomputesInputsItCannotKeep() throws {
        let ckpt = try Checkpoint(directory: Self.model)
        let calib = try CalibrationBundle.load(path: Self.calib, for: ckpt.config)
        let lengths = calib.samples.map(\.length)
        let needs = MemoryNeeds(shape: CostModel.Shape(ckpt.config), inputRows: lengths.reduce(0, +), tokens: lengths.max()!,
                                weightBytes: ckpt.weightDType == .bf16 ? 2 : 4)
        XCTAssertEqual(needs.capacity(memory: UInt64(needs.bytes(layers: 3, spills: false)) + 1, spills: false, layers: 3), 3)
        XCTAssertEqual(needs.capacity(memory: UInt64(needs.bytes(layers: 3, spills: false) - needs.stageInputBytes), spills: false, layers: 3), 2,
                       "a layer's worth less memory holds a layer less")
        let p = port()
        let out = tmp + "/out", clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", out,
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "1", "--job-dir", tmp + "/job", "--log-format", "json"], log: clog)
        let w = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w0", "--threads", "1",
                           "--max-memory", "\(Int(needs.bytes(layers: 3, spills: false)) + 1)"], log: tmp + "/w0.log")
        defer { for x in [coord, w] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog) + text(tmp + "/w0.log"))
        XCTAssertTrue(hasEvent(clog, "planned") { Self.plan($0) == ["w0=0..<3"] }, text(clog))
        XCTAssertTrue(text(tmp + "/w0.log").contains("block inputs past the budget not kept"), text(tmp + "/w0.log"))
        try assertSameAsReference(out)
    }

    /// SIGKILL one of two workers inside `phase`: the survivor takes its blocks.
    func killWorker(during phase: String, options: [String] = ["--w-bit", "3"], afterLayer: Int? = nil) throws {
        let p = port()
        let out = tmp + "/out-\(phase)", clog = tmp + "/coord-\(phase).log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--out", out,
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "2", "--job-dir", tmp + "/job-\(phase)", "--log-format", "json"] + options,
                              log: clog)
        let delay = ["MBQ_TEST_PHASE_DELAY": "0.7"]
        let w0 = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w0", "--threads", "1"], log: tmp + "/w0-\(phase).log", env: delay)
        let w1 = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w1", "--threads", "1"], log: tmp + "/w1-\(phase).log", env: delay)
        defer { for x in [coord, w0, w1] where x.isRunning { x.terminate() } }
        if let afterLayer {
            XCTAssertTrue(waitForEvent(clog, "layer_searched") { $0["layer"] as? Int == afterLayer }, text(clog))
        } else {
            XCTAssertTrue(waitForEvent(clog, "phase_started") { $0["of_phase"] as? String == phase && $0["plan_epoch"] as? Int == 1 }, text(clog))
        }
        kill(w1.processIdentifier, SIGKILL)
        XCTAssertTrue(waitExit(coord), "coordinator did not finish after losing w1 in \(phase): \(text(clog).suffix(3000))")
        XCTAssertEqual(coord.terminationStatus, 0, text(clog))
        XCTAssertTrue(hasEvent(clog, "worker_lost") { $0["worker"] as? String == "w1" }, text(clog))
        XCTAssertTrue(hasEvent(clog, "planned") { $0["plan_epoch"] as? Int == 2 }, text(clog))
        try assertSameAsReference(out, options: options)
    }

    func testKillWorkerDuringForward() throws { try killWorker(during: "forward") }
    func testKillWorkerDuringBackward() throws { try killWorker(during: "backward") }
    func testKillWorkerDuringSearch() throws { try killWorker(during: "search") }
    func testKillWorkerDuringApply() throws { try killWorker(during: "apply") }
    /// A --distort search that loses a stage: the survivor recomputes the quantized
    /// activations of the layers already finished from their journaled scales.
    func testKillWorkerDuringDistortSearch() throws {
        try killWorker(during: "search", options: ["--w-bit", "3", "--distort"], afterLayer: 0)
        let log = tmp + "/coord-search.log"
        XCTAssertEqual(events(log, "layer_searched").filter { $0["layer"] as? Int == 0 }.count, 1, "layer 0 searched once:\n\(text(log))")
    }

    func testCoordinatorKilledMidSearchResumes() throws { try coordinatorKilledMidSearchResumes(options: ["--w-bit", "3"]) }

    /// GPTQ's codes live with the worker that made them: after the coordinator's restart
    /// the pipeline rounds the finished layers again (no new report for them) and the
    /// output is the one-process output.
    func testCoordinatorKilledMidGPTQResumes() throws {
        try coordinatorKilledMidSearchResumes(options: ["--method", "gptq", "--hessian-weights", "modality", "--w-bit", "3"])
    }

    func coordinatorKilledMidSearchResumes(options: [String]) throws {
        let p = port()
        let out = tmp + "/out", job = tmp + "/job", clog1 = tmp + "/coord1.log", clog2 = tmp + "/coord2.log"
        let args = ["coordinator", "--model", Self.model, "--calib", Self.calib, "--out", out,
                    "--bind", "tcp://127.0.0.1:\(p)", "--workers", "1", "--job-dir", job, "--log-format", "json"] + options
        let c1 = try spawn(args, log: clog1)
        let w = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w0", "--threads", "1"], log: tmp + "/w.log",
                          env: ["MBQ_TEST_PHASE_DELAY": "0.8"])
        defer { for x in [c1, w] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitForEvent(clog1, "layer_searched") { $0["layer"] as? Int == 0 }, text(clog1))
        kill(c1.processIdentifier, SIGKILL)
        c1.waitUntilExit()
        let finishedBefore = events(clog1, "layer_searched").compactMap { $0["layer"] as? Int }
        XCTAssertFalse(finishedBefore.isEmpty)
        // Without --resume the job directory is refused; with it the job completes.
        let refused = try spawn(args, log: tmp + "/refused.log")
        XCTAssertTrue(waitExit(refused))
        XCTAssertNotEqual(refused.terminationStatus, 0)
        XCTAssertTrue(text(tmp + "/refused.log").contains("--resume"))
        let c2 = try spawn(args + ["--resume"], log: clog2)
        defer { if c2.isRunning { c2.terminate() } }
        XCTAssertTrue(waitExit(c2), text(clog2).suffix(3000).description)
        XCTAssertEqual(c2.terminationStatus, 0, text(clog2))
        XCTAssertTrue(hasEvent(clog2, "resumed") { Set($0["finished_layers"] as? [Int] ?? []).isSuperset(of: finishedBefore) }, text(clog2))
        let searchedAgain = Set(events(clog2, "layer_searched").compactMap { $0["layer"] as? Int }).intersection(finishedBefore)
        XCTAssertEqual(searchedAgain, [], "layers searched again after resume:\n\(text(clog2))")
        try assertSameAsReference(out, options: options)
    }

    func testCurveZMQAdmitsOnlyAuthorizedKeys() throws {
        let k = try spawn(["keygen", "--dir", tmp, "--no-secret", "--curve", "coord", "good", "good2", "evil"], log: tmp + "/keygen.log")
        XCTAssertTrue(waitExit(k))
        XCTAssertEqual(k.terminationStatus, 0, text(tmp + "/keygen.log"))
        let key = try String(contentsOfFile: tmp + "/coord.key", encoding: .utf8)
        XCTAssertEqual(key.split(separator: "\n").count, 2)
        XCTAssertEqual((try FileManager.default.attributesOfItem(atPath: tmp + "/coord.key")[.posixPermissions] as? NSNumber)?.intValue, 0o600)
        let p = port()
        let out = tmp + "/out", clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", out,
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "2", "--curve-key", tmp + "/coord.key",
                               "--authorized-keys", tmp + "/good.pub", tmp + "/good2.pub", "--log-format", "json"], log: clog)
        let evil = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "evil", "--curve-server-key", tmp + "/coord.pub",
                              "--curve-key", tmp + "/evil.key"], log: tmp + "/evil.log")
        defer { for x in [coord, evil] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitForEvent(clog, "curve_auth", timeout: 20) { ($0["line"] as? String ?? "").contains("is not authorized") }, text(clog))
        // Two authorized workers: activations and gradients between them go over
        // CURVE-encrypted data sockets that admit only the neighbour's key.
        let good = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "good", "--curve-server-key", tmp + "/coord.pub",
                              "--curve-key", tmp + "/good.key"], log: tmp + "/good.log")
        let good2 = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "good2", "--curve-server-key", tmp + "/coord.pub",
                               "--curve-key", tmp + "/good2.key"], log: tmp + "/good2.log")
        defer { for x in [good, good2] where x.isRunning { x.terminate() } }
        // The refused worker says why and stops instead of retrying forever.
        XCTAssertTrue(waitExit(evil, timeout: 30), text(tmp + "/evil.log"))
        XCTAssertEqual(evil.terminationStatus, 1, text(tmp + "/evil.log"))
        XCTAssertTrue(text(tmp + "/evil.log").contains("does not authorize this worker's key"), text(tmp + "/evil.log"))
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog))
        XCTAssertFalse(hasEvent(clog, "worker_registered") { $0["worker"] as? String == "evil" }, text(clog))
        XCTAssertTrue(hasEvent(clog, "planned") { $0["reason"] as? String == "2 worker(s) ready" }, text(clog))
        XCTAssertTrue(hasEvent(clog, "worker_finished_phase") { ($0["bytes_moved"] as? Int ?? 0) > 0 },
                      "activations crossed the encrypted data sockets: \(text(clog))")
        try assertSameAsReference(out)
    }

    /// Bounded retries: a worker with no coordinator registers again every 3 s, then gives up.
    func testWorkerWithoutCoordinatorGivesUp() throws {
        let w = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(port())", "--id", "lonely", "--give-up-after", "1.5"],
                          log: tmp + "/lonely.log")
        XCTAssertTrue(waitExit(w, timeout: 30), text(tmp + "/lonely.log"))
        XCTAssertEqual(w.terminationStatus, 2, text(tmp + "/lonely.log"))
        XCTAssertTrue(text(tmp + "/lonely.log").contains("giving up"), text(tmp + "/lonely.log"))
    }

    func testUnauthorizedWorkerIsRefusedAndTheJobGoesOn() throws {
        let p = port()
        let out = tmp + "/out", clog = tmp + "/coord.log"
        let secret = ["MBQ_SECRET": "s3cret-s3cret-s3cret"]
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", out,
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "1", "--log-format", "json"], log: clog, env: secret)
        let evil = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "evil"], log: tmp + "/evil.log",
                             env: ["MBQ_SECRET": "a-guess-of-16-bytes-or-more"])
        XCTAssertTrue(waitExit(evil, timeout: 30))
        XCTAssertNotEqual(evil.terminationStatus, 0)
        XCTAssertTrue(text(tmp + "/evil.log").contains("refused"), text(tmp + "/evil.log"))
        let good = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "good"], log: tmp + "/good.log", env: secret)
        defer { for x in [coord, good] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog))
        XCTAssertTrue(hasEvent(clog, "worker_refused") { $0["worker"] as? String == "evil" }, text(clog))
        try assertSameAsReference(out)
        // Binding beyond loopback without a secret is refused.
        let open = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--out", tmp + "/x",
                              "--bind", "tcp://0.0.0.0:\(p + 1)"], log: tmp + "/open.log")
        XCTAssertTrue(waitExit(open, timeout: 30))
        XCTAssertNotEqual(open.terminationStatus, 0)
        XCTAssertTrue(text(tmp + "/open.log").contains("--secret-file"), text(tmp + "/open.log"))
    }

    /// The doors the cluster README's old example left open: an empty or short secret, a
    /// secret on the command line, a secret file others can read. Each is refused before
    /// the coordinator binds, with a line that says what to do.
    func testSecretsThatWouldLeaveTheDoorOpenAreRefused() throws {
        let base = ["coordinator", "--model", Self.model, "--calib", Self.calib, "--out", tmp + "/x", "--bind", "tcp://0.0.0.0:\(port())"]
        func refused(_ args: [String], env: [String: String] = [:], _ needle: String) throws {
            let log = tmp + "/refused-\(UUID().uuidString).log"
            let c = try spawn(args, log: log, env: env)
            XCTAssertTrue(waitExit(c, timeout: 30))
            XCTAssertEqual(c.terminationStatus, 1, "\(args) \(env): \(text(log))")
            XCTAssertTrue(text(log).contains(needle), "\(args) \(env): \(text(log))")
            XCTAssertFalse(text(log).contains("listening"), text(log))
        }
        // `MBQ_SECRET=$(openssl rand -hex 16) mbq ... --secret "$MBQ_SECRET"` gave an empty secret.
        try refused(base, env: ["MBQ_SECRET": ""], "MBQ_SECRET has 0 bytes")
        try refused(base, env: ["MBQ_SECRET": "short"], "at least 16")
        try refused(base + ["--secret", "0123456789abcdef0123"], "command line")
        let k = try spawn(["keygen", "--dir", tmp + "/keys"], log: tmp + "/keygen.log")
        XCTAssertTrue(waitExit(k))
        XCTAssertEqual(k.terminationStatus, 0, text(tmp + "/keygen.log"))
        let file = tmp + "/keys/secret"
        XCTAssertEqual((try FileManager.default.attributesOfItem(atPath: file)[.posixPermissions] as? NSNumber)?.intValue, 0o600)
        XCTAssertEqual(try String(contentsOfFile: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines).count, 64)
        // keygen never overwrites a secret in use.
        let again = try spawn(["keygen", "--dir", tmp + "/keys"], log: tmp + "/keygen2.log")
        XCTAssertTrue(waitExit(again))
        XCTAssertNotEqual(again.terminationStatus, 0, text(tmp + "/keygen2.log"))
        chmod(file, 0o644)
        try refused(base + ["--secret-file", file], "chmod 600")
        try refused(["worker", "--connect", "tcp://127.0.0.1:1", "--secret-file", file], "chmod 600")
    }
}

/// Cluster/rehearsal.sh: three hosts in network namespaces, a whole job across them.
final class RehearsalTests: XCTestCase {
    func testThreeHostRehearsal() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [root.appendingPathComponent("Cluster/rehearsal.sh").path, CLITests.binary]
        p.currentDirectoryURL = root
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        if p.terminationStatus == 77 { throw XCTSkip("rehearsal skipped: \(text)") }
        print(text)
        XCTAssertEqual(p.terminationStatus, 0, text)
        XCTAssertTrue(text.contains("rehearsal passed"), text)
    }
}
