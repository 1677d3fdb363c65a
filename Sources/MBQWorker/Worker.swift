import CZMQ
import Foundation
import Logging
import MBQFormats
import MBQMessages
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import MBQWire

public struct WorkerOptions: Sendable {
    public var connect: String
    public var workerID: String
    public var dataBind = "tcp://127.0.0.1:*"
    public var maxMemoryBytes: UInt64 = 20 << 30
    /// Where block inputs go past the memory budget (nil: they stay in memory).
    public var scratch: String? = nil
    public var threads: Int = EngineThreads.count
    /// Tokens per search chunk (`LayerStep.search`); nil: a quarter of what the budget
    /// leaves after weights and working set. Changes no result.
    public var chunkTokens: Int? = nil
    public var heartbeatInterval = 0.5
    public var coordinatorTimeout = 3.0
    /// A worker that has not heard from any coordinator this long gives up (exit 2):
    /// long enough for a crashed coordinator to be restarted with --resume.
    public var giveUpAfter = 600.0
    public var secret: String? = nil
    /// CurveZMQ: the coordinator's public key and this worker's keypair.
    public var curve: (serverKey: String, publicKey: String, secretKey: String)? = nil

    public init(connect: String, workerID: String) {
        self.connect = connect
        self.workerID = workerID
    }
}

/// A worker process: owns a contiguous range of decoder blocks and does forward,
/// backward, search and apply for them (the phases: WorkerPhases.swift). The control
/// thread owns the coordinator socket (heartbeats keep flowing while the compute thread
/// works); activations and gradients go straight to the neighbouring stages over their
/// data sockets, which are CURVE-encrypted when the control channel is, and carry an
/// HMAC tag under a shared secret.
public final class Worker: @unchecked Sendable {
    let options: WorkerOptions
    let backend: ComputeBackend
    let logger: Logger
    let outbox = Outbox()
    let commands = CommandQueue()
    let epochLock = NSLock()
    var latestEpoch: UInt32 = 0
    var jobID = ""
    /// The job whose files this worker has checked (`assign`).
    var verifiedJob = ""

    // Compute-thread state.
    var assignment = Mbq_Assignment()
    var ckpt: Checkpoint?
    var bundle: CalibrationBundle?
    /// The owned layers' weights, loaded into the backend once per assignment.
    var blocks: [Int: BackendBlock] = [:]
    var head: BackendHead?
    var inputs: ActivationStore
    /// The last stage's final hidden states per sample, kept in the backend for the loss.
    var finalHidden: [BackendTensor] = []
    var ratios: (attn: [Double], mlp: [Double])?
    /// Scales per layer and group (searched here, or sent by the coordinator).
    var results: [Int: [SearchGroup: Mbq_GroupResult]] = [:]
    var quantOptions = QuantizeOptions()
    /// GPTQ: each owned layer's codes from this plan's search, for the apply phase (they
    /// cannot be rebuilt from scales; a byte per weight, not the dequantized block).
    var gptqDone: [Int: [String: QuantizedWeight]] = [:]
    /// GPTQ's gradient token weights of the owned layers: layer -> sample -> role -> [T].
    var tokenNorms: [Int: [Int: TokenWeightSet]] = [:]
    /// Tokens per search chunk for the current assignment.
    var chunkTokens: Int? = nil
    var pull: ZMQSocket
    var up: ZMQSocket?
    var down: ZMQSocket?
    let dataEndpoint: String
    /// The data socket's CURVE keypair (made per process) and its ZAP handler, which
    /// admits only the current neighbours' keys.
    let dataKeys: (public: String, secret: String)?
    let dataAuthenticator: CurveAuthenticator?

    /// The default backend keeps a bf16 checkpoint's layers in bf16 (`CPUBackend`).
    public init(options: WorkerOptions, backend: ComputeBackend = CPUBackend(keepStoredPrecision: true)) throws {
        self.options = options
        self.backend = backend
        let logger = Logger(label: "mbq.worker.\(options.workerID)")
        self.logger = logger
        inputs = ActivationStore(budgetBytes: Int.max, scratch: nil, owner: options.workerID)
        pull = try ZMQSocket(.pull)
        try pull.configureForTensors()
        if options.curve != nil {
            let keys = try Curve.keypair()
            dataKeys = keys
            dataAuthenticator = try CurveAuthenticator(authorizedKeys: [], grace: 5) { line in logger.warning("data socket: \(line)") }
            try Curve.server(pull, secretKey: keys.secret)
        } else {
            dataKeys = nil
            dataAuthenticator = nil
        }
        try pull.bind(options.dataBind)
        dataEndpoint = pull.lastEndpoint
    }

    var currentEpoch: UInt32 {
        epochLock.lock(); defer { epochLock.unlock() }
        return latestEpoch
    }

    func post(_ body: Mbq_Envelope.OneOf_Body) {
        if let f = try? Wire.encode(Wire.envelope(job: jobID, body)) { outbox.post(f) }
    }

    // MARK: control thread

    /// The control socket (DEALER to the coordinator, CURVE client when configured) and,
    /// under CURVE, a monitor that sees a refused handshake.
    func openControl() throws -> (socket: ZMQSocket, monitor: ZMQSocket?) {
        let control = try ZMQSocket(.dealer)
        if let c = options.curve { try Curve.client(control, serverKey: c.serverKey, publicKey: c.publicKey, secretKey: c.secretKey) }
        // A CURVE refusal never reaches us as a message (the handshake fails): watch the
        // socket's events to say so and stop instead of retrying forever.
        let monitor = options.curve != nil ? try control.monitor(events: ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) : nil
        try control.connect(options.connect)
        return (control, monitor)
    }

    /// --max-memory, or the device's free memory at start when that is less
    /// (`ComputeBackend.deviceMemoryBytes`): what the worker registers and plans its layers in.
    lazy var memoryBudget: UInt64 = min(options.maxMemoryBytes, backend.deviceMemoryBytes ?? .max)

    /// Runs until the coordinator says shutdown (returns 0), refuses us (returns 1) or is
    /// gone for `giveUpAfter` seconds (returns 2). The link's timing is `WorkerLink`'s.
    public func run() throws -> Int32 {
        _ = memoryBudget   // read before any layer is on the device
        var (control, monitor) = try openControl()
        let rates = backend.measureGEMMRates(sizes: GEMMRateSizes.all)
        let gflops = zip(GEMMRateSizes.all, rates).first { $0.0 == GEMMRateSizes.planSize }?.1 ?? rates.last ?? 0
        var reg = Mbq_Register()
        reg.workerID = options.workerID
        reg.host = ProcessInfo.processInfo.hostName
        reg.maxMemoryBytes = memoryBudget
        reg.threads = UInt32(options.threads)
        reg.gemmGflops = gflops
        reg.dataEndpoint = dataEndpoint
        reg.backend = backend.name
        reg.device = backend.device
        reg.dataCurveKey = dataKeys?.public ?? ""
        reg.gemmRates = rates
        reg.loopGbps = backend.measureLoopGBps()
        reg.cores = UInt32(ProcessInfo.processInfo.activeProcessorCount)
        if let s = options.scratch { reg.scratchBytes = Self.freeBytes(s) }
        let compute = Thread { [self] in computeLoop() }
        compute.stackSize = 16 << 20
        compute.start()
        var registered = false
        var link = WorkerLink(settings: .init(heartbeatInterval: options.heartbeatInterval, coordinatorTimeout: options.coordinatorTimeout,
                                              giveUpAfter: options.giveUpAfter), now: Self.now())
        while true {
            let now = Self.now()
            if let monitor, let event = try monitor.receive(timeoutMs: 0), let code = Self.monitorEvent(event),
               code == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH {
                logger.error("refused by the coordinator at \(options.connect): its CurveZMQ handler does not authorize this worker's key \(options.curve!.publicKey) (add the worker's .pub to the coordinator's --authorized-keys)")
                return 1
            }
            for action in link.tick(now: now) {
                switch action {
                case .giveUp:
                    logger.error("no coordinator at \(options.connect) for \(Int(options.giveUpAfter)) s: giving up")
                    return 2
                case .recreateSocket:
                    monitor = nil
                    (control, monitor) = try openControl()
                case let .register(silentFor):
                    if let silentFor {
                        logger.warning("coordinator silent for \(String(format: "%.1f", silentFor)) s: registering again on a new connection (next try in \(String(format: "%.0f", link.backoff)) s)")
                    }
                    try control.send(try Wire.encode(Wire.envelope(job: jobID, .register(reg))))
                case .heartbeat:
                    var hb = Mbq_Heartbeat()
                    hb.workerID = options.workerID
                    try control.send(try Wire.encode(Wire.envelope(job: jobID, .heartbeat(hb))))
                }
            }
            for f in outbox.drain() { try control.send(f) }
            guard let frames = try control.receive(timeoutMs: 50, maxFrameBytes: maxFrameBytes) else { continue }
            let m: WireMessage
            do {
                m = try Wire.decode(frames)
            } catch {
                logger.error("dropped a bad message from the coordinator: \(error)")
                continue
            }
            var registerAgain = false
            if case .registerAgain = m.envelope.body {
                logger.info("coordinator does not know this worker (restarted?): registering again")
                registerAgain = true
            }
            link.heard(now: Self.now(), registerAgain: registerAgain)
            if jobID.isEmpty { jobID = m.envelope.jobID }
            switch m.envelope.body {
            case let .challenge(c):
                guard let s = options.secret else {
                    logger.error("the coordinator at \(options.connect) requires a shared secret: pass the job's --secret-file (or set MBQ_SECRET)")
                    return 1
                }
                reg.nonce = c.nonce
                reg.authToken = Data(Auth.token(secret: s, jobID: m.envelope.jobID, workerID: options.workerID, nonce: Array(c.nonce)))
                try control.send(try Wire.encode(Wire.envelope(job: jobID, .register(reg))))
                link.registerSent(now: now)
            case .heartbeat:
                // The coordinator heartbeats only the workers it registered.
                if !registered {
                    registered = true
                    logger.info("registered with the coordinator at \(options.connect) (job \(m.envelope.jobID)) as \(options.workerID)")
                }
            case .registerAgain:
                registered = false
            case let .refused(r):
                logger.error("refused by the coordinator: \(r.reason)")
                return 1
            case .shutdown:
                logger.info("shutdown")
                inputs.removeFiles()  // the job is over: the compute thread is idle
                return 0
            case let .assignment(a):
                jobID = m.envelope.jobID
                epochLock.lock(); latestEpoch = a.epoch; epochLock.unlock()
                commands.push(m)
            default:
                commands.push(m)
            }
        }
    }

    static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    /// A socket-monitor event's code (frame 1: uint16 event, uint32 value).
    static func monitorEvent(_ frames: [[UInt8]]) -> Int32? {
        guard let f = frames.first, f.count >= 2 else { return nil }
        return Int32(UInt16(f[0]) | UInt16(f[1]) << 8)
    }

    static func freeBytes(_ dir: String) -> UInt64 {
        var s = statvfs()
        guard statvfs(dir, &s) == 0 else { return 0 }
        return UInt64(s.f_bavail) * UInt64(s.f_frsize)
    }

    // MARK: compute thread

    func computeLoop() {
        while true {
            let m = commands.pop()
            do {
                try handle(m)
            } catch let e as Aborted {
                logger.info("\(e.what) abandoned: a new plan (epoch \(currentEpoch)) superseded it")
            } catch {
                var r = Mbq_ErrorReport()
                r.message = "\(error)"
                r.fatal = true
                post(.error(r))
            }
        }
    }

    struct Aborted: Error { let what: String }

    func handle(_ m: WireMessage) throws {
        switch m.envelope.body {
        case let .assignment(a): try assign(a)
        case let .ratios(r):
            guard let n = ckpt?.config.numLayers, r.attn.count == n, r.mlp.count == n else {
                throw ProtocolError.malformed("ratios for \(r.attn.count)/\(r.mlp.count) layers (the model has \(ckpt?.config.numLayers ?? 0))")
            }
            ratios = (r.attn, r.mlp)
        case let .groupResult(g):
            guard let group = g.searchGroup else { throw ProtocolError.malformed("scales for an unknown group \(g.group) of layer \(g.layer)") }
            results[Int(g.layer), default: [:]][group] = g
        case let .runPhase(p):
            guard p.epoch == assignment.epoch, p.epoch == currentEpoch else { return }
            try testDelay(p.phase.name)
            let t0 = Self.now()
            var moved: UInt64 = 0
            var transfer = 0.0
            switch p.phase {
            case .forward: (moved, transfer) = try forward()
            case .backward: (moved, transfer) = try backward()
            case .search: (moved, transfer) = try search(skip: Set(p.skipLayers.map(Int.init)))
            case .apply: try apply(); return
            case .unspecified, .UNRECOGNIZED: throw ProtocolError.malformed("unknown phase \(p.phase)")
            }
            var d = Mbq_PhaseDone()
            d.phase = p.phase
            d.epoch = p.epoch
            d.seconds = Self.now() - t0
            d.bytesMoved = moved
            d.transferSeconds = transfer
            d.spilledBytes = UInt64(inputs.spilledBytes)
            post(.phaseDone(d))
        default: break
        }
    }

    /// Test hook: MBQ_TEST_PHASE_DELAY=seconds holds every phase (and every searched
    /// layer) that long, so tests can kill processes inside a chosen phase.
    let phaseDelay = Double(ProcessInfo.processInfo.environment["MBQ_TEST_PHASE_DELAY"] ?? "") ?? 0

    func testDelay(_ what: String) throws {
        guard phaseDelay > 0 else { return }
        let end = Self.now() + phaseDelay
        while Self.now() < end {
            if currentEpoch != assignment.epoch { throw Aborted(what: what) }
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    func assign(_ a: Mbq_Assignment) throws {
        let t0 = Self.now()
        if ckpt == nil || ckpt!.directory != a.modelDir { ckpt = try Checkpoint(directory: a.modelDir) }
        let c = ckpt!
        if bundle == nil || bundle!.path != a.calibPath {
            bundle = try CalibrationBundle.load(path: a.calibPath, for: c.config)
        }
        // The files here must be the coordinator's: the job id is derived from their
        // content fingerprints (`JobIdentity`), so a different copy, another version or
        // another model at the same path is refused before any work.
        if verifiedJob != jobID {
            let here = JobIdentity(modelDir: a.modelDir, calibPath: a.calibPath, modelContent: try c.fingerprint(),
                                   calibContent: bundle!.fingerprint, options: a.options.canonicalText, samples: Int(a.samples))
            guard here.jobID == jobID else {
                throw WorkerError.inputs("the checkpoint \(a.modelDir) or the bundle \(a.calibPath) on \(ProcessInfo.processInfo.hostName) differs from the coordinator's (their content gives job \(here.jobID), the coordinator runs \(jobID)): give every worker the same files")
            }
            verifiedJob = jobID
        }
        guard a.firstLayer < a.endLayer, Int(a.endLayer) <= c.config.numLayers, Int(a.samples) <= bundle!.count, a.samples > 0 else {
            throw ProtocolError.malformed("assignment of layers \(a.firstLayer)..<\(a.endLayer) over \(a.samples) samples does not fit the model (\(c.config.numLayers) layers) and bundle (\(bundle!.count) samples)")
        }
        let range = Int(a.firstLayer)..<Int(a.endLayer)
        // Keep blocks already loaded; load the new ones; drop the rest.
        var nb: [Int: BackendBlock] = [:]
        for l in range where nb[l] == nil {
            if let b = blocks[l] { nb[l] = b; continue }
            nb[l] = try backend.loadBlock(DecoderBlockWeights<Float>.load(from: c, layer: l))
            c.releasePages(layer: l)   // the backend holds it now; the file's pages need not stay resident
        }
        blocks = nb
        head = a.holdsHead ? try backend.loadHead(norm: try c.tensor(c.names.finalNorm, shape: [c.config.hiddenSize]),
                                                  lmHead: try c.tensor(c.names.outputProjection, shape: [c.config.vocabSize, c.config.hiddenSize]),
                                                  eps: Float(c.config.rmsNormEps)) : nil
        c.releasePages([c.names.finalNorm, c.names.outputProjection])
        quantOptions = try a.options.quantizeOptions()
        // What the memory budget leaves once the weights, the head, one sample's working
        // set and one sample's input per layer (the backward recomputes those not kept)
        // are in: the search's chunk (a quarter of it unless --chunk-tokens says; without
        // --scratch, of what is left after two layers' inputs, which then stay in
        // memory), then block inputs (`MemoryBudget.split`, the plan's arithmetic too).
        let cfg = c.config
        let weights = nb.values.reduce(0) { $0 + $1.residentBytes }
        let lengths = bundle!.samples.prefix(Int(a.samples)).map(\.length)
        let tokens = lengths.max() ?? 0
        let stage = Double(lengths.reduce(0, +) * cfg.hiddenSize * 4)
        // GPTQ: one layer's Hessians while it is rounded, and every owned layer's codes
        // (a byte per weight) until the apply phase.
        let fixed = MemoryBudget.working(cfg, tokens: tokens) + Double(range.count * tokens * cfg.hiddenSize * 4)
            + MemoryBudget.gptqBytes(cfg, options: quantOptions, heldLayers: range.count)
        let split = MemoryBudget.split(free: max(0, Double(memoryBudget) - Double(weights) - fixed),
                                       inMemoryInputs: options.scratch == nil ? 2 * stage : 0, chunkTokens: options.chunkTokens,
                                       longest: tokens, bytesPerToken: MemoryBudget.searchBytesPerToken(cfg))
        chunkTokens = split.chunkTokens
        let budget = Int(split.inputBytes)
        inputs = ActivationStore(budgetBytes: budget, scratch: options.scratch, owner: options.workerID)
        finalHidden = []
        results = [:]
        gptqDone = [:]
        tokenNorms = [:]
        ratios = nil
        up = nil
        down = nil
        dataAuthenticator?.setAuthorized([a.upstreamCurveKey, a.downstreamCurveKey].filter { !$0.isEmpty })
        if !a.upstreamEndpoint.isEmpty { up = try dataSocket(a.upstreamEndpoint, serverKey: a.upstreamCurveKey) }
        if !a.downstreamEndpoint.isEmpty { down = try dataSocket(a.downstreamEndpoint, serverKey: a.downstreamCurveKey) }
        assignment = a
        let spill = options.scratch.map { " (block inputs past \(String(format: "%.1f", Double(budget) / 1048576)) MiB spill to \($0))" }
            ?? " (block inputs of layers past the first kept while \(String(format: "%.1f", Double(budget) / 1048576)) MiB holds them)"
        logger.info("assigned layers \(range.lowerBound)..<\(range.upperBound) (epoch \(a.epoch)) in \(String(format: "%.2f", Self.now() - t0)) s; search chunks of at most \(split.chunkTokens) tokens\(spill)")
    }

    /// A PUSH socket to a neighbour's data endpoint, CURVE when the job uses it.
    func dataSocket(_ endpoint: String, serverKey: String) throws -> ZMQSocket {
        let s = try ZMQSocket(.push)
        try s.configureForTensors()
        if let k = dataKeys {
            guard !serverKey.isEmpty else {
                throw ProtocolError.malformed("the assignment gives no CURVE key for \(endpoint) (every worker of a CURVE job has one)")
            }
            try Curve.client(s, serverKey: serverKey, publicKey: k.public, secretKey: k.secret)
        }
        try s.connect(endpoint)
        return s
    }

    var range: Range<Int> { Int(assignment.firstLayer)..<Int(assignment.endLayer) }
}
