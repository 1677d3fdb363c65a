import Foundation
import MBQCluster
import MBQCoordinator
import MBQMessages
import MBQMethods
import MBQTensor
import MBQWire
import MBQWorker
import XCTest

/// The coordinator's state machine without sockets: messages and clock in, directives out.
final class CoordinatorStateTests: XCTestCase {
    static func spec(workers: Int, layers: Int = 4) -> JobSpec {
        JobSpec(jobID: "job", modelDir: "/m", calibPath: "/c", options: Mbq_JobOptions(), layers: layers, samples: 2,
                needsStats: true, needsForward: true, groupsPerLayer: 3, expectedWorkers: workers)
    }

    static func register(_ id: String, gflops: Double = 100, token: [UInt8] = []) -> Mbq_Envelope {
        var r = Mbq_Register()
        r.workerID = id
        r.gemmGflops = gflops
        r.dataEndpoint = "tcp://127.0.0.1:\(id.count)"
        r.authToken = Data(token)
        return Wire.envelope(job: "", .register(r))
    }

    func msg(_ e: Mbq_Envelope) -> WireMessage { WireMessage(envelope: e, tensor: nil) }

    func sends(_ d: [Directive]) -> [(identity: [UInt8], body: Mbq_Envelope.OneOf_Body)] {
        d.compactMap { if case let .send(i, e) = $0 { return (i, e.body!) } else { return nil } }
    }

    func events(_ d: [Directive]) -> [CoordinatorEvent] { d.compactMap { if case let .event(e) = $0 { return e } else { return nil } } }

    func done(_ phase: String, epoch: UInt32) -> Mbq_Envelope {
        var p = Mbq_PhaseDone()
        p.phase = CoordinatorPhase(rawValue: phase)?.wire ?? .unspecified
        p.epoch = epoch
        return Wire.envelope(job: "job", .phaseDone(p))
    }

    func testPlanWaitsForWorkersThenRunsPhasesInOrder() {
        let s = CoordinatorState(spec: Self.spec(workers: 2))
        XCTAssertTrue(sends(s.handle(identity: [1], msg(Self.register("a")), now: 0)).isEmpty, "waits for the second worker")
        let d = sends(s.handle(identity: [2], msg(Self.register("b")), now: 0))
        XCTAssertEqual(s.phase, .forward)
        XCTAssertEqual(s.plan.map(\.range), [0..<2, 2..<4])
        let assignments = d.compactMap { if case let .assignment(a) = $0.body { return a } else { return nil } }
        XCTAssertEqual(assignments.count, 2)
        XCTAssertEqual(assignments[0].downstreamEndpoint, "tcp://127.0.0.1:1")
        XCTAssertTrue(assignments[1].holdsHead)
        _ = s.handle(identity: [1], msg(done("forward", epoch: s.epoch)), now: 1)
        XCTAssertEqual(s.phase, .forward)
        _ = s.handle(identity: [2], msg(done("forward", epoch: s.epoch)), now: 1)
        XCTAssertEqual(s.phase, .backward)
        // Stale completions are dropped.
        _ = s.handle(identity: [1], msg(done("backward", epoch: s.epoch - 1)), now: 2)
        for l in 0..<4 {
            var st = Mbq_LayerStats()
            st.layer = UInt32(l); st.attnVis = 1; st.attnCap = 2; st.mlpVis = Double(l); st.mlpCap = 1; st.samples = 2
            st.epoch = s.epoch
            _ = s.handle(identity: [l < 2 ? 1 : 2], msg(Wire.envelope(job: "job", .layerStats(st))), now: 2)
        }
        _ = s.handle(identity: [1], msg(done("backward", epoch: s.epoch)), now: 2)
        XCTAssertEqual(s.phase, .backward)
        let toSearch = s.handle(identity: [2], msg(done("backward", epoch: s.epoch)), now: 2)
        XCTAssertEqual(s.phase, .search)
        XCTAssertEqual(s.stats?.layers.map(\.mlpRatio), [1.5, 1.5, 2, 3], "median clamp over layers")
        XCTAssertEqual(sends(toSearch).filter { if case .ratios = $0.body { return true } else { return false } }.count, 2)
    }

    func testLostWorkerTriggersReplanOnSurvivors() {
        let s = CoordinatorState(spec: Self.spec(workers: 2))
        _ = s.handle(identity: [1], msg(Self.register("a")), now: 0)
        _ = s.handle(identity: [2], msg(Self.register("b")), now: 0)
        let e1 = s.epoch
        // Only "a" keeps talking.
        for t in stride(from: 0.5, through: 2.5, by: 0.5) {
            _ = s.handle(identity: [1], msg(Wire.envelope(job: "job", .heartbeat(Mbq_Heartbeat()))), now: t)
            _ = s.tick(now: t)
        }
        XCTAssertEqual(s.epoch, e1)
        _ = s.handle(identity: [1], msg(Wire.envelope(job: "job", .heartbeat(Mbq_Heartbeat()))), now: 3.4)
        let d = s.tick(now: 3.5)
        XCTAssertEqual(s.epoch, e1 + 1)
        XCTAssertEqual(s.plan.map(\.worker), ["a"])
        XCTAssertEqual(s.plan.map(\.range), [0..<4])
        XCTAssertEqual(s.phase, .forward)
        XCTAssertTrue(events(d).contains { if case .workerLost(worker: "b", _, _) = $0 { return true } else { return false } }, "\(events(d))")
        XCTAssertEqual(s.workers["b"]?.liveness, .lost)
        XCTAssertEqual(s.workers["a"]?.liveness, .alive)
        // The lost worker's next message is answered with a request to register again.
        let again = sends(s.handle(identity: [2], msg(Wire.envelope(job: "job", .heartbeat(Mbq_Heartbeat()))), now: 3.55))
        XCTAssertEqual(again.count, 1)
        XCTAssertTrue(again.allSatisfy { if case .registerAgain = $0.body { return true } else { return false } }, "\(again)")
        // A newly joined worker waits as a spare until the next plan.
        _ = s.handle(identity: [3], msg(Self.register("c")), now: 3.6)
        XCTAssertEqual(s.plan.map(\.worker), ["a"])
        // Everyone lost: wait for anyone, then plan on whoever comes.
        _ = s.tick(now: 10)
        XCTAssertEqual(s.phase, .waiting)
        _ = s.handle(identity: [4], msg(Self.register("d")), now: 10.1)
        XCTAssertEqual(s.phase, .forward)
        XCTAssertEqual(s.plan.map(\.worker), ["d"])
    }

    func testFinishedLayersAreNotSearchedAgainAfterResume() {
        var g = Mbq_GroupResult()
        g.layer = 1; g.group = .qkv
        let s = CoordinatorState(spec: Self.spec(workers: 1, layers: 3), resumed: (stats: nil, results: [1: LayerResults(groups: [g, g, g])]), epochBase: 1000)
        let d = sends(s.handle(identity: [1], msg(Self.register("a")), now: 0))
        XCTAssertEqual(s.epoch, 1001)
        // The resumed job is planned whole (its finished layer is still held, for apply).
        let a = d.compactMap { if case let .assignment(a) = $0.body { return a } else { return nil } }
        XCTAssertEqual(a.map { [$0.firstLayer, $0.endLayer] }, [[0, 3]])
        XCTAssertEqual(a.first?.epoch, 1001)
        _ = s.handle(identity: [1], msg(done("forward", epoch: s.epoch)), now: 1)
        XCTAssertEqual(s.phase, .backward, "statistics were not journaled: recomputed")
        for l in 0..<3 {
            var st = Mbq_LayerStats()
            st.layer = UInt32(l); st.attnVis = 1; st.attnCap = 1; st.mlpVis = 1; st.mlpCap = 1; st.samples = 1; st.epoch = s.epoch
            _ = s.handle(identity: [1], msg(Wire.envelope(job: "job", .layerStats(st))), now: 1)
        }
        let toSearch = sends(s.handle(identity: [1], msg(done("backward", epoch: s.epoch)), now: 1))
        let run = toSearch.compactMap { if case let .runPhase(r) = $0.body { return r } else { return nil } }.first!
        XCTAssertEqual(run.skipLayers, [1])
        // A late result for a finished layer is ignored.
        var late = g
        late.epoch = s.epoch
        let logs = s.handle(identity: [1], msg(Wire.envelope(job: "job", .groupResult(late))), now: 2)
        XCTAssertTrue(events(logs).contains { if case let .messageDropped(_, _, reason) = $0 { return reason.contains("finished already") } else { return false } })
    }

    /// Shared secret: a registration is answered with a challenge; only the answer to
    /// that connection's current nonce, under the right secret and for this job, is
    /// accepted, once. A recorded registration replayed (on its connection or another)
    /// gets a fresh challenge, never a place in the plan.
    func testSharedSecretChallengeCannotBeReplayed() {
        var counter: UInt8 = 0
        let s = CoordinatorState(spec: Self.spec(workers: 2), secret: "k") { counter += 1; return [counter, 7, 7, 7] }
        func challenge(_ d: [Directive]) -> [UInt8]? {
            for x in sends(d) { if case let .challenge(c) = x.body { return Array(c.nonce) } }
            return nil
        }
        func refused(_ d: [Directive]) -> Bool { sends(d).contains { if case .refused = $0.body { return true } else { return false } } }
        func answer(_ id: String, secret: String, job: String = "job", nonce: [UInt8]) -> Mbq_Envelope {
            var e = Self.register(id, token: Auth.token(secret: secret, jobID: job, workerID: id, nonce: nonce))
            if case var .register(r) = e.body { r.nonce = Data(nonce); e.body = .register(r) }
            return e
        }
        // Without a token: a challenge, nothing registered.
        let n1 = challenge(s.handle(identity: [9], msg(Self.register("evil")), now: 0))
        XCTAssertEqual(n1, [1, 7, 7, 7])
        XCTAssertTrue(s.workers.isEmpty)
        // The wrong secret: refused.
        XCTAssertTrue(refused(s.handle(identity: [9], msg(answer("evil", secret: "wrong", nonce: n1!)), now: 0)))
        // The right secret for another job: refused.
        let n2 = challenge(s.handle(identity: [8], msg(Self.register("other")), now: 0))!
        XCTAssertTrue(refused(s.handle(identity: [8], msg(answer("other", secret: "k", job: "another-job", nonce: n2)), now: 0)))
        // The right answer: registered.
        let n3 = challenge(s.handle(identity: [1], msg(Self.register("good")), now: 0))!
        let recorded = answer("good", secret: "k", nonce: n3)
        _ = s.handle(identity: [1], msg(recorded), now: 0)
        XCTAssertEqual(s.workers.keys.sorted(), ["good"])
        // The recorded registration replayed from another connection, then from the
        // same one: each time a new nonce, never accepted.
        let r1 = s.handle(identity: [5], msg(recorded), now: 1)
        XCTAssertNotNil(challenge(r1)); XCTAssertNotEqual(challenge(r1), n3)
        let r2 = s.handle(identity: [1], msg(recorded), now: 1)
        XCTAssertNotNil(challenge(r2))
        XCTAssertEqual(s.workers.keys.sorted(), ["good"])
        XCTAssertEqual(s.phase, .waiting, "one worker of two: the replay did not count as the second")
        // A second honest worker completes the plan.
        let n4 = challenge(s.handle(identity: [2], msg(Self.register("good2")), now: 2))!
        _ = s.handle(identity: [2], msg(answer("good2", secret: "k", nonce: n4)), now: 2)
        XCTAssertEqual(s.phase, .forward)
        XCTAssertEqual(s.plan.map(\.worker), ["good", "good2"])
    }

    func testPlanKeepsWithinMemoryBudgets() {
        // Speed alone would give "fast" 60 layers; its memory holds 40.
        let p = Planner.plan(layers: 80, workers: [("fast", 300, 40), ("slow", 100, 80)])!
        XCTAssertEqual(p.map(\.range), [0..<40, 40..<80])
        // Three equal workers, the middle one holding 1 layer: the others share the rest.
        let q = Planner.plan(layers: 9, workers: [("a", 1, 9), ("b", 1, 1), ("c", 1, 9)])!
        XCTAssertEqual(q.map(\.range.count), [4, 1, 4])
        // A worker that holds nothing is left out; too little memory overall is nil.
        XCTAssertEqual(Planner.plan(layers: 4, workers: [("a", 1, 0), ("b", 1, 4)])!.map(\.worker), ["b"])
        XCTAssertNil(Planner.plan(layers: 5, workers: [("a", 1, 2), ("b", 1, 2)]))
        // Within budgets the plan is the speed-proportional one.
        XCTAssertEqual(Planner.plan(layers: 80, workers: [("fast", 300, 80), ("slow", 100, 80)])!.map(\.range), [0..<60, 60..<80])
        let needs = MemoryNeeds(layerWeightBytes: 100, stageInputBytes: 50, fixedBytes: 1000, chunkBytesPerToken: 1, longestTokens: 1)
        XCTAssertEqual(needs.capacity(memory: 1000 + 450, spills: false, layers: 10), 3)
        XCTAssertEqual(needs.capacity(memory: 1000 + 450, spills: true, layers: 10), 4)
        XCTAssertEqual(needs.capacity(memory: 900, spills: true, layers: 10), 0)
        // Inputs kept from forward to backward: what is left past the weights, the fixed
        // part and the search's default chunk (a quarter of what two layers' inputs leave).
        XCTAssertEqual(needs.inputLayersKept(memory: 1450, layers: 3, spills: false), 2)  // 151 free, 12-token chunk
        XCTAssertEqual(needs.inputLayersKept(memory: 1450, layers: 3, spills: true), 3)
        XCTAssertEqual(needs.inputLayersKept(memory: 2000, layers: 3, spills: false), 3)
        XCTAssertEqual(needs.inputLayersKept(memory: 1300, layers: 3, spills: false), 1, "the first layer's inputs always")
    }

    func testCoordinatorWaitsUntilTheWorkersHoldTheModel() {
        var spec = Self.spec(workers: 2, layers: 4)
        spec.memory = MemoryNeeds(layerWeightBytes: 100, stageInputBytes: 0, fixedBytes: 0)
        let st = CoordinatorState(spec: spec)
        func reg(_ id: String) -> Mbq_Envelope {
            var e = Self.register(id)
            if case var .register(r) = e.body { r.maxMemoryBytes = 150; e.body = .register(r) }
            return e
        }
        _ = st.handle(identity: [1], msg(reg("a")), now: 0)
        let d = st.handle(identity: [2], msg(reg("b")), now: 0)
        XCTAssertEqual(st.phase, .waiting)
        XCTAssertTrue(events(d).contains { if case .waitingForMemory(_, _, 2, 4, _, _, _) = $0 { return true } else { return false } }, "\(events(d))")
        XCTAssertTrue(sends(d).isEmpty, "no assignment while the model does not fit")
        _ = st.handle(identity: [3], msg(reg("c")), now: 0)
        let e = st.handle(identity: [4], msg(reg("d")), now: 0)
        XCTAssertEqual(st.phase, .forward)
        XCTAssertEqual(st.plan.map(\.range), [0..<1, 1..<2, 2..<3, 3..<4], "\(events(e))")
    }

    /// Through the state machine: workers that register with different measured GEMM
    /// rates get layer ranges in proportion, and never more stages than layers.
    func testPlanFollowsMeasuredSpeed() {
        let st = CoordinatorState(spec: Self.spec(workers: 2, layers: 8))
        _ = st.handle(identity: [1], msg(Self.register("fast", gflops: 300)), now: 0)
        _ = st.handle(identity: [2], msg(Self.register("slow", gflops: 100)), now: 0)
        XCTAssertEqual(st.phase, .forward)
        XCTAssertEqual(st.plan.map(\.worker), ["fast", "slow"])
        XCTAssertEqual(st.plan.map(\.range), [0..<6, 6..<8], "3:1 speeds, 6:2 layers")
        let few = CoordinatorState(spec: Self.spec(workers: 3, layers: 2))
        for (i, id) in ["a", "b", "c"].enumerated() { _ = few.handle(identity: [UInt8(i)], msg(Self.register(id)), now: 0) }
        XCTAssertEqual(few.plan.map(\.range), [0..<1, 1..<2], "never more stages than layers")
    }
}

final class JournalTests: XCTestCase {
    func testRoundTripAndTornWriteDetection() throws {
        let dir = NSTemporaryDirectory() + "mbq-journal-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var sums: [GradientStatistics.Layer] = []
        for v in [0.0, 0.25, 1.5] {
            var l = GradientStatistics.Layer()
            l.attnVis = v; l.attnCap = 1; l.mlpVis = 0.1; l.mlpCap = 0.3
            sums.append(l)
        }
        let stats = GradientStatistics.finalize(sums: sums, used: 1, skipped: ["sample 3: no vision positions"])
        var g = Mbq_GroupResult()
        g.layer = 2; g.group = .down; g.bestIdx = 7; g.alpha = 0.35; g.loss = [0.5, 0.25, 0]; g.ratio = 0.3
        g.scales = [1.5, 0.1, 3e-5]
        let reports = ApplyScales.linears.enumerated().map { i, l in
            GPTQLinearReport(layer: 2, role: l.role, tokens: 40 + i, errorBefore: 0.1 / Double(i + 3), errorAfter: 1e-3 * Double(i))
        }
        let report = Mbq_GptqReport(layer: 2, reports, epoch: 3)
        try Journal.write(Journal.Contents(jobID: "j", stats: stats, results: [2: LayerResults(groups: [g], gptq: report)], epoch: 3), jobDir: dir)
        let r = try Journal.read(jobDir: dir)
        XCTAssertEqual(r.jobID, "j")
        XCTAssertEqual(r.epoch, 3)
        XCTAssertEqual(r.stats?.layers, stats.layers)
        XCTAssertEqual(r.stats?.skipped, stats.skipped)
        XCTAssertEqual(r.results[2]?.groups.first?.scales, g.scales)
        XCTAssertEqual(r.results[2]?.groups.first?.loss, g.loss)
        XCTAssertEqual(r.results[2]?.groups.first?.bestIdx, 7)
        XCTAssertEqual(r.results[2]?.groups.first?.group, .down)
        XCTAssertEqual(try r.results[2]?.gptq?.reports(), reports, "the GPTQ report round-trips bit for bit")
        // A torn write (the file cut short) and an edited one are both refused.
        let path = Journal.path(dir)
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try Journal.read(jobDir: dir)) { e in XCTAssert("\(e)".contains("torn"), "\(e)") }
        var text = String(decoding: data, as: UTF8.self)
        text = text.replacingOccurrences(of: "down", with: "qkv")
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try Journal.read(jobDir: dir)) { e in XCTAssert("\(e)".contains("checksum mismatch"), "\(e)") }
    }
}

/// The cost model's arithmetic (its calibration is shown by `mbq bench --cluster`).
final class CostModelTests: XCTestCase {
    func testWorkersOnOneHostShareItsCores() {
        let a = CostModel.Worker(gflops: 100, memoryBytes: 0, host: "h", threads: 1, cores: 1)
        let b = CostModel.Worker(gflops: 100, memoryBytes: 0, host: "h", threads: 1, cores: 1)
        let c = CostModel.Worker(gflops: 100, memoryBytes: 0, host: "other", threads: 1, cores: 1)
        // Two 1 s jobs on one core: 2 s; on two hosts: 1 s; 1 s + 3 s on one core: 4 s.
        XCTAssertEqual(CostModel.makespan([a, b], work: [1, 1]), 2, accuracy: 1e-9)
        XCTAssertEqual(CostModel.makespan([a, c], work: [1, 1]), 1, accuracy: 1e-9)
        XCTAssertEqual(CostModel.makespan([a, b], work: [1, 3]), 4, accuracy: 1e-9)
        // Three one-thread workers on two cores: each at 2/3 while all are busy.
        let three = [a, b, b].map { w -> CostModel.Worker in var w = w; w.cores = 2; return w }
        // Until 1.5 s all run at 2/3 (the third has done 1 of 2), then it runs alone.
        XCTAssertEqual(CostModel.makespan(three, work: [1, 1, 2]), 1.5 + 1, accuracy: 1e-9)
    }

    func testGEMMRateFollowsTheMeasuredCurveBySize() {
        let w = CostModel.Worker(gflops: 100, memoryBytes: 0, rates: [10, 20, 40, 80, 100])
        XCTAssertEqual(w.rate(64, 64, 64), 10, accuracy: 1e-9)
        XCTAssertEqual(w.rate(256, 256, 256), 40, accuracy: 1e-9)
        XCTAssertEqual(w.rate(8, 8, 8), 10, accuracy: 1e-9, "below the curve: its first point")
        XCTAssertEqual(w.rate(4096, 4096, 4096), 100, accuracy: 1e-9, "above: its last")
        XCTAssertEqual(w.rate(181.02, 181.02, 181.02), 40 / 2.squareRoot(), accuracy: 0.01, "log-log halfway between 128 and 256")
    }

    func testPhasesScaleWithTheWork() {
        let shape = CostModel.presets["llama-7b"]!
        let w = CostModel.Worker(gflops: 250, memoryBytes: 64e9, threads: 2)
        var load = CostModel.Workload(samples: 8, tokens: 2048)
        load.lossRowFraction = 0.6
        // Without the assignment's loading, which does not depend on the samples (below).
        var m = CostModel()
        m.loadSecondsPerWeight = 0
        let one = m.predict(shape, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9)
        load.samples = 16
        let two = m.predict(shape, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9)
        let s1 = Dictionary(uniqueKeysWithValues: one.seconds.map { ($0.phase, $0.seconds) })
        let s2 = Dictionary(uniqueKeysWithValues: two.seconds.map { ($0.phase, $0.seconds) })
        XCTAssertEqual(s2["forward"]! / s1["forward"]!, 2, accuracy: 0.01, "forward is linear in samples")
        XCTAssertGreaterThan(s1["backward"]!, 2 * s1["forward"]!, "backward recomputes and differentiates")
        XCTAssertGreaterThan(s1["search"]!, 15 * s1["forward"]!, "21 evaluations per group")
        // Four workers: every phase shorter, the search about four times.
        let four = m.predict(shape, workers: Array(repeating: w, count: 4), workload: load, bandwidthBytesPerSecond: 1e9)
        let s4 = Dictionary(uniqueKeysWithValues: four.seconds.map { ($0.phase, $0.seconds) })
        XCTAssertEqual(s2["search"]! / s4["search"]!, 4, accuracy: 0.1)
        XCTAssertLessThan(s4["forward"]!, s2["forward"]!)
        XCTAssertEqual(four.plan.map(\.count), [8, 8, 8, 8])
        // A worker that keeps only some layers' inputs recomputes the others in the
        // backward, one block forward each; with --scratch it keeps them all.
        let needs = MemoryNeeds(shape: shape, inputRows: 16 * 2048, tokens: 2048, weightBytes: 2)
        var small = w
        small.memoryBytes = 20e9
        XCTAssertEqual(needs.inputLayersKept(memory: w.memoryBytes, layers: 32, spills: false), 32)
        let kept = needs.inputLayersKept(memory: small.memoryBytes, layers: 32, spills: false)
        XCTAssertLessThan(kept, 32)
        let tight = m.predict(shape, workers: [small], workload: load, bandwidthBytesPerSecond: 1e9, memory: needs)
        let st = Dictionary(uniqueKeysWithValues: tight.seconds.map { ($0.phase, $0.seconds) })
        XCTAssertEqual(st["backward"]! - s2["backward"]!, Double(32 - kept) * s2["forward"]! / 32, accuracy: s2["forward"]! * 0.01)
        var spilling = small
        spilling.spills = true
        let spilled = m.predict(shape, workers: [spilling], workload: load, bandwidthBytesPerSecond: 1e9, memory: needs)
        XCTAssertEqual(spilled.seconds.first { $0.phase == "backward" }!.seconds, s2["backward"]!, accuracy: 1e-9)
        // Loading the blocks and the head at assignment adds to the forward, seconds per
        // weight; bf16-held blocks are widened when used after another
        // block: once per layer and sample in the forward, once per differentiated (and
        // per recomputed) layer in the backward, and a stage of one layer keeps its one.
        let loaded = CostModel().predict(shape, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9)
        let weights = 32 * shape.paramsPerLayer + Double(shape.vocab * shape.hidden)
        XCTAssertEqual(loaded.seconds[0].seconds - s2["forward"]!, weights * CostModel().loadSecondsPerWeight, accuracy: 1e-6)
        load.weightBytes = 2
        let held = m.predict(shape, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9)
        let sh = Dictionary(uniqueKeysWithValues: held.seconds.map { ($0.phase, $0.seconds) })
        let widen = shape.paramsPerLayer * m.widenSecondsPerWeight
        XCTAssertGreaterThan(widen, 0)
        XCTAssertEqual(sh["forward"]! - s2["forward"]!, 16 * 32 * widen, accuracy: 1e-6)
        XCTAssertEqual(sh["backward"]! - s2["backward"]!, 16 * 32 * widen, accuracy: 1e-6)
        let oneLayer = CostModel.Shape(layers: 1, hidden: shape.hidden, intermediate: shape.intermediate, heads: shape.heads,
                                       kvHeads: shape.kvHeads, headDim: shape.headDim, vocab: shape.vocab)
        load.weightBytes = 4
        let fp32 = m.predict(oneLayer, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9).seconds
        load.weightBytes = 2
        let bf16 = m.predict(oneLayer, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9).seconds
        XCTAssertEqual(bf16[0].seconds - fp32[0].seconds, widen, accuracy: 1e-9, "one layer: widened once, on its first use")
        XCTAssertEqual(Array(bf16.dropFirst().map(\.seconds)), Array(fp32.dropFirst().map(\.seconds)), "and kept for every later use")
        // A worker whose loops run at twice the calibration machine's: every loop term
        // halves, the GEMMs stay; loading and apply, set by page faults and the disk, stay.
        var fast = w
        fast.loopGBps = 2 * m.referenceLoopGBps
        let quick = m.predict(oneLayer, workers: [fast], workload: load, bandwidthBytesPerSecond: 1e9).seconds
        var mLoad = m
        mLoad.loadSecondsPerWeight = CostModel().loadSecondsPerWeight
        let loadedSlow = mLoad.predict(oneLayer, workers: [w], workload: load, bandwidthBytesPerSecond: 1e9).seconds
        let loadedFast = mLoad.predict(oneLayer, workers: [fast], workload: load, bandwidthBytesPerSecond: 1e9).seconds
        let loadSeconds = (oneLayer.paramsPerLayer + Double(shape.vocab * shape.hidden)) * mLoad.loadSecondsPerWeight
        XCTAssertEqual(loadedSlow[0].seconds - bf16[0].seconds, loadSeconds, accuracy: 1e-6)
        XCTAssertEqual(loadedFast[0].seconds - quick[0].seconds, loadSeconds, accuracy: 1e-6, "loading is page faults, not loops")
        XCTAssertEqual(bf16.last!.phase, "apply")
        XCTAssertEqual(quick.last!.seconds, bf16.last!.seconds, accuracy: 1e-9)
        XCTAssertEqual(bf16.last!.seconds - m.phaseOverhead, m.applyFixedSeconds + oneLayer.paramsPerLayer * m.applySecondsPerWeight, accuracy: 1e-9)
        XCTAssertLessThan(quick[1].seconds, bf16[1].seconds)
        XCTAssertGreaterThan(quick[1].seconds, bf16[1].seconds / 2, "the backward's GEMMs do not speed up")
    }
}

/// Block inputs past the memory budget go to --scratch and come back bit for bit.
final class ActivationStoreTests: XCTestCase {
    func testSpillsPastTheBudgetAndReadsBack() throws {
        let scratch = NSTemporaryDirectory() + "mbq-scratch-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        var rng = SeededRandom(seed: 8)
        let ts: [Tensor<Float>] = (0..<5).map { _ in rng.normalTensor([16, 32]) }  // 2 KiB each
        var store: ActivationStore? = ActivationStore(budgetBytes: 5000, scratch: scratch, owner: "t")
        for (i, t) in ts.enumerated() { try store!.put(layer: 3, sample: i, t) }
        XCTAssertEqual(store!.residentBytes, 4096, "two fit in 5000 bytes")
        XCTAssertEqual(store!.spilledBytes, 3 * 2048)
        for (i, t) in ts.enumerated() {
            let back = try store!.get(layer: 3, sample: i)
            XCTAssertEqual(back.shape, t.shape)
            XCTAssertEqual(back.data, t.data, "sample \(i)")
        }
        let dirs = try FileManager.default.contentsOfDirectory(atPath: scratch)
        XCTAssertEqual(dirs.count, 1)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: scratch + "/" + dirs[0]).count, 3)
        // A truncated file is an error naming it, not a crash.
        let f = scratch + "/" + dirs[0] + "/L3-S4.f32"
        try Data(count: 100).write(to: URL(fileURLWithPath: f))
        XCTAssertThrowsError(try store!.get(layer: 3, sample: 4)) { e in XCTAssert("\(e)".contains("L3-S4.f32"), "\(e)") }
        store = nil
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: scratch), [], "files go with the store")
        // Without a scratch directory nothing spills.
        let mem = ActivationStore(budgetBytes: 0, scratch: nil, owner: "t")
        try mem.put(layer: 0, sample: 0, ts[0])
        XCTAssertEqual(mem.spilledBytes, 0)
        XCTAssertEqual(try mem.get(layer: 0, sample: 0).data, ts[0].data)
    }
}
