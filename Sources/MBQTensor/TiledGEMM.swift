import CBLAS
import Dispatch

/// Single-precision GEMM whose every output bit is independent of the thread count.
///
/// Why: OpenBLAS's own threading cuts C by the number of threads, and its kernels round
/// the edge tiles of a partition differently from the interior (a different micro-kernel,
/// a different order of the K sum). Measured on an AMD EPYC where Debian's OpenBLAS 0.3.21
/// picks its Haswell kernels: the same one-process job with `--threads 1` and `--threads
/// 2` chose different grid points in 2 of 9 groups, so 1-thread workers could not
/// reproduce a 2-thread single process (the SkylakeX kernels happened not to show it;
/// Prescott's did for W-A searches). The distributed job's promise (docs/DESIGN.md §3:
/// output bit-identical to one process, whatever each host's threads) needs arithmetic
/// that does not depend on threads at all.
///
/// How: OpenBLAS always runs one thread. C [m, n] is cut into tiles whose bounds depend on
/// (m, n) only — `rowTile` x `colTile` — each computed by one single-threaded
/// cblas_sgemm over the whole K (K is never split), and the tiles are spread over
/// `BLASRuntime.threads` threads. Each tile sees the same call whatever the thread count,
/// so each output element does too.
public enum TiledGEMM {
    /// Tile bounds. 512 x 512 keeps a tile's packing of A (512 x K) and B (K x 512)
    /// small next to its 2 * 512 * 512 * K flops, and gives a 4096-wide projection
    /// 8 column tiles per 512 rows to spread.
    public static let rowTile = 512, colTile = 512

    /// OpenBLAS to one thread, once per process, before the first product.
    static let openBLASSingleThreaded: Void = { openblas_set_num_threads(1) }()

    /// Row-major C = alpha op(A) op(B) + beta C (see `BLASScalar.gemm`).
    public static func sgemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
                             alpha: Float, a: UnsafePointer<Float>, lda: Int,
                             b: UnsafePointer<Float>, ldb: Int,
                             beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        _ = openBLASSingleThreaded
        tiled(m: m, n: n) { i0, j0, mt, nt in
            // op(A) rows i0..<i0+mt: rows of A, or columns of a transposed A.
            let ta = a + (transA ? i0 : i0 * lda)
            // op(B) columns j0..<j0+nt: rows of a transposed B, or columns of B.
            let tb = b + (transB ? j0 * ldb : j0)
            cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                        Int32(mt), Int32(nt), Int32(k), alpha, ta, Int32(lda), tb, Int32(ldb), beta, c + (i0 * ldc + j0), Int32(ldc))
        }
    }

    /// The same tiling in double precision (GPTQ's Hessians and factorization,
    /// docs/DESIGN.md §2.7). `lowerTiles`: only the tiles on or below the diagonal of a
    /// square C (a symmetric product's lower half; the diagonal tiles whole).
    public static func dgemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
                             alpha: Double, a: UnsafePointer<Double>, lda: Int,
                             b: UnsafePointer<Double>, ldb: Int,
                             beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int, lowerTiles: Bool = false) {
        _ = openBLASSingleThreaded
        precondition(!lowerTiles || m == n, "lower tiles of a \(m) x \(n) product")
        tiled(m: m, n: n, lowerOnly: lowerTiles) { i0, j0, mt, nt in
            cblas_dgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                        Int32(mt), Int32(nt), Int32(k), alpha, a + (transA ? i0 : i0 * lda), Int32(lda),
                        b + (transB ? j0 * ldb : j0), Int32(ldb), beta, c + (i0 * ldc + j0), Int32(ldc))
        }
    }

    /// Runs `tile(i0, j0, rows, cols)` for every `rowTile` x `colTile` tile of an [m, n]
    /// output, spread over `BLASRuntime.threads` threads. Tiles are disjoint parts of C;
    /// which thread computes a tile does not matter.
    static func tiled(m: Int, n: Int, lowerOnly: Bool = false, _ tile: (Int, Int, Int, Int) -> Void) {
        withoutActuallyEscaping(tile) { tile in tiledEscaping(m: m, n: n, lowerOnly: lowerOnly, tile) }
    }

    private static func tiledEscaping(m: Int, n: Int, lowerOnly: Bool, _ tile: @escaping (Int, Int, Int, Int) -> Void) {
        let rowTiles = (m + rowTile - 1) / rowTile, colTiles = (n + colTile - 1) / colTile
        // (row tile, column tile) pairs, in row-major order.
        let pairs = (0..<(rowTiles * colTiles)).map { ($0 / colTiles, $0 % colTiles) }
            .filter { !lowerOnly || $0.1 * colTile <= $0.0 * rowTile + rowTile - 1 }
        let tiles = pairs.count
        let run = { (t: Int) in
            let i0 = pairs[t].0 * rowTile, j0 = pairs[t].1 * colTile
            tile(i0, j0, Swift.min(rowTile, m - i0), Swift.min(colTile, n - j0))
        }
        let threads = Swift.min(BLASRuntime.threads, tiles)
        if threads <= 1 {
            for t in 0..<tiles { run(t) }
            return
        }
        DispatchQueue.concurrentPerform(iterations: threads) { w in
            var t = w
            while t < tiles {
                run(t)
                t += threads
            }
        }
    }
}
