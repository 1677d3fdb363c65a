import Foundation
import MBQMessages
import MBQMethods
import MBQTensor
import MBQWire

/// What a job is: fixed for its lifetime, recorded in the job directory.
public struct JobSpec: Sendable {
    public var jobID: String
    /// Every input that changes the output (`jobID` is derived from it when set).
    public var identity = JobIdentity(fields: [:])
    public var modelDir: String
    public var calibPath: String
    public var options: Mbq_JobOptions
    public var layers: Int
    public var samples: Int
    /// mbq (and awq with --reweight) need the backward pass's gradient statistics.
    public var needsStats: Bool
    /// rtn needs no activations at all.
    public var needsForward: Bool
    /// Searched groups' results per layer (0 for GPTQ alone, 2 for SmoothQuant's scales).
    public var groupsPerLayer: Int
    public var expectedWorkers: Int
    public var heartbeatInterval: Double = 0.5
    /// A worker silent this long is declared lost (the missed-heartbeat budget).
    public var livenessTimeout: Double = 3.0
    /// What each held layer costs a worker's memory; the plan keeps within budgets.
    public var memory = MemoryNeeds()
    /// The output's temporary directory, the token in its marker file, and how blocks
    /// reach it: auto (workers that see the directory write their blocks there, the
    /// others stream them here), shared or coordinator.
    public var outputDir = ""
    public var outputToken = ""
    public var outputVia = Mbq_OutputRouting.auto
    /// --distort: search runs as a pipeline; finished layers' scales go back to their
    /// owners at the start of the search, to recompute the quantized activations.
    public var distort = false
    /// GPTQ rounds the weights (--method gptq, --then gptq): a layer's codes exist only on
    /// the worker that made them, so the search pipeline always runs and redoes the
    /// finished layers (their scales and reports known) before the apply phase; a layer
    /// is finished when its `GptqReport` is in too.
    public var gptq = false
    /// GPTQ with gradient token weights: each worker needs its own layers' per-token
    /// gradients, so the backward runs in every plan, not only the first.
    public var tokenGradients = false
    /// For the cost model's prediction, logged with the first plan and checked at the end.
    public var shape: CostModel.Shape?
    public var workload: CostModel.Workload?
    public var bandwidthBytesPerSecond = 1.25e9

    public init(jobID: String, modelDir: String, calibPath: String, options: Mbq_JobOptions, layers: Int, samples: Int,
                needsStats: Bool, needsForward: Bool, groupsPerLayer: Int, expectedWorkers: Int) {
        self.jobID = jobID; self.modelDir = modelDir; self.calibPath = calibPath; self.options = options
        self.layers = layers; self.samples = samples; self.needsStats = needsStats; self.needsForward = needsForward
        self.groupsPerLayer = groupsPerLayer; self.expectedWorkers = expectedWorkers
    }
}

public enum CoordinatorPhase: String, Sendable {
    case waiting, forward, backward, search, apply, done, failed

    /// The phases workers run, as the wire names them (nil for the coordinator's own).
    public var wire: Mbq_Phase? {
        switch self {
        case .forward: return .forward
        case .backward: return .backward
        case .search: return .search
        case .apply: return .apply
        case .waiting, .done, .failed: return nil
        }
    }

    /// A phase in which workers hold a plan.
    public var isRunning: Bool { wire != nil }
}

/// A finished layer: its searched groups' results and, with GPTQ, its rounding report.
public struct LayerResults: Sendable {
    public var groups: [Mbq_GroupResult]
    public var gptq: Mbq_GptqReport?

    public init(groups: [Mbq_GroupResult] = [], gptq: Mbq_GptqReport? = nil) { self.groups = groups; self.gptq = gptq }
}

/// What the shell must do.
public enum Directive {
    case send(identity: [UInt8], Mbq_Envelope)
    case event(CoordinatorEvent)
    /// A layer's shard streamed by a worker: write the bytes into the output's
    /// temporary directory under `file`, as they came.
    case storeShard(layer: Int, file: String, bytes: [UInt8])
    /// Finished results changed: write the journal.
    case journal
    case finished
    case failed(String)
}

/// Whether a registered worker takes part in the job.
public enum Liveness: Sendable, Equatable {
    case alive
    /// Silent past the liveness timeout: its layers were re-planned; it may register again.
    case lost
    /// Dropped after a fatal error it reported: the same process (data endpoint) is not
    /// admitted again, a new one under the same id is.
    case dropped(why: String)
}

public struct WorkerEntry {
    public var identity: [UInt8]
    public var id: String
    public var info: Mbq_Register
    public var lastSeen: Double
    public var liveness: Liveness
    public var range: Range<Int>?

    public var alive: Bool { liveness == .alive }
}

/// The coordinator's logic as a pure state machine (docs/DESIGN.md §3): messages and clock
/// ticks in, directives out; no sockets, no clock of its own, so every path — lost
/// workers, re-plans, stale messages, resume — is tested without a network.
public final class CoordinatorState {
    public let spec: JobSpec
    public private(set) var phase: CoordinatorPhase = .waiting
    public private(set) var epoch: UInt32 = 0
    public private(set) var workers: [String: WorkerEntry] = [:]
    public private(set) var plan: [(worker: String, range: Range<Int>)] = []
    /// Finished layers' results (journaled).
    public private(set) var results: [Int: LayerResults] = [:]
    /// Gradient statistics once complete (journaled).
    public private(set) var stats: GradientStatistics?
    /// Layers whose shard a worker streamed here (the shell wrote them).
    public private(set) var streamed: Set<Int> = []
    /// Blocks a worker wrote into the output directory itself (apply phase).
    public private(set) var written: [Int: Mbq_BlockWritten] = [:]
    var partialStats: [Int: Mbq_LayerStats] = [:]
    var pending: [Int: LayerResults] = [:]
    var phaseDone: Set<String> = []
    /// Activation/gradient traffic reported by the workers, and when the first plan started.
    public private(set) var bytesMoved: UInt64 = 0
    public private(set) var transferSeconds = 0.0
    var firstPlan: Double?
    /// The phases' measured seconds (a re-plan runs some phases twice: their sum).
    public private(set) var phaseSeconds: [String: Double] = [:]
    var lastHeartbeatSent = -Double.infinity
    var phaseStarted = 0.0
    /// Layers finished before this search phase began (a resume or a re-plan): the rate
    /// and ETA count only what this phase searched.
    var finishedBefore: Set<Int> = []
    /// Shared-secret mode (CURVE is checked by ZeroMQ): the secret, where nonces come
    /// from, and the nonce each connection (ZeroMQ identity) was challenged with.
    let secret: String?
    let makeNonce: () -> [UInt8]
    var challenges: [[UInt8]: [UInt8]] = [:]

    /// `epochBase`: plans count up from here; a resumed coordinator starts above every
    /// epoch its predecessor used, so workers' traffic from before the crash is stale.
    /// `secret`: workers must answer a challenge (see `Auth`); `makeNonce` is injected
    /// so that tests can replay exactly.
    public init(spec: JobSpec, resumed: (stats: GradientStatistics?, results: [Int: LayerResults])? = nil,
                epochBase: UInt32 = 0, secret: String? = nil, makeNonce: @escaping () -> [UInt8] = Auth.nonce) {
        self.spec = spec
        self.secret = secret
        self.makeNonce = makeNonce
        self.epoch = epochBase
        self.epochBase = epochBase
        if let resumed {
            stats = resumed.stats
            results = resumed.results
        }
    }

    let epochBase: UInt32

    func env(_ body: Mbq_Envelope.OneOf_Body) -> Mbq_Envelope { Wire.envelope(job: spec.jobID, body) }

    /// A `Refused` saying why: the worker logs the reason and exits with an error.
    func refusal(_ reason: String) -> Mbq_Envelope {
        var no = Mbq_Refused()
        no.reason = reason
        return env(.refused(no))
    }

    public var finishedLayers: [Int] { results.keys.sorted() }

    /// Every layer's results are in and the apply phase can start from them: never for
    /// GPTQ before this plan's search (the codes live with the workers that made them).
    var allFinished: Bool { results.count == spec.layers && !(spec.gptq && phase != .search) }

    // MARK: inputs

    /// One message from the worker at `identity`: checked against the job, then handed
    /// to the handler of its kind.
    public func handle(identity: [UInt8], _ m: WireMessage, now: Double) -> [Directive] {
        // A worker learns the job id from the coordinator: its first messages carry none.
        guard m.envelope.jobID == spec.jobID || m.envelope.jobID.isEmpty else {
            // A worker left over from another job (this port's previous coordinator): it
            // would never join, so it is told to stop instead of waiting forever.
            let reason = "this coordinator runs job '\(spec.jobID)', the worker belongs to job '\(m.envelope.jobID)': start a new worker for this job"
            return [.send(identity: identity, refusal(reason)),
                    .event(.workerRefused(worker: senderName(m.envelope.body), host: "", reason: reason))]
        }
        guard let body = m.envelope.body else { return [] }
        if case let .register(r) = body { return register(identity: identity, r, now: now) }
        guard let id = workerID(identity), workers[id]?.alive == true else {
            // A worker of an earlier coordinator (or one declared lost): ask it to register
            // again rather than wait for it to notice the silence.
            return [.send(identity: identity, env(.registerAgain(Mbq_RegisterAgain()))),
                    .event(.messageDropped(what: bodyName(body), from: nil, reason: "an unregistered peer; asked it to register"))]
        }
        workers[id]?.lastSeen = now
        switch body {
        case .heartbeat: return []
        case let .phaseDone(p): return phaseDone(p, from: id, now: now)
        case let .layerStats(st): return layerStats(st, from: id)
        case let .groupResult(g): return groupResult(g, from: id, now: now)
        case let .gptqReport(r): return gptqReport(r, from: id, now: now)
        case let .tensor(h): return shard(h, bytes: m.bytes, from: id, now: now)
        case let .blockWritten(b): return blockWritten(b, from: id, now: now)
        case let .error(e):
            return [.event(.workerError(worker: id, message: e.message, fatal: e.fatal))] + (e.fatal ? drop(id, why: e.message, now: now) : [])
        default:
            return [.event(.messageDropped(what: bodyName(body), from: id, reason: "unexpected"))]
        }
    }

    func phaseDone(_ p: Mbq_PhaseDone, from id: String, now: Double) -> [Directive] {
        guard p.epoch == epoch, p.phase == phase.wire else {
            return [.event(p.epoch == epoch ? .workerLateCompletion(worker: id, phase: p.phase.name)
                                            : .messageDropped(what: "a \(p.phase.name) completion", from: id, reason: "stale (epoch \(p.epoch), current \(epoch))"))]
        }
        phaseDone.insert(id)
        bytesMoved += p.bytesMoved
        transferSeconds += p.transferSeconds
        // Throughput in block-samples per second: the worker's layers times the samples.
        let layers = workers[id]?.range?.count ?? 0
        let rate = (phase == .forward || phase == .backward) && p.seconds > 0 ? Double(layers * spec.samples) / p.seconds : nil
        var out: [Directive] = [.event(.workerFinishedPhase(phase: phase.rawValue, worker: id, seconds: p.seconds, blockSamplesPerSecond: rate,
                                                            bytesMoved: p.bytesMoved, transferSeconds: p.transferSeconds,
                                                            spilledBytes: phase == .forward ? p.spilledBytes : 0,
                                                            done: phaseDone.count, of: plan.count))]
        if Set(plan.map(\.worker)).isSubset(of: phaseDone) { out += advance(now: now) }
        return out
    }

    func layerStats(_ st: Mbq_LayerStats, from id: String) -> [Directive] {
        guard phase == .backward, st.epoch == epoch else {
            return [.event(.messageDropped(what: "layer statistics", from: id, reason: "stale (epoch \(st.epoch))"))]
        }
        guard owns(id, Int(st.layer)) else {
            return [.event(.messageDropped(what: "statistics for layer \(st.layer)", from: id, reason: "it does not hold that layer"))]
        }
        partialStats[Int(st.layer)] = st
        return []
    }

    /// Whether a layer's result from `id` counts now: searching, this epoch, a layer it
    /// holds that is not finished. nil when it does; else why not.
    func resultRefusal(layer: UInt32, epoch e: UInt32, from id: String) -> String? {
        guard phase == .search, e == epoch, Int(layer) < spec.layers, results[Int(layer)] == nil else { return "finished already or not searching" }
        guard owns(id, Int(layer)) else { return "it does not hold that layer" }
        return nil
    }

    func groupResult(_ g: Mbq_GroupResult, from id: String, now: Double) -> [Directive] {
        if let why = resultRefusal(layer: g.layer, epoch: g.epoch, from: id) {
            return [.event(.messageDropped(what: "a result for layer \(g.layer)", from: id, reason: why))]
        }
        guard g.searchGroup != nil else {
            return [.event(.messageDropped(what: "a result for group \(g.group)", from: id, reason: "unknown group"))]
        }
        let l = Int(g.layer)
        pending[l, default: LayerResults()].groups.removeAll { $0.group == g.group }
        pending[l, default: LayerResults()].groups.append(g)
        return layerIfFinished(l, by: id, now: now)
    }

    func gptqReport(_ r: Mbq_GptqReport, from id: String, now: Double) -> [Directive] {
        if let why = resultRefusal(layer: r.layer, epoch: r.epoch, from: id) {
            return [.event(.messageDropped(what: "a GPTQ report for layer \(r.layer)", from: id, reason: why))]
        }
        guard spec.gptq, (try? r.reports()) != nil else {
            return [.event(.messageDropped(what: "a GPTQ report for layer \(r.layer)", from: id,
                                           reason: spec.gptq ? "it does not list the block's linears" : "this job does not use GPTQ"))]
        }
        pending[Int(r.layer), default: LayerResults()].gptq = r
        return layerIfFinished(Int(r.layer), by: id, now: now)
    }

    /// Layer `l` is finished when every searched group's result and, with GPTQ, its
    /// report are in: journaled, then announced.
    func layerIfFinished(_ l: Int, by id: String, now: Double) -> [Directive] {
        guard let done = pending[l], done.groups.count == spec.groupsPerLayer, !spec.gptq || done.gptq != nil else { return [] }
        pending[l] = nil
        results[l] = done
        // Journal first: a layer the log calls finished must survive a crash.
        var out: [Directive] = [.journal]
        let searched = results.count - finishedBefore.count
        let rate = now > phaseStarted && searched > 0 ? Double(searched) / (now - phaseStarted) * 60 : nil
        let named = done.groups.map { ($0.searchGroup?.rawValue ?? "\($0.group)", $0.alpha) }
        out.append(.event(.layerSearched(layer: l, worker: id, alphas: Dictionary(named, uniquingKeysWith: { a, _ in a }),
                                         groups: named.map(\.0) + (done.gptq != nil ? ["gptq"] : []), done: results.count, of: spec.layers,
                                         layersPerMinute: rate, etaSeconds: searchETA(now: now) ?? (results.count == spec.layers ? 0 : nil))))
        if results.count == spec.layers { out += advance(now: now) }
        return out
    }

    /// A layer's shard streamed here in the apply phase (`TensorName.shard`).
    func shard(_ h: Mbq_TensorHeader, bytes: [UInt8]?, from id: String, now: Double) -> [Directive] {
        guard phase == .apply, let bytes else {
            return [.event(.messageDropped(what: "a tensor", from: id, reason: "not a shard in the apply phase"))]
        }
        guard h.epoch == epoch else { return [.event(.messageDropped(what: "tensor \(h.name)", from: id, reason: "stale (epoch \(h.epoch))"))] }
        guard case let .shard(l, file)? = TensorName(wire: h.name), owns(id, l) else {
            return [.event(.messageDropped(what: "tensor '\(h.name)'", from: id, reason: "unexpected"))]
        }
        var b = Mbq_BlockWritten()
        b.layer = UInt32(l); b.file = file; b.bytes = UInt64(bytes.count); b.epoch = epoch
        written[l] = b
        streamed.insert(l)
        return [.storeShard(layer: l, file: file, bytes: bytes), .event(.blockReceived(layer: l, worker: id, done: blocksDone, of: spec.layers))]
            + finishIfComplete(now: now)
    }

    func blockWritten(_ b: Mbq_BlockWritten, from id: String, now: Double) -> [Directive] {
        guard phase == .apply, b.epoch == epoch, owns(id, Int(b.layer)) else {
            return [.event(.messageDropped(what: "a block-written report for layer \(b.layer)", from: id,
                                           reason: "stale, or a layer it does not hold"))]
        }
        written[Int(b.layer)] = b
        streamed.remove(Int(b.layer))
        return [.event(.blockWritten(layer: Int(b.layer), worker: id, file: b.file, bytes: b.bytes, done: blocksDone, of: spec.layers))]
            + finishIfComplete(now: now)
    }

    /// A worker that reported an error it cannot recover from (it cannot read the model,
    /// a phase failed) is dropped like a lost one: told to stop, its layers re-planned on
    /// the others. Only when no worker is left does the job fail. The same process is not
    /// admitted again (`failed`); a new process under the same id is.
    func drop(_ id: String, why: String, now: Double) -> [Directive] {
        guard let w = workers[id] else { return [] }
        workers[id]?.liveness = .dropped(why: why)
        var out: [Directive] = [.send(identity: w.identity, refusal("dropped from the job after its error: \(why)"))]
        guard phase.isRunning, plan.contains(where: { $0.worker == id }) else { return out }
        guard workers.values.contains(where: \.alive) else {
            phase = .failed
            return out + [.failed("worker \(id): \(why) (no other worker is left)")]
        }
        out += replan(now: now, reason: "dropped \(id) after its error")
        return out
    }

    /// The worker id a message names, for refusals of messages from unknown peers.
    func senderName(_ b: Mbq_Envelope.OneOf_Body?) -> String {
        switch b {
        case let .register(r)?: return r.workerID
        case let .heartbeat(h)? where !h.workerID.isEmpty: return h.workerID
        default: return "?"
        }
    }

    /// Whether worker `id` holds layer `l` in the current plan (reports about other
    /// layers are stale or wrong, and never counted).
    func owns(_ id: String, _ l: Int) -> Bool { workers[id]?.range?.contains(l) == true }

    /// Layers whose quantized block is in: streamed here or written by a worker.
    var blocksDone: Int { written.count }

    /// Adds the running phase's time to its total (a re-plan runs some phases twice).
    func closePhase(now: Double) {
        if phase.isRunning { phaseSeconds[phase.rawValue, default: 0] += now - phaseStarted }
    }

    func finishIfComplete(now: Double) -> [Directive] {
        guard blocksDone == spec.layers else { return [] }
        closePhase(now: now)
        phase = .done
        let wall = firstPlan.map { now - $0 }
        var out: [Directive] = [.event(.jobDone(layers: spec.layers, writtenByWorkers: written.count - streamed.count, streamed: streamed.count,
                                                bytesMoved: bytesMoved, transferSeconds: transferSeconds, workers: max(plan.count, 1),
                                                wallSeconds: wall))]
        out.append(.finished)
        return out
    }

    /// Heartbeats out, liveness in. Call at least every heartbeat interval.
    public func tick(now: Double) -> [Directive] {
        var out: [Directive] = []
        if now - lastHeartbeatSent >= spec.heartbeatInterval {
            lastHeartbeatSent = now
            for w in workers.values where w.alive { out.append(.send(identity: w.identity, env(.heartbeat(Mbq_Heartbeat())))) }
        }
        var lost: [String] = []
        for (id, w) in workers where w.alive && now - w.lastSeen > spec.livenessTimeout {
            workers[id]?.liveness = .lost
            lost.append(id)
        }
        for id in lost.sorted() {
            out.append(.event(.workerLost(worker: id, silentSeconds: spec.livenessTimeout, layers: workers[id]?.range)))
        }
        if !lost.isEmpty && phase.isRunning
            && lost.contains(where: { id in plan.contains { $0.worker == id } }) {
            out += replan(now: now, reason: "lost \(lost.joined(separator: ", "))")
        }
        return out
    }

    // MARK: transitions

    func workerID(_ identity: [UInt8]) -> String? {
        workers.first { $0.value.identity == identity }?.key
    }

    func register(identity: [UInt8], _ r: Mbq_Register, now: Double) -> [Directive] {
        if let secret {
            // Only an answer to the nonce this connection was just given counts; anything
            // else (a first registration, a stale or replayed one) gets a fresh challenge.
            guard let issued = challenges[identity], Array(r.nonce) == issued else {
                if challenges.count >= 1024 { challenges.removeAll() }  // bounded under a flood of identities
                let n = makeNonce()
                challenges[identity] = n
                var c = Mbq_Challenge()
                c.nonce = Data(n)
                return [.send(identity: identity, env(.challenge(c)))]
            }
            challenges[identity] = nil
            guard Auth.verify(secret: secret, jobID: spec.jobID, workerID: r.workerID, nonce: issued, token: Array(r.authToken)) else {
                return [.send(identity: identity, refusal("authentication failed")),
                        .event(.workerRefused(worker: r.workerID, host: r.host, reason: "authentication failed"))]
            }
        }
        let known = workers[r.workerID]
        func refuse(_ reason: String) -> [Directive] {
            [.send(identity: identity, refusal(reason)), .event(.workerRefused(worker: r.workerID, host: r.host, reason: reason))]
        }
        // One process per id: a second process (another data endpoint) under the id of a
        // live worker would take over its place and both would evict each other.
        if let known, known.alive, known.identity != identity, known.info.dataEndpoint != r.dataEndpoint {
            return refuse("worker id '\(r.workerID)' is taken by a live worker on \(known.info.host) (\(known.info.dataEndpoint)): give each worker its own --id")
        }
        if let known, case let .dropped(why) = known.liveness, known.info.dataEndpoint == r.dataEndpoint {
            return refuse("dropped from the job after its error: \(why)")
        }
        workers[r.workerID] = WorkerEntry(identity: identity, id: r.workerID, info: r, lastSeen: now, liveness: .alive, range: nil)
        var out: [Directive] = [.event(.workerRegistered(worker: r.workerID, host: r.host, device: r.device, threads: Int(r.threads), cores: Int(r.cores),
                                                         gflops: r.gemmGflops, gemmRates: r.gemmRates, loopGBps: r.loopGbps, memoryBytes: r.maxMemoryBytes,
                                                         scratchBytes: r.scratchBytes, reconnect: known != nil))]
        switch phase {
        case .waiting:
            let alive = workers.values.filter(\.alive).count
            // The first plan waits for every expected worker; after a loss any one will do.
            let needed = epoch == epochBase ? spec.expectedWorkers : 1
            if alive >= needed { out += replan(now: now, reason: "\(alive) worker(s) ready") }
        case .forward, .backward, .search, .apply:
            if known?.range != nil || plan.contains(where: { $0.worker == r.workerID }) {
                out += replan(now: now, reason: "worker \(r.workerID) restarted")
            } else {
                out.append(.event(.workerSpare(worker: r.workerID)))
            }
        case .done, .failed:
            break
        }
        return out
    }

    func replan(now: Double, reason: String) -> [Directive] {
        let alive = workers.values.filter(\.alive).sorted { $0.id < $1.id }
        for id in workers.keys { workers[id]?.range = nil }
        partialStats = [:]
        pending = [:]
        streamed = []
        written = [:]
        phaseDone = []
        guard !alive.isEmpty else {
            phase = .waiting
            plan = []
            return [.event(.waitingForWorkers(reason: reason))]
        }
        let capacities = alive.map { w in
            (w.id, w.info.gemmGflops, spec.memory.capacity(memory: w.info.maxMemoryBytes, spills: w.info.scratchBytes > 0, layers: spec.layers))
        }
        guard let newPlan = Planner.plan(layers: spec.layers, workers: capacities) else {
            phase = .waiting
            plan = []
            let held = capacities.reduce(0) { $0 + $1.2 }
            return [.event(.waitingForMemory(reason: reason, liveWorkers: alive.count, layersHeld: min(held, spec.layers), layers: spec.layers,
                                             layerWeightBytes: spec.memory.layerWeightBytes, stageInputBytes: spec.memory.stageInputBytes,
                                             fixedBytes: spec.memory.fixedBytes))]
        }
        epoch += 1
        plan = newPlan
        if firstPlan == nil { firstPlan = now }
        var out: [Directive] = [.event(.planned(epoch: epoch, reason: reason,
                                                plan: plan.map { CoordinatorEvent.PlanEntry(worker: $0.worker, layers: $0.range) })), .journal]
        for (i, p) in plan.enumerated() {
            guard let w = workers[p.worker] else { preconditionFailure("planned \(p.worker), which is not registered") }
            workers[p.worker]?.range = p.range
            var a = Mbq_Assignment()
            a.firstLayer = UInt32(p.range.lowerBound)
            a.endLayer = UInt32(p.range.upperBound)
            a.modelDir = spec.modelDir
            a.calibPath = spec.calibPath
            if i > 0, let up = workers[plan[i - 1].worker] {
                a.upstreamEndpoint = up.info.dataEndpoint
                a.upstreamCurveKey = up.info.dataCurveKey
            }
            if i < plan.count - 1, let down = workers[plan[i + 1].worker] {
                a.downstreamEndpoint = down.info.dataEndpoint
                a.downstreamCurveKey = down.info.dataCurveKey
            }
            a.outputDir = spec.outputDir
            a.outputToken = spec.outputToken
            a.outputVia = spec.outputVia
            a.holdsHead = i == plan.count - 1
            a.options = spec.options
            a.samples = UInt32(spec.samples)
            a.epoch = epoch
            out.append(.send(identity: w.identity, env(.assignment(a))))
        }
        let first: CoordinatorPhase = allFinished || !spec.needsForward ? .apply : .forward
        out += start(first, now: now)
        return out
    }

    func start(_ p: CoordinatorPhase, now: Double) -> [Directive] {
        closePhase(now: now)
        if p == .search { finishedBefore = Set(results.keys) }
        phase = p
        phaseDone = []
        phaseStarted = now
        var out: [Directive] = [.event(.phaseStarted(phase: p.rawValue, epoch: epoch, workers: plan.count))]
        let planned = plan.compactMap { p in workers[p.worker].map { (identity: $0.identity, range: p.range) } }
        if p == .apply || (p == .search && spec.distort) {
            // Every worker gets the scales of its layers, whoever searched them (in a
            // --distort search, those finished before a re-plan or a restart).
            for (identity, range) in planned {
                for l in range { for g in results[l]?.groups ?? [] { out.append(.send(identity: identity, env(.groupResult(g)))) } }
            }
        }
        guard let wirePhase = p.wire else { preconditionFailure("start(\(p)): not a phase workers run") }
        var run = Mbq_RunPhase()
        run.phase = wirePhase
        run.epoch = epoch
        if p == .search { run.skipLayers = finishedLayers.map(UInt32.init) }
        if p == .search, let s = stats {
            var r = Mbq_Ratios()
            r.attn = s.layers.map(\.attnRatio)
            r.mlp = s.layers.map(\.mlpRatio)
            for w in planned { out.append(.send(identity: w.identity, env(.ratios(r)))) }
        }
        for w in planned { out.append(.send(identity: w.identity, env(.runPhase(run)))) }
        return out
    }

    func advance(now: Double) -> [Directive] {
        switch phase {
        case .forward:
            return start(spec.needsStats && (stats == nil || spec.tokenGradients) ? .backward : (allFinished ? .apply : .search), now: now)
        case .backward:
            guard partialStats.count == spec.layers else {
                phase = .failed
                return [.failed("backward finished with statistics for \(partialStats.count) of \(spec.layers) layers")]
            }
            var sums: [GradientStatistics.Layer] = []
            var used = 0
            var skipped: [String] = []
            for l in 0..<spec.layers {
                guard let s = partialStats[l] else {
                    phase = .failed
                    return [.failed("backward finished without statistics for layer \(l)")]
                }
                sums.append(s.sums)
                used = Int(s.samples)
                skipped = s.skipped
            }
            guard used > 0 else {
                phase = .failed
                return [.failed("no usable calibration samples: every sample lacks vision or caption positions")]
            }
            let finished = GradientStatistics.finalize(sums: sums, used: used, skipped: skipped)
            stats = finished
            return [.journal, .event(.gradientStatistics(samples: used, attnRatios: finished.layers.map(\.attnRatio),
                                                         mlpRatios: finished.layers.map(\.mlpRatio)))]
                + start(allFinished ? .apply : .search, now: now)
        case .search:
            return start(.apply, now: now)
        default:
            return []
        }
    }

    /// The search's ETA: stages search in parallel, so it is the slowest stage's — each
    /// at its own seconds per layer so far (the mean of the others' before its first),
    /// minus the time already spent. (--distort runs stages one after another.)
    public func searchETA(now: Double) -> Double? {
        guard phase == .search else { return nil }
        let dt = now - phaseStarted
        let stages = plan.map { p -> (done: Int, left: Int) in
            (p.range.filter { results[$0] != nil && !finishedBefore.contains($0) }.count, p.range.filter { results[$0] == nil }.count)
        }
        let newDone = results.count - finishedBefore.count
        guard newDone > 0, dt > 0 else { return nil }
        if spec.distort { return dt / Double(newDone) * Double(spec.layers - results.count) }
        let rates = stages.filter { $0.done > 0 }.map { dt / Double($0.done) }
        let mean = rates.reduce(0, +) / Double(max(1, rates.count))
        let eta = stages.map { st -> Double in
            let perLayer = st.done > 0 ? dt / Double(st.done) : mean
            return max(0, perLayer * Double(st.done + st.left) - dt)
        }.max() ?? 0
        return eta
    }

    func bodyName(_ b: Mbq_Envelope.OneOf_Body) -> String { String(describing: b).split(separator: "(").first.map(String.init) ?? "message" }
}
