import CZMQ
import Foundation

public enum TransportError: Error, CustomStringConvertible {
    case zmq(String, Int32)
    case closed

    public var description: String {
        switch self {
        case let .zmq(what, code): return "ZeroMQ \(what): \(String(cString: zmq_strerror(code)))"
        case .closed: return "socket closed"
        }
    }
}

/// The one ZeroMQ context of a process.
public final class ZMQContext: @unchecked Sendable {
    public static let shared = ZMQContext()
    let raw: UnsafeMutableRawPointer
    init() {
        raw = zmq_ctx_new()
        // Two I/O threads: a worker receives from one neighbour while sending to another.
        zmq_ctx_set(raw, ZMQ_IO_THREADS, 2)
    }
}

/// A thin owner of one ZeroMQ socket: multipart send/receive of byte frames, polling
/// with a finite timeout, socket options. Not thread-safe (ZeroMQ sockets are not).
public final class ZMQSocket {
    public enum Kind { case router, dealer, push, pull, rep, pair }
    let raw: UnsafeMutableRawPointer
    public private(set) var lastEndpoint = ""
    /// Seconds the last `receive` spent taking the message off the socket (poll wait excluded).
    public private(set) var lastReceiveSeconds = 0.0

    public init(_ kind: Kind, context: ZMQContext = .shared) throws {
        let t: Int32
        switch kind {
        case .router: t = ZMQ_ROUTER
        case .dealer: t = ZMQ_DEALER
        case .push: t = ZMQ_PUSH
        case .pull: t = ZMQ_PULL
        case .rep: t = ZMQ_REP
        case .pair: t = ZMQ_PAIR
        }
        guard let s = zmq_socket(context.raw, t) else { throw TransportError.zmq("socket", zmq_errno()) }
        raw = s
        try setInt(ZMQ_LINGER, 0)
    }

    deinit { zmq_close(raw) }

    public func setInt(_ option: Int32, _ value: Int32) throws {
        var v = value
        guard zmq_setsockopt(raw, option, &v, MemoryLayout<Int32>.size) == 0 else {
            throw TransportError.zmq("setsockopt \(option)", zmq_errno())
        }
    }

    public func setInt64(_ option: Int32, _ value: Int64) throws {
        var v = value
        guard zmq_setsockopt(raw, option, &v, MemoryLayout<Int64>.size) == 0 else {
            throw TransportError.zmq("setsockopt \(option)", zmq_errno())
        }
    }

    public func setBytes(_ option: Int32, _ value: [UInt8]) throws {
        guard value.withUnsafeBytes({ zmq_setsockopt(raw, option, $0.baseAddress, value.count) }) == 0 else {
            throw TransportError.zmq("setsockopt \(option)", zmq_errno())
        }
    }

    /// A worker-to-worker data socket: no high-water mark (a stage may run ahead of the
    /// next by the whole calibration set; the sender's memory already holds it) and 4 MiB
    /// kernel buffers (fewer, larger reads and writes of 64 MiB tensors).
    public func configureForTensors() throws {
        try setInt(ZMQ_SNDHWM, 0)
        try setInt(ZMQ_RCVHWM, 0)
        try setInt(ZMQ_SNDBUF, 4 << 20)
        try setInt(ZMQ_RCVBUF, 4 << 20)
    }

    public func bind(_ endpoint: String) throws {
        guard zmq_bind(raw, endpoint) == 0 else { throw TransportError.zmq("bind \(endpoint)", zmq_errno()) }
        var buf = [CChar](repeating: 0, count: 256)
        var len = buf.count
        zmq_getsockopt(raw, ZMQ_LAST_ENDPOINT, &buf, &len)
        lastEndpoint = String(cString: buf)
    }

    /// Starts libzmq's monitor for `events` on this socket; -> a PAIR socket that
    /// receives them (frame 1: uint16 event, uint32 value; frame 2: the endpoint).
    public func monitor(events: Int32) throws -> ZMQSocket {
        let endpoint = "inproc://monitor-\(UInt(bitPattern: raw))"
        guard zmq_socket_monitor(raw, endpoint, events) == 0 else { throw TransportError.zmq("socket_monitor", zmq_errno()) }
        let pair = try ZMQSocket(.pair)
        try pair.connect(endpoint)
        return pair
    }

    public func connect(_ endpoint: String) throws {
        guard zmq_connect(raw, endpoint) == 0 else { throw TransportError.zmq("connect \(endpoint)", zmq_errno()) }
    }

    /// Sends all frames as one message. Raw buffers are copied into ZeroMQ messages.
    public func send(_ frames: [[UInt8]]) throws {
        for (i, f) in frames.enumerated() {
            let flags: Int32 = i < frames.count - 1 ? ZMQ_SNDMORE : 0
            let rc = f.withUnsafeBytes { zmq_send(raw, $0.baseAddress, f.count, flags) }
            guard rc >= 0 else { throw TransportError.zmq("send", zmq_errno()) }
        }
    }

    /// Sends `head` frames, then `payload` cut into `chunk`-byte frames handed to ZeroMQ
    /// without a copy: each frame points into the caller's storage, and `owner` is
    /// retained until ZeroMQ's I/O thread has written the last of them (it calls back).
    public func send(_ head: [[UInt8]], payload: UnsafeRawBufferPointer, chunk: Int, owner: AnyObject) throws {
        let chunks = payload.isEmpty ? 0 : (payload.count + chunk - 1) / chunk
        for (i, f) in head.enumerated() {
            let more = i < head.count - 1 || chunks > 0
            let rc = f.withUnsafeBytes { zmq_send(raw, $0.baseAddress, f.count, more ? ZMQ_SNDMORE : 0) }
            guard rc >= 0 else { throw TransportError.zmq("send", zmq_errno()) }
        }
        for c in 0..<chunks {
            let start = c * chunk, n = min(chunk, payload.count - start)
            var msg = zmq_msg_t()
            // One retain per frame, released by ZeroMQ's free callback (or below on failure).
            let hint = Unmanaged.passRetained(owner).toOpaque()
            guard zmq_msg_init_data(&msg, UnsafeMutableRawPointer(mutating: payload.baseAddress! + start), n,
                                    { _, hint in Unmanaged<AnyObject>.fromOpaque(hint!).release() }, hint) == 0 else {
                Unmanaged<AnyObject>.fromOpaque(hint).release()
                throw TransportError.zmq("msg_init_data", zmq_errno())
            }
            guard zmq_msg_send(&msg, raw, c < chunks - 1 ? ZMQ_SNDMORE : 0) >= 0 else {
                let e = zmq_errno()
                zmq_msg_close(&msg)  // runs the callback: the retain is returned
                throw TransportError.zmq("send", e)
            }
        }
    }

    /// Receives one whole message without copying it out of ZeroMQ (nil when nothing came
    /// within `timeoutMs`). Frames larger than `maxFrameBytes` drop the message (empty).
    public func receiveRaw(timeoutMs: Int, maxFrameBytes: Int = 1 << 30) throws -> RawMessage? {
        var item = zmq_pollitem_t(socket: raw, fd: 0, events: Int16(ZMQ_POLLIN), revents: 0)
        let n = zmq_poll(&item, 1, timeoutMs)
        if n < 0 {
            let e = zmq_errno()
            if e == EINTR { return nil }
            throw TransportError.zmq("poll", e)
        }
        if n == 0 { return nil }
        let t0 = DispatchTime.now().uptimeNanoseconds
        defer { lastReceiveSeconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9 }
        let m = RawMessage()
        var oversized = false
        while true {
            let msg = UnsafeMutablePointer<zmq_msg_t>.allocate(capacity: 1)
            zmq_msg_init(msg)
            guard zmq_msg_recv(msg, raw, 0) >= 0 else {
                zmq_msg_close(msg); msg.deallocate()
                throw TransportError.zmq("recv", zmq_errno())
            }
            if zmq_msg_size(msg) > maxFrameBytes { oversized = true }
            m.parts.append(msg)
            if zmq_msg_more(msg) == 0 { break }
        }
        if oversized { m.parts.forEach { zmq_msg_close($0); $0.deallocate() }; m.parts = [] }
        return m
    }

    /// Receives one whole message as byte arrays, waiting at most `timeoutMs` (nil when
    /// nothing came). Frames larger than `maxFrameBytes` drop the message (returns []).
    public func receive(timeoutMs: Int, maxFrameBytes: Int = 1 << 30) throws -> [[UInt8]]? {
        try receiveRaw(timeoutMs: timeoutMs, maxFrameBytes: maxFrameBytes)?.frames
    }
}

/// A received multipart message still owned by ZeroMQ; frames are read in place.
public final class RawMessage {
    var parts: [UnsafeMutablePointer<zmq_msg_t>] = []

    public var count: Int { parts.count }

    public func frame(_ i: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: zmq_msg_data(parts[i]), count: zmq_msg_size(parts[i]))
    }

    public var frames: [[UInt8]] { (0..<count).map { Array(frame($0)) } }

    /// The sending peer's IP address as ZeroMQ reports it (the "Peer-Address" property of
    /// a frame that came over the wire: a ROUTER's identity frame has none), or nil.
    public var peerAddress: String? {
        for part in parts { if let p = zmq_msg_gets(part, "Peer-Address") { return String(cString: p) } }
        return nil
    }

    deinit { for p in parts { zmq_msg_close(p); p.deallocate() } }
}
