/// Errors of the quantization methods: refused option combinations and unusable data.
public enum MethodsError: Error, CustomStringConvertible, Equatable {
    case invalidOptions(String)
    case noUsableSamples(String)
    case output(path: String, reason: String)
    /// A --scratch file could not be written or read back.
    case scratch(path: String, reason: String)
    /// A pass asked for a block input the forward pass did not produce.
    case missingInput(layer: Int, sample: Int)

    public var description: String {
        switch self {
        case let .invalidOptions(why): return "invalid options: \(why)"
        case let .noUsableSamples(why): return "no usable calibration samples: \(why)"
        case let .output(path, reason): return "\(path): \(reason)"
        case let .scratch(path, why): return "scratch file \(path): \(why)"
        case let .missingInput(l, s): return "no cached input for layer \(l), sample \(s): the forward pass has not run"
        }
    }
}
