/// What the coordinator's policy refuses.
public enum CoordinatorError: Error, CustomStringConvertible {
    /// The job directory's journal is missing, torn, or belongs to another job.
    case journal(path: String, reason: String)

    public var description: String {
        switch self {
        case let .journal(path, why): return "\(path): \(why)"
        }
    }
}
