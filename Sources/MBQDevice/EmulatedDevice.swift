import CMBQKernels
import Foundation
import MBQTensor

/// The `Device` contract on the host (after tinygrad's mocked CUDA driver, docs in
/// issue 25): allocations are host memory whose addresses are the device pointers,
/// copies are memcpy, GEMMs follow cuBLAS's column-major contract on the CPU GEMM. Every
/// access is checked to lie inside one live allocation (a memcheck), and allocations
/// count against `capacity` as on a GPU, so out-of-memory paths run too. Work is done
/// when the call returns (the stream is synchronous).
public final class EmulatedDevice: Device, @unchecked Sendable {
    public let name = "emulated"
    public let capacity: Int
    let lock = NSLock()
    /// Live allocations by base address, and their bases sorted for lookup.
    var sizes: [DevicePointer: Int] = [:]
    var bases: [DevicePointer] = []
    var used = 0

    public init(capacity: Int = 16 << 30) { self.capacity = capacity }

    deinit {
        for (base, _) in sizes { UnsafeMutableRawPointer(bitPattern: UInt(base))?.deallocate() }
    }

    public func allocate(_ bytes: Int) throws -> DevicePointer {
        guard bytes > 0 else { throw DeviceError.invalidArgument(op: "allocate", reason: "\(bytes) bytes") }
        return try lock.withLock {
            guard used + bytes <= capacity else { throw DeviceError.outOfMemory(requested: bytes, free: capacity - used) }
            let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 256)
            let base = DevicePointer(UInt(bitPattern: raw))
            sizes[base] = bytes
            bases.insert(base, at: bases.firstIndex { $0 > base } ?? bases.endIndex)
            used += bytes
            return base
        }
    }

    public func free(_ p: DevicePointer) throws {
        try lock.withLock {
            guard let bytes = sizes.removeValue(forKey: p) else {
                throw DeviceError.invalidArgument(op: "free", reason: "0x\(String(p, radix: 16)) is not an allocation's start")
            }
            bases.removeAll { $0 == p }
            used -= bytes
            UnsafeMutableRawPointer(bitPattern: UInt(p))?.deallocate()
        }
    }

    /// The host address of `bytes` at `p`, which must lie inside one live allocation.
    func resolve(_ op: String, _ p: DevicePointer, _ bytes: Int) throws -> UnsafeMutableRawPointer {
        try lock.withLock {
            // The last allocation starting at or below p.
            var lo = 0, hi = bases.count
            while lo < hi { let mid = (lo + hi) / 2; if bases[mid] <= p { lo = mid + 1 } else { hi = mid } }
            guard lo > 0, let size = sizes[bases[lo - 1]], p + UInt64(bytes) <= bases[lo - 1] + UInt64(size),
                  let raw = UnsafeMutableRawPointer(bitPattern: UInt(p)) else {
                throw DeviceError.outOfBounds(op: op, address: p, bytes: bytes)
            }
            return raw
        }
    }

    public func copy(_ host: UnsafeRawBufferPointer, to p: DevicePointer) throws {
        guard host.count > 0, let src = host.baseAddress else { return }
        try resolve("copy host to device", p, host.count).copyMemory(from: src, byteCount: host.count)
    }

    public func copy(_ p: DevicePointer, to host: UnsafeMutableRawBufferPointer) throws {
        guard host.count > 0, let dst = host.baseAddress else { return }
        dst.copyMemory(from: try resolve("copy device to host", p, host.count), byteCount: host.count)
    }

    public func copy(_ from: DevicePointer, to: DevicePointer, bytes: Int) throws {
        guard bytes > 0 else { return }
        let src = try resolve("copy device to device (source)", from, bytes)
        try resolve("copy device to device (destination)", to, bytes).copyMemory(from: src, byteCount: bytes)
    }

    public func gemm(_ g: GEMM) throws {
        try gemmStridedBatched(g, strideA: 0, strideB: 0, strideC: 0, batch: 1)
    }

    /// Column-major C (m×n) = op(A) op(B) is row-major Cᵀ (n×m) = op(B)ᵀ op(A)ᵀ over the
    /// same memory: the row-major GEMM with the operands swapped, and each operand's
    /// stored matrix read row-major is its transpose, so the flags carry over.
    public func gemmStridedBatched(_ g: GEMM, strideA: Int, strideB: Int, strideC: Int, batch: Int) throws {
        let op = batch == 1 && strideA == 0 && strideC == 0 ? "gemm" : "gemmStridedBatched"
        try g.validate(op)
        guard batch >= 0 else { throw DeviceError.invalidArgument(op: op, reason: "batch \(batch)") }
        guard g.m > 0, g.n > 0 else { return }
        let (ra, ca) = g.storedA, (rb, cb) = g.storedB
        for i in 0..<batch {
            let a = try resolve("\(op) A", g.a + UInt64(i * strideA * 4), GEMM.span(rows: ra, cols: ca, ld: g.lda))
            let b = try resolve("\(op) B", g.b + UInt64(i * strideB * 4), GEMM.span(rows: rb, cols: cb, ld: g.ldb))
            let c = try resolve("\(op) C", g.c + UInt64(i * strideC * 4), GEMM.span(rows: g.m, cols: g.n, ld: g.ldc))
            let pc = c.assumingMemoryBound(to: Float.self)
            if g.k == 0 {
                // cuBLAS scales C by beta (beta = 0 writes zeros, whatever C held).
                for j in 0..<g.n { for r in 0..<g.m { pc[r + j * g.ldc] = g.beta == 0 ? 0 : g.beta * pc[r + j * g.ldc] } }
                continue
            }
            let pa = UnsafePointer(a.assumingMemoryBound(to: Float.self)), pb = UnsafePointer(b.assumingMemoryBound(to: Float.self))
            guard g.precision == .bf16 else {
                Float.gemm(transA: g.transB == .transpose, transB: g.transA == .transpose, m: g.n, n: g.m, k: g.k, alpha: g.alpha,
                           a: pb, lda: g.ldb, b: pa, ldb: g.lda, beta: g.beta, c: pc, ldc: g.ldc)
                continue
            }
            // bf16: the operands rounded to bf16 as the tensor cores take them, the products
            // and sums in fp32 (the copies span the operands' stored extent).
            let qa = Self.roundedToBF16(pa, count: GEMM.span(rows: ra, cols: ca, ld: g.lda) / 4)
            let qb = Self.roundedToBF16(pb, count: GEMM.span(rows: rb, cols: cb, ld: g.ldb) / 4)
            qa.withUnsafeBufferPointer { qa in
                qb.withUnsafeBufferPointer { qb in
                    Float.gemm(transA: g.transB == .transpose, transB: g.transA == .transpose, m: g.n, n: g.m, k: g.k, alpha: g.alpha,
                               a: qb.baseAddress!, lda: g.ldb, b: qa.baseAddress!, ldb: g.lda, beta: g.beta, c: pc, ldc: g.ldc)
                }
            }
        }
    }

    /// Runs the kernel's own source compiled for the host (CMBQKernels) over every block,
    /// blocks in parallel (they share nothing: kernels/mbq_kernels.cuh), each block's threads
    /// in order. Every pointer argument must be null or inside a live allocation.
    public func launch(_ kernel: Kernel, _ shape: LaunchShape, _ arguments: [KernelArgument]) throws {
        let index = mbq_host_kernel_index(kernel.rawValue)
        guard index >= 0 else { throw DeviceError.invalidArgument(op: "launch", reason: "no kernel \(kernel.rawValue) compiled for the host") }
        for (i, a) in arguments.enumerated() {
            if case .pointer(let p) = a, p != 0 { _ = try resolve("launch \(kernel.rawValue) argument \(i)", p, 1) }
        }
        let blockSize = UInt32(shape.blockSize)
        withKernelParameters(arguments) { params in
            parallelChunks(shape.blocks, minChunk: 1) { range in
                mbq_host_launch(index, UInt32(shape.blocks), 1, 1, blockSize, 1, 1,
                                UInt64(range.lowerBound), UInt64(range.upperBound), params)
            }
        }
    }

    /// `count` values from `p`, each rounded to the nearest bf16 (ties to even).
    static func roundedToBF16(_ p: UnsafePointer<Float>, count: Int) -> [Float] {
        (0..<count).map { HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16(p[$0])) }
    }

    public func memoryInfo() throws -> DeviceMemoryInfo {
        lock.withLock { DeviceMemoryInfo(free: capacity - used, total: capacity) }
    }

    public func synchronize() throws {}
}
