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

    /// Every output bit is the same at 1, 2 and 3 threads (TiledGEMM), for products of
    /// several tiles in every orientation and with beta, and close to a Double product.
    func testThreadCountIsSettableAndResultBitIdentical() {
        var rng = SeededRandom(seed: 14)
        let before = BLASRuntime.threads
        defer { BLASRuntime.setThreads(before) }
        for (m, k, n, transA, transB) in [(700, 96, 1100, false, true), (1030, 70, 530, true, false), (64, 96, 80, false, false),
                                          (513, 33, 1025, true, true)] {
            let a: Tensor<Float> = rng.normalTensor(transA ? [k, m] : [m, k])
            let b: Tensor<Float> = rng.normalTensor(transB ? [n, k] : [k, n])
            let c0: Tensor<Float> = rng.normalTensor([m, n])
            var results: [[Float]] = []
            for threads in [1, 2, 3] {
                BLASRuntime.setThreads(threads)
                XCTAssertEqual(BLASRuntime.threads, threads)
                var c = c0
                gemm(a, b, transA: transA, transB: transB, alpha: 0.5, beta: 2, into: &c)
                results.append(c.data)
            }
            XCTAssert(results[0] == results[1] && results[0] == results[2], "\(m)x\(k)x\(n) transA \(transA) transB \(transB): threads change bits")
            let ad = Tensor<Double>(shape: a.shape, data: a.data.map(Double.init)), bd = Tensor<Double>(shape: b.shape, data: b.data.map(Double.init))
            let ref = matmul(ad, bd, transA: transA, transB: transB)
            var worst = 0.0
            for i in 0..<ref.count { worst = max(worst, abs(Double(results[0][i]) - (0.5 * ref.data[i] + 2 * Double(c0.data[i])))) }
            XCTAssertLessThan(worst, 1e-4, "\(m)x\(k)x\(n): max abs diff to Double \(worst)")
        }
        XCTAssertFalse(BLASRuntime.coreName.isEmpty)
    }

    func testDoubleGEMM() {
        let a = Tensor<Double>(shape: [2, 2], data: [1, 2, 3, 4])
        let b = Tensor<Double>(shape: [2, 2], data: [5, 6, 7, 8])
        XCTAssertEqual(matmul(a, b).data, [19, 22, 43, 50])
        XCTAssertEqual(matmul(a, b, transA: true).data, [26, 30, 38, 44])
    }
}
