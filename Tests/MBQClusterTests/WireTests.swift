import Foundation
import MBQCluster
import MBQCoordinator
import MBQTensor
import MBQWire
import MBQWorker
import XCTest

final class WireTests: XCTestCase {
    func testTensorRoundTripInChunks() throws {
        var rng = SeededRandom(seed: 1)
        let t: Tensor<Float> = rng.normalTensor([700, 1000])  // 2.8 MB: three 1 MiB chunks
        let frames = try Wire.encode(job: "j", name: .activation(sample: 3), tensor: t, epoch: 7)
        XCTAssertEqual(frames.count, 1 + 3)
        let m = try Wire.decode(frames)
        XCTAssertEqual(m.tensor?.data, t.data)
        XCTAssertEqual(m.tensor?.shape, [700, 1000])
        guard case let .tensor(h) = m.envelope.body else { return XCTFail("no header") }
        XCTAssertEqual(h.name, "act/3")
        XCTAssertEqual(h.epoch, 7)
    }

    /// Tensor names are written and parsed in one place; anything else is not a name.
    func testTensorNamesRoundTripAndRejectOthers() {
        let names: [TensorName] = [.activation(sample: 0), .gradient(sample: 17), .distorted(sample: 3),
                                   .shard(layer: 12, file: "model-00001-of-00002.safetensors")]
        XCTAssertEqual(names.map(\.wire), ["act/0", "grad/17", "dist/3", "shard/12/model-00001-of-00002.safetensors"])
        for n in names { XCTAssertEqual(TensorName(wire: n.wire), n) }
        for bad in ["", "act", "act/", "act/-1", "act/x", "act/1/2", "grad/1/", "shard/1", "shard/1/", "shard/1/a/b",
                    "shard/x/f", "block/0/q", "ACT/1"] {
            XCTAssertNil(TensorName(wire: bad), "'\(bad)' is not a tensor name")
        }
    }

    func testCorruptionIsDetected() throws {
        let t = Tensor<Float>(shape: [2, 3], data: [1, 2, 3, 4, 5, 6])
        var frames = try Wire.encode(job: "j", name: .gradient(sample: 0), tensor: t, epoch: 1)
        func expect(_ f: [[UInt8]], _ needle: String) {
            XCTAssertThrowsError(try Wire.decode(f)) { e in XCTAssert("\(e)".contains(needle), "\(needle) not in \(e)") }
        }
        var flipped = frames
        flipped[1][5] ^= 0x40
        expect(flipped, "checksum mismatch")
        expect(Array(frames.prefix(1)), "announces 1 chunks, 0 arrived")
        var short = frames
        short[1].removeLast(4)
        expect(short, "20 bytes arrived, header says 24")
        expect([[]], "empty")
        expect([[0xff, 0xff, 0xff]], "not a protobuf Envelope")
        var env = Wire.envelope(job: "j", .heartbeat(Mbq_Heartbeat()))
        env.version = 99
        expect(try Wire.encode(env), "protocol version 99")
        frames = try Wire.encode(Wire.envelope(job: "j", .heartbeat(Mbq_Heartbeat())))
        expect(frames + [[1, 2, 3]], "unexpected extra frames")
        var h = Mbq_TensorHeader()
        h.name = "big"; h.dtype = "F32"; h.shape = [1 << 39, 1 << 39]; h.byteCount = 16; h.chunks = 1
        expect(try Wire.encode(Wire.envelope(job: "j", .tensor(h))) + [[UInt8](repeating: 0, count: 16)], "overflows")
        h.shape = [2, 2]; h.dtype = "BF16"
        expect(try Wire.encode(Wire.envelope(job: "j", .tensor(h))) + [[UInt8](repeating: 0, count: 16)], "dtype 'BF16'")
        h.dtype = "F32"; h.shape = [3]; h.byteCount = 16
        expect(try Wire.encode(Wire.envelope(job: "j", .tensor(h))) + [[UInt8](repeating: 0, count: 16)], "needs 12 bytes")
    }

    func testSharedSecretTagsTensorMessages() throws {
        var rng = SeededRandom(seed: 5)
        let t: Tensor<Float> = rng.normalTensor([3, 5])
        let head = try Wire.tensorHeader(job: "j", name: .activation(sample: 0), tensor: t, epoch: 2, secret: "s3cret")
        let m = try Wire.decode([head] + [t.data.withUnsafeBytes { Array($0) }])
        guard case let .tensor(h) = m.envelope.body else { return XCTFail("not a tensor") }
        XCTAssertTrue(Wire.verifyTag(h, job: "j", secret: "s3cret"))
        XCTAssertFalse(Wire.verifyTag(h, job: "j", secret: "guess"), "another secret")
        XCTAssertFalse(Wire.verifyTag(h, job: "other", secret: "s3cret"), "another job")
        var renamed = h
        renamed.name = "act/1"
        XCTAssertFalse(Wire.verifyTag(renamed, job: "j", secret: "s3cret"), "a replayed tensor under another name")
        let untagged = try Wire.tensorHeader(job: "j", name: .activation(sample: 0), tensor: t, epoch: 2)
        guard case let .tensor(u) = try Wire.decode([untagged] + [t.data.withUnsafeBytes { Array($0) }]).envelope.body else { return XCTFail() }
        XCTAssertFalse(Wire.verifyTag(u, job: "j", secret: "s3cret"), "no tag")
    }

    func testChecksumStreamsInPiecesOfAnyLength() {
        var rng = SeededRandom(seed: 4)
        for n in [0, 1, 7, 8, 31, 32, 33, 100, 1000, 4099] {
            let bytes = (0..<n).map { _ in UInt8(truncatingIfNeeded: Int(rng.normal() * 1000)) }
            let whole = Checksum64.of(bytes)
            for piece in [1, 5, 13, 32, 64, 1000] {
                var s = Checksum64(total: n)
                bytes.withUnsafeBytes { p in
                    var i = 0
                    while i < n { let k = min(piece, n - i); s.update(UnsafeRawBufferPointer(rebasing: p[i..<(i + k)])); i += k }
                }
                XCTAssertEqual(s.finalize(), whole, "n=\(n) piece=\(piece)")
            }
            if n >= 16 {
                // Swapping two different words, or flipping one bit, changes the sum.
                var swapped = bytes
                for j in 0..<8 { swapped.swapAt(j, j + 8) }
                if swapped != bytes { XCTAssertNotEqual(Checksum64.of(swapped), whole, "n=\(n) swap") }
                var flipped = bytes
                flipped[n / 2] ^= 0x10
                XCTAssertNotEqual(Checksum64.of(flipped), whole, "n=\(n) flip")
            }
        }
    }

    /// A shard travels as bytes (dtype U8) in 1 MiB frames, checked like a tensor.
    func testShardBytesRoundTrip() throws {
        let bytes = (0..<(2 * tensorChunkBytes + 5)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        var frames = try Wire.encode(job: "j", name: .shard(layer: 2, file: "model-00003-of-00004.safetensors"), bytes: bytes, epoch: 4)
        XCTAssertEqual(frames.count, 4, "header and three chunks")
        let m = try Wire.decode(frames)
        XCTAssertEqual(m.bytes, bytes)
        XCTAssertNil(m.tensor)
        guard case let .tensor(h) = m.envelope.body else { return XCTFail("a tensor header") }
        XCTAssertEqual(h.dtype, "U8"); XCTAssertEqual(h.shape, [UInt64(bytes.count)]); XCTAssertEqual(h.epoch, 4)
        frames[2][7] ^= 1
        XCTAssertThrowsError(try Wire.decode(frames)) { XCTAssertTrue("\($0)".contains("checksum"), "\($0)") }
        XCTAssertThrowsError(try Wire.decode(Array(frames.dropLast()))) { XCTAssertTrue("\($0)".contains("chunks"), "\($0)") }
    }

    func testChecksumAndSHA256() {
        XCTAssertEqual(SHA256.hex(Array("abc".utf8)),
                       "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        // RFC 4231 test case 2.
        XCTAssertEqual(Auth.hmacSHA256(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8))
                        .map { String(format: "%02x", $0) }.joined(),
                       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        let n: [UInt8] = [1, 2, 3]
        XCTAssertTrue(Auth.verify(secret: "s", jobID: "j", workerID: "w", nonce: n, token: Auth.token(secret: "s", jobID: "j", workerID: "w", nonce: n)))
        XCTAssertFalse(Auth.verify(secret: "s", jobID: "j", workerID: "w", nonce: n, token: Auth.token(secret: "t", jobID: "j", workerID: "w", nonce: n)))
        XCTAssertFalse(Auth.verify(secret: "s", jobID: "j", workerID: "w", nonce: n, token: Auth.token(secret: "s", jobID: "k", workerID: "w", nonce: n)))
        XCTAssertFalse(Auth.verify(secret: "s", jobID: "j", workerID: "w", nonce: n, token: Auth.token(secret: "s", jobID: "j", workerID: "w", nonce: [1, 2, 4])))
        XCTAssertNotEqual(Auth.nonce(), Auth.nonce())
        let a: [UInt8] = Array(0..<100), b = a.map { $0 == 57 ? 58 : $0 }
        XCTAssertNotEqual(Checksum64.of(a), Checksum64.of(b))
        XCTAssertNotEqual(Checksum64.of(Array(a.prefix(99))), Checksum64.of(a))
    }

    /// 100,000 random and mutated messages through the decoder and, when they decode,
    /// through the coordinator's state machine: errors are fine, traps are not.
    func testFuzzDecoderAndCoordinator() throws {
        var rng = SeededRandom(seed: 2024)
        let state = CoordinatorState(spec: CoordinatorStateTests.spec(workers: 2))
        let seeds: [[[UInt8]]] = [
            try Wire.encode(job: "job", name: .distorted(sample: 0), tensor: Tensor(shape: [2, 2], data: [1, 2, 3, 4]), epoch: 1),
            try Wire.encode(CoordinatorStateTests.register("w0")),
            try Wire.encode(Wire.envelope(job: "job", .heartbeat(Mbq_Heartbeat()))),
            try Wire.encode(Wire.envelope(job: "job", .groupResult(Mbq_GroupResult()))),
            try Wire.encode(Wire.envelope(job: "job", .phaseDone(Mbq_PhaseDone()))),
            try Wire.encode(Wire.envelope(job: "job", .layerStats(Mbq_LayerStats()))),
            try Wire.encode(Wire.envelope(job: "job", .blockWritten(Mbq_BlockWritten()))),
            [try Wire.tensorHeader(job: "job", name: .activation(sample: 0), tensor: Tensor(shape: [1, 2], data: [5, 6]), epoch: 1, secret: "s"),
             Tensor<Float>(shape: [1, 2], data: [5, 6]).data.withUnsafeBytes { Array($0) }],
        ]
        var decoded = 0, rejected = 0
        for i in 0..<100_000 {
            var frames: [[UInt8]]
            if i % 4 == 0 {
                let n = Int(rng.next() % 3) + 1
                frames = (0..<n).map { _ in (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
            } else {
                frames = seeds[Int(rng.next() % UInt64(seeds.count))]
                for _ in 0..<Int(rng.next() % 4) + 1 {
                    let f = Int(rng.next() % UInt64(frames.count))
                    if frames[f].isEmpty { continue }
                    switch rng.next() % 4 {
                    case 0: frames[f][Int(rng.next() % UInt64(frames[f].count))] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
                    case 1: frames[f].removeLast(Int(rng.next() % UInt64(frames[f].count)))
                    case 2: frames[f].insert(UInt8(truncatingIfNeeded: rng.next()), at: Int(rng.next() % UInt64(frames[f].count)))
                    default: frames.append([UInt8(truncatingIfNeeded: rng.next())])
                    }
                }
            }
            do {
                let m = try Wire.decode(frames)
                decoded += 1
                _ = state.handle(identity: [UInt8(i % 3)], m, now: Double(i) * 1e-3)
                if i % 100 == 0 { _ = state.tick(now: Double(i) * 1e-3) }
            } catch {
                rejected += 1
            }
        }
        print("fuzz: 100000 messages, \(decoded) decoded and fed to the coordinator, \(rejected) rejected")
        // The seeds themselves are valid (so the mutations test something), and any one
        // byte of a tensor's payload flipped is caught by its checksum.
        for seed in seeds { XCTAssertNoThrow(try Wire.decode(seed)) }
        for i in 0..<seeds[0][1].count {
            var frames = seeds[0]
            frames[1][i] ^= 0x10
            XCTAssertThrowsError(try Wire.decode(frames), "payload byte \(i) flipped") { e in
                XCTAssertTrue("\(e)".contains("checksum"), "\(e)")
            }
        }
        // And 100,000 well-formed envelopes with random contents, straight into the
        // coordinator's state machine: registrations, statistics, results for any layer
        // and group, completions of any phase and epoch, tensors, errors, from known and
        // unknown peers. A coordinator that fails or finishes is replaced by a fresh one;
        // the phases reached are counted.
        var st = CoordinatorState(spec: CoordinatorStateTests.spec(workers: 2))
        var reached: [String: Int] = [:]
        let phases: [Mbq_Phase] = [.forward, .backward, .search, .apply, .unspecified]
        let groups: [Mbq_Group] = [.qkv, .o, .gateUp, .down, .UNRECOGNIZED(9)]
        func small() -> UInt32 { UInt32(rng.next() % 6) }
        for i in 0..<100_000 {
            let body: Mbq_Envelope.OneOf_Body
            // Mostly the current epoch (so results and completions count), sometimes a stale one.
            let epochNow = rng.next() % 4 == 0 ? small() : st.epoch
            let peer = Int(rng.next() % 4)
            switch rng.next() % 8 {
            case 0 where rng.next() % 20 == 0: body = CoordinatorStateTests.register("w\(peer)").body!
            case 1: var g = Mbq_GroupResult(); g.layer = small(); g.group = groups[Int(rng.next() % 5)]; g.epoch = epochNow; body = .groupResult(g)
            case 2:
                var p = Mbq_PhaseDone()
                p.phase = rng.next() % 3 == 0 ? phases[Int(rng.next() % 5)] : (st.phase.wire ?? .unspecified)
                p.epoch = epochNow
                body = .phaseDone(p)
            case 3: var l = Mbq_LayerStats(); l.layer = small(); l.epoch = epochNow; l.samples = small(); l.attnVis = rng.normal(); body = .layerStats(l)
            case 4: var b = Mbq_BlockWritten(); b.layer = small(); b.epoch = epochNow; body = .blockWritten(b)
            case 5: var h = Mbq_TensorHeader(); let k = small(); h.name = ["shard/\(k)/x", "act/\(k)", "block/\(k)/q"][Int(rng.next() % 3)]; h.epoch = epochNow; body = .tensor(h)
            case 6: var e = Mbq_ErrorReport(); e.fatal = rng.next() % 5000 == 0; body = .error(e)
            default: body = .heartbeat(Mbq_Heartbeat())
            }
            let m = WireMessage(envelope: Wire.envelope(job: "job", body), tensor: rng.next() % 2 == 0 ? Tensor(shape: [2, 2], repeating: 1) : nil)
            let now = Double(i) * 1e-3
            _ = st.handle(identity: [UInt8(peer)], m, now: now)
            if i % 50 == 0 { _ = st.tick(now: now) }
            reached[st.phase.rawValue, default: 0] += 1
            if st.phase != .waiting && st.phase != .failed && st.phase != .done {
                XCTAssertEqual(st.plan.map(\.range.count).reduce(0, +), 4, "a live plan covers every layer")
            }
            if st.phase == .failed || st.phase == .done { st = CoordinatorState(spec: CoordinatorStateTests.spec(workers: 2)) }
        }
        XCTAssertGreaterThan(reached["search"] ?? 0, 0, "the random walk reaches the search: \(reached)")
        print("fuzz: 100000 random well-formed envelopes into the coordinator; messages handled per phase: \(reached.sorted { $0.key < $1.key })")
        XCTAssertGreaterThan(rejected, 10_000)
        XCTAssertGreaterThan(decoded, 1_000)
    }
}
