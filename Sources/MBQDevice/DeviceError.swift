/// What a device call can fail with; each case names the call or library at fault.
public enum DeviceError: Error, CustomStringConvertible, Equatable {
    /// A driver, cuBLAS or NVRTC library was not found where `CUDALibraries` looks.
    case libraryNotFound(library: String, searched: [String], hint: String)
    /// A call returned an error status.
    case call(String, status: Int32)
    /// An access outside every live allocation (the emulated device checks each one).
    case outOfBounds(op: String, address: UInt64, bytes: Int)
    case invalidArgument(op: String, reason: String)
    case outOfMemory(requested: Int, free: Int)
    /// NVRTC refused the kernel source; its log says where.
    case compile(architecture: String, log: String)

    public var description: String {
        switch self {
        case let .libraryNotFound(lib, searched, hint):
            return "\(lib) not found (searched: \(searched.joined(separator: ", "))): \(hint)"
        case let .call(name, status): return "\(name) failed with status \(status)"
        case let .outOfBounds(op, address, bytes):
            return "\(op): \(bytes) bytes at 0x\(String(address, radix: 16)) are not inside one allocation"
        case let .invalidArgument(op, reason): return "\(op): \(reason)"
        case let .outOfMemory(requested, free): return "device allocation of \(requested) bytes failed (\(free) bytes free)"
        case let .compile(arch, log): return "NVRTC could not compile the kernels for \(arch):\n\(log)"
        }
    }
}
