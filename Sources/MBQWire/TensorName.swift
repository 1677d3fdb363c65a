/// What a tensor frame carries, and its name on the wire (`TensorHeader.name`): encoded
/// and parsed here only. A sample's block activations going down the pipeline
/// ("act/S"), its gradients going up ("grad/S"), its quantized-pipeline activations in a
/// --distort or GPTQ search ("dist/S"), and a finished layer's shard file streamed to the
/// coordinator ("shard/L/FILE").
public enum TensorName: Equatable, Hashable, Sendable, CustomStringConvertible {
    case activation(sample: Int)
    case gradient(sample: Int)
    case distorted(sample: Int)
    case shard(layer: Int, file: String)

    public var wire: String {
        switch self {
        case let .activation(s): return "act/\(s)"
        case let .gradient(s): return "grad/\(s)"
        case let .distorted(s): return "dist/\(s)"
        case let .shard(l, file): return "shard/\(l)/\(file)"
        }
    }

    public var description: String { wire }

    /// nil for anything else: an unknown kind, a negative or non-numeric index, an empty
    /// file name or one with a path separator.
    public init?(wire: String) {
        let parts = wire.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count >= 2, let n = Int(parts[1]), n >= 0 else { return nil }
        switch (parts[0], parts.count) {
        case ("act", 2): self = .activation(sample: n)
        case ("grad", 2): self = .gradient(sample: n)
        case ("dist", 2): self = .distorted(sample: n)
        case ("shard", 3) where !parts[2].isEmpty: self = .shard(layer: n, file: String(parts[2]))
        default: return nil
        }
    }
}
