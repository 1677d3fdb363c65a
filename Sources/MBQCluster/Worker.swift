import CZMQ
import Foundation
import Logging
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor

/// The arithmetic a worker runs, behind a small interface so that another backend
/// (CUDA) can be added without touching the protocol or the coordinator.
public protocol ComputeBackend: Sendable {
    var name: String { get }
    func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                      save: Bool, capture: Bool) -> DecoderBlockForward<Float>
    func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                       rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float>
    func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                     options: SearchOptions) -> [GroupResult]
    func measureGFLOPS() -> Double
}

public struct CPUBackend: ComputeBackend {
    public init() {}
    public var name: String { "cpu" }
    public func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                             save: Bool, capture: Bool) -> DecoderBlockForward<Float> {
        decoderBlockForward(x, weights: w, rope: rope, mask: mask, save: save, capture: capture)
    }
    public func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                              rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float> {
        decoderBlockBackward(dy, saved: saved, weights: w, rope: rope, mask: mask)
    }
    public func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                            options: SearchOptions) -> [GroupResult] {
        ScaleSearch.searchLayer(l, weights: w, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio, options: options)
    }
    public func measureGFLOPS() -> Double {
        var rng = SeededRandom(seed: 1)
        let a: Tensor<Float> = rng.normalTensor([512, 512]), b: Tensor<Float> = rng.normalTensor([512, 512])
        _ = matmul(a, b)
        let t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<4 { _ = matmul(a, b) }
        let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        return 4 * 2 * 512 * 512 * 512 / dt / 1e9
    }
}

public struct WorkerOptions: Sendable {
    public var connect: String
    public var workerID: String
    public var dataBind = "tcp://127.0.0.1:*"
    public var maxMemoryBytes: UInt64 = 20 << 30
    public var threads: Int = EngineThreads.count
    public var heartbeatInterval = 0.5
    public var coordinatorTimeout = 3.0
    public var secret: String? = nil
    /// CurveZMQ: the coordinator's public key and this worker's keypair.
    public var curve: (serverKey: String, publicKey: String, secretKey: String)? = nil

    public init(connect: String, workerID: String) {
        self.connect = connect
        self.workerID = workerID
    }
}

/// A worker process: owns a contiguous range of decoder blocks and does forward,
/// backward, search and apply for them. The control thread owns the coordinator
/// socket (heartbeats keep flowing while the compute thread works); activations and
/// gradients go straight to the neighbouring stages over their data sockets.
public final class Worker: @unchecked Sendable {
    let options: WorkerOptions
    let backend: ComputeBackend
    let logger: Logger
    let outbox = Outbox()
    let commands = CommandQueue()
    let epochLock = NSLock()
    var latestEpoch: UInt32 = 0
    var jobID = ""
    var stopped = false

    // Compute-thread state.
    var assignment = Mbq_Assignment()
    var ckpt: Checkpoint?
    var bundle: CalibrationBundle?
    var blocks: [Int: DecoderBlockWeights<Float>] = [:]
    var head: (norm: Tensor<Float>, lm: Tensor<Float>, eps: Float)?
    var inputs: [Int: [Tensor<Float>]] = [:]       // block input per owned layer per sample
    var finalHidden: [Tensor<Float>] = []
    var ratios: (attn: [Double], mlp: [Double])?
    var results: [Int: [Mbq_GroupResult]] = [:]
    var quantOptions = QuantizeOptions()
    var pull: ZMQSocket
    var up: ZMQSocket?
    var down: ZMQSocket?
    let dataEndpoint: String

    public init(options: WorkerOptions, backend: ComputeBackend = CPUBackend()) throws {
        self.options = options
        self.backend = backend
        logger = Logger(label: "mbq.worker.\(options.workerID)")
        pull = try ZMQSocket(.pull)
        try pull.setInt(ZMQ_RCVHWM, 0)
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

    /// Runs until the coordinator says shutdown (returns 0) or refuses us (returns 1).
    public func run() throws -> Int32 {
        let control = try ZMQSocket(.dealer)
        if let c = options.curve { try Curve.client(control, serverKey: c.serverKey, publicKey: c.publicKey, secretKey: c.secretKey) }
        try control.connect(options.connect)
        let gflops = backend.measureGFLOPS()
        var reg = Mbq_Register()
        reg.workerID = options.workerID
        reg.host = ProcessInfo.processInfo.hostName
        reg.maxMemoryBytes = options.maxMemoryBytes
        reg.threads = UInt32(options.threads)
        reg.gemmGflops = gflops
        reg.dataEndpoint = dataEndpoint
        reg.backend = backend.name
        if let s = options.secret { reg.authToken = Data(Auth.token(secret: s, workerID: options.workerID)) }
        let compute = Thread { [self] in computeLoop() }
        compute.stackSize = 16 << 20
        compute.start()
        var lastRegister = -Double.infinity, lastHeartbeat = 0.0, lastHeard = Self.now()
        var registered = false
        while true {
            let now = Self.now()
            if !registered || now - lastHeard > options.coordinatorTimeout {
                if now - lastRegister > options.coordinatorTimeout {
                    if registered { logger.warning("coordinator silent for \(String(format: "%.1f", now - lastHeard)) s: registering again") }
                    try control.send(try Wire.encode(Wire.envelope(job: jobID, .register(reg))))
                    lastRegister = now
                    registered = true
                    lastHeard = now
                }
            }
            if now - lastHeartbeat > options.heartbeatInterval {
                var hb = Mbq_Heartbeat()
                hb.workerID = options.workerID
                try control.send(try Wire.encode(Wire.envelope(job: jobID, .heartbeat(hb))))
                lastHeartbeat = now
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
            lastHeard = Self.now()
            if jobID.isEmpty { jobID = m.envelope.jobID }
            switch m.envelope.body {
            case let .heartbeat(h):
                if h.phase == "register-again" && now - lastRegister > 0.5 {
                    logger.info("coordinator does not know this worker (restarted?): registering again")
                    registered = false
                    lastRegister = -Double.infinity
                }
            case let .refused(r):
                logger.error("refused by the coordinator: \(r.reason)")
                return 1
            case .shutdown:
                logger.info("shutdown")
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
        case let .ratios(r): ratios = (r.attn, r.mlp)
        case let .groupResult(g): results[Int(g.layer), default: []].append(g)
        case let .runPhase(p):
            guard p.epoch == assignment.epoch, p.epoch == currentEpoch else { return }
            try testDelay(p.phase)
            let t0 = Self.now()
            var moved: UInt64 = 0
            var transfer = 0.0
            switch p.phase {
            case "forward": (moved, transfer) = try forward()
            case "backward": (moved, transfer) = try backward()
            case "search": try search(skip: Set(p.skipLayers.map(Int.init)))
            case "apply": try apply(); return
            default: throw ProtocolError.malformed("unknown phase '\(p.phase)'")
            }
            var d = Mbq_PhaseDone()
            d.phase = p.phase
            d.epoch = p.epoch
            d.seconds = Self.now() - t0
            d.bytesMoved = moved
            d.transferSeconds = transfer
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
            bundle = try CalibrationBundle.load(path: a.calibPath, hiddenSize: c.config.hiddenSize, vocabSize: c.config.vocabSize,
                                                positionRows: c.config.mropeSection == nil ? 1 : 3)
        }
        let range = Int(a.firstLayer)..<Int(a.endLayer)
        // Keep blocks already loaded; load the new ones; drop the rest.
        var nb: [Int: DecoderBlockWeights<Float>] = [:]
        for l in range { nb[l] = try blocks[l] ?? DecoderBlockWeights<Float>.load(from: c, layer: l) }
        blocks = nb
        head = a.holdsHead ? (try c.tensor(c.names.finalNorm, shape: [c.config.hiddenSize]),
                              try c.tensor(c.names.outputProjection, shape: [c.config.vocabSize, c.config.hiddenSize]),
                              Float(c.config.rmsNormEps)) : nil
        quantOptions = try QuantizeOptionsCodec.decode(a.optionsJson)
        inputs = [:]
        finalHidden = []
        results = [:]
        ratios = nil
        up = nil
        down = nil
        if !a.upstreamEndpoint.isEmpty {
            let s = try ZMQSocket(.push)
            try s.setInt(ZMQ_SNDHWM, 0)
            try s.connect(a.upstreamEndpoint)
            up = s
        }
        if !a.downstreamEndpoint.isEmpty {
            let s = try ZMQSocket(.push)
            try s.setInt(ZMQ_SNDHWM, 0)
            try s.connect(a.downstreamEndpoint)
            down = s
        }
        assignment = a
        logger.info("assigned layers \(range.lowerBound)..<\(range.upperBound) (epoch \(a.epoch)) in \(String(format: "%.2f", Self.now() - t0)) s")
    }

    var range: Range<Int> { Int(assignment.firstLayer)..<Int(assignment.endLayer) }

    func rope(_ s: CalibrationSample) -> RoPETable<Float> {
        let cfg = ckpt!.config
        return RoPETable(positions: s.positions, headDim: cfg.headDim, theta: cfg.ropeTheta, mropeSection: cfg.mropeSection)
    }

    /// Waits for tensor `name` of the current epoch on the data socket.
    /// -> the tensor and the seconds spent moving it (taking it off the socket and
    /// checking it; time waiting for the upstream stage to compute is not counted).
    func receive(_ name: String, what: String) throws -> (Tensor<Float>, Double) {
        while true {
            if currentEpoch != assignment.epoch { throw Aborted(what: what) }
            guard let raw = try pull.receiveRaw(timeoutMs: 200, maxFrameBytes: maxFrameBytes) else { continue }
            let t0 = Self.now()
            let m = try Wire.decode(raw)
            let moving = pull.lastReceiveSeconds + (Self.now() - t0)
            guard case let .tensor(h) = m.envelope.body, let t = m.tensor else { continue }
            if h.epoch != assignment.epoch { continue }  // stale traffic from an earlier plan
            guard h.name == name else { throw ProtocolError.tensor(name: h.name, reason: "expected '\(name)'") }
            return (t, moving)
        }
    }

    func send(_ sock: ZMQSocket, _ name: String, _ t: Tensor<Float>) throws -> (UInt64, Double) {
        let t0 = Self.now()
        try Wire.send(sock, job: jobID, name: name, tensor: t, epoch: assignment.epoch)
        return (UInt64(t.count * 4), Self.now() - t0)
    }

    /// The calibration samples of this job (the first `assignment.samples` of the bundle).
    var samples: [CalibrationSample] { Array(bundle!.samples.prefix(Int(assignment.samples))) }

    func forward() throws -> (UInt64, Double) {
        let samples = self.samples
        var moved: UInt64 = 0, transfer = 0.0
        for l in range { inputs[l] = [] }
        finalHidden = []
        for (s, sample) in samples.enumerated() {
            var x: Tensor<Float>
            if range.lowerBound == 0 {
                x = sample.embeds
            } else {
                let (t, dt) = try receive("act/\(s)", what: "forward")
                x = t
                transfer += dt
            }
            let r = rope(sample)
            for l in range {
                inputs[l]!.append(x)
                x = backend.blockForward(x, blocks[l]!, rope: r, mask: sample.attention, save: false, capture: false).output
                guard allFinite(x) else { throw ModelError.nonFinite(what: "block output", layer: l) }
            }
            if let down {
                let (b, dt) = try send(down, "act/\(s)", x)
                moved += b; transfer += dt
            } else {
                finalHidden.append(x)
            }
        }
        return (moved, transfer)
    }

    /// A sample enters the statistics when it has vision and caption positions and at
    /// least one caption token is predicted (as GradientStatistics.compute decides).
    static func usable(_ s: CalibrationSample) -> String? {
        let vis = zip(s.vision, s.attention).contains { $0 && $1 }
        let cap = zip(s.caption, s.attention).contains { $0 && $1 }
        if !vis { return "no vision positions" }
        if !cap { return "no caption positions" }
        if !(0..<max(0, s.length - 1)).contains(where: { s.labels[$0 + 1] != -100 }) { return "no caption token is predicted" }
        return nil
    }

    func backward() throws -> (UInt64, Double) {
        let samples = self.samples
        var moved: UInt64 = 0, transfer = 0.0
        var sums = [Int: GradientStatistics.Layer]()
        for l in range { sums[l] = GradientStatistics.Layer() }
        var used = 0
        var skipped: [String] = []
        for (s, sample) in samples.enumerated() {
            if let why = Self.usable(sample) { skipped.append("sample \(s): \(why)"); continue }
            used += 1
            var dy: Tensor<Float>
            if let h = head {
                let f = lossHeadForward(finalHidden[s], norm: h.norm, lmHead: h.lm, labels: sample.labels, eps: h.eps)
                dy = lossHeadBackward(saved: f.saved, norm: h.norm, lmHead: h.lm)
            } else {
                let (t, dt) = try receive("grad/\(s)", what: "backward")
                dy = t
                transfer += dt
            }
            let r = rope(sample)
            let vis = zip(sample.vision, sample.attention).map { $0 && $1 }
            let cap = zip(sample.caption, sample.attention).map { $0 && $1 }
            for l in range.reversed() {
                let f = backend.blockForward(inputs[l]![s], blocks[l]!, rope: r, mask: sample.attention, save: true, capture: false)
                let g = backend.blockBackward(dy, f.saved!, blocks[l]!, rope: r, mask: sample.attention)
                sums[l]!.accumulate(attentionGrad: g.attentionOutput, mlpGrad: g.mlpOutput, vision: vis, caption: cap)
                dy = g.input
            }
            if let up {
                let (b, dt) = try send(up, "grad/\(s)", dy)
                moved += b; transfer += dt
            }
        }
        for l in range {
            var st = Mbq_LayerStats()
            st.layer = UInt32(l)
            st.attnVis = sums[l]!.attnVis; st.attnCap = sums[l]!.attnCap; st.mlpVis = sums[l]!.mlpVis; st.mlpCap = sums[l]!.mlpCap
            st.samples = UInt32(used)
            st.skipped = skipped
            st.epoch = assignment.epoch
            post(.layerStats(st))
        }
        return (moved, transfer)
    }

    func search(skip: Set<Int>) throws {
        let samples = self.samples
        let opts = quantOptions.searchOptions
        for l in range where !skip.contains(l) {
            if currentEpoch != assignment.epoch { throw Aborted(what: "search") }
            try testDelay("search")
            logger.info("searching layer \(l)")
            var layerSamples: [LayerSample] = []
            for (s, sample) in samples.enumerated() {
                let r = rope(sample)
                let f = backend.blockForward(inputs[l]![s], blocks[l]!, rope: r, mask: sample.attention, save: false, capture: true)
                layerSamples.append(LayerSample(captures: f.captures!, rope: r, attention: sample.attention,
                                                vision: sample.vision, caption: sample.caption))
            }
            let ar = ratios?.attn[l] ?? 1, mr = ratios?.mlp[l] ?? 1
            for g in backend.searchLayer(l, blocks[l]!, samples: layerSamples, attnRatio: ar, mlpRatio: mr, options: opts) {
                var m = Mbq_GroupResult()
                m.layer = UInt32(g.layer); m.group = g.group.rawValue; m.bestIdx = UInt32(g.bestIndex)
                m.alpha = g.alpha; m.loss = g.losses; m.ratio = g.ratio; m.scales = g.scales
                m.epoch = assignment.epoch
                post(.groupResult(m))
            }
        }
    }

    func apply() throws {
        for l in range {
            var w = blocks[l]!
            for g in results[l] ?? [] {
                guard let group = SearchGroup(rawValue: g.group) else { throw ProtocolError.malformed("unknown group '\(g.group)'") }
                ApplyScales.apply(group, scales: g.scales, to: &w)
            }
            ApplyScales.quantizeLinears(&w, with: quantOptions.weightQuantizer)
            for (role, t) in BlockTensors.roles(w) {
                outbox.post(try Wire.encode(job: jobID, name: "block/\(l)/\(role)", tensor: t, epoch: assignment.epoch))
            }
        }
    }
}

/// Block tensors by role, for the apply phase's transfer.
public enum BlockTensors {
    public static func roles(_ w: DecoderBlockWeights<Float>) -> [(String, Tensor<Float>)] {
        var r: [(String, Tensor<Float>)] = [("input_norm", w.inputNorm), ("post_norm", w.postAttentionNorm), ("q", w.q), ("k", w.k),
                                            ("v", w.v), ("o", w.o), ("gate", w.gate), ("up", w.up), ("down", w.down)]
        if let b = w.qBias { r.append(("q_bias", b)) }
        if let b = w.kBias { r.append(("k_bias", b)) }
        if let b = w.vBias { r.append(("v_bias", b)) }
        if let b = w.oBias { r.append(("o_bias", b)) }
        return r
    }

    /// Rebuilds a block from its role tensors.
    public static func block(_ t: [String: Tensor<Float>], shape: AttentionShape, eps: Double) -> DecoderBlockWeights<Float> {
        DecoderBlockWeights(inputNorm: t["input_norm"]!, postAttentionNorm: t["post_norm"]!, q: t["q"]!, k: t["k"]!, v: t["v"]!,
                            o: t["o"]!, qBias: t["q_bias"], kBias: t["k_bias"], vBias: t["v_bias"], oBias: t["o_bias"],
                            gate: t["gate"]!, up: t["up"]!, down: t["down"]!, shape: shape, rmsNormEps: eps)
    }
}
