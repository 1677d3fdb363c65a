/// Everything the CUDA backend asks of a GPU, as one small protocol (issue 25; the
/// driver API and cuBLAS calls it stands for are named on each requirement). Two
/// implementations: the real one over libcuda/cuBLAS/NVRTC resolved with dlopen, and
/// `EmulatedDevice`, host memory with the same contracts, so that the backend is
/// proved on every machine.
///
/// Addresses are `DevicePointer`s (CUdeviceptr): plain integers, so offsets into an
/// allocation are additions, as on the GPU. Matrices are column-major, as cuBLAS takes
/// them (`GEMM`).
public typealias DevicePointer = UInt64

/// cuBLAS's operation on an operand (CUBLAS_OP_N, CUBLAS_OP_T).
public enum GEMMOperation: Int32, Sendable {
    case none = 0
    case transpose = 1
}

/// How a GEMM's products are formed (issue 25). `strict`: fp32 inputs and products,
/// CUBLAS_COMPUTE_32F (no TF32) — the CPU's arithmetic up to summation order, the default.
/// `bf16`: A and B rounded to bf16 (to nearest, ties to even) and multiplied on the tensor
/// cores with fp32 accumulation, CUBLAS_COMPUTE_32F_FAST_16BF on fp32 matrices — faster
/// on a GPU, and a candidate's loss moves by bf16's rounding, which can change a grid
/// point where two are nearly tied.
public enum GEMMPrecision: String, Sendable, CaseIterable {
    case strict
    case bf16
}

/// One column-major product C = alpha op(A) op(B) + beta C, in cuBLAS's terms
/// (`cublasGemmEx` with fp32 inputs, outputs and CUBLAS_COMPUTE_32F): op(A) is m×k,
/// op(B) k×n, C m×n; element (i, j) of a matrix X with leading dimension ld is at
/// X + (i + j·ld) elements. lda ≥ rows of A as stored (m for `.none`, k for
/// `.transpose`), ldb ≥ k or n likewise, ldc ≥ m.
public struct GEMM: Sendable, Equatable {
    public var transA: GEMMOperation, transB: GEMMOperation
    public var m: Int, n: Int, k: Int
    public var alpha: Float, beta: Float
    public var a: DevicePointer, lda: Int
    public var b: DevicePointer, ldb: Int
    public var c: DevicePointer, ldc: Int
    public var precision: GEMMPrecision

    public init(transA: GEMMOperation, transB: GEMMOperation, m: Int, n: Int, k: Int, alpha: Float = 1,
                a: DevicePointer, lda: Int, b: DevicePointer, ldb: Int, beta: Float = 0, c: DevicePointer, ldc: Int,
                precision: GEMMPrecision = .strict) {
        self.transA = transA; self.transB = transB; self.m = m; self.n = n; self.k = k; self.alpha = alpha; self.beta = beta
        self.a = a; self.lda = lda; self.b = b; self.ldb = ldb; self.c = c; self.ldc = ldc; self.precision = precision
    }

    /// Rows and columns of A, B and C as stored.
    var storedA: (rows: Int, cols: Int) { transA == .none ? (m, k) : (k, m) }
    var storedB: (rows: Int, cols: Int) { transB == .none ? (k, n) : (n, k) }

    /// Checks the leading dimensions against the shapes (cuBLAS returns
    /// CUBLAS_STATUS_INVALID_VALUE for these).
    func validate(_ op: String) throws {
        guard m >= 0, n >= 0, k >= 0 else { throw DeviceError.invalidArgument(op: op, reason: "negative size m \(m), n \(n), k \(k)") }
        guard lda >= max(1, storedA.rows) else { throw DeviceError.invalidArgument(op: op, reason: "lda \(lda) < rows of A \(storedA.rows)") }
        guard ldb >= max(1, storedB.rows) else { throw DeviceError.invalidArgument(op: op, reason: "ldb \(ldb) < rows of B \(storedB.rows)") }
        guard ldc >= max(1, m) else { throw DeviceError.invalidArgument(op: op, reason: "ldc \(ldc) < m \(m)") }
    }

    /// Bytes a column-major matrix of `rows`×`cols` with leading dimension `ld` spans.
    static func span(rows: Int, cols: Int, ld: Int) -> Int { rows == 0 || cols == 0 ? 0 : ((cols - 1) * ld + rows) * 4 }
}

/// Free and total bytes (cuMemGetInfo).
public struct DeviceMemoryInfo: Sendable, Equatable {
    public var free: Int
    public var total: Int

    public init(free: Int, total: Int) { self.free = free; self.total = total }
}

public protocol Device: AnyObject, Sendable {
    /// What the device is ("NVIDIA H100 80GB HBM3", "emulated").
    var name: String { get }

    /// cuMemAlloc: `bytes` of device memory, 256-byte aligned.
    func allocate(_ bytes: Int) throws -> DevicePointer
    /// cuMemFree.
    func free(_ p: DevicePointer) throws
    /// cuMemcpyHtoDAsync on the device's stream.
    func copy(_ host: UnsafeRawBufferPointer, to p: DevicePointer) throws
    /// cuMemcpyDtoHAsync on the device's stream (complete after `synchronize`).
    func copy(_ p: DevicePointer, to host: UnsafeMutableRawBufferPointer) throws
    /// cuMemcpyDtoDAsync.
    func copy(_ from: DevicePointer, to: DevicePointer, bytes: Int) throws
    /// cublasGemmEx, fp32 in and out, CUBLAS_COMPUTE_32F (or _32F_FAST_16BF: `GEMM.precision`).
    func gemm(_ g: GEMM) throws
    /// cublasGemmStridedBatchedEx: `batch` products, operand i at a + i·strideA elements
    /// (and b, c likewise).
    func gemmStridedBatched(_ g: GEMM, strideA: Int, strideB: Int, strideC: Int, batch: Int) throws
    /// cuLaunchKernel of one of the source's kernels (`Kernel`, compiled by NVRTC on a
    /// GPU, for the host on the emulated device) on the device's stream.
    func launch(_ kernel: Kernel, _ shape: LaunchShape, _ arguments: [KernelArgument]) throws
    /// cuMemGetInfo.
    func memoryInfo() throws -> DeviceMemoryInfo
    /// cuStreamSynchronize on the device's stream.
    func synchronize() throws
}

extension Device {
    /// fp32 values up to the device.
    public func upload(_ values: [Float]) throws -> DevicePointer {
        let p = try allocate(values.count * 4)
        try values.withUnsafeBytes { try copy($0, to: p) }
        return p
    }

    /// `count` fp32 values from `p`.
    public func download(_ p: DevicePointer, count: Int) throws -> [Float] {
        var out = [Float](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try copy(p, to: $0) }
        try synchronize()
        return out
    }
}
