import MBQQuant
import MBQTensor
import XCTest

/// The integer codes (the spec is `QuantReference`) and the bit layouts the packed
/// formats use, on hand-worked examples and random round trips.
final class PackingTests: XCTestCase {
    func randomWeight(_ rows: Int, _ cols: Int, seed: UInt64) -> Tensor<Float> {
        var state = seed
        func next() -> Float {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int64(bitPattern: state >> 11) % 2000) / 1000 - 1
        }
        var w = Tensor<Float>(shape: [rows, cols], data: (0..<(rows * cols)).map { _ in next() })
        // An outlier column and a row of one sign (zero point 0), as real weights have.
        for r in 0..<rows { w.data[r * cols + 3] *= 20 }
        for j in 0..<cols { w.data[j] = abs(w.data[j]) + 0.5 }
        return w
    }

    func testFastCodesEqualTheReference() {
        for (rows, cols) in [(8, 128), (24, 256), (3, 384)] {
            let w = randomWeight(rows, cols, seed: UInt64(rows * cols))
            for bits in [2, 3, 4, 8] {
                for group in [32, 128, -1] where group < 0 || cols % group == 0 {
                    let fast = Quantize.groupAsymmetricCodes(w, bits: bits, group: group)
                    XCTAssertEqual(fast, QuantReference.groupAsymmetricCodes(w, bits: bits, group: group), "w\(bits) g\(group) \(rows)x\(cols)")
                    // Fake quantization is exactly the codes' dequantization.
                    XCTAssertEqual(fast.dequantized().data, Quantize.groupAsymmetric(w, bits: bits, group: group).data)
                }
                if bits >= 2 {
                    let fast = Quantize.rowSymmetricCodes(w, bits: bits)
                    XCTAssertEqual(fast, QuantReference.rowSymmetricCodes(w, bits: bits), "sym w\(bits)")
                    XCTAssertEqual(fast.dequantized().data, Quantize.rowSymmetric(w, bits: bits).data)
                }
            }
        }
    }

    func testCodesOfAHandWorkedGroup() {
        // min -1, max 2 at 2 bits: scale = 3/3 = 1, zero = clamp(-round(-1), 0, 3) = 1.
        let w = Tensor<Float>(shape: [1, 4], data: [-1, 0, 0.5, 2])
        let q = QuantReference.groupAsymmetricCodes(w, bits: 2, group: 4)
        XCTAssertEqual(q.codes, [0, 1, 1, 3], "0.5 rounds half to even: 0 + 1")
        XCTAssertEqual(q.scales, [1]); XCTAssertEqual(q.zeros, [1])
        // Symmetric 4-bit: scale = 7/7 = 1; signed codes -7, 0, 2, 7 stored + 8.
        let s = QuantReference.rowSymmetricCodes(Tensor(shape: [1, 4], data: [-7, 0, 2.4, 7]), bits: 4)
        XCTAssertEqual(s.codes, [1, 8, 10, 15]); XCTAssertEqual(s.zeros, [8])
        XCTAssertEqual(s.dequantized().data, [-7, 0, 2, 7])
        // All-positive group: the zero point is 0 (what GPTQ v1 cannot store).
        let p = QuantReference.groupAsymmetricCodes(Tensor(shape: [1, 4], data: [0.5, 1, 2, 3.5]), bits: 4, group: 4)
        XCTAssertEqual(p.zeros, [0])
    }

    func testThreeBitCodesStraddleWords() {
        // Code i sits at bits 3i..3i+2: code 10 takes bits 30, 31 of word 0 and bit 0 of word 1.
        var codes = [UInt8](repeating: 0, count: 32)
        codes[0] = 7; codes[10] = 5; codes[31] = 6
        let packed = BitPacking.packRows(codes, rows: 1, cols: 32, bits: 3)
        XCTAssertEqual(packed.count, 3, "32 codes x 3 bits = 3 words")
        XCTAssertEqual(UInt32(bitPattern: packed[0]), 0x4000_0007, "7 at bits 0-2, the low bits (01) of 5 at bits 30-31")
        XCTAssertEqual(UInt32(bitPattern: packed[1]), 0x0000_0001, "the high bit of 5 at bit 0 of word 1")
        XCTAssertEqual(UInt32(bitPattern: packed[2]), 0xC000_0000, "6 = 0b110 at bits 93-95")
        XCTAssertEqual(BitPacking.unpackRows(packed, rows: 1, cols: 32, bits: 3), codes)
    }

    func testFourBitStreamAndColumnPacking() {
        let codes: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0]
        XCTAssertEqual(BitPacking.packRows(codes, rows: 1, cols: 16, bits: 4).map { UInt32(bitPattern: $0) }, [0x8765_4321, 0x0FED_CBA9])
        // Down the columns of [16, 1]: the same stream.
        XCTAssertEqual(BitPacking.packColumns(codes, rows: 16, cols: 1, bits: 4), BitPacking.packRows(codes, rows: 1, cols: 16, bits: 4))
        // Two columns interleaved in memory, each its own stream.
        let two: [UInt8] = (0..<16).flatMap { [UInt8($0 % 16), UInt8(15 - $0 % 16)] }
        let p = BitPacking.packColumns(two, rows: 16, cols: 2, bits: 4).map { UInt32(bitPattern: $0) }
        XCTAssertEqual(p, [0x7654_3210, 0x89AB_CDEF, 0xFEDC_BA98, 0x0123_4567])
    }

    func testAWQInterleave() {
        // Nibble k holds column order[k] = [0, 2, 4, 6, 1, 3, 5, 7].
        let row: [UInt8] = [0, 1, 2, 3, 4, 5, 6, 7]
        let p = BitPacking.packAWQ(row, rows: 1, cols: 8)
        XCTAssertEqual(UInt32(bitPattern: p[0]), 0x7531_6420)
        XCTAssertEqual(BitPacking.unpackAWQ(p, rows: 1, cols: 8), row)
    }

    func testRandomRoundTrips() {
        var state: UInt64 = 42
        for bits in [2, 3, 4, 8] {
            for (rows, cols) in [(5, 32), (7, 96), (64, 3)] {
                let codes = (0..<(rows * cols)).map { _ -> UInt8 in
                    state = state &* 6364136223846793005 &+ 1
                    return UInt8((state >> 33) % UInt64(1 << bits))
                }
                XCTAssertEqual(BitPacking.unpackRows(BitPacking.packRows(codes, rows: rows, cols: cols, bits: bits), rows: rows, cols: cols, bits: bits), codes)
                XCTAssertEqual(BitPacking.unpackColumns(BitPacking.packColumns(codes, rows: rows, cols: cols, bits: bits), rows: rows, cols: cols, bits: bits), codes)
                // A row's stream down an output column is packColumns of the transpose.
                var t = codes
                for r in 0..<rows { for c in 0..<cols { t[c * rows + r] = codes[r * cols + c] } }
                let down = BitPacking.packRowsTransposed(codes, rows: rows, cols: cols, bits: bits)
                XCTAssertEqual(down, BitPacking.packColumns(t, rows: cols, cols: rows, bits: bits))
                XCTAssertEqual(BitPacking.unpackRowsTransposed(down, rows: rows, cols: cols, bits: bits), codes)
                if bits == 4 && cols % 8 == 0 {
                    XCTAssertEqual(BitPacking.unpackAWQ(BitPacking.packAWQ(codes, rows: rows, cols: cols), rows: rows, cols: cols), codes)
                }
            }
        }
    }

    func testScalePrecisionRoundsLikeTorch() {
        // 1 + 2^-9 is halfway between two bf16 values: ties to even (1.0). fp16 keeps it.
        let x = Float(1) + Float(1) / 512
        XCTAssertEqual(ScalePrecision.bf16.round(x), 1)
        XCTAssertEqual(ScalePrecision.f16.round(x), x)
        // Dequantization multiplies in the scale's precision: (q - z) * s rounded once.
        let q = QuantizedWeight(rows: 1, cols: 2, bits: 4, group: 2, symmetric: false, codes: [15, 0], scales: [0.1], zeros: [0])
        let s16 = ScalePrecision.f16.round(0.1)
        XCTAssertEqual(q.dequantized(precision: .f16).data, [ScalePrecision.f16.round(15 * s16), 0])
    }
}
