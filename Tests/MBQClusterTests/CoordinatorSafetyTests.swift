import Foundation
import MBQCoordinator
import MBQTensor
import MBQWire
import XCTest

/// The cluster's doors as the state machine keeps them, without sockets: one process per
/// worker id, no worker of another job, a failing worker dropped and its layers re-planned;
/// and the pieces the shells use (the log throttle, secrets, loopback).
final class CoordinatorSafetyTests: XCTestCase {
    typealias T = CoordinatorStateTests

    func register(_ id: String, endpoint: String, job: String = "") -> WireMessage {
        var r = Mbq_Register()
        r.workerID = id
        r.gemmGflops = 100
        r.dataEndpoint = endpoint
        return WireMessage(envelope: Wire.envelope(job: job, .register(r)), tensor: nil)
    }

    func refusals(_ d: [Directive]) -> [(identity: [UInt8], reason: String)] {
        d.compactMap { if case let .send(i, e) = $0, case let .refused(r)? = e.body { return (i, r.reason) } else { return nil } }
    }

    func testASecondProcessUnderALiveWorkersIdIsRefused() {
        let s = CoordinatorState(spec: T.spec(workers: 2))
        XCTAssertTrue(refusals(s.handle(identity: [1], register("w0", endpoint: "tcp://a:1"), now: 0)).isEmpty)
        let d = s.handle(identity: [2], register("w0", endpoint: "tcp://b:1"), now: 0.5)
        XCTAssertEqual(refusals(d).map(\.identity), [[2]])
        XCTAssertTrue(refusals(d)[0].reason.contains("worker id 'w0' is taken by a live worker"), refusals(d)[0].reason)
        XCTAssertEqual(s.workers["w0"]?.identity, [1], "the first keeps its place")
        // The same process on a new connection (it re-registers after a silence) is welcome.
        XCTAssertTrue(refusals(s.handle(identity: [3], register("w0", endpoint: "tcp://a:1"), now: 1)).isEmpty)
        XCTAssertEqual(s.workers["w0"]?.identity, [3])
        // Once the first is lost, a new process may take the id.
        _ = s.tick(now: 10)
        XCTAssertTrue(refusals(s.handle(identity: [4], register("w0", endpoint: "tcp://b:1"), now: 10.1)).isEmpty)
    }

    func testAWorkerOfAnotherJobIsToldToStop() {
        let s = CoordinatorState(spec: T.spec(workers: 1))
        let d = s.handle(identity: [9], register("old", endpoint: "tcp://a:1", job: "mbq-other"), now: 0)
        XCTAssertEqual(refusals(d).count, 1)
        XCTAssertTrue(refusals(d)[0].reason.contains("belongs to job 'mbq-other'"), refusals(d)[0].reason)
        XCTAssertTrue(s.workers.isEmpty)
    }

    func error(_ message: String) -> WireMessage {
        var e = Mbq_ErrorReport()
        e.message = message
        e.fatal = true
        return WireMessage(envelope: Wire.envelope(job: "job", .error(e)), tensor: nil)
    }

    func testAFailingWorkerIsDroppedAndItsLayersReplanned() {
        let s = CoordinatorState(spec: T.spec(workers: 2))
        _ = s.handle(identity: [1], register("a", endpoint: "tcp://a:1"), now: 0)
        _ = s.handle(identity: [2], register("b", endpoint: "tcp://b:1"), now: 0)
        XCTAssertEqual(s.plan.map(\.worker), ["a", "b"])
        let e1 = s.epoch
        let d = s.handle(identity: [2], error("/m/calib.safetensors: cannot read"), now: 1)
        XCTAssertEqual(refusals(d).map(\.identity), [[2]], "told to stop")
        XCTAssertEqual(s.workers["b"]?.liveness, .dropped(why: "/m/calib.safetensors: cannot read"))
        XCTAssertEqual(s.epoch, e1 + 1)
        XCTAssertEqual(s.plan.map(\.worker), ["a"])
        XCTAssertEqual(s.plan.map(\.range), [0..<4])
        XCTAssertEqual(s.phase, .forward)
        // The same process registering again is refused; a new process under its id is not.
        XCTAssertEqual(refusals(s.handle(identity: [2], register("b", endpoint: "tcp://b:1"), now: 2)).count, 1)
        XCTAssertTrue(refusals(s.handle(identity: [5], register("b", endpoint: "tcp://b:2"), now: 2)).isEmpty)
        // The new "b" waited as a spare: it takes over when "a" fails; when it fails too,
        // no worker is left and the job fails.
        _ = s.handle(identity: [1], error("out of memory"), now: 3)
        XCTAssertEqual(s.plan.map(\.worker), ["b"])
        XCTAssertEqual(s.phase, .forward)
        _ = s.handle(identity: [5], error("disk full"), now: 3)
        XCTAssertEqual(s.phase, .failed)
    }

    func testTheLastWorkerFailingFailsTheJobWithItsReason() {
        let s = CoordinatorState(spec: T.spec(workers: 1))
        _ = s.handle(identity: [1], register("a", endpoint: "tcp://a:1"), now: 0)
        let d = s.handle(identity: [1], error("/m: cannot read"), now: 1)
        XCTAssertEqual(s.phase, .failed)
        let why = d.compactMap { if case let .failed(w) = $0 { return w } else { return nil } }
        XCTAssertEqual(why, ["worker a: /m: cannot read (no other worker is left)"])
    }

    func testLogThrottleWritesABurstPerWindowAndCountsTheRest() {
        var t = LogThrottle(window: 10, burst: 3)
        let admitted = (0..<1000).filter { t.admit(source: "10.0.0.9", now: Double($0) * 0.001) }.count
        XCTAssertEqual(admitted, 3)
        XCTAssertTrue(t.admit(source: "10.0.0.8", now: 1), "another source has its own budget")
        XCTAssertTrue(t.expired(now: 5).isEmpty, "the window is still open")
        let e = t.expired(now: 10.5)
        XCTAssertEqual(e.map(\.source), ["10.0.0.9"])
        XCTAssertEqual(e.map(\.count), [997])
        XCTAssertTrue(t.expired(now: 30).isEmpty, "reported once")
        XCTAssertTrue(t.admit(source: "10.0.0.9", now: 31), "a new window")
    }

    func testSecretsMustBeLongAndPrivate() throws {
        let dir = NSTemporaryDirectory() + "mbq-secret-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        XCTAssertNil(try SharedSecret.load(file: nil, environment: [:]))
        XCTAssertThrowsError(try SharedSecret.load(file: nil, environment: ["MBQ_SECRET": ""])) {
            XCTAssertEqual($0 as? SharedSecret.Problem, .tooShort(source: "MBQ_SECRET", bytes: 0))
        }
        XCTAssertEqual(try SharedSecret.load(file: nil, environment: ["MBQ_SECRET": "0123456789abcdef"]), "0123456789abcdef")
        let f = dir + "/secret"
        try SharedSecret.write(to: f)
        let s = try SharedSecret.load(file: f, environment: ["MBQ_SECRET": "ignored-when-a-file-is-given"])
        XCTAssertEqual(s?.count, 64)
        XCTAssertThrowsError(try SharedSecret.write(to: f), "never overwrites")
        chmod(f, 0o640)
        XCTAssertThrowsError(try SharedSecret.load(file: f)) { XCTAssertTrue("\($0)".contains("chmod 600"), "\($0)") }
        XCTAssertNotEqual(SharedSecret.generate(), SharedSecret.generate())
    }

    func testLoopbackEndpoints() {
        for e in ["tcp://127.0.0.1:5555", "tcp://127.1.2.3:1", "tcp://localhost:5", "tcp://[::1]:5", "ipc:///tmp/x"] {
            XCTAssertTrue(Endpoint.isLoopback(e), e)
        }
        for e in ["tcp://0.0.0.0:5555", "tcp://10.0.0.1:5555", "tcp://127.0.0.1.evil.example:5", "tcp://eth0:5555", "tcp://*:5555",
                  "tcp://[::]:5"] {
            XCTAssertFalse(Endpoint.isLoopback(e), e)
        }
    }

    func testJobIdentityNamesWhatDiffers() {
        let a = JobIdentity(modelDir: "/m", calibPath: "/c", modelContent: "aa", calibContent: "cc", options: "{}", samples: 8)
        var b = a
        b.fields["samples"] = "4"
        b.fields["calib_content"] = "dd"
        XCTAssertNotEqual(a.jobID, b.jobID)
        XCTAssertEqual(b.differences(from: a), ["calib_content: cc in the journal, dd now", "samples: 8 in the journal, 4 now"])
        XCTAssertEqual(a.differences(from: a), [])
        XCTAssertTrue(a.jobID.hasPrefix("mbq-") && a.jobID.count == 16, a.jobID)
    }
}
