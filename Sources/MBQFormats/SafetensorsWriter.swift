import Foundation
import MBQTensor
#if canImport(Glibc)
import Glibc
#endif

/// Builds a safetensors file and writes it atomically: everything goes to a temporary
/// file beside the target, which is fsynced and renamed over it, so a crash leaves
/// either the old file or the new one, never half of one.
public struct SafetensorsWriter {
    struct Pending {
        let name: String
        let dtype: DType
        let shape: [Int]
        let data: Bytes
        let count: Int
    }

    /// A tensor's bytes: held, or read from another file's mapping only while writing
    /// (an unchanged 152k x 8192 embedding need not pass through anonymous memory).
    enum Bytes {
        case held([UInt8])
        case mapped(SafetensorsFile, String)

        /// Hands the bytes to `body` (1 GiB at a time from a mapping, each piece's pages
        /// released once it is written).
        func withPieces(_ body: (UnsafeRawBufferPointer) throws -> Void) throws {
            switch self {
            case .held(let b):
                try b.withUnsafeBytes(body)
            case .mapped(let f, let name):
                let all = try f.rawBytes(name)
                var at = 0
                repeat {
                    let n = min(1 << 30, all.count - at)
                    try body(UnsafeRawBufferPointer(rebasing: all[at..<(at + n)]))
                    at += n
                } while at < all.count
                f.releasePages(name)
            }
        }
    }

    private var pending: [Pending] = []
    private var names: Set<String> = []

    public init() {}

    /// Adds raw little-endian bytes; byte count must equal shape × dtype size.
    public mutating func add(_ name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        precondition(!names.contains(name), "tensor '\(name)' added twice")
        precondition(shape.reduce(1, *) * dtype.byteSize == bytes.count,
                     "tensor '\(name)': shape \(shape) × \(dtype.rawValue) != \(bytes.count) bytes")
        names.insert(name)
        pending.append(Pending(name: name, dtype: dtype, shape: shape, data: .held(bytes), count: bytes.count))
    }

    /// Adds `source`'s tensor `name` as stored; its bytes are read from the mapping when
    /// the file is written.
    public mutating func add(copying name: String, from source: SafetensorsFile) throws {
        let e = try source.entry(name)
        precondition(!names.contains(name), "tensor '\(name)' added twice")
        names.insert(name)
        pending.append(Pending(name: name, dtype: e.dtype, shape: e.shape, data: .mapped(source, name), count: e.byteRange.count))
    }

    /// Adds a float tensor stored as F32, BF16 or F16 (rounded to nearest even).
    public mutating func add(_ name: String, _ t: Tensor<Float>, as dtype: DType = .f32) {
        add(name, floats: t.data, shape: t.shape, as: dtype)
    }

    public mutating func add(_ name: String, floats: [Float], shape: [Int], as dtype: DType = .f32) {
        var bytes: [UInt8]
        switch dtype {
        case .f32:
            bytes = floats.withUnsafeBytes { Array($0) }
        case .bf16:
            let h = floats.map { HalfPrecision.floatToBF16($0).littleEndian }
            bytes = h.withUnsafeBytes { Array($0) }
        case .f16:
            let h = floats.map { HalfPrecision.floatToFP16($0).littleEndian }
            bytes = h.withUnsafeBytes { Array($0) }
        case .f64:
            bytes = floats.map { Double($0) }.withUnsafeBytes { Array($0) }
        default:
            preconditionFailure("add(floats:) cannot store \(dtype.rawValue)")
        }
        add(name, dtype: dtype, shape: shape, bytes: bytes)
    }

    public mutating func add(_ name: String, int64 values: [Int64], shape: [Int]) {
        add(name, dtype: .i64, shape: shape, bytes: values.map { $0.littleEndian }.withUnsafeBytes { Array($0) })
    }

    public mutating func add(_ name: String, int32 values: [Int32], shape: [Int]) {
        add(name, dtype: .i32, shape: shape, bytes: values.map { $0.littleEndian }.withUnsafeBytes { Array($0) })
    }

    public mutating func add(_ name: String, int8 values: [Int8], shape: [Int]) {
        add(name, dtype: .i8, shape: shape, bytes: values.withUnsafeBytes { Array($0) })
    }

    public mutating func add(_ name: String, uint8 values: [UInt8], shape: [Int]) {
        add(name, dtype: .u8, shape: shape, bytes: values)
    }

    /// Orders the data section by tensor name (the header is sorted anyway), so a file's
    /// bytes do not depend on the order its tensors were added in.
    public mutating func sortByName() {
        pending.sort { $0.name < $1.name }
    }

    /// The header JSON, padded with spaces to a multiple of 8 bytes so that the data
    /// section starts aligned (as the reference writer does).
    func headerBytes(metadata: [String: String]) throws -> [UInt8] {
        var obj: [String: Any] = [:]
        if !metadata.isEmpty { obj["__metadata__"] = metadata }
        var offset = 0
        for p in pending {
            obj[p.name] = ["dtype": p.dtype.rawValue, "shape": p.shape,
                           "data_offsets": [offset, offset + p.count]] as [String: Any]
            offset += p.count
        }
        var header = Array(try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys]))
        while header.count % 8 != 0 { header.append(0x20) }
        return header
    }

    /// The whole file as bytes (what `write` puts on disk).
    public func serialized(metadata: [String: String] = [:]) throws -> [UInt8] {
        let header = try headerBytes(metadata: metadata)
        var out: [UInt8] = []
        out.reserveCapacity(8 + header.count + pending.reduce(0) { $0 + $1.count })
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { out += $0 }
        out += header
        for p in pending { try p.data.withPieces { out += $0 } }
        return out
    }

    /// Writes the file atomically (temp file + fsync + rename).
    public func write(to path: String, metadata: [String: String] = [:]) throws {
        let header = try headerBytes(metadata: metadata)
        try AtomicFile.write(to: path) { fh in
            var len = UInt64(header.count).littleEndian
            try withUnsafeBytes(of: &len) { try fh.write($0) }
            try header.withUnsafeBytes { try fh.write($0) }
            for p in pending { try p.data.withPieces { try fh.write($0) } }
        }
    }
}

/// A file being written under a temporary name; renamed into place only on success.
public struct AtomicFile {
    public let fd: Int32
    public let path: String

    public func write(_ buf: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buf.count {
            let n = Glibc.write(fd, buf.baseAddress! + done, buf.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw FormatsError.writeFailed(path: path, reason: String(cString: strerror(errno)))
            }
            done += n
        }
    }

    /// Runs `body` on a temporary file beside `path`, then fsyncs and renames it to
    /// `path`. On any error the temporary file is removed and `path` is untouched.
    public static func write(to path: String, _ body: (AtomicFile) throws -> Void) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let base = (path as NSString).lastPathComponent
        let tmp = (dir.isEmpty ? "." : dir) + "/.\(base).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        guard fd >= 0 else {
            throw FormatsError.writeFailed(path: path, reason: String(cString: strerror(errno)))
        }
        var ok = false
        defer {
            if !ok { close(fd); unlink(tmp) }
        }
        try body(AtomicFile(fd: fd, path: path))
        guard fsync(fd) == 0 else {
            throw FormatsError.writeFailed(path: path, reason: "fsync: \(String(cString: strerror(errno)))")
        }
        close(fd)
        guard rename(tmp, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(tmp)
            ok = true
            throw FormatsError.writeFailed(path: path, reason: "rename: \(reason)")
        }
        ok = true
    }

    /// Writes `data` to `path` atomically.
    public static func write(data: Data, to path: String) throws {
        try write(to: path) { f in try data.withUnsafeBytes { try f.write($0) } }
    }
}
