/// Errors of the quantization methods: refused option combinations and unusable data.
public enum MethodsError: Error, CustomStringConvertible, Equatable {
    case invalidOptions(String)
    case noUsableSamples(String)
    case output(path: String, reason: String)

    public var description: String {
        switch self {
        case let .invalidOptions(why): return "invalid options: \(why)"
        case let .noUsableSamples(why): return "no usable calibration samples: \(why)"
        case let .output(path, reason): return "\(path): \(reason)"
        }
    }
}
