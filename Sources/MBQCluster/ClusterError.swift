/// Failures of a worker's or the coordinator's own resources (as opposed to the wire,
/// `ProtocolError`, and ZeroMQ, `TransportError`).
public enum ClusterError: Error, CustomStringConvertible {
    /// A --scratch file could not be written or read back.
    case scratch(path: String, reason: String)
    /// A block a worker wrote into the shared output directory does not check out.
    case output(path: String, reason: String)
    /// A phase asked for a block input the forward phase of this plan did not produce.
    case missingInput(layer: Int, sample: Int)
    /// The job directory's journal is missing, torn, or belongs to another job.
    case journal(path: String, reason: String)
    /// The distributed job failed (a worker's fatal error, a phase that cannot finish).
    case jobFailed(String)
    /// The job did not finish within its deadline.
    case deadline(seconds: Double)
    /// A cluster option that cannot work.
    case invalidOption(String)

    public var description: String {
        switch self {
        case let .scratch(path, why): return "scratch file \(path): \(why)"
        case let .output(path, why): return "output \(path): \(why)"
        case let .missingInput(l, s): return "no cached input for layer \(l), sample \(s): the forward phase of this plan has not run"
        case let .journal(path, why): return "\(path): \(why)"
        case let .jobFailed(why): return "the job failed: \(why)"
        case let .deadline(s): return "the job did not finish within \(Int(s)) s"
        case let .invalidOption(why): return "invalid option: \(why)"
        }
    }
}
