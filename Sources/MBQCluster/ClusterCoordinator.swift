import CZMQ
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

/// The socket-owning shell around CoordinatorState: one ROUTER socket, a poll loop with
/// a finite timeout, directives carried out, the journal written, one log line per event.
public final class ClusterCoordinator {
    public enum LogFormat: String, Sendable { case text, json }

    public let state: CoordinatorState
    let router: ZMQSocket
    let jobDir: String
    let logFormat: LogFormat
    let logger = Logger(label: "mbq.coordinator")
    let zapLock: NSLock
    let zapLines: () -> [String]
    let logFile: FileHandle?
    let started = Date()
    public private(set) var endpoint: String
    /// The cost model's prediction for the first plan (the shell's: the state machine
    /// does not run the cost model).
    public private(set) var predicted: CostModel.Prediction?

    var authenticator: CurveAuthenticator?
    var throttle = LogThrottle()
    /// Why the job failed, for status.json.
    var failure: String?

    /// `curve`: the coordinator's secret key and the authorized workers' public keys.
    public init(spec: JobSpec, bind: String, jobDir: String, resume: Bool, secret: String?,
                logFormat: LogFormat = .text, curve: (secretKey: String, authorized: [String])? = nil) throws {
        try FileManager.default.createDirectory(atPath: jobDir, withIntermediateDirectories: true)
        var resumed: (GradientStatistics?, [Int: LayerResults])? = nil
        var epochBase: UInt32 = 0
        if resume {
            let j = try Journal.read(jobDir: jobDir)
            epochBase = j.epoch + 1000
            let differs = j.identity.fields.isEmpty ? [] : spec.identity.differences(from: j.identity)
            guard differs.isEmpty else {
                throw CoordinatorError.journal(path: Journal.path(jobDir), reason: "--resume refused: this is not the journal's job (\(differs.joined(separator: "; "))); resume with the journal's inputs and options, or use a new --job-dir")
            }
            guard j.jobID == spec.jobID else {
                throw CoordinatorError.journal(path: Journal.path(jobDir), reason: "journal is for job '\(j.jobID)', not '\(spec.jobID)'")
            }
            resumed = (j.stats, j.results)
        } else if FileManager.default.fileExists(atPath: Journal.path(jobDir)) {
            throw CoordinatorError.journal(path: Journal.path(jobDir), reason: "the job directory holds a journal: pass --resume to continue it, or use a new --job-dir")
        }
        state = CoordinatorState(spec: spec, resumed: resumed.map { (stats: $0.0, results: $0.1) }, epochBase: epochBase,
                                 secret: secret)
        router = try ZMQSocket(.router)
        try router.setInt(ZMQ_ROUTER_MANDATORY, 0)
        var zapLog: [String] = []
        let zapLock = NSLock()
        if let curve {
            // The ZAP handler must exist before the first connection arrives.
            authenticator = try CurveAuthenticator(authorizedKeys: curve.authorized) { line in
                zapLock.lock(); zapLog.append(line); zapLock.unlock()
            }
            try Curve.server(router, secretKey: curve.secretKey)
        }
        self.zapLock = zapLock
        self.zapLines = { zapLock.lock(); defer { zapLog = []; zapLock.unlock() }; return zapLog }
        try router.bind(bind)
        endpoint = router.lastEndpoint
        self.jobDir = jobDir
        self.logFormat = logFormat
        let logPath = jobDir + "/coordinator.log"
        if !FileManager.default.fileExists(atPath: logPath) { _ = FileManager.default.createFile(atPath: logPath, contents: nil) }
        logFile = FileHandle(forWritingAtPath: logPath)
        logFile?.seekToEndOfFile()
        if let r = resumed {
            log(.resumed(finishedLayers: r.1.keys.sorted(), statistics: r.0 != nil))
        }
        log(.listening(endpoint: endpoint, curveKeys: curve?.authorized.count, workers: spec.expectedWorkers, job: spec.jobID,
                       layers: spec.layers, samples: spec.samples))
    }

    /// Writes one event to stderr and the job's coordinator.log, as text or JSON; the
    /// cost model's report rides on the events that close a plan and the job.
    public func log(_ e: CoordinatorEvent) {
        let line = CoordinatorEventLog.line(e, t: Date().timeIntervalSince(started), phase: state.phase.rawValue, epoch: state.epoch,
                                            json: logFormat == .json)
        FileHandle.standardError.write(Data((line + "\n").utf8))
        logFile?.write(Data((line + "\n").utf8))
        switch e {
        case .planned where predicted == nil:
            if let p = predict() {
                predicted = p
                log(.costModelPredicted(phases: Dictionary(uniqueKeysWithValues: p.seconds.map { ($0.phase, $0.seconds) }),
                                        order: p.seconds.map(\.phase), total: p.total))
            }
        case let .jobDone(_, _, _, _, _, _, wall?):
            if let p = predicted {
                log(.costModelMeasured(measured: state.phaseSeconds, predicted: Dictionary(uniqueKeysWithValues: p.seconds.map { ($0.phase, $0.seconds) }),
                                       order: p.seconds.map(\.phase), total: wall, predictedTotal: p.total))
            }
        default:
            break
        }
    }

    /// The cost model's prediction for the current (first) plan, from what the workers
    /// measured when they registered.
    func predict() -> CostModel.Prediction? {
        let spec = state.spec
        guard let shape = spec.shape, let load = spec.workload, !state.plan.isEmpty else { return nil }
        let infos = state.plan.compactMap { state.workers[$0.worker]?.info }
        guard infos.count == state.plan.count else { return nil }
        let ws = infos.map { i -> CostModel.Worker in
            var w = CostModel.Worker(gflops: i.gemmGflops, memoryBytes: Double(i.maxMemoryBytes),
                                     rates: i.gemmRates.count == CostModel.curveSizes.count ? i.gemmRates : nil,
                                     host: i.host, threads: Int(i.threads), cores: Int(i.cores))
            w.spills = i.scratchBytes > 0
            w.loopGBps = i.loopGbps > 0 ? i.loopGbps : nil
            return w
        }
        return CostModel().predict(shape, workers: ws, workload: load, bandwidthBytesPerSecond: spec.bandwidthBytesPerSecond,
                                   plan: state.plan.map(\.range), memory: spec.memory)
    }

    static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    var lastStatus = -Double.infinity

    /// job-dir/status.json, for `mbq status` (rewritten at most twice a second).
    func writeStatus(force: Bool = false) {
        let now = Self.now()
        guard force || now - lastStatus > 0.5 else { return }
        lastStatus = now
        let st = state
        let eta = st.searchETA(now: now)
        let workers: [[String: Any]] = st.workers.values.sorted { $0.id < $1.id }.map { w in
            var o: [String: Any] = ["id": w.id, "host": w.info.host, "device": w.info.device, "alive": w.alive, "gflops": w.info.gemmGflops,
                                    "threads": w.info.threads, "seconds_since_heard": max(0, now - w.lastSeen)]
            if let r = w.range { o["layers"] = [r.lowerBound, r.upperBound] }
            return o
        }
        var o: [String: Any] = ["job_id": st.spec.jobID, "phase": st.phase.rawValue, "epoch": st.epoch,
                                "layers": st.spec.layers, "samples": st.spec.samples, "finished_layers": st.finishedLayers,
                                "gradient_statistics": st.stats != nil, "elapsed_s": Date().timeIntervalSince(started),
                                "workers": workers, "model": st.spec.modelDir, "calib": st.spec.calibPath,
                                "options": st.spec.options.canonicalText, "pid": Int(getpid()),
                                "host": ProcessInfo.processInfo.hostName, "updated_unix": Date().timeIntervalSince1970]
        if let failure { o["failure"] = failure }
        if let eta { o["search_eta_s"] = eta }
        if let p = predicted {
            o["predicted_s"] = Dictionary(uniqueKeysWithValues: p.seconds.map { ($0.phase, $0.seconds) })
            o["phase_s"] = st.phaseSeconds
        }
        if let data = try? JSONSerialization.data(withJSONObject: o, options: [.prettyPrinted, .sortedKeys]) {
            try? AtomicFile.write(data: data, to: jobDir + "/status.json")
        }
    }

    /// Runs until the job is done (returns) or failed (throws). `deadline`: give up after
    /// that many seconds without finishing.
    public func run(deadline: Double = .infinity) throws {
        let t0 = Self.now()
        while true {
            if Self.now() - t0 > deadline { throw ClusterError.deadline(seconds: deadline) }
            for line in zapLines() { log(.curveAuth(line: line)) }
            var directives = state.tick(now: Self.now())
            for x in throttle.expired(now: Self.now()) { log(.messagesSuppressed(source: x.source, count: x.count, seconds: x.seconds)) }
            if let raw = try router.receiveRaw(timeoutMs: 20, maxFrameBytes: maxFrameBytes) {
                let frames = raw.frames, source = raw.peerAddress ?? "an unknown peer"
                var fromMessage: [Directive] = []
                if frames.count < 2 {
                    fromMessage = [.event(.messageRejected(reason: "\(frames.count) frame(s), oversized or empty, from \(source)"))]
                } else {
                    do {
                        let m = try Wire.decode(Array(frames.dropFirst()))
                        fromMessage = state.handle(identity: frames[0], m, now: Self.now())
                    } catch {
                        fromMessage = [.event(.messageRejected(reason: "\(error) (from \(source))"))]
                    }
                }
                // What rejected traffic makes the log say goes through the throttle.
                directives += fromMessage.filter { d in
                    guard case let .event(e) = d, Self.isRejection(e) else { return true }
                    return throttle.admit(source: source, now: Self.now())
                }
            }
            writeStatus(force: !directives.isEmpty && directives.contains { if case .journal = $0 { return true } else { return false } })
            for d in directives {
                switch d {
                case let .send(identity, env):
                    try? router.send([identity] + (try Wire.encode(env)))
                case let .event(e):
                    log(e)
                case let .storeShard(_, file, bytes):
                    try QuantizedCheckpointWriter.writeShard(file, bytes, into: state.spec.outputDir)
                case .journal:
                    try Journal.write(Journal.Contents(jobID: state.spec.jobID, stats: state.stats, results: state.results,
                                                       epoch: state.epoch, identity: state.spec.identity), jobDir: jobDir)
                case .finished:
                    writeStatus(force: true)
                    shutdownWorkers("job finished")
                    return
                case let .failed(why):
                    failure = why
                    writeStatus(force: true)
                    shutdownWorkers("job failed")
                    throw ClusterError.jobFailed(why)
                }
            }
        }
    }

    /// Events that unauthenticated or malformed traffic causes (`LogThrottle` bounds them).
    static func isRejection(_ e: CoordinatorEvent) -> Bool {
        switch e {
        case .messageRejected, .workerRefused, .messageDropped(_, nil, _): return true
        default: return false
        }
    }

    func shutdownWorkers(_ why: String) {
        var s = Mbq_Shutdown()
        s.reason = why
        for w in state.workers.values where w.alive {
            try? router.send([w.identity] + (try Wire.encode(Wire.envelope(job: state.spec.jobID, .shutdown(s)))))
        }
        // Let ZeroMQ flush before the socket closes.
        _ = try? router.receive(timeoutMs: 100)
    }

    /// The finished job as a QuantizeResult (same ordering as the single-process run).
    /// `blocks` is empty: the layers' shards are in the output's temporary directory.
    public func result(options: QuantizeOptions, seconds: [String: Double]) throws -> QuantizeResult {
        var groups: [GroupResult] = []
        var gptq: [GPTQLinearReport] = []
        for l in 0..<state.spec.layers {
            let done = state.results[l] ?? LayerResults()
            if let r = done.gptq { gptq += try r.reports() }
            // SmoothQuant's scales travel as results but, as in one process, are not reported.
            guard options.method != .smoothquant else { continue }
            let order = SearchGroup.allCases
            groups += try done.groups.map { try $0.groupResult() }
                .sorted { (order.firstIndex(of: $0.group) ?? 0) < (order.firstIndex(of: $1.group) ?? 0) }
        }
        return QuantizeResult(options: options, gradStats: state.stats, groups: groups, blocks: [], gptq: gptq, seconds: seconds)
    }
}
