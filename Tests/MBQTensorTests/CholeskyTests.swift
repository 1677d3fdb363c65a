import MBQTensor
import XCTest

/// GPTQ's inverse-Hessian factor (`Cholesky.upperFactorOfInverse`, blocked in panels of
/// 128): U upper triangular with a positive diagonal and UᵀU = H⁻¹, checked against a
/// plain Gauss-Jordan inverse in Double; the same bits at 1 and 2 threads.
final class CholeskyTests: XCTestCase {
    /// A symmetric positive definite [n, n]: XᵀX/m + 0.1 I from random X (m > n).
    func spd(_ n: Int, seed: UInt64) -> [Double] {
        var rng = SeededRandom(seed: seed)
        let m = n + 50
        let x = (0..<(m * n)).map { _ in rng.normal() }
        var h = [Double](repeating: 0, count: n * n)
        for i in 0..<n { for j in 0..<n {
            var s = 0.0
            for r in 0..<m { s += x[r * n + i] * x[r * n + j] }
            h[i * n + j] = s / Double(m) + (i == j ? 0.1 : 0)
        } }
        return h
    }

    func inverse(_ a: [Double], _ n: Int) -> [Double] {
        var m = a, inv = [Double](repeating: 0, count: n * n)
        for i in 0..<n { inv[i * n + i] = 1 }
        for c in 0..<n {
            let p = (c..<n).max { abs(m[$0 * n + c]) < abs(m[$1 * n + c]) }!
            for j in 0..<n { m.swapAt(c * n + j, p * n + j); inv.swapAt(c * n + j, p * n + j) }
            let d = m[c * n + c]
            for j in 0..<n { m[c * n + j] /= d; inv[c * n + j] /= d }
            for r in 0..<n where r != c {
                let f = m[r * n + c]
                if f == 0 { continue }
                for j in 0..<n { m[r * n + j] -= f * m[c * n + j]; inv[r * n + j] -= f * inv[c * n + j] }
            }
        }
        return inv
    }

    func testFactorOfTheInverseAcrossPanels() throws {
        for n in [1, 5, 128, 300] {
            let h = spd(n, seed: UInt64(n))
            let u = try Cholesky.upperFactorOfInverse(h, n: n)
            let want = inverse(h, n)
            var worst = 0.0, scale = 0.0
            for i in 0..<n {
                XCTAssertGreaterThan(u[i * n + i], 0, "n \(n): diagonal \(i)")
                for j in 0..<i { XCTAssertEqual(u[i * n + j], 0, "n \(n): below the diagonal") }
                for j in 0..<n {
                    var s = 0.0
                    for k in 0...min(i, j) { s += Double(u[k * n + i]) * Double(u[k * n + j]) }
                    worst = max(worst, abs(s - want[i * n + j]))
                    scale = max(scale, abs(want[i * n + j]))
                }
            }
            XCTAssertLessThan(worst / scale, 1e-6, "n \(n): UᵀU vs H⁻¹")
        }
    }

    func testNoBitDependsOnTheThreadCount() throws {
        let h = spd(300, seed: 9)
        let (engine, blas) = (EngineThreads.count, BLASRuntime.threads)
        defer { EngineThreads.count = engine; BLASRuntime.setThreads(blas) }
        EngineThreads.count = 1; BLASRuntime.setThreads(1)
        let one = try Cholesky.upperFactorOfInverse(h, n: 300)
        EngineThreads.count = 3; BLASRuntime.setThreads(3)
        XCTAssertEqual(try Cholesky.upperFactorOfInverse(h, n: 300), one)
    }

    func testNotPositiveDefiniteIsAnError() {
        XCTAssertThrowsError(try Cholesky.upperFactorOfInverse([1, 2, 2, 1], n: 2)) { XCTAssertTrue("\($0)".contains("not positive definite")) }
    }
}
