/// Failures of a worker's own resources (as opposed to the wire, `ProtocolError`, and
/// ZeroMQ, `TransportError`).
public enum WorkerError: Error, CustomStringConvertible {
    /// The shared output directory cannot be used as asked.
    case output(path: String, reason: String)
    /// The job's model or bundle on this host is not the coordinator's.
    case inputs(String)

    public var description: String {
        switch self {
        case let .output(path, why): return "output \(path): \(why)"
        case let .inputs(why): return why
        }
    }
}
