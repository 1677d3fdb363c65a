import MBQWire
import MBQCoordinator
import MBQWorker

/// Failures of a distributed job as a whole (its parts' errors: `ProtocolError`,
/// `TransportError`, `CoordinatorError`, `WorkerError`).
public enum ClusterError: Error, CustomStringConvertible {
    /// The distributed job failed (a worker's fatal error, a phase that cannot finish).
    case jobFailed(String)
    /// The job did not finish within its deadline.
    case deadline(seconds: Double)
    /// A cluster option that cannot work.
    case invalidOption(String)

    public var description: String {
        switch self {
        case let .jobFailed(why): return "the job failed: \(why)"
        case let .deadline(s): return "the job did not finish within \(Int(s)) s"
        case let .invalidOption(why): return "invalid option: \(why)"
        }
    }
}
