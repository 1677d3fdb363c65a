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

    /// Columns per panel of the blocked factorization, and rows per block of the inverse.
    static let panel = 256, inversePanel = 256

    /// h: [n, n] row-major, symmetric.
    /// -> U: [n, n] row-major in fp32, zero below the diagonal.
    public static func upperFactorOfInverse(_ h: [Double], n: Int) throws -> [Float] {
        var g = h
        return try upperFactorOfInverse(overwriting: &g, n: n)
    }

    /// The same, using `h`'s storage for the factorization, then releasing it (`h` is left
    /// empty): one [n, n] fp64 array fewer (1 GiB for an 11008-wide down_proj, and its
    /// page faults); at most two are held at once.
    public static func upperFactorOfInverse(overwriting h: inout [Double], n: Int) throws -> [Float] {
        precondition(h.count == n * n, "\(h.count) values for an order-\(n) matrix")
        _ = TiledGEMM.openBLASSingleThreaded
        // G = JHJ: element (a, b) is H's (n-1-a, n-1-b), the flat array reversed.
        h.reverse()
        try h.withUnsafeMutableBufferPointer { try lowerFactor($0.baseAddress!, n: n) }
        let x = h.withUnsafeBufferPointer { lowerInverse($0.baseAddress!, n: n) }
        h = []   // the factor is no longer needed: its memory goes before U's is taken
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
    /// right-looking blocked Cholesky: each 256-column panel's diagonal block by LAPACK
    /// (one thread), the panel below it by triangular solves over fixed 128-row chunks, the trailing
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
            // A21 ← A21 L11⁻ᵀ, rows independent, in chunks of 128.
            let chunks = (m + 127) / 128
            parallelChunks(chunks) { range in
                for c in range {
                    let r0 = c * 128, rows = Swift.min(128, m - r0)
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

    /// L⁻¹ of the lower triangle of `l` ([n, n] row-major), lower, row-major, by block
    /// rows of 256, top to bottom: X_ii = L_ii⁻¹ (a triangular solve on I), and for each
    /// earlier block column c, X_ic = −L_ii⁻¹ (L[i, c..<i] X[c..<i, c]) — one GEMM over the
    /// nonzero rows of X's column c and one small solve, the columns spread over threads.
    /// n³/3 flops as LAPACK's trtri, nearly all in GEMMs; every call single-threaded and
    /// fixed by n.
    static func lowerInverse(_ l: UnsafePointer<Double>, n: Int) -> [Double] {
        var x = [Double](repeating: 0, count: n * n)
        let b = inversePanel
        let blocks = (n + b - 1) / b
        x.withUnsafeMutableBufferPointer { px in
            let base = Int(bitPattern: px.baseAddress!), pl = Int(bitPattern: l)
            for i in 0..<blocks {
                let r0 = i * b, rb = Swift.min(b, n - r0)
                // Column blocks 0..<i, then the diagonal one (i) last: X_ic reads X[c..<i, c]
                // of earlier rows only.
                DispatchQueue.concurrentPerform(iterations: Swift.max(1, Swift.min(EngineThreads.count, i + 1))) { t in
                    let threads = Swift.max(1, Swift.min(EngineThreads.count, i + 1))
                    for c in stride(from: t, through: i, by: threads) {
                        let x0 = UnsafeMutablePointer<Double>(bitPattern: base)!, l0 = UnsafePointer<Double>(bitPattern: pl)!
                        let c0 = c * b, cb = Swift.min(b, n - c0)
                        let dst = x0 + r0 * n + c0, lii = l0 + r0 * n + r0
                        if c == i {
                            for k in 0..<rb { dst[k * n + k] = 1 }
                            cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, Int32(rb), Int32(cb), 1,
                                        lii, Int32(n), dst, Int32(n))
                        } else {
                            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rb), Int32(cb), Int32(r0 - c0), 1,
                                        l0 + r0 * n + c0, Int32(n), x0 + c0 * n + c0, Int32(n), 0, dst, Int32(n))
                            cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, Int32(rb), Int32(cb), -1,
                                        lii, Int32(n), dst, Int32(n))
                        }
                    }
                }
            }
        }
        return x
    }
}
