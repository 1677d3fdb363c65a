import CZMQ
import Foundation
import Logging

/// CurveZMQ: the coordinator's control socket encrypts and authenticates every worker
/// (libzmq's CURVE mechanism; Debian's libzmq is built with it). Keys are Z85 text, 40
/// characters, as `zmq_curve_keypair` makes them; `mbq keys` writes NAME.key / NAME.pub.
public enum Curve {
    public static var available: Bool { zmq_has("curve") == 1 }

    public static func keypair() throws -> (public: String, secret: String) {
        var pub = [CChar](repeating: 0, count: 41), sec = [CChar](repeating: 0, count: 41)
        guard zmq_curve_keypair(&pub, &sec) == 0 else { throw TransportError.zmq("curve keypair", zmq_errno()) }
        return (String(cString: pub), String(cString: sec))
    }

    /// Reads a Z85 key file (first line, 40 characters).
    public static func readKey(_ path: String) throws -> String {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
              let line = text.split(whereSeparator: \.isNewline).first.map(String.init)?.trimmingCharacters(in: .whitespaces),
              line.count == 40 else {
            throw TransportError.zmq("key file \(path): expected one 40-character Z85 key", EINVAL)
        }
        return line
    }

    /// A NAME.key file: the secret key on line 1, the public key on line 2.
    public static func readKeypair(_ path: String) throws -> (public: String, secret: String) {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw TransportError.zmq("key file \(path): unreadable", ENOENT)
        }
        let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
        guard lines.count >= 2, lines[0].count == 40, lines[1].count == 40 else {
            throw TransportError.zmq("key file \(path): expected the secret and the public Z85 key on two lines", EINVAL)
        }
        return (lines[1], lines[0])
    }

    /// Writes NAME.key (secret + public, mode 600) and NAME.pub into `dir`.
    public static func writeKeypair(name: String, dir: String) throws -> (keyFile: String, pubFile: String) {
        let (pub, sec) = try keypair()
        let key = dir + "/" + name + ".key", pubFile = dir + "/" + name + ".pub"
        for f in [key, pubFile] where FileManager.default.fileExists(atPath: f) {
            throw TransportError.zmq("\(f) exists (keys are never overwritten)", EEXIST)
        }
        try NewFile.write(key, sec + "\n" + pub + "\n", mode: 0o600)
        try NewFile.write(pubFile, pub + "\n", mode: 0o644)
        return (key, pubFile)
    }

    static func binary(_ z85: String) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 32)
        return zmq_z85_decode(&out, z85) == nil ? nil : out
    }

    /// Makes `socket` a CURVE server with `secretKey`.
    public static func server(_ socket: ZMQSocket, secretKey: String) throws {
        try socket.setInt(ZMQ_CURVE_SERVER, 1)
        try socket.setBytes(ZMQ_CURVE_SECRETKEY, Array(secretKey.utf8))
    }

    /// Makes `socket` a CURVE client of `serverKey` with its own keypair.
    public static func client(_ socket: ZMQSocket, serverKey: String, publicKey: String, secretKey: String) throws {
        try socket.setBytes(ZMQ_CURVE_SERVERKEY, Array(serverKey.utf8))
        try socket.setBytes(ZMQ_CURVE_PUBLICKEY, Array(publicKey.utf8))
        try socket.setBytes(ZMQ_CURVE_SECRETKEY, Array(secretKey.utf8))
    }
}

/// The ZAP handler (RFC 27) that admits only authorized CURVE public keys. Runs on its
/// own thread for the life of the process; every decision is logged.
public final class CurveAuthenticator: @unchecked Sendable {
    private var authorized: Set<[UInt8]>
    private let changed = NSCondition()
    let grace: Double
    let log: (String) -> Void

    /// `authorizedKeys`: Z85 public keys (one per line in the files `mbq keys` writes).
    /// `grace`: how long an unknown key's handshake waits for `setAuthorized` to admit it
    /// (a worker's neighbour may connect before this worker has read the assignment
    /// that names it; ZeroMQ does not retry a refused handshake).
    public init(authorizedKeys: [String], grace: Double = 0, log: @escaping (String) -> Void) throws {
        authorized = Set(authorizedKeys.compactMap(Curve.binary))
        self.grace = grace
        self.log = log
        let rep = try ZMQSocket(.rep)
        try rep.bind("inproc://zeromq.zap.01")
        let t = Thread { [self] in serve(rep) }
        t.start()
    }

    /// Replaces the admitted keys (a worker's data socket admits its current neighbours).
    public func setAuthorized(_ keys: [String]) {
        changed.lock(); defer { changed.unlock() }
        authorized = Set(keys.compactMap(Curve.binary))
        changed.broadcast()
    }

    func admits(_ key: [UInt8]) -> Bool {
        changed.lock(); defer { changed.unlock() }
        let end = Date().addingTimeInterval(grace)
        while !authorized.contains(key) {
            guard changed.wait(until: end) else { return authorized.contains(key) }
        }
        return true
    }

    func serve(_ rep: ZMQSocket) {
        while true {
            guard let f = try? rep.receive(timeoutMs: 1000), f.count >= 6 else { continue }
            // version, request id, domain, address, identity, mechanism, credentials...
            let mechanism = String(decoding: f[5], as: UTF8.self)
            let key = f.count > 6 ? f[6] : []
            let ok = mechanism == "CURVE" && admits(key)
            let address = String(decoding: f[3], as: UTF8.self)
            if !ok {
                var z = [CChar](repeating: 0, count: 41)
                let shown = key.count == 32 ? (key.withUnsafeBufferPointer { zmq_z85_encode(&z, $0.baseAddress, 32) } != nil ? String(cString: z) : "?") : "none"
                log("refused a connection from \(address): CURVE key \(shown) is not authorized")
            }
            try? rep.send([f[0], f[1], Array((ok ? "200" : "400").utf8), Array((ok ? "OK" : "not authorized").utf8),
                           Array((ok ? "worker" : "").utf8), []])
        }
    }
}
