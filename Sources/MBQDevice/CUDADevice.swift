import Foundation

/// The `Device` contract on an NVIDIA GPU: the driver API and cuBLAS resolved with dlopen
/// at run time (`CUDALibraries`; symbols and constants from ../shared/CUDA.md), the
/// kernels compiled by NVRTC for the GPU's own architecture when the device opens. One
/// primary context (the one cuBLAS uses) and one stream per device; every call is
/// ordered on that stream and `synchronize` waits for it.
///
/// GEMMs are fp32 in and out with CUBLAS_COMPUTE_32F: no TF32, the "strict" precision
/// the CPU's results are held to. Kernels sum without atomics, so a run repeats bit for bit.
public final class CUDADevice: Device, @unchecked Sendable {
    // Driver API (CUresult = Int32, CUdevice = Int32, handles = OpaquePointer?, CUdeviceptr = UInt64).
    typealias CuInit = @convention(c) (UInt32) -> Int32
    typealias CuDeviceGet = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32
    typealias CuDeviceGetCount = @convention(c) (UnsafeMutablePointer<Int32>) -> Int32
    typealias CuDeviceGetName = @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> Int32
    typealias CuDeviceGetAttribute = @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> Int32
    typealias CuPrimaryCtxRetain = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32) -> Int32
    typealias CuCtxSetCurrent = @convention(c) (OpaquePointer?) -> Int32
    typealias CuStreamCreate = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Int32
    typealias CuStreamSynchronize = @convention(c) (OpaquePointer?) -> Int32
    typealias CuMemAlloc = @convention(c) (UnsafeMutablePointer<UInt64>, Int) -> Int32
    typealias CuMemFree = @convention(c) (UInt64) -> Int32
    typealias CuMemcpyHtoD = @convention(c) (UInt64, UnsafeRawPointer?, Int, OpaquePointer?) -> Int32
    typealias CuMemcpyDtoH = @convention(c) (UnsafeMutableRawPointer?, UInt64, Int, OpaquePointer?) -> Int32
    typealias CuMemcpyDtoD = @convention(c) (UInt64, UInt64, Int, OpaquePointer?) -> Int32
    typealias CuMemGetInfo = @convention(c) (UnsafeMutablePointer<Int>, UnsafeMutablePointer<Int>) -> Int32
    typealias CuModuleLoadData = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafeRawPointer) -> Int32
    typealias CuModuleGetFunction = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UnsafePointer<CChar>) -> Int32
    typealias CuLaunchKernel = @convention(c) (OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, OpaquePointer?,
                                               UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32
    typealias CuGetErrorName = @convention(c) (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Int32
    typealias CuHandleCall = @convention(c) (OpaquePointer?) -> Int32      // cuStreamDestroy_v2, cuModuleUnload, cublasDestroy_v2
    typealias CuPrimaryCtxRelease = @convention(c) (Int32) -> Int32
    // cuBLAS.
    typealias CublasCreate = @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    typealias CublasSetStream = @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32
    typealias CublasGemmEx = @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafeRawPointer, UInt64, Int32, Int32,
                                             UInt64, Int32, Int32, UnsafeRawPointer, UInt64, Int32, Int32, Int32, Int32) -> Int32
    typealias CublasGemmStridedBatchedEx = @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafeRawPointer,
                                                           UInt64, Int32, Int32, Int64, UInt64, Int32, Int32, Int64, UnsafeRawPointer,
                                                           UInt64, Int32, Int32, Int64, Int32, Int32, Int32) -> Int32

    static let cudaR32F: Int32 = 0, computeType32F: Int32 = 68, computeType32FFast16BF: Int32 = 75, gemmDefault: Int32 = -1
    static func computeType(_ p: GEMMPrecision) -> Int32 { p == .strict ? computeType32F : computeType32FFast16BF }
    static let attributeComputeMajor: Int32 = 75, attributeComputeMinor: Int32 = 76

    /// A value behind a lock.
    final class Locked<Value>: @unchecked Sendable {
        private var value: Value
        private let lock = NSLock()
        init(_ value: Value) { self.value = value }
        func withLock<R>(_ body: (inout Value) -> R) -> R { lock.lock(); defer { lock.unlock() }; return body(&value) }
    }

    struct Driver {
        let getErrorName: CuGetErrorName?
        let streamSynchronize: CuStreamSynchronize, memAlloc: CuMemAlloc, memFree: CuMemFree
        let htod: CuMemcpyHtoD, dtoh: CuMemcpyDtoH, dtod: CuMemcpyDtoD, memGetInfo: CuMemGetInfo
        let launchKernel: CuLaunchKernel
        let gemmEx: CublasGemmEx, gemmStridedBatchedEx: CublasGemmStridedBatchedEx
    }

    public let name: String
    public let ordinal: Int
    /// "sm_90" for an H100.
    public let architecture: String
    /// Where libcuda and cuBLAS were found (nil: the loader's own search).
    public let libraryFolders: [String: String?]
    /// What NVRTC reported when it compiled the kernels for this GPU.
    public let compiled: KernelCompiler.Output
    let api: Driver
    let stream: OpaquePointer?
    let cublas: OpaquePointer?
    let module: OpaquePointer?
    let functions: [Kernel: OpaquePointer]
    /// Live allocations' sizes, and freed ones kept for reuse (`AllocationPool`).
    let sizes = Locked<[DevicePointer: Int]>([:])
    let pool = Locked(AllocationPool())
    /// What deinit releases, in order: cuBLAS's handle, the module, the stream, the
    /// primary context's reference.
    let release: (cublasDestroy: CuHandleCall, moduleUnload: CuHandleCall, streamDestroy: CuHandleCall,
                  contextRelease: CuPrimaryCtxRelease, device: Int32)

    /// Opens GPU `ordinal`: a clear error when libcuda is missing (naming it and
    /// `MBQ_CUDA_LIBS`), when there is no such GPU, or when a call fails.
    public init(ordinal: Int = 0, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        let (cuda, cudaFolder) = try CUDALibraries.open(CUDALibraries.driver, environment: environment)
        func sym<F>(_ handle: UnsafeMutableRawPointer, _ lib: String, _ name: String, _: F.Type) throws -> F {
            guard let p = dlsym(handle, name) else { throw DeviceError.call("dlsym \(name) in \(lib)", status: -1) }
            return unsafeBitCast(p, to: F.self)
        }
        let d = CUDALibraries.driver
        let errorName = dlsym(cuda, "cuGetErrorName").map { unsafeBitCast($0, to: CuGetErrorName.self) }
        func check(_ call: String, _ status: Int32) throws {
            guard status != 0 else { return }
            throw DeviceError.call(call + Self.statusName(status, errorName), status: status)
        }
        try check("cuInit", try sym(cuda, d, "cuInit", CuInit.self)(0))
        var count: Int32 = 0
        try check("cuDeviceGetCount", try sym(cuda, d, "cuDeviceGetCount", CuDeviceGetCount.self)(&count))
        guard ordinal >= 0, ordinal < Int(count) else {
            throw DeviceError.invalidArgument(op: "open cuda:\(ordinal)", reason: "the driver sees \(count) GPU(s)")
        }
        var dev: Int32 = 0
        try check("cuDeviceGet", try sym(cuda, d, "cuDeviceGet", CuDeviceGet.self)(&dev, Int32(ordinal)))
        var buf = [CChar](repeating: 0, count: 256)
        try check("cuDeviceGetName", try sym(cuda, d, "cuDeviceGetName", CuDeviceGetName.self)(&buf, 255, dev))
        name = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let attribute = try sym(cuda, d, "cuDeviceGetAttribute", CuDeviceGetAttribute.self)
        var major: Int32 = 0, minor: Int32 = 0
        try check("cuDeviceGetAttribute", attribute(&major, Self.attributeComputeMajor, dev))
        try check("cuDeviceGetAttribute", attribute(&minor, Self.attributeComputeMinor, dev))
        architecture = "sm_\(major)\(minor)"
        // The primary context, not cuCtxCreate (CUDA 13 maps it to _v4, another signature).
        var ctx: OpaquePointer?
        try check("cuDevicePrimaryCtxRetain", try sym(cuda, d, "cuDevicePrimaryCtxRetain", CuPrimaryCtxRetain.self)(&ctx, dev))
        try check("cuCtxSetCurrent", try sym(cuda, d, "cuCtxSetCurrent", CuCtxSetCurrent.self)(ctx))
        var s: OpaquePointer?
        try check("cuStreamCreate", try sym(cuda, d, "cuStreamCreate", CuStreamCreate.self)(&s, 1))   // CU_STREAM_NON_BLOCKING
        stream = s

        let (blas, blasFolder) = try CUDALibraries.open(CUDALibraries.cublas, environment: environment)
        let b = CUDALibraries.cublas
        var h: OpaquePointer?
        try check("cublasCreate_v2", try sym(blas, b, "cublasCreate_v2", CublasCreate.self)(&h))
        try check("cublasSetStream_v2", try sym(blas, b, "cublasSetStream_v2", CublasSetStream.self)(h, s))
        cublas = h
        api = Driver(getErrorName: errorName,
                     streamSynchronize: try sym(cuda, d, "cuStreamSynchronize", CuStreamSynchronize.self),
                     memAlloc: try sym(cuda, d, "cuMemAlloc_v2", CuMemAlloc.self), memFree: try sym(cuda, d, "cuMemFree_v2", CuMemFree.self),
                     htod: try sym(cuda, d, "cuMemcpyHtoDAsync_v2", CuMemcpyHtoD.self),
                     dtoh: try sym(cuda, d, "cuMemcpyDtoHAsync_v2", CuMemcpyDtoH.self),
                     dtod: try sym(cuda, d, "cuMemcpyDtoDAsync_v2", CuMemcpyDtoD.self),
                     memGetInfo: try sym(cuda, d, "cuMemGetInfo_v2", CuMemGetInfo.self),
                     launchKernel: try sym(cuda, d, "cuLaunchKernel", CuLaunchKernel.self),
                     gemmEx: try sym(blas, b, "cublasGemmEx", CublasGemmEx.self),
                     gemmStridedBatchedEx: try sym(blas, b, "cublasGemmStridedBatchedEx", CublasGemmStridedBatchedEx.self))

        // The kernels, compiled for this GPU and loaded as one module.
        let out = try KernelCompiler(environment: environment).compile(architecture: architecture)
        var loaded: OpaquePointer?
        try out.cubin.withUnsafeBytes { p in
            try check("cuModuleLoadData", try sym(cuda, d, "cuModuleLoadData", CuModuleLoadData.self)(&loaded, p.baseAddress!))
        }
        module = loaded
        let getFunction = try sym(cuda, d, "cuModuleGetFunction", CuModuleGetFunction.self)
        var fns: [Kernel: OpaquePointer] = [:]
        for k in Kernel.allCases {
            var f: OpaquePointer?
            try check("cuModuleGetFunction \(k.rawValue)", getFunction(&f, loaded, k.rawValue))
            guard let f else { throw DeviceError.call("cuModuleGetFunction \(k.rawValue)", status: -1) }
            fns[k] = f
        }
        functions = fns
        compiled = out
        release = (try sym(blas, b, "cublasDestroy_v2", CuHandleCall.self), try sym(cuda, d, "cuModuleUnload", CuHandleCall.self),
                   try sym(cuda, d, "cuStreamDestroy_v2", CuHandleCall.self),
                   try sym(cuda, d, "cuDevicePrimaryCtxRelease_v2", CuPrimaryCtxRelease.self), dev)
        self.ordinal = ordinal
        libraryFolders = [CUDALibraries.driver: cudaFolder, CUDALibraries.cublas: blasFolder]
    }

    deinit {
        _ = try? synchronize()
        for p in pool.withLock({ $0.drain() }) + Array(sizes.withLock { $0.keys }) { _ = api.memFree(p) }
        _ = release.cublasDestroy(cublas)
        _ = release.moduleUnload(module)
        _ = release.streamDestroy(stream)
        _ = release.contextRelease(release.device)
    }

    static func statusName(_ status: Int32, _ errorName: CuGetErrorName?) -> String {
        var p: UnsafePointer<CChar>?
        guard let errorName, errorName(status, &p) == 0, let p else { return "" }
        return " (\(String(cString: p)))"
    }

    func check(_ call: String, _ status: Int32) throws {
        guard status != 0 else { return }
        throw DeviceError.call(call + Self.statusName(status, api.getErrorName), status: status)
    }

    /// Allocations are rounded up to 256 bytes and reused from `pool` by size.
    public func allocate(_ bytes: Int) throws -> DevicePointer {
        guard bytes > 0 else { throw DeviceError.invalidArgument(op: "allocate", reason: "\(bytes) bytes") }
        let size = (bytes + 255) / 256 * 256
        if let p = pool.withLock({ $0.take(size) }) {
            sizes.withLock { $0[p] = size }
            return p
        }
        var p: UInt64 = 0
        var status = api.memAlloc(&p, size)
        if status == 2 {   // CUDA_ERROR_OUT_OF_MEMORY: give the pool back and try once more
            for q in pool.withLock({ $0.drain() }) { _ = api.memFree(q) }
            status = api.memAlloc(&p, size)
        }
        if status == 2 { throw DeviceError.outOfMemory(requested: bytes, free: (try? memoryInfo().free) ?? 0) }
        try check("cuMemAlloc_v2", status)
        sizes.withLock { $0[p] = size }
        return p
    }

    public func free(_ p: DevicePointer) throws {
        guard let size = sizes.withLock({ $0.removeValue(forKey: p) }) else {
            throw DeviceError.invalidArgument(op: "free", reason: "0x\(String(p, radix: 16)) is not an allocation's start")
        }
        pool.withLock { $0.put(p, bytes: size) }
    }

    public func copy(_ host: UnsafeRawBufferPointer, to p: DevicePointer) throws {
        guard host.count > 0 else { return }
        try check("cuMemcpyHtoDAsync_v2", api.htod(p, host.baseAddress, host.count, stream))
        // The host buffer may be gone when the call returns: wait for the copy.
        try synchronize()
    }

    public func copy(_ p: DevicePointer, to host: UnsafeMutableRawBufferPointer) throws {
        guard host.count > 0 else { return }
        try check("cuMemcpyDtoHAsync_v2", api.dtoh(host.baseAddress, p, host.count, stream))
        try synchronize()
    }

    public func copy(_ from: DevicePointer, to: DevicePointer, bytes: Int) throws {
        guard bytes > 0 else { return }
        try check("cuMemcpyDtoDAsync_v2", api.dtod(to, from, bytes, stream))
    }

    public func gemm(_ g: GEMM) throws {
        try g.validate("gemm")
        guard g.m > 0, g.n > 0 else { return }
        var alpha = g.alpha, beta = g.beta
        try check("cublasGemmEx", api.gemmEx(cublas, g.transA.rawValue, g.transB.rawValue, Int32(g.m), Int32(g.n), Int32(g.k), &alpha,
                                             g.a, Self.cudaR32F, Int32(g.lda), g.b, Self.cudaR32F, Int32(g.ldb), &beta,
                                             g.c, Self.cudaR32F, Int32(g.ldc), Self.computeType(g.precision), Self.gemmDefault))
    }

    public func gemmStridedBatched(_ g: GEMM, strideA: Int, strideB: Int, strideC: Int, batch: Int) throws {
        try g.validate("gemmStridedBatched")
        guard g.m > 0, g.n > 0, batch > 0 else { return }
        var alpha = g.alpha, beta = g.beta
        try check("cublasGemmStridedBatchedEx",
                  api.gemmStridedBatchedEx(cublas, g.transA.rawValue, g.transB.rawValue, Int32(g.m), Int32(g.n), Int32(g.k), &alpha,
                                           g.a, Self.cudaR32F, Int32(g.lda), Int64(strideA), g.b, Self.cudaR32F, Int32(g.ldb), Int64(strideB),
                                           &beta, g.c, Self.cudaR32F, Int32(g.ldc), Int64(strideC), Int32(batch),
                                           Self.computeType(g.precision), Self.gemmDefault))
    }

    public func launch(_ kernel: Kernel, _ shape: LaunchShape, _ arguments: [KernelArgument]) throws {
        guard let f = functions[kernel] else { throw DeviceError.invalidArgument(op: "launch", reason: "no kernel \(kernel.rawValue)") }
        let status = withKernelParameters(arguments) { params in
            api.launchKernel(f, UInt32(shape.blocks), 1, 1, UInt32(shape.blockSize), 1, 1, 0, stream, params, nil)
        }
        try check("cuLaunchKernel \(kernel.rawValue)", status)
    }

    /// The driver's free memory plus what the pool holds for reuse.
    public func memoryInfo() throws -> DeviceMemoryInfo {
        var free = 0, total = 0
        try check("cuMemGetInfo_v2", api.memGetInfo(&free, &total))
        return DeviceMemoryInfo(free: free + pool.withLock { $0.pooledBytes }, total: total)
    }

    public func synchronize() throws { try check("cuStreamSynchronize", api.streamSynchronize(stream)) }
}
