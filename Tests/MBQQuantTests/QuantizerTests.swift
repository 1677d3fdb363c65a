import MBQQuant
import MBQTensor
import XCTest

final class QuantizerTests: XCTestCase {
    /// Round-trip error budgets: mean |w - Q(w)| / mean |w| on N(0, 1) weights with a few
    /// outliers, per bit width. Measured values sit well inside (see the printed table);
    /// a quantizer that got a step or a zero point wrong lands far outside.
    static let groupBudgets: [Int: Float] = [2: 0.60, 3: 0.26, 4: 0.12, 5: 0.06, 6: 0.03, 7: 0.015, 8: 0.008]
    static let channelBudgets: [Int: Float] = [4: 0.22, 8: 0.012]

    func weights(_ rows: Int, _ cols: Int, seed: UInt64) -> Tensor<Float> {
        var rng = SeededRandom(seed: seed)
        var w: Tensor<Float> = rng.normalTensor([rows, cols])
        w.data[3] = 9; w.data[cols + 7] = -7  // outliers
        return w
    }

    func relError(_ w: Tensor<Float>, _ q: Tensor<Float>) -> Float {
        zip(w.data, q.data).map { abs($0 - $1) }.reduce(0, +) / w.data.map { abs($0) }.reduce(0, +)
    }

    func testFastPathsEqualTheReferenceBitForBit() {
        for (rows, cols, group) in [(16, 256, 128), (8, 96, 32), (5, 64, 64), (7, 50, -1)] {
            let w = weights(rows, cols, seed: UInt64(rows * cols))
            for bits in 2...8 {
                XCTAssertEqual(Quantize.groupAsymmetric(w, bits: bits, group: group).data,
                               QuantReference.groupAsymmetric(w, bits: bits, group: group).data, "w\(bits) g\(group) \(rows)x\(cols)")
                XCTAssertEqual(Quantize.rowSymmetric(w, bits: bits).data, QuantReference.rowSymmetric(w, bits: bits).data,
                               "sym \(bits) bits")
            }
        }
    }

    /// The search's fused Q(W diag(s)) diag(s)^-1 equals the three steps done apart.
    func testFusedScaledQuantizationEqualsTheSteps() {
        let w = weights(12, 256, seed: 4)
        var rng = SeededRandom(seed: 5)
        let s = (0..<256).map { _ in Float(0.1 + 3 * rng.uniform()) }
        for bits in [3, 4] {
            var scaled = w
            for r in 0..<12 { for j in 0..<256 { scaled.data[r * 256 + j] *= s[j] } }
            var want = QuantReference.groupAsymmetric(scaled, bits: bits, group: 128)
            for r in 0..<12 { for j in 0..<256 { want.data[r * 256 + j] /= s[j] } }
            XCTAssertEqual(Quantize.groupAsymmetric(w, bits: bits, group: 128, columnScales: s).data, want.data)
        }
    }

    func testGroupAsymmetricProperties() {
        let w = weights(32, 256, seed: 1)
        for bits in 2...8 {
            let q = Quantize.groupAsymmetric(w, bits: bits, group: 128)
            // At most 2^b distinct values per group, and the group's min and max are kept within a step.
            for g in stride(from: 0, to: w.count, by: 128) {
                let vals = Set(q.data[g..<(g + 128)])
                XCTAssertLessThanOrEqual(vals.count, 1 << bits)
                let step = (w.data[g..<(g + 128)].max()! - w.data[g..<(g + 128)].min()!) / Float((1 << bits) - 1)
                XCTAssertLessThanOrEqual(abs(q.data[g..<(g + 128)].max()! - w.data[g..<(g + 128)].max()!), step * 0.5 + 1e-5)
            }
            let e = relError(w, q)
            print(String(format: "round-trip w%d g128 asym: %.4f (budget %.3f)", bits, e, Self.groupBudgets[bits]!))
            XCTAssertLessThan(e, Self.groupBudgets[bits]!, "w\(bits) g128")
        }
        // Smaller groups are never worse on average.
        XCTAssertLessThanOrEqual(relError(w, Quantize.groupAsymmetric(w, bits: 4, group: 32)),
                                 relError(w, Quantize.groupAsymmetric(w, bits: 4, group: -1)))
    }

    func testChannelSymmetricAndTokenActivations() {
        let w = weights(32, 256, seed: 2)
        for bits in [4, 8] {
            let q = Quantize.rowSymmetric(w, bits: bits)
            let e = relError(w, q)
            print(String(format: "round-trip w%d per-channel sym: %.4f (budget %.3f)", bits, e, Self.channelBudgets[bits]!))
            XCTAssertLessThan(e, Self.channelBudgets[bits]!)
            // Symmetric: values are integer multiples of absmax / qmax in [-2^(b-1), 2^(b-1) - 1].
            for r in 0..<w.rows {
                let row = Array(w.data[(r * 256)..<((r + 1) * 256)])
                let scale = max(row.map(abs).max()!, 1e-5) / Float((1 << (bits - 1)) - 1)
                for j in 0..<256 {
                    let k = q.data[r * 256 + j] / scale
                    XCTAssertEqual(k, k.rounded(), accuracy: 1e-3)
                    XCTAssertGreaterThanOrEqual(k, -Float(1 << (bits - 1)) - 1e-3)
                    XCTAssertLessThanOrEqual(k, Float((1 << (bits - 1)) - 1) + 1e-3)
                }
            }
        }
        // Per-token activation quantization in place matches the out-of-place one; zero rows stay zero.
        var x = weights(4, 64, seed: 3)
        for j in 0..<64 { x.data[2 * 64 + j] = 0 }
        var y = x
        Quantize.rowSymmetricInPlace(&y, bits: 8)
        XCTAssertEqual(y.data, QuantReference.rowSymmetric(x, bits: 8).data)
        XCTAssertEqual(Array(y.data[128..<192]), [Float](repeating: 0, count: 64))
    }

    func testHandWorkedExample() {
        // One group [-1, 0, 0.5, 2] at 2 bits: scale = 3 / 3 = 1, zero = clamp(-round(-1), 0, 3) = 1,
        // q = clamp(round(w) + 1, 0, 3) = [0, 1, 1 (0.5 rounds to even 0, +1), 3] -> w' = [-1, 0, 0, 2].
        let w = Tensor<Float>(shape: [1, 4], data: [-1, 0, 0.5, 2])
        XCTAssertEqual(QuantReference.groupAsymmetric(w, bits: 2, group: 4).data, [-1, 0, 0, 2])
        // Symmetric 4-bit: absmax 2 -> scale 2/7; 0.5 -> round(1.75) = 2 -> 4/7.
        XCTAssertEqual(QuantReference.rowSymmetric(w, bits: 4).data[2], 4.0 / 7.0, accuracy: 1e-6)
        XCTAssertEqual(WeightQuantizer.groupAsymmetric(bits: 2, group: 4).apply(w).data, [-1, 0, 0, 2])
    }
}
