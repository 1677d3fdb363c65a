import Foundation
import MBQTensor
#if canImport(Glibc)
import Glibc
#endif

/// One tensor's place in a safetensors file. `byteRange` is absolute in the file.
public struct TensorEntry: Sendable, Equatable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let byteRange: Range<Int>
    public var elementCount: Int { shape.reduce(1, *) }
}

/// A safetensors file opened read-only with mmap: the header is parsed and validated up
/// front, tensor bytes are touched only when asked for, so opening a 140 GB checkpoint
/// costs its headers. Format: u64 little-endian header length N, N bytes of JSON
/// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
/// then the data section (offsets are relative to it).
public final class SafetensorsFile: @unchecked Sendable {
    /// Headers larger than this are refused (the reference implementation's limit).
    public static let maxHeaderBytes = 100 * 1024 * 1024

    public let path: String
    public let metadata: [String: String]
    public let entries: [String: TensorEntry]
    private let base: UnsafeRawPointer?
    private let mappedLength: Int

    public var tensorNames: [String] { entries.keys.sorted() }

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw FormatsError.unreadable(path: path, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw FormatsError.unreadable(path: path, reason: String(cString: strerror(errno)))
        }
        let size = Int(st.st_size)
        guard size >= 8 else {
            throw FormatsError.truncated(path: path, reason: "\(size) bytes, shorter than the 8-byte header length")
        }
        guard let map = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), map != MAP_FAILED else {
            throw FormatsError.unreadable(path: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
        }
        let raw = UnsafeRawPointer(map)
        do {
            let (meta, ents) = try SafetensorsFile.parseHeader(raw, fileSize: size, path: path)
            self.metadata = meta
            self.entries = ents
        } catch {
            munmap(map, size)
            throw error
        }
        self.base = raw
        self.mappedLength = size
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), mappedLength) }
    }

    /// Drops the file pages under tensor `name` from this process's resident memory (they
    /// stay in the page cache; a later read faults them back in). Pages shared with a
    /// neighbouring tensor are kept. Reading one layer at a time and releasing it keeps
    /// the resident set at one layer's bytes however large the model.
    public func releasePages(_ name: String) {
        guard let base, let e = entries[name], !e.byteRange.isEmpty else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let lo = (e.byteRange.lowerBound + page - 1) / page * page, hi = e.byteRange.upperBound / page * page
        guard hi > lo else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base + lo), hi - lo, MADV_DONTNEED)
    }

    static func parseHeader(_ raw: UnsafeRawPointer, fileSize: Int, path: String) throws
        -> ([String: String], [String: TensorEntry]) {
        let n64 = UInt64(littleEndian: raw.loadUnaligned(as: UInt64.self))
        guard n64 <= UInt64(maxHeaderBytes) else {
            throw FormatsError.invalidHeader(path: path, reason: "header length \(n64) exceeds the \(maxHeaderBytes)-byte limit")
        }
        let n = Int(n64)
        guard 8 + n <= fileSize else {
            throw FormatsError.truncated(path: path, reason: "header claims \(n) bytes but the file has \(fileSize - 8) after the length field")
        }
        let headerData = Data(bytes: raw + 8, count: n)
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: headerData)
        } catch {
            throw FormatsError.invalidHeader(path: path, reason: "header is not valid JSON")
        }
        guard let dict = json as? [String: Any] else {
            throw FormatsError.invalidHeader(path: path, reason: "header is not a JSON object")
        }
        let dataStart = 8 + n
        let dataSize = fileSize - dataStart
        var metadata: [String: String] = [:]
        var entries: [String: TensorEntry] = [:]
        for (name, value) in dict {
            if name == "__metadata__" {
                guard let m = value as? [String: Any] else {
                    throw FormatsError.invalidHeader(path: path, reason: "__metadata__ is not an object")
                }
                for (k, v) in m {
                    guard let s = v as? String else {
                        throw FormatsError.invalidHeader(path: path, reason: "__metadata__['\(k)'] is not a string")
                    }
                    metadata[k] = s
                }
                continue
            }
            entries[name] = try parseEntry(name: name, value: value, dataStart: dataStart,
                                           dataSize: dataSize, path: path)
        }
        // No two tensors may share bytes.
        let sorted = entries.values.filter { !$0.byteRange.isEmpty }
            .sorted { ($0.byteRange.lowerBound, $0.name) < ($1.byteRange.lowerBound, $1.name) }
        for i in sorted.indices.dropFirst() where sorted[i].byteRange.lowerBound < sorted[i - 1].byteRange.upperBound {
            throw FormatsError.overlappingTensors(path: path, first: sorted[i - 1].name, second: sorted[i].name)
        }
        return (metadata, entries)
    }

    private static func intArray(_ v: Any?) -> [Int]? {
        guard let arr = v as? [Any] else { return nil }
        var out: [Int] = []
        for x in arr {
            guard let num = x as? NSNumber else { return nil }
            // Reject booleans and non-integral numbers that JSONSerialization also returns as NSNumber.
            let d = num.doubleValue
            guard d == d.rounded(), d >= 0, d < 9.0e15, String(cString: num.objCType) != "c" else { return nil }
            out.append(Int(d))
        }
        return out
    }

    private static func parseEntry(name: String, value: Any, dataStart: Int, dataSize: Int,
                                   path: String) throws -> TensorEntry {
        guard let e = value as? [String: Any] else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "entry is not an object")
        }
        guard let dtypeName = e["dtype"] as? String else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "missing dtype")
        }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "unknown dtype '\(dtypeName)'")
        }
        guard let shape = intArray(e["shape"]) else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "shape is not a list of non-negative integers")
        }
        guard let offsets = intArray(e["data_offsets"]), offsets.count == 2 else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "data_offsets is not [begin, end]")
        }
        let (begin, end) = (offsets[0], offsets[1])
        guard begin <= end else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "data_offsets [\(begin), \(end)] run backwards")
        }
        guard end <= dataSize else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name,
                reason: "data_offsets [\(begin), \(end)] run past the data section (\(dataSize) bytes; file truncated?)")
        }
        var elements = 1
        for d in shape {
            let (p, overflow) = elements.multipliedReportingOverflow(by: d)
            guard !overflow else {
                throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "shape \(shape) overflows")
            }
            elements = p
        }
        let (bytes, overflow) = elements.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow, bytes == end - begin else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name,
                reason: "shape \(shape) × \(dtypeName) needs \(elements * dtype.byteSize) bytes but data_offsets span \(end - begin)")
        }
        return TensorEntry(name: name, dtype: dtype, shape: shape,
                           byteRange: (dataStart + begin)..<(dataStart + end))
    }

    public func entry(_ name: String) throws -> TensorEntry {
        guard let e = entries[name] else { throw FormatsError.missingTensor(name: name, in: path) }
        return e
    }

    /// The tensor's bytes, straight from the mapping (no copy).
    public func rawBytes(_ name: String) throws -> UnsafeRawBufferPointer {
        let e = try entry(name)
        return UnsafeRawBufferPointer(start: base! + e.byteRange.lowerBound, count: e.byteRange.count)
    }

    /// The file's bytes at `range` (absolute offsets, clamped to the file), copied.
    public func fileBytes(_ range: Range<Int>) -> [UInt8] {
        let r = max(0, range.lowerBound)..<min(mappedLength, max(range.lowerBound, range.upperBound))
        guard let base, !r.isEmpty else { return [] }
        return Array(UnsafeRawBufferPointer(start: base + r.lowerBound, count: r.count))
    }

    /// The file's size in bytes.
    public var fileSize: Int { mappedLength }

    /// One row of a 2-D floating-point tensor converted to fp32 (reads that row only).
    public func floatRow(_ name: String, row: Int) throws -> [Float] {
        let e = try entry(name)
        guard e.dtype.isFloatingPoint, e.shape.count == 2, (0..<e.shape[0]).contains(row) else {
            throw FormatsError.invalidTensorEntry(path: path, tensor: name, reason: "no row \(row) of a 2-D floating-point tensor (\(e.dtype.rawValue) \(e.shape))")
        }
        let cols = e.shape[1], bs = e.dtype.byteSize
        var out = [Float](repeating: 0, count: cols)
        out.withUnsafeMutableBufferPointer { dst in
            Self.widen(UnsafeRawBufferPointer(start: base! + e.byteRange.lowerBound + row * cols * bs, count: cols * bs), e.dtype, into: dst)
        }
        return out
    }

    /// A floating-point tensor converted to fp32 (F32, F16, BF16, F64 accepted).
    public func floatTensor(_ name: String) throws -> Tensor<Float> {
        let e = try entry(name)
        guard e.dtype.isFloatingPoint else {
            throw FormatsError.dtypeMismatch(path: path, tensor: name, expected: "a floating-point dtype", found: e.dtype.rawValue)
        }
        let raw = try rawBytes(name)
        let n = e.elementCount
        var out = [Float](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { dst in Self.widen(raw, e.dtype, into: dst) }
        return Tensor(shape: e.shape, data: out)
    }

    /// `dst.count` values of floating-point `dtype` from `raw`, as fp32.
    static func widen(_ raw: UnsafeRawBufferPointer, _ dtype: DType, into dst: UnsafeMutableBufferPointer<Float>) {
        let n = dst.count
        switch dtype {
        case .f32:
            if n > 0 { memcpy(dst.baseAddress!, raw.baseAddress!, n * 4) }
        case .bf16:
            for i in 0..<n { dst[i] = HalfPrecision.bf16ToFloat(raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .f16:
            for i in 0..<n { dst[i] = HalfPrecision.fp16ToFloat(raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .f64:
            for i in 0..<n { dst[i] = Float(raw.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)) }
        default:
            break
        }
    }

    /// An integer or bool tensor widened to Int64.
    public func intValues(_ name: String) throws -> (shape: [Int], values: [Int64]) {
        let e = try entry(name)
        let raw = try rawBytes(name)
        let n = e.elementCount
        var out = [Int64](repeating: 0, count: n)
        switch e.dtype {
        case .i64: for i in 0..<n { out[i] = raw.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self) }
        case .i32: for i in 0..<n { out[i] = Int64(raw.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
        case .i16: for i in 0..<n { out[i] = Int64(raw.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)) }
        case .i8: for i in 0..<n { out[i] = Int64(raw.load(fromByteOffset: i, as: Int8.self)) }
        case .u8, .bool: for i in 0..<n { out[i] = Int64(raw.load(fromByteOffset: i, as: UInt8.self)) }
        default:
            throw FormatsError.dtypeMismatch(path: path, tensor: name, expected: "an integer dtype", found: e.dtype.rawValue)
        }
        return (e.shape, out)
    }
}
