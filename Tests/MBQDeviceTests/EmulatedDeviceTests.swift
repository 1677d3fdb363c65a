import Foundation
import MBQDevice
import MBQTensor
import XCTest

/// The emulated device's contract, checked on products worked out by hand from cuBLAS's
/// documentation of `cublasGemmEx` (column-major; C = alpha op(A) op(B) + beta C; element
/// (i, j) of X at X[i + j·ld]), independently of any backend.
final class EmulatedDeviceTests: XCTestCase {
    let dev = EmulatedDevice()

    // A = [[1, 2, 3], [4, 5, 6]] (2×3), B = [[7, 8], [9, 10], [11, 12]] (3×2):
    // A·B = [[58, 64], [139, 154]], column-major [58, 139, 64, 154].

    func testPlainProductColumnMajor() throws {
        let a = try dev.upload([1, 4, 2, 5, 3, 6])         // A, lda 2
        let b = try dev.upload([7, 9, 11, 8, 10, 12])      // B, ldb 3
        let c = try dev.upload([Float](repeating: .nan, count: 4))  // beta 0: C is not read
        try dev.gemm(GEMM(transA: .none, transB: .none, m: 2, n: 2, k: 3, a: a, lda: 2, b: b, ldb: 3, c: c, ldc: 2))
        XCTAssertEqual(try dev.download(c, count: 4), [58, 139, 64, 154])
    }

    func testTransposedAPaddedLeadingDimensionsAlphaBeta() throws {
        // A stored 3×2 with lda 4 (a padding row): op(A) = Aᵀ = [[1, 2, 3], [4, 5, 6]].
        let a = try dev.upload([1, 2, 3, -99, 4, 5, 6, -99])
        let b = try dev.upload([7, 9, 11, 8, 10, 12])
        // C = [[1, 1], [1, 1]] with ldc 3: its padding rows must stay -7.
        let c = try dev.upload([1, 1, -7, 1, 1, -7])
        try dev.gemm(GEMM(transA: .transpose, transB: .none, m: 2, n: 2, k: 3, alpha: 2, a: a, lda: 4, b: b, ldb: 3,
                          beta: 1, c: c, ldc: 3))
        // 2·[[58, 64], [139, 154]] + 1
        XCTAssertEqual(try dev.download(c, count: 6), [117, 279, -7, 129, 309, -7])
    }

    func testTransposedB() throws {
        let a = try dev.upload([1, 4, 2, 5, 3, 6])
        // B stored 2×3 (n×k), ldb 2: op(B) = Bᵀ = [[7, 8], [9, 10], [11, 12]].
        let b = try dev.upload([7, 8, 9, 10, 11, 12])
        let c = try dev.upload([0, 0, 0, 0])
        try dev.gemm(GEMM(transA: .none, transB: .transpose, m: 2, n: 2, k: 3, a: a, lda: 2, b: b, ldb: 2, c: c, ldc: 2))
        XCTAssertEqual(try dev.download(c, count: 4), [58, 139, 64, 154])
    }

    /// ../shared/CUDA.md: row-major y[T, out] = x[T, in] Wᵀ is
    /// GemmEx(OP_T, OP_N, m: out, n: T, k: in, A: W, lda: in, B: x, ldb: in, C: y, ldc: out).
    func testRowMajorLinearThroughColumnMajorGEMM() throws {
        var rng = SeededRandom(seed: 3)
        let t = 37, inF = 48, outF = 29   // no dimension a multiple of a tile
        let x: Tensor<Float> = rng.normalTensor([t, inF]), w: Tensor<Float> = rng.normalTensor([outF, inF])
        let px = try dev.upload(x.data), pw = try dev.upload(w.data), py = try dev.allocate(t * outF * 4)
        try dev.gemm(GEMM(transA: .transpose, transB: .none, m: outF, n: t, k: inF, a: pw, lda: inF, b: px, ldb: inF,
                          c: py, ldc: outF))
        let y = try dev.download(py, count: t * outF)
        for r in 0..<t {
            for o in 0..<outF {
                var s = 0.0
                for j in 0..<inF { s += Double(x.data[r * inF + j]) * Double(w.data[o * inF + j]) }
                XCTAssertEqual(Double(y[r * outF + o]), s, accuracy: 1e-4 * max(1, abs(s)), "y[\(r), \(o)]")
            }
        }
    }

    func testStridedBatchedUsesEachOperandsOffsets() throws {
        // Batch 0: A·B as above. Batch 1: A' = 2A (stride 6), the same B (stride 0),
        // C' at stride 4: 2·A·B.
        let a = try dev.upload([1, 4, 2, 5, 3, 6, 2, 8, 4, 10, 6, 12])
        let b = try dev.upload([7, 9, 11, 8, 10, 12])
        let c = try dev.upload([Float](repeating: 0, count: 8))
        try dev.gemmStridedBatched(GEMM(transA: .none, transB: .none, m: 2, n: 2, k: 3, a: a, lda: 2, b: b, ldb: 3, c: c, ldc: 2),
                                   strideA: 6, strideB: 0, strideC: 4, batch: 2)
        XCTAssertEqual(try dev.download(c, count: 8), [58, 139, 64, 154, 116, 278, 128, 308])
    }

    func testZeroInnerDimensionScalesC() throws {
        let a = try dev.upload([0]), b = try dev.upload([0])
        let c = try dev.upload([1, 2, 3, 4])
        try dev.gemm(GEMM(transA: .none, transB: .none, m: 2, n: 2, k: 0, a: a, lda: 2, b: b, ldb: 1, beta: 3, c: c, ldc: 2))
        XCTAssertEqual(try dev.download(c, count: 4), [3, 6, 9, 12])
    }

    func testCopiesAndOffsets() throws {
        let p = try dev.upload([1, 2, 3, 4, 5, 6])
        let q = try dev.allocate(4 * 4)
        try dev.copy(p + 8, to: q, bytes: 16)               // elements 2..<6
        XCTAssertEqual(try dev.download(q, count: 4), [3, 4, 5, 6])
        XCTAssertEqual(try dev.download(p + 20, count: 1), [6])
    }

    /// Every access is checked: a product, copy or free outside a live allocation is an
    /// error naming the call and operand, not a wild write.
    func testOutOfBoundsAndBadArgumentsAreNamed() throws {
        let a = try dev.upload([1, 4, 2, 5, 3, 6]), b = try dev.upload([7, 9, 11, 8, 10, 12])
        let small = try dev.allocate(3 * 4)   // C needs 4 floats
        XCTAssertThrowsError(try dev.gemm(GEMM(transA: .none, transB: .none, m: 2, n: 2, k: 3, a: a, lda: 2, b: b, ldb: 3,
                                               c: small, ldc: 2))) { e in
            XCTAssertEqual("\(e)".hasPrefix("gemm C: 16 bytes at 0x"), true, "\(e)")
        }
        XCTAssertThrowsError(try dev.gemm(GEMM(transA: .none, transB: .none, m: 2, n: 2, k: 3, a: a, lda: 1, b: b, ldb: 3,
                                               c: small, ldc: 2))) { e in
            XCTAssertEqual("\(e)", "gemm: lda 1 < rows of A 2")
        }
        XCTAssertThrowsError(try dev.download(a + 4, count: 6)) { e in XCTAssert("\(e)".hasPrefix("copy device to host: 24 bytes"), "\(e)") }
        XCTAssertThrowsError(try dev.copy(a, to: small, bytes: 16)) { e in
            XCTAssert("\(e)".hasPrefix("copy device to device (destination)"), "\(e)")
        }
        try dev.free(small)
        XCTAssertThrowsError(try dev.free(small)) { e in XCTAssert("\(e)".hasPrefix("free: 0x"), "\(e)") }
        XCTAssertThrowsError(try dev.download(small, count: 1), "a freed allocation is gone")
    }

    func testCapacityIsEnforcedAndReported() throws {
        let d = EmulatedDevice(capacity: 1000)
        let p = try d.allocate(600)
        XCTAssertEqual(try d.memoryInfo(), DeviceMemoryInfo(free: 400, total: 1000))
        XCTAssertThrowsError(try d.allocate(500)) { e in XCTAssertEqual(e as? DeviceError, .outOfMemory(requested: 500, free: 400)) }
        try d.free(p)
        XCTAssertEqual(try d.memoryInfo().free, 1000)
    }
}

/// The library search: without a driver, one error that names libcuda, where it looked
/// and how to point at it.
final class CUDALibrariesTests: XCTestCase {
    func testMissingDriverIsOneClearError() throws {
        guard dlopen(CUDALibraries.driver, RTLD_NOW) == nil else { throw XCTSkip("this machine has an NVIDIA driver") }
        let env = ["MBQ_CUDA_LIBS": "/nonexistent/cuda:/also/not/here"]
        XCTAssertThrowsError(try CUDALibraries.open(CUDALibraries.driver, environment: env)) { e in
            let text = "\(e)"
            XCTAssert(text.hasPrefix("libcuda.so.1 not found (searched: MBQ_CUDA_LIBS /nonexistent/cuda, MBQ_CUDA_LIBS /also/not/here, the system's library paths"), text)
            XCTAssert(text.contains("set MBQ_CUDA_LIBS to the folder that holds it"), text)
        }
    }

    func testEnvironmentFoldersComeFirst() throws {
        // A library that exists everywhere, found through the variable's folder.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mbq-cudalibs-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let libz = ["/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib64/libz.so.1"]
            .first { FileManager.default.fileExists(atPath: $0) }
        guard let libz else { throw XCTSkip("no libz.so.1 to stand in for a CUDA library") }
        try FileManager.default.createSymbolicLink(atPath: dir + "/libz.so.1", withDestinationPath: libz)
        let (h, folder) = try CUDALibraries.open("libz.so.1", environment: ["MBQ_CUDA_LIBS": "/nonexistent:" + dir])
        XCTAssertEqual(folder, dir)
        dlclose(h)
    }
}

/// The CUDA device's pool of freed allocations: reuse by exact size, last freed first,
/// and everything handed back when the device runs out of memory.
final class AllocationPoolTests: XCTestCase {
    func testReuseBySizeAndDrain() {
        var pool = AllocationPool()
        XCTAssertNil(pool.take(256))
        pool.put(0x1000, bytes: 256)
        pool.put(0x2000, bytes: 512)
        pool.put(0x3000, bytes: 256)
        XCTAssertEqual(pool.pooledBytes, 1024)
        XCTAssertEqual(pool.take(256), 0x3000)
        XCTAssertNil(pool.take(768), "no other size is handed out")
        XCTAssertEqual(pool.pooledBytes, 768)
        XCTAssertEqual(Set(pool.drain()), [0x1000, 0x2000])
        XCTAssertEqual(pool.pooledBytes, 0)
        XCTAssertNil(pool.take(512))
    }
}

/// `GEMMPrecision.bf16` on the emulated device: exactly the strict product of the operands
/// rounded to bf16 (ties to even), so the rounding is the only change.
final class BF16GEMMTests: XCTestCase {
    func testBF16IsTheStrictProductOfRoundedOperands() throws {
        let dev = EmulatedDevice()
        var rng = SeededRandom(seed: 9)
        let (m, n, k) = (37, 45, 96)
        let a: [Float] = (0..<(m * k)).map { _ in Float(rng.normal()) }, b: [Float] = (0..<(k * n)).map { _ in Float(rng.normal()) }
        let round = { (v: [Float]) in v.map { HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16($0)) } }
        func product(_ a: [Float], _ b: [Float], _ p: GEMMPrecision) throws -> [Float] {
            let da = try dev.upload(a), db = try dev.upload(b), dc = try dev.upload([Float](repeating: 0, count: m * n))
            try dev.gemm(GEMM(transA: .none, transB: .none, m: m, n: n, k: k, a: da, lda: m, b: db, ldb: k, c: dc, ldc: m, precision: p))
            return try dev.download(dc, count: m * n)
        }
        let bf16 = try product(a, b, .bf16)
        XCTAssertEqual(bf16, try product(round(a), round(b), .strict))
        XCTAssertNotEqual(bf16, try product(a, b, .strict), "the operands were rounded")
    }
}
