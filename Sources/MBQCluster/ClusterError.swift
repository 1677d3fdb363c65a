/// Failures of a worker's or the coordinator's own resources (as opposed to the wire,
/// `ProtocolError`, and ZeroMQ, `TransportError`).
public enum ClusterError: Error, CustomStringConvertible {
    /// A --scratch file could not be written or read back.
    case scratch(path: String, reason: String)
    /// A block a worker wrote into the shared output directory does not check out.
    case output(path: String, reason: String)
    /// CurveZMQ refused this worker's key (it is not in the coordinator's authorized list).
    case refused(String)

    public var description: String {
        switch self {
        case let .scratch(path, why): return "scratch file \(path): \(why)"
        case let .output(path, why): return "output \(path): \(why)"
        case let .refused(why): return "refused: \(why)"
        }
    }
}
