/// Keeps traffic the coordinator rejects from filling its log: per source (a peer's
/// address), the first `burst` events of each `window` seconds are written, the rest
/// counted and reported once when the window closes (`messagesSuppressed`). A flood of
/// well-formed but unauthenticated messages then costs a few lines every window instead
/// of one line per message. Pure: the caller gives the clock.
public struct LogThrottle {
    public var window: Double
    public var burst: Int
    var windowStart: [String: Double] = [:]
    var written: [String: Int] = [:]
    var suppressed: [String: Int] = [:]

    public init(window: Double = 10, burst: Int = 5) {
        self.window = window
        self.burst = burst
    }

    /// Whether an event from `source` at `now` is written (else it is counted).
    public mutating func admit(source: String, now: Double) -> Bool {
        if let start = windowStart[source], now - start < window {
            if written[source, default: 0] < burst {
                written[source, default: 0] += 1
                return true
            }
            suppressed[source, default: 0] += 1
            return false
        }
        windowStart[source] = now
        written[source] = 1
        return true
    }

    /// The sources whose window closed with events counted but not written, with their
    /// counts (each reported once), sorted by source.
    public mutating func expired(now: Double) -> [(source: String, count: Int, seconds: Double)] {
        var out: [(String, Int, Double)] = []
        for (source, start) in windowStart where now - start >= window {
            if let n = suppressed.removeValue(forKey: source), n > 0 { out.append((source, n, now - start)) }
            windowStart[source] = nil
            written[source] = nil
        }
        return out.sorted { $0.0 < $1.0 }
    }
}
