/// Integer codes packed into int32 words, as the serving formats lay them out
/// (../shared/FORMATS.md; docs/FORMATS.md).
///
/// A *stream* puts element i of a line at global bit i·b, least significant bits first,
/// so a 3-bit code may straddle two words (GPTQ). compressed-tensors' pack-quantized
/// and GPTQ use streams along one dimension of a matrix; AutoAWQ packs eight 4-bit
/// codes per word in an interleaved order.
public enum BitPacking {
    /// Words needed for `count` codes of `bits` bits.
    public static func words(_ count: Int, bits: Int) -> Int { (count * bits + 31) / 32 }

    /// Packs `count` codes, `value(i)` each, into a stream of `words(count, bits)` words
    /// written at `out[base + k * stride]`.
    @inline(__always)
    static func packLine(_ count: Int, bits: Int, into out: UnsafeMutablePointer<UInt32>, base: Int, stride: Int,
                         _ value: (Int) -> UInt8) {
        let mask = UInt64((1 << bits) - 1)
        var acc: UInt64 = 0, filled = 0, k = 0
        for i in 0..<count {
            acc |= (UInt64(value(i)) & mask) << UInt64(filled)
            filled += bits
            if filled >= 32 {
                out[base + k * stride] = UInt32(truncatingIfNeeded: acc)
                k += 1
                acc >>= 32
                filled -= 32
            }
        }
        if filled > 0 { out[base + k * stride] = UInt32(truncatingIfNeeded: acc) }
    }

    /// The codes of one stream read back from `words(count, bits)` words.
    @inline(__always)
    static func unpackLine(_ count: Int, bits: Int, from w: UnsafePointer<UInt32>, base: Int, stride: Int,
                           _ store: (Int, UInt8) -> Void) {
        let mask = UInt64((1 << bits) - 1)
        var acc: UInt64 = 0, filled = 0, k = 0
        for i in 0..<count {
            if filled < bits {
                acc |= UInt64(w[base + k * stride]) << UInt64(filled)
                k += 1
                filled += 32
            }
            store(i, UInt8(acc & mask))
            acc >>= UInt64(bits)
            filled -= bits
        }
    }

    /// Each row's stream of `codes` [rows, cols], word k of row r at out[base(r) + k * stride].
    static func packEachRow(_ codes: [UInt8], rows: Int, cols: Int, bits: Int, stride: Int, base: (Int) -> Int) -> [Int32] {
        var out = [UInt32](repeating: 0, count: words(cols, bits: bits) * rows)
        out.withUnsafeMutableBufferPointer { po in
            codes.withUnsafeBufferPointer { pc in
                for r in 0..<rows { packLine(cols, bits: bits, into: po.baseAddress!, base: base(r), stride: stride) { pc[r * cols + $0] } }
            }
        }
        return out.map { Int32(bitPattern: $0) }
    }

    /// The inverse of `packEachRow`.
    static func unpackEachRow(_ packed: [Int32], rows: Int, cols: Int, bits: Int, stride: Int, base: (Int) -> Int) -> [UInt8] {
        precondition(packed.count == words(cols, bits: bits) * rows, "packed \(packed.count) words for \(rows) rows of \(words(cols, bits: bits))")
        let w = packed.map { UInt32(bitPattern: $0) }
        var out = [UInt8](repeating: 0, count: rows * cols)
        w.withUnsafeBufferPointer { pw in
            out.withUnsafeMutableBufferPointer { po in
                for r in 0..<rows { unpackLine(cols, bits: bits, from: pw.baseAddress!, base: base(r), stride: stride) { po[r * cols + $0] = $1 } }
            }
        }
        return out
    }

    /// codes: [rows, cols] -> [rows, words(cols)]: one stream along each row.
    public static func packRows(_ codes: [UInt8], rows: Int, cols: Int, bits: Int) -> [Int32] {
        let wpr = words(cols, bits: bits)
        return packEachRow(codes, rows: rows, cols: cols, bits: bits, stride: 1) { $0 * wpr }
    }

    /// [rows, words(cols)] -> codes [rows, cols].
    public static func unpackRows(_ packed: [Int32], rows: Int, cols: Int, bits: Int) -> [UInt8] {
        let wpr = words(cols, bits: bits)
        return unpackEachRow(packed, rows: rows, cols: cols, bits: bits, stride: 1) { $0 * wpr }
    }

    /// codes: [rows, cols] -> [words(cols), rows]: each row's stream written down a column
    /// of the output (GPTQ's `qweight` from [out, in] codes; `packColumns` of the
    /// transpose, without transposing).
    public static func packRowsTransposed(_ codes: [UInt8], rows: Int, cols: Int, bits: Int) -> [Int32] {
        packEachRow(codes, rows: rows, cols: cols, bits: bits, stride: rows) { $0 }
    }

    /// [words(cols), rows] -> codes [rows, cols].
    public static func unpackRowsTransposed(_ packed: [Int32], rows: Int, cols: Int, bits: Int) -> [UInt8] {
        unpackEachRow(packed, rows: rows, cols: cols, bits: bits, stride: rows) { $0 }
    }

    /// codes: [rows, cols] -> [words(rows), cols]: one stream down each column.
    public static func packColumns(_ codes: [UInt8], rows: Int, cols: Int, bits: Int) -> [Int32] {
        let wpc = words(rows, bits: bits)
        var out = [UInt32](repeating: 0, count: wpc * cols)
        out.withUnsafeMutableBufferPointer { po in
            codes.withUnsafeBufferPointer { pc in
                for c in 0..<cols { packLine(rows, bits: bits, into: po.baseAddress!, base: c, stride: cols) { pc[$0 * cols + c] } }
            }
        }
        return out.map { Int32(bitPattern: $0) }
    }

    /// [words(rows), cols] -> codes [rows, cols].
    public static func unpackColumns(_ packed: [Int32], rows: Int, cols: Int, bits: Int) -> [UInt8] {
        let wpc = words(rows, bits: bits)
        precondition(packed.count == wpc * cols, "packed \(packed.count) words for [\(wpc), \(cols)]")
        let w = packed.map { UInt32(bitPattern: $0) }
        var out = [UInt8](repeating: 0, count: rows * cols)
        w.withUnsafeBufferPointer { pw in
            out.withUnsafeMutableBufferPointer { po in
                for c in 0..<cols { unpackLine(rows, bits: bits, from: pw.baseAddress!, base: c, stride: cols) { po[$0 * cols + c] = $1 } }
            }
        }
        return out
    }

    /// AutoAWQ's order: nibble k of a word holds column 8c + awqOrder[k] (`packAWQ`
    /// writes it out by hand)
    /// (AutoAWQ `awq/modules/linear/gemm.py`, `AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`).
    public static let awqOrder = [0, 2, 4, 6, 1, 3, 5, 7]

    /// 4-bit codes [rows, cols] (cols a multiple of 8) -> [rows, cols / 8], interleaved.
    public static func packAWQ(_ codes: [UInt8], rows: Int, cols: Int) -> [Int32] {
        precondition(cols % 8 == 0 && codes.count == rows * cols, "AWQ packs 8 columns per word: [\(rows), \(cols)]")
        var out = [Int32](repeating: 0, count: rows * cols / 8)
        codes.withUnsafeBufferPointer { pc in
            out.withUnsafeMutableBufferPointer { po in
                for w in 0..<(rows * cols / 8) {
                    let b = 8 * w  // the row's columns 8c ..< 8c + 8, in memory order
                    var word = UInt32(pc[b] & 0xF) | UInt32(pc[b + 2] & 0xF) << 4 | UInt32(pc[b + 4] & 0xF) << 8
                    word |= UInt32(pc[b + 6] & 0xF) << 12 | UInt32(pc[b + 1] & 0xF) << 16 | UInt32(pc[b + 3] & 0xF) << 20
                    word |= UInt32(pc[b + 5] & 0xF) << 24 | UInt32(pc[b + 7] & 0xF) << 28
                    po[w] = Int32(bitPattern: word)
                }
            }
        }
        return out
    }

    /// [rows, cols / 8] interleaved -> 4-bit codes [rows, cols].
    public static func unpackAWQ(_ packed: [Int32], rows: Int, cols: Int) -> [UInt8] {
        precondition(cols % 8 == 0 && packed.count == rows * cols / 8, "AWQ: \(packed.count) words for [\(rows), \(cols)]")
        var out = [UInt8](repeating: 0, count: rows * cols)
        for r in 0..<rows {
            for c in 0..<(cols / 8) {
                let word = UInt32(bitPattern: packed[r * (cols / 8) + c])
                for k in 0..<8 { out[r * cols + 8 * c + awqOrder[k]] = UInt8((word >> UInt32(4 * k)) & 0xF) }
            }
        }
        return out
    }
}
