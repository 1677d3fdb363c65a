import CBLAS
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A floating-point type the engine computes in. `Float` is the production type;
/// `Double` exists so every backward function can be checked against central
/// differences without float32 rounding noise (tests only).
public protocol BLASScalar: BinaryFloatingPoint, Sendable {
    /// Row-major C = alpha * op(A) * op(B) + beta * C, op = transpose when the flag is set.
    /// A: [m, k] after op, B: [k, n] after op, C: [m, n]; lda/ldb/ldc are row strides.
    static func gemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
                     alpha: Self, a: UnsafePointer<Self>, lda: Int,
                     b: UnsafePointer<Self>, ldb: Int,
                     beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)
    static func exp(_ x: Self) -> Self
    static func log(_ x: Self) -> Self
    static func sin(_ x: Self) -> Self
    static func cos(_ x: Self) -> Self
    static func pow(_ x: Self, _ y: Self) -> Self
    init(_ value: Float)
    var floatValue: Float { get }
}

@inline(__always)
private func cblasTrans(_ t: Bool) -> CBLAS_TRANSPOSE { t ? CblasTrans : CblasNoTrans }

extension Float: BLASScalar {
    @inlinable public static func exp(_ x: Float) -> Float { Foundation.exp(x) }
    @inlinable public static func log(_ x: Float) -> Float { Foundation.log(x) }
    @inlinable public static func sin(_ x: Float) -> Float { Foundation.sin(x) }
    @inlinable public static func cos(_ x: Float) -> Float { Foundation.cos(x) }
    @inlinable public static func pow(_ x: Float, _ y: Float) -> Float { Foundation.pow(x, y) }
    @inlinable public var floatValue: Float { self }

    /// Tiled so that no output bit depends on the thread count (`TiledGEMM`).
    public static func gemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
                            alpha: Float, a: UnsafePointer<Float>, lda: Int,
                            b: UnsafePointer<Float>, ldb: Int,
                            beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        TiledGEMM.sgemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda,
                        b: b, ldb: ldb, beta: beta, c: c, ldc: ldc)
    }
}

extension Double: BLASScalar {
    @inlinable public static func exp(_ x: Double) -> Double { Foundation.exp(x) }
    @inlinable public static func log(_ x: Double) -> Double { Foundation.log(x) }
    @inlinable public static func sin(_ x: Double) -> Double { Foundation.sin(x) }
    @inlinable public static func cos(_ x: Double) -> Double { Foundation.cos(x) }
    @inlinable public static func pow(_ x: Double, _ y: Double) -> Double { Foundation.pow(x, y) }
    @inlinable public var floatValue: Float { Float(self) }

    public static func gemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
                            alpha: Double, a: UnsafePointer<Double>, lda: Int,
                            b: UnsafePointer<Double>, ldb: Int,
                            beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int) {
        cblas_dgemm(CblasRowMajor, cblasTrans(transA), cblasTrans(transB),
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb),
                    beta, c, Int32(ldc))
    }
}

/// OpenBLAS runtime controls. The kernel OpenBLAS runs is chosen at load time from the
/// CPU, or from `OPENBLAS_CORETYPE` when that is set; `coreName` reports it.
public enum BLASRuntime {
    /// The threads a Float GEMM spreads its tiles over (`TiledGEMM`; OpenBLAS itself runs
    /// one thread). Default: `OPENBLAS_NUM_THREADS` when set, else every online core, as
    /// OpenBLAS would.
    nonisolated(unsafe) public private(set) static var threads: Int = {
        if let v = getenv("OPENBLAS_NUM_THREADS"), let n = Int(String(cString: v)), n > 0 { return n }
        return ProcessInfoShim.activeProcessorCount
    }()
    public static func setThreads(_ n: Int) { threads = max(1, n) }

    /// `body` with OpenBLAS's own threading at `n` threads (benchmarks of raw
    /// cblas_sgemm), then OpenBLAS back to one thread.
    public static func withOpenBLASThreads<R>(_ n: Int, _ body: () throws -> R) rethrows -> R {
        openblas_set_num_threads(Int32(max(1, n)))
        defer { openblas_set_num_threads(1) }
        return try body()
    }
    public static var coreName: String {
        guard let p = openblas_get_corename() else { return "unknown" }
        return String(cString: p)
    }
    public static var config: String {
        guard let p = openblas_get_config() else { return "unknown" }
        return String(cString: p)
    }
}
