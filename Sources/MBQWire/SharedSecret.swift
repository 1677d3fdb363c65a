import Foundation
import MBQTensor

/// Where the job's shared secret comes from, and what it must be (README "Security"):
/// a file only its owner can read (`--secret-file`, made by `mbq keygen`) or the
/// MBQ_SECRET environment variable, never a command line (`ps` shows those to every user
/// of the machine), and at least `minimumBytes` long: an empty variable (a shell that
/// expanded `$MBQ_SECRET` before setting it) is an error, not "no authentication".
public enum SharedSecret {
    public static let minimumBytes = 16
    public static let environmentVariable = "MBQ_SECRET"

    public enum Problem: Error, CustomStringConvertible, Equatable {
        case unreadable(path: String, reason: String)
        case exposed(path: String, mode: UInt16)
        case tooShort(source: String, bytes: Int)

        public var description: String {
            switch self {
            case let .unreadable(path, reason): return "secret file \(path): \(reason)"
            case let .exposed(path, mode):
                return "secret file \(path) is readable by other users (mode \(String(mode, radix: 8))): chmod 600 \(path)"
            case let .tooShort(source, bytes):
                return "the shared secret from \(source) has \(bytes) bytes; at least \(SharedSecret.minimumBytes) are required (make one with `mbq keygen`)"
            }
        }
    }

    /// The secret from `file`, else from the environment; nil when neither gives one.
    /// A file readable by group or others, and a secret shorter than `minimumBytes`
    /// (an empty MBQ_SECRET included), are refused.
    public static func load(file: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> String? {
        if let file {
            var st = stat()
            guard stat(file, &st) == 0 else { throw Problem.unreadable(path: file, reason: String(cString: strerror(errno))) }
            guard st.st_mode & 0o077 == 0 else { throw Problem.exposed(path: file, mode: UInt16(st.st_mode & 0o777)) }
            guard let data = FileManager.default.contents(atPath: file) else { throw Problem.unreadable(path: file, reason: "cannot read") }
            let s = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            guard s.utf8.count >= minimumBytes else { throw Problem.tooShort(source: file, bytes: s.utf8.count) }
            return s
        }
        guard let s = environment[environmentVariable] else { return nil }
        guard s.utf8.count >= minimumBytes else { throw Problem.tooShort(source: environmentVariable, bytes: s.utf8.count) }
        return s
    }

    /// 32 bytes from the system's random source, as 64 hex digits.
    public static func generate() -> String {
        var g = SystemRandomNumberGenerator()
        return (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &g)) }.joined()
    }

    /// Writes a new secret to `path` (mode 0600, never over an existing file).
    public static func write(to path: String) throws {
        try NewFile.write(path, generate() + "\n", mode: 0o600)
    }
}

/// Files that hold keys and secrets: created with their final mode (never readable by
/// others, not even briefly), never over an existing file, synced before use.
enum NewFile {
    static func write(_ path: String, _ text: String, mode: mode_t) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode)
        guard fd >= 0 else { throw SharedSecret.Problem.unreadable(path: path, reason: "cannot create: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard Glibc.write(fd, bytes, bytes.count) == bytes.count, fsync(fd) == 0 else {
            throw SharedSecret.Problem.unreadable(path: path, reason: "cannot write: \(String(cString: strerror(errno)))")
        }
    }
}

/// A ZeroMQ TCP endpoint's host, to tell loopback from a network address.
public enum Endpoint {
    /// "tcp://HOST:PORT" -> HOST (brackets of an IPv6 literal removed); nil for other forms.
    public static func host(_ endpoint: String) -> String? {
        guard endpoint.hasPrefix("tcp://") else { return nil }
        let rest = endpoint.dropFirst(6)
        guard let colon = rest.lastIndex(of: ":") else { return nil }
        var h = String(rest[..<colon])
        if h.hasPrefix("[") && h.hasSuffix("]") { h = String(h.dropFirst().dropLast()) }
        return h
    }

    /// Whether only this machine can reach `endpoint`: tcp on 127.0.0.0/8, ::1 or
    /// localhost, or the ipc and inproc transports.
    public static func isLoopback(_ endpoint: String) -> Bool {
        if endpoint.hasPrefix("ipc://") || endpoint.hasPrefix("inproc://") { return true }
        guard let h = host(endpoint) else { return false }
        if h == "localhost" || h == "::1" { return true }
        let parts = h.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }
}
