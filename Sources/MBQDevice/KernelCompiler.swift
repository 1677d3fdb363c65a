import Foundation

/// NVRTC, resolved at run time (../shared/CUDA.md "NVRTC"): compiles the kernel source
/// (`Kernel.source`) to a cubin for one GPU architecture, with ptxas's report of every
/// kernel's registers, spills and compile time. No CUDA toolkit at build time: the
/// library comes from `CUDALibraries` (the `nvidia-cuda-nvrtc` wheel, which `make test`
/// unpacks into .cuda-tools/, or a system install). A cubin, never PTX: PTX from an
/// NVRTC newer than the driver does not load.
public struct KernelCompiler: @unchecked Sendable {
    typealias CreateProgram = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafePointer<CChar>, UnsafePointer<CChar>?, Int32,
                                              UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    typealias CompileProgram = @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    typealias GetSize = @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    typealias GetBytes = @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    typealias DestroyProgram = @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    typealias Version = @convention(c) (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) -> Int32

    let create: CreateProgram, compileProgram: CompileProgram, destroy: DestroyProgram
    let logSize: GetSize, log: GetBytes, cubinSize: GetSize, cubin: GetBytes
    /// Where libnvrtc was found (nil: the loader's own search).
    public let folder: String?
    /// NVRTC's version, "13.0".
    public let version: String

    /// The options every compile gets besides the architecture: no fused multiply-add
    /// (the CPU reference rounds a product and a sum apart; kernels/mbq_kernels.cuh), IEEE
    /// division and square root, and ptxas's resource report.
    public static let options = ["--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ptxas-options=-v"]

    public init(environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        let (handle, folder) = try CUDALibraries.open(CUDALibraries.nvrtc, environment: environment)
        // libnvrtc dlopens its builtins by soname when it compiles: load them first, from
        // the same folder, so that name resolves without LD_LIBRARY_PATH.
        let builtins = "libnvrtc-builtins.so.13.0"
        if dlopen((folder.map { $0 + "/" } ?? "") + builtins, RTLD_NOW | RTLD_GLOBAL) == nil {
            throw DeviceError.libraryNotFound(library: builtins, searched: [folder ?? "the system's library paths"],
                                              hint: "it ships beside \(CUDALibraries.nvrtc) in the nvidia-cuda-nvrtc wheel")
        }
        func symbol<F>(_ name: String, as: F.Type) throws -> F {
            guard let p = dlsym(handle, name) else { throw DeviceError.call("dlsym \(name) in \(CUDALibraries.nvrtc)", status: -1) }
            return unsafeBitCast(p, to: F.self)
        }
        create = try symbol("nvrtcCreateProgram", as: CreateProgram.self)
        compileProgram = try symbol("nvrtcCompileProgram", as: CompileProgram.self)
        destroy = try symbol("nvrtcDestroyProgram", as: DestroyProgram.self)
        logSize = try symbol("nvrtcGetProgramLogSize", as: GetSize.self)
        log = try symbol("nvrtcGetProgramLog", as: GetBytes.self)
        cubinSize = try symbol("nvrtcGetCUBINSize", as: GetSize.self)
        cubin = try symbol("nvrtcGetCUBIN", as: GetBytes.self)
        var major: Int32 = 0, minor: Int32 = 0
        _ = try symbol("nvrtcVersion", as: Version.self)(&major, &minor)
        version = "\(major).\(minor)"
        self.folder = folder
    }

    /// One kernel as ptxas reports it.
    public struct Resources: Sendable, Equatable {
        public var kernel: String
        public var registers: Int
        public var spillStores: Int   // bytes
        public var spillLoads: Int    // bytes
        public var stackFrame: Int    // bytes
        public var compileMilliseconds: Double

        public init(kernel: String, registers: Int, spillStores: Int, spillLoads: Int, stackFrame: Int, compileMilliseconds: Double) {
            self.kernel = kernel; self.registers = registers; self.spillStores = spillStores; self.spillLoads = spillLoads
            self.stackFrame = stackFrame; self.compileMilliseconds = compileMilliseconds
        }
    }

    public struct Output: Sendable {
        public var architecture: String
        public var cubin: [UInt8]
        public var log: String
        public var seconds: Double
        public var kernels: [Resources]
    }

    /// `source` compiled for `architecture` ("sm_80", "sm_90"); a compile error throws with
    /// NVRTC's log.
    public func compile(_ source: String = Kernel.source, architecture: String) throws -> Output {
        var program: OpaquePointer?
        var status = source.withCString { create(&program, $0, "mbq_kernels.cu", 0, nil, nil) }
        guard status == 0 else { throw DeviceError.call("nvrtcCreateProgram", status: status) }
        defer { _ = destroy(&program) }
        let options = ["--gpu-architecture=\(architecture)"] + Self.options
        let start = DispatchTime.now().uptimeNanoseconds
        status = withCStrings(options) { compileProgram(program, Int32(options.count), $0) }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        var n = 0
        _ = logSize(program, &n)
        var text = [CChar](repeating: 0, count: max(n, 1))
        _ = log(program, &text)
        let logText = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard status == 0 else {
            throw DeviceError.compile(architecture: architecture, log: logText)
        }
        _ = cubinSize(program, &n)
        var bytes = [CChar](repeating: 0, count: n)
        status = cubin(program, &bytes)
        guard status == 0 else { throw DeviceError.call("nvrtcGetCUBIN", status: status) }
        return Output(architecture: architecture, cubin: bytes.map { UInt8(bitPattern: $0) }, log: logText, seconds: seconds,
                      kernels: Self.resources(in: logText))
    }

    /// ptxas -v's report, per kernel in the order compiled:
    ///   ptxas info    : Compiling entry function 'row_error' for 'sm_90'
    ///   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ///   ptxas info    : Used 24 registers, used 0 barriers
    ///   ptxas info    : Compile time = 8.822 ms
    public static func resources(in log: String) -> [Resources] {
        var out: [Resources] = []
        func number(before word: String, in line: Substring) -> Int? {
            guard let r = line.range(of: " " + word) else { return nil }
            return Int(line[..<r.lowerBound].split(separator: " ").last ?? "")
        }
        for line in log.split(separator: "\n") {
            if let r = line.range(of: "Compiling entry function '") {
                let name = line[r.upperBound...].prefix { $0 != "'" }
                out.append(Resources(kernel: String(name), registers: 0, spillStores: 0, spillLoads: 0, stackFrame: 0, compileMilliseconds: 0))
            } else if !out.isEmpty {
                if let v = number(before: "bytes stack frame", in: line) { out[out.count - 1].stackFrame = v }
                if let v = number(before: "bytes spill stores", in: line) { out[out.count - 1].spillStores = v }
                if let v = number(before: "bytes spill loads", in: line) { out[out.count - 1].spillLoads = v }
                if let v = number(before: "registers", in: line), line.contains("Used ") { out[out.count - 1].registers = v }
                if let r = line.range(of: "Compile time = ") {
                    out[out.count - 1].compileMilliseconds = Double(line[r.upperBound...].split(separator: " ").first ?? "") ?? 0
                }
            }
        }
        return out
    }
}

/// `strings` as a C array of C strings, valid inside `body`.
func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers = copies.map { UnsafePointer<CChar>($0) }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
