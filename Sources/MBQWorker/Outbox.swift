import Foundation
import MBQWire

/// Messages the compute thread hands to the thread that owns the control socket
/// (ZeroMQ sockets must stay on one thread).
final class Outbox: @unchecked Sendable {
    private let lock = NSLock()
    private var frames: [[[UInt8]]] = []

    func post(_ f: [[UInt8]]) {
        lock.lock(); frames.append(f); lock.unlock()
    }

    func drain() -> [[[UInt8]]] {
        lock.lock(); defer { lock.unlock() }
        let f = frames
        frames = []
        return f
    }
}

/// Commands the control thread hands to the compute thread, in order.
final class CommandQueue: @unchecked Sendable {
    private let cond = NSCondition()
    private var items: [WireMessage] = []

    func push(_ m: WireMessage) {
        cond.lock(); items.append(m); cond.signal(); cond.unlock()
    }

    func pop() -> WireMessage {
        cond.lock(); defer { cond.unlock() }
        while items.isEmpty { cond.wait() }
        return items.removeFirst()
    }
}
