import Foundation
import MBQTensor
import SwiftProtobuf

/// The protocol version every envelope carries; peers with another version are refused.
public let protocolVersion: UInt32 = 2

/// Largest raw frame accepted, and the chunk size tensors are cut into (ZeroMQ moves
/// 1 MiB frames about twice as fast as one 64 MiB frame over loopback).
public let maxFrameBytes = 64 << 20
public let tensorChunkBytes = 1 << 20

public enum ProtocolError: Error, CustomStringConvertible, Equatable {
    case empty
    case malformed(String)
    case versionMismatch(got: UInt32, want: UInt32)
    case tensor(name: String, reason: String)

    public var description: String {
        switch self {
        case .empty: return "empty message"
        case let .malformed(why): return "malformed envelope: \(why)"
        case let .versionMismatch(got, want): return "protocol version \(got), this side speaks \(want)"
        case let .tensor(name, why): return "tensor '\(name)': \(why)"
        }
    }
}

/// A decoded message: the envelope and, when it carries a TensorHeader, the checked
/// payload: an fp32 tensor (dtype F32), or opaque bytes (dtype U8: a finished layer
/// shard, written as it came).
public struct WireMessage {
    public var envelope: Mbq_Envelope
    public var tensor: Tensor<Float>?
    public var bytes: [UInt8]?

    public init(envelope: Mbq_Envelope, tensor: Tensor<Float>?, bytes: [UInt8]? = nil) {
        self.envelope = envelope
        self.tensor = tensor
        self.bytes = bytes
    }
}

public enum Wire {
    public static func envelope(job: String, _ body: Mbq_Envelope.OneOf_Body) -> Mbq_Envelope {
        var e = Mbq_Envelope()
        e.version = protocolVersion
        e.jobID = job
        e.body = body
        return e
    }

    /// Frames of an envelope without a tensor.
    public static func encode(_ e: Mbq_Envelope) throws -> [[UInt8]] {
        [Array(try e.serializedData())]
    }

    /// The envelope frame of a tensor message: its TensorHeader (checksum of the bytes).
    public static func tensorHeader(job: String, name: TensorName, tensor t: Tensor<Float>, epoch: UInt32,
                                    secret: String? = nil) throws -> [UInt8] {
        var h = Mbq_TensorHeader()
        h.name = name.wire
        h.dtype = "F32"
        h.shape = t.shape.map(UInt64.init)
        h.byteCount = UInt64(t.count * 4)
        h.checksum = t.data.withUnsafeBytes { Checksum64.of($0) }
        h.epoch = epoch
        h.chunks = UInt32((t.count * 4 + tensorChunkBytes - 1) / tensorChunkBytes)
        if let secret { h.authTag = Data(tag(h, job: job, secret: secret)) }
        return try encode(envelope(job: job, .tensor(h)))[0]
    }

    /// Frames of a byte message (dtype U8, shape [count]): the envelope with its
    /// TensorHeader, then the bytes cut into `tensorChunkBytes` frames.
    public static func encode(job: String, name: TensorName, bytes: [UInt8], epoch: UInt32, secret: String? = nil) throws -> [[UInt8]] {
        var h = Mbq_TensorHeader()
        h.name = name.wire
        h.dtype = "U8"
        h.shape = [UInt64(bytes.count)]
        h.byteCount = UInt64(bytes.count)
        h.checksum = bytes.withUnsafeBytes { Checksum64.of($0) }
        h.epoch = epoch
        h.chunks = UInt32((bytes.count + tensorChunkBytes - 1) / tensorChunkBytes)
        if let secret { h.authTag = Data(tag(h, job: job, secret: secret)) }
        var frames = [try encode(envelope(job: job, .tensor(h)))[0]]
        var i = 0
        while i < bytes.count {
            frames.append(Array(bytes[i..<min(bytes.count, i + tensorChunkBytes)]))
            i += tensorChunkBytes
        }
        return frames
    }

    /// Frames of a tensor message: the envelope with its TensorHeader, then the raw fp32
    /// bytes cut into `tensorChunkBytes` frames.
    public static func encode(job: String, name: TensorName, tensor t: Tensor<Float>, epoch: UInt32) throws -> [[UInt8]] {
        let head = try tensorHeader(job: job, name: name, tensor: t, epoch: epoch)
        return t.data.withUnsafeBytes { bytes in
            var chunks: [[UInt8]] = [head]
            var i = 0
            while i < bytes.count {
                chunks.append(Array(bytes[i..<min(bytes.count, i + tensorChunkBytes)]))
                i += tensorChunkBytes
            }
            return chunks
        }
    }

    /// Keeps a tensor's element storage alive while ZeroMQ still sends from it.
    final class PinnedStorage {
        let data: [Float]
        init(_ d: [Float]) { data = d }
    }

    /// Sends a tensor message straight from the tensor's storage (no copy on this side).
    /// The pointer stays valid after `withUnsafeBytes` returns because the box holds the
    /// array's one heap buffer, which is never mutated (a write elsewhere would copy it
    /// first) and is freed only when ZeroMQ releases the box.
    public static func send(_ sock: ZMQSocket, job: String, name: TensorName, tensor t: Tensor<Float>, epoch: UInt32,
                            secret: String? = nil) throws {
        let head = try tensorHeader(job: job, name: name, tensor: t, epoch: epoch, secret: secret)
        let box = PinnedStorage(t.data)
        try box.data.withUnsafeBytes { try sock.send([head], payload: $0, chunk: tensorChunkBytes, owner: box) }
    }

    /// Shared-secret mode: HMAC-SHA256 over what identifies a tensor message (the checksum
    /// stands for the bytes, which the receiver checks against it).
    static func tag(_ h: Mbq_TensorHeader, job: String, secret: String) -> [UInt8] {
        Auth.hmacSHA256(key: Array(secret.utf8), message: Array("\(job)|\(h.name)|\(h.epoch)|\(h.byteCount)|\(h.checksum)".utf8))
    }

    public static func verifyTag(_ h: Mbq_TensorHeader, job: String, secret: String) -> Bool {
        Auth.constantTimeEqual(tag(h, job: job, secret: secret), Array(h.authTag))
    }

    /// Decodes a message read in place: tensor chunks are copied once, into the tensor.
    public static func decode(_ m: RawMessage) throws -> WireMessage {
        guard m.count > 0 else { throw ProtocolError.empty }
        return try decode(first: Array(m.frame(0)), rest: (1..<m.count).map { m.frame($0) })
    }

    /// Decodes and validates: version, a body present, and for tensors the frame count,
    /// byte count, shape and checksum. Never traps on bad input.
    public static func decode(_ frames: [[UInt8]]) throws -> WireMessage {
        guard let first = frames.first else { throw ProtocolError.empty }
        return try frames.dropFirst().withContiguousBufferPointers { try decode(first: first, rest: $0) }
    }

    static func decode(first: [UInt8], rest: [UnsafeRawBufferPointer]) throws -> WireMessage {
        guard !first.isEmpty else { throw ProtocolError.empty }
        let frames = [UnsafeRawBufferPointer(start: nil, count: 0)] + rest  // index 0 stands for the envelope
        let e: Mbq_Envelope
        do {
            e = try Mbq_Envelope(serializedBytes: first)
        } catch {
            throw ProtocolError.malformed("not a protobuf Envelope (\(first.count) bytes)")
        }
        guard e.version == protocolVersion else { throw ProtocolError.versionMismatch(got: e.version, want: protocolVersion) }
        guard let body = e.body else { throw ProtocolError.malformed("no body") }
        guard case let .tensor(h) = body else {
            guard frames.count == 1 else { throw ProtocolError.malformed("\(frames.count - 1) unexpected extra frames") }
            return WireMessage(envelope: e, tensor: nil)
        }
        let name = h.name
        guard h.dtype == "F32" || h.dtype == "U8" else { throw ProtocolError.tensor(name: name, reason: "dtype '\(h.dtype)' (F32 tensors and U8 bytes travel)") }
        let width: UInt64 = h.dtype == "F32" ? 4 : 1
        guard Int(h.chunks) == frames.count - 1 else {
            throw ProtocolError.tensor(name: name, reason: "header announces \(h.chunks) chunks, \(frames.count - 1) arrived")
        }
        guard h.shape.count <= 8, h.shape.allSatisfy({ $0 < (1 << 40) }) else {
            throw ProtocolError.tensor(name: name, reason: "implausible shape \(h.shape)")
        }
        var elements: UInt64 = 1
        for d in h.shape {
            let (p, o) = elements.multipliedReportingOverflow(by: d)
            guard !o else { throw ProtocolError.tensor(name: name, reason: "shape \(h.shape) overflows") }
            elements = p
        }
        guard elements * width == h.byteCount else {
            throw ProtocolError.tensor(name: name, reason: "shape \(h.shape) needs \(elements * width) bytes, header says \(h.byteCount)")
        }
        let total = frames.dropFirst().reduce(0) { $0 + $1.count }
        guard UInt64(total) == h.byteCount else {
            throw ProtocolError.tensor(name: name, reason: "\(total) bytes arrived, header says \(h.byteCount)")
        }
        // One pass per frame: copy it into the tensor and fold it into the checksum while
        // it is still in cache.
        var sum = Checksum64(total: Int(h.byteCount))
        if width == 1 {
            let bytes = [UInt8](unsafeUninitializedCapacity: Int(elements)) { buf, n in
                var off = 0
                for f in frames.dropFirst() where f.count > 0 {
                    let piece = UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(buf)[off..<(off + f.count)])
                    piece.copyMemory(from: f)
                    sum.update(UnsafeRawBufferPointer(piece))
                    off += f.count
                }
                n = Int(elements)
            }
            guard sum.finalize() == h.checksum else { throw ProtocolError.tensor(name: name, reason: "checksum mismatch (corrupted in transit)") }
            return WireMessage(envelope: e, tensor: nil, bytes: bytes)
        }
        let data = [Float](unsafeUninitializedCapacity: Int(elements)) { buf, n in
            let dst = UnsafeMutableRawBufferPointer(buf)
            var off = 0
            for f in frames.dropFirst() where f.count > 0 {
                let piece = UnsafeMutableRawBufferPointer(rebasing: dst[off..<(off + f.count)])
                piece.copyMemory(from: f)
                sum.update(UnsafeRawBufferPointer(piece))
                off += f.count
            }
            n = Int(elements)
        }
        guard sum.finalize() == h.checksum else { throw ProtocolError.tensor(name: name, reason: "checksum mismatch (corrupted in transit)") }
        return WireMessage(envelope: e, tensor: Tensor(shape: h.shape.map { Int($0) }, data: data))
    }
}

extension ArraySlice where Element == [UInt8] {
    /// Runs `body` with pointers to every array's bytes (valid only inside `body`).
    func withContiguousBufferPointers<R>(_ body: ([UnsafeRawBufferPointer]) throws -> R) rethrows -> R {
        var ptrs: [UnsafeRawBufferPointer] = []
        func go(_ i: Index) throws -> R {
            if i == endIndex { return try body(ptrs) }
            return try self[i].withUnsafeBytes { p in
                ptrs.append(p)
                return try go(index(after: i))
            }
        }
        return try go(startIndex)
    }
}
