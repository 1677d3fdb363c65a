import CBLAS
import Dispatch

/// The inverse Hessian's Cholesky factor that GPTQ walks (docs/DESIGN.md §2.7): for a
/// symmetric positive definite H, the upper-triangular U with H⁻¹ = UᵀU and a positive
/// diagonal — what the reference computes as
/// `cholesky(cholesky_inverse(cholesky(H)), upper=True)` (IST-DASLab/gptq, gptq.py).
///
/// Computed in fp64 with one factorization and one triangular inverse instead of the
/// reference's three calls: with J the reversal permutation, JHJ = LLᵀ gives H = RRᵀ
/// with R = JLJ upper triangular, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J L⁻¹ J (2n³/3 flops
/// instead of 4n³/3). Both are blocked so that they spread over the engine's threads
/// while every call OpenBLAS runs is single-threaded and fixed by n: the result does not
/// depend on the thread count.
public enum Cholesky {
    public struct NotPositiveDefinite: Error, CustomStringConvertible {
        public let order: Int
        public let info: Int32
        public var description: String {
            "the matrix is not positive definite (LAPACK info \(info) at order \(order))"
        }
    }

    /// Columns per panel of the blocked factorization and inverse.
    static let panel = 128

    /// h: [n, n] row-major, symmetric (only its lower half is read).
    /// -> U: [n, n] row-major in fp32, zero below the diagonal.
    public static func upperFactorOfInverse(_ h: [Double], n: Int) throws -> [Float] {
        precondition(h.count == n * n, "\(h.count) values for an order-\(n) matrix")
        _ = TiledGEMM.openBLASSingleThreaded
        // G = JHJ, row-major; its lower half is H's upper half reversed, so read H's lower.
        var g = [Double](repeating: 0, count: n * n)
        h.withUnsafeBufferPointer { ph in
            g.withUnsafeMutableBufferPointer { pg in
                for a in 0..<n { for b in 0...a { pg[a * n + b] = ph[(n - 1 - b) * n + (n - 1 - a)] } }
            }
        }
        try g.withUnsafeMutableBufferPointer { try lowerFactor($0.baseAddress!, n: n) }
        let x = g.withUnsafeBufferPointer { lowerInverse($0.baseAddress!, n: n) }
        // U[i][j] = L⁻¹[n-1-i][n-1-j].
        var u = [Float](repeating: 0, count: n * n)
        x.withUnsafeBufferPointer { px in
            u.withUnsafeMutableBufferPointer { pu in
                for i in 0..<n { for j in i..<n { pu[i * n + j] = Float(px[(n - 1 - i) * n + (n - 1 - j)]) } }
            }
        }
        return u
    }

    /// In place, row-major: the lower half of `a` ([n, n]) becomes L with A = LLᵀ. A
    /// right-looking blocked Cholesky: each panel's diagonal block by LAPACK (one thread),
    /// the panel below it by triangular solves over fixed 128-row chunks, the trailing
    /// lower half by `TiledGEMM.dgemm`'s fixed tiles — the work spreads over threads and
    /// no bit depends on how many.
    static func lowerFactor(_ a: UnsafeMutablePointer<Double>, n: Int) throws {
        var lda = Int32(n)
        for k in stride(from: 0, to: n, by: panel) {
            let kb = Swift.min(panel, n - k)
            // The row-major lower block is LAPACK's column-major upper: A = UᵀU, Uᵀ = L.
            var order = Int32(kb), info: Int32 = 0
            dpotrf_("U", &order, a + k * n + k, &lda, &info, 1)
            guard info == 0 else { throw NotPositiveDefinite(order: n, info: Int32(k) + info) }
            let m = n - k - kb
            guard m > 0 else { break }
            let l11 = Int(bitPattern: a + k * n + k), below = Int(bitPattern: a + (k + kb) * n + k)
            // A21 ← A21 L11⁻ᵀ, rows independent.
            let chunks = (m + panel - 1) / panel
            parallelChunks(chunks) { range in
                for c in range {
                    let r0 = c * panel, rows = Swift.min(panel, m - r0)
                    cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, Int32(rows), Int32(kb), 1,
                                UnsafePointer<Double>(bitPattern: l11)!, Int32(n),
                                UnsafeMutablePointer<Double>(bitPattern: below)! + r0 * n, Int32(n))
                }
            }
            // A22 ← A22 − A21 A21ᵀ, its lower half.
            let p21 = a + (k + kb) * n + k
            TiledGEMM.dgemm(transA: false, transB: true, m: m, n: m, k: kb, alpha: -1, a: p21, lda: n, b: p21, ldb: n,
                            beta: 1, c: a + (k + kb) * n + (k + kb), ldc: n, lowerTiles: true)
        }
    }

    /// L⁻¹ of the lower triangle of `l` ([n, n] row-major), lower, row-major. Each panel of
    /// columns solves L X = I on its own (the rows above the panel are zero), one
    /// triangular solve per panel, panels spread over threads.
    static func lowerInverse(_ l: UnsafePointer<Double>, n: Int) -> [Double] {
        var x = [Double](repeating: 0, count: n * n)
        x.withUnsafeMutableBufferPointer { px in
            let base = Int(bitPattern: px.baseAddress!), pl = Int(bitPattern: l)
            let panels = (n + panel - 1) / panel
            // Round-robin: the first panels are the longest.
            let threads = Swift.max(1, Swift.min(EngineThreads.count, panels))
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                for p in stride(from: t, to: panels, by: threads) {
                    let j0 = p * panel, w = Swift.min(panel, n - j0)
                    let xp = UnsafeMutablePointer<Double>(bitPattern: base)! + j0 * n + j0
                    for i in 0..<w { xp[i * n + i] = 1 }
                    cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, Int32(n - j0), Int32(w), 1,
                                UnsafePointer<Double>(bitPattern: pl)! + j0 * n + j0, Int32(n), xp, Int32(n))
                }
            }
        }
        return x
    }
}
