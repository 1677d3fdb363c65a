import CBLAS

/// The inverse Hessian's Cholesky factor that GPTQ walks (docs/DESIGN.md §2.7): for a
/// symmetric positive definite H, the upper-triangular U with H⁻¹ = UᵀU and a positive
/// diagonal — what the reference computes as
/// `cholesky(cholesky_inverse(cholesky(H)), upper=True)` (IST-DASLab/gptq, gptq.py).
///
/// Computed in fp64 with two LAPACK calls instead of three: with J the reversal
/// permutation, JHJ = LLᵀ gives H = RRᵀ with R = JLJ upper triangular, so
/// H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J L⁻¹ J (one Cholesky, one triangular inverse: 2n³/3
/// flops instead of 4n³/3). OpenBLAS runs single-threaded here (`TiledGEMM`), so the
/// result does not depend on the thread count.
public enum Cholesky {
    public struct NotPositiveDefinite: Error, CustomStringConvertible {
        public let order: Int
        public let info: Int32
        public var description: String {
            "the matrix is not positive definite (LAPACK info \(info) at order \(order))"
        }
    }

    /// h: [n, n] row-major, symmetric (only its values matter, not which triangle).
    /// -> U: [n, n] row-major in fp32, zero below the diagonal.
    public static func upperFactorOfInverse(_ h: [Double], n: Int) throws -> [Float] {
        precondition(h.count == n * n, "\(h.count) values for an order-\(n) matrix")
        _ = TiledGEMM.openBLASSingleThreaded
        // G = JHJ, row-major. LAPACK reads it column-major: Gᵀ, the same matrix.
        var g = [Double](repeating: 0, count: n * n)
        h.withUnsafeBufferPointer { ph in
            g.withUnsafeMutableBufferPointer { pg in
                for a in 0..<n { for b in 0..<n { pg[a * n + b] = ph[(n - 1 - a) * n + (n - 1 - b)] } }
            }
        }
        var order = Int32(n), lda = Int32(n), info: Int32 = 0
        // Column-major lower L (G = LLᵀ), then L⁻¹ in place.
        dpotrf_("L", &order, &g, &lda, &info, 1)
        guard info == 0 else { throw NotPositiveDefinite(order: n, info: info) }
        dtrtri_("L", "N", &order, &g, &lda, &info, 1, 1)
        guard info == 0 else { throw NotPositiveDefinite(order: n, info: info) }
        // Column-major element (r, c) of L⁻¹ sits at g[c * n + r]; U[i][j] = L⁻¹[n-1-i][n-1-j].
        var u = [Float](repeating: 0, count: n * n)
        g.withUnsafeBufferPointer { pg in
            u.withUnsafeMutableBufferPointer { pu in
                for i in 0..<n { for j in i..<n { pu[i * n + j] = Float(pg[(n - 1 - j) * n + (n - 1 - i)]) } }
            }
        }
        return u
    }
}
