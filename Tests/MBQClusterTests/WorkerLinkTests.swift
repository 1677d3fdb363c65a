import MBQCluster
import MBQCoordinator
import MBQWire
import MBQWorker
import XCTest

/// The worker's control link without sockets: an injected clock, actions out.
final class WorkerLinkTests: XCTestCase {
    let settings = WorkerLink.Settings(heartbeatInterval: 0.5, coordinatorTimeout: 3, giveUpAfter: 100, maxBackoff: 20)

    /// Runs the link from `from` to `to` in steps of 0.1 s; -> (time, action) of every action.
    func run(_ link: inout WorkerLink, from: Double, to: Double) -> [(Double, WorkerLink.Action)] {
        var out: [(Double, WorkerLink.Action)] = []
        for i in Int((from * 10).rounded())...Int((to * 10).rounded()) {
            let t = Double(i) / 10
            for a in link.tick(now: t) { out.append((t, a)) }
        }
        return out
    }

    func registrations(_ a: [(Double, WorkerLink.Action)]) -> [Double] {
        a.compactMap { if case .register = $0.1 { return ($0.0 * 10).rounded() / 10 } else { return nil } }
    }

    func testNoCoordinatorBacksOffOnNewSocketsThenGivesUp() {
        var link = WorkerLink(settings: settings, now: 0)
        let actions = run(&link, from: 0, to: 60)
        // At once, then once the silence exceeds 3 s (the first tick after), then after
        // waits of 6, 12 and 20 s (doubling, capped at maxBackoff).
        XCTAssertEqual(registrations(actions), [0, 3.1, 9.1, 21.1, 41.1])
        // Every registration but the first goes out on a fresh socket.
        let recreated = actions.filter { $0.1 == .recreateSocket }.map(\.0)
        XCTAssertEqual(recreated, [3.1, 9.1, 21.1, 41.1])
        if case let .register(silent)? = actions.first(where: { $0.0 == 9.1 && $0.1 != .recreateSocket })?.1 {
            XCTAssertEqual(silent ?? 0, 6, accuracy: 1e-9, "silent since the registration at 3.1 s")
        } else { XCTFail("a re-registration at 9.1 s") }
        var patient = WorkerLink(settings: .init(heartbeatInterval: 0.5, coordinatorTimeout: 3, giveUpAfter: 10), now: 0)
        let end = run(&patient, from: 0, to: 11)
        XCTAssertEqual(end.first { $0.1 == .giveUp }?.0, 10.1, "the first tick past 10 s of silence")
    }

    func testHeartbeatsAndAnAnsweringCoordinator() {
        var link = WorkerLink(settings: settings, now: 0)
        var actions = run(&link, from: 0, to: 0.2)
        XCTAssertEqual(registrations(actions), [0])
        // The coordinator answers and keeps talking: no more registrations, heartbeats every 0.5 s.
        actions = []
        for i in 3..<100 {
            let t = Double(i) / 10
            link.heard(now: t)
            for a in link.tick(now: t) { actions.append((t, a)) }
        }
        XCTAssertEqual(registrations(actions), [])
        XCTAssertEqual(actions.filter { $0.1 == .heartbeat }.count, 16, "more than 0.5 s apart: every 0.6 s at 0.1 s ticks, over 9.7 s")
        XCTAssertEqual(link.unanswered, 0)
        // Then silence: one timeout later a re-registration on a new socket, saying how long it was.
        actions = run(&link, from: 10, to: 13.5)
        XCTAssertEqual(actions.filter { $0.1 == .recreateSocket }.count, 1)
        guard case let .register(silent)? = actions.first(where: { if case .register = $0.1 { return true } else { return false } })?.1 else {
            return XCTFail("re-registered")
        }
        XCTAssertGreaterThan(silent ?? 0, 3)
    }

    func testRegisterAgainIsImmediateAndAChallengeAnswerCounts() {
        var link = WorkerLink(settings: settings, now: 0)
        _ = run(&link, from: 0, to: 1)
        link.heard(now: 1.05)
        // A restarted coordinator asks who we are: register on the next tick, same socket.
        link.heard(now: 1.2, registerAgain: true)
        let a = link.tick(now: 1.25)
        XCTAssertTrue(a.contains(.register(silentFor: nil)), "\(a)")
        XCTAssertFalse(a.contains(.recreateSocket))
        // Asked again within 0.5 s of registering: ignored (it is the same request in flight).
        link.heard(now: 1.4, registerAgain: true)
        XCTAssertFalse(link.tick(now: 1.45).contains { if case .register = $0 { return true } else { return false } })
        // Answering a challenge restarts the silence count.
        link.registerSent(now: 5)
        XCTAssertFalse(link.tick(now: 7.9).contains { if case .register = $0 { return true } else { return false } })
    }
}
