/// Failures of a worker's own resources (as opposed to the wire, `ProtocolError`, and
/// ZeroMQ, `TransportError`).
public enum WorkerError: Error, CustomStringConvertible {
    /// A --scratch file could not be written or read back.
    case scratch(path: String, reason: String)
    /// The shared output directory cannot be used as asked.
    case output(path: String, reason: String)
    /// A phase asked for a block input the forward phase of this plan did not produce.
    case missingInput(layer: Int, sample: Int)

    public var description: String {
        switch self {
        case let .scratch(path, why): return "scratch file \(path): \(why)"
        case let .output(path, why): return "output \(path): \(why)"
        case let .missingInput(l, s): return "no cached input for layer \(l), sample \(s): the forward phase of this plan has not run"
        }
    }
}
