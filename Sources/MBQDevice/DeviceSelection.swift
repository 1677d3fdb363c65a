import Foundation

/// What `--device` names: the CPU, GPU N through CUDA, or the emulated CUDA device (the
/// kernels' own source run on the host; for tests and for checking a machine without a GPU).
public enum DeviceSelection: Sendable, Equatable, CustomStringConvertible {
    case cpu
    case cuda(ordinal: Int)
    case cudaEmulated

    /// "cpu", "cuda", "cuda:N", "cuda-emulated".
    public init(parsing text: String) throws {
        switch text {
        case "cpu": self = .cpu
        case "cuda": self = .cuda(ordinal: 0)
        case "cuda-emulated": self = .cudaEmulated
        default:
            guard text.hasPrefix("cuda:"), let n = Int(text.dropFirst(5)), n >= 0 else {
                throw DeviceError.invalidArgument(op: "--device", reason: "'\(text)' is not cpu, cuda, cuda:N or cuda-emulated")
            }
            self = .cuda(ordinal: n)
        }
    }

    public var description: String {
        switch self {
        case .cpu: return "cpu"
        case .cuda(let n): return "cuda:\(n)"
        case .cudaEmulated: return "cuda-emulated"
        }
    }

    /// The device it names (nil for the CPU, which needs none).
    public func open(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> Device? {
        switch self {
        case .cpu: return nil
        case .cuda(let n): return try CUDADevice(ordinal: n, environment: environment)
        case .cudaEmulated: return EmulatedDevice()
        }
    }
}
