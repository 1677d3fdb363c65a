import MBQTensor
import XCTest

final class GEMMTests: XCTestCase {
    /// Naive triple loop in Double: the spec the BLAS wrapper is tested against.
    func naive(_ a: Tensor<Float>, _ b: Tensor<Float>, transA: Bool, transB: Bool) -> [Double] {
        let m = transA ? a.cols : a.rows, k = transA ? a.rows : a.cols, n = transB ? b.rows : b.cols
        var c = [Double](repeating: 0, count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var s = 0.0
                for p in 0..<k {
                    let av = transA ? a.data[p * a.cols + i] : a.data[i * a.cols + p]
                    let bv = transB ? b.data[j * b.cols + p] : b.data[p * b.cols + j]
                    s += Double(av) * Double(bv)
                }
                c[i * n + j] = s
            }
        }
        return c
    }

    func testAllTransposeCombinations() {
        var rng = SeededRandom(seed: 11)
        let (m, k, n) = (13, 29, 7)
        for transA in [false, true] {
            for transB in [false, true] {
                let a: Tensor<Float> = rng.normalTensor(transA ? [k, m] : [m, k])
                let b: Tensor<Float> = rng.normalTensor(transB ? [n, k] : [k, n])
                let c = matmul(a, b, transA: transA, transB: transB)
                XCTAssertEqual(c.shape, [m, n])
                let ref = naive(a, b, transA: transA, transB: transB)
                let err = zip(c.data, ref).map { abs(Double($0) - $1) }.max()!
                XCTAssertLessThan(err, 1e-4, "transA \(transA) transB \(transB): max abs diff \(err)")
            }
        }
    }

    func testAlphaBetaAccumulate() {
        var rng = SeededRandom(seed: 12)
        let a: Tensor<Float> = rng.normalTensor([4, 5])
        let b: Tensor<Float> = rng.normalTensor([5, 3])
        var c: Tensor<Float> = rng.normalTensor([4, 3])
        let c0 = c
        gemm(a, b, alpha: 2, beta: 0.5, into: &c)
        let ab = naive(a, b, transA: false, transB: false)
        for i in 0..<c.count {
            XCTAssertEqual(Double(c.data[i]), 2 * ab[i] + 0.5 * Double(c0.data[i]), accuracy: 1e-4)
        }
    }

    func testLinearWithBiasMatchesDefinition() {
        var rng = SeededRandom(seed: 13)
        let x: Tensor<Float> = rng.normalTensor([2, 3, 6])
        let w: Tensor<Float> = rng.normalTensor([4, 6])
        let bias: Tensor<Float> = rng.normalTensor([4])
        let y = linearForward(x, weight: w, bias: bias)
        XCTAssertEqual(y.shape, [2, 3, 4])
        for r in 0..<6 {
            for o in 0..<4 {
                var s = Double(bias.data[o])
                for i in 0..<6 { s += Double(x.data[r * 6 + i]) * Double(w.data[o * 6 + i]) }
                XCTAssertEqual(Double(y.data[r * 4 + o]), s, accuracy: 1e-5)
            }
        }
    }

    func testThreadCountIsSettableAndResultUnchanged() {
        var rng = SeededRandom(seed: 14)
        let a: Tensor<Float> = rng.normalTensor([64, 96])
        let b: Tensor<Float> = rng.normalTensor([96, 80])
        let before = BLASRuntime.threads
        BLASRuntime.setThreads(1)
        XCTAssertEqual(BLASRuntime.threads, 1)
        let one = matmul(a, b)
        BLASRuntime.setThreads(2)
        let two = matmul(a, b)
        BLASRuntime.setThreads(before)
        XCTAssertLessThan(one.maxDifference(to: two).abs, 1e-4)
        XCTAssertFalse(BLASRuntime.coreName.isEmpty)
    }

    func testDoubleGEMM() {
        let a = Tensor<Double>(shape: [2, 2], data: [1, 2, 3, 4])
        let b = Tensor<Double>(shape: [2, 2], data: [5, 6, 7, 8])
        XCTAssertEqual(matmul(a, b).data, [19, 22, 43, 50])
        XCTAssertEqual(matmul(a, b, transA: true).data, [26, 30, 38, 44])
    }
}
