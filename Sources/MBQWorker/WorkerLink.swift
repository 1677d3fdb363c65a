/// The worker's side of the control channel as a state machine (docs/DESIGN.md §3.2):
/// clock readings and what arrived in, actions out, so heartbeats, liveness,
/// re-registration with exponential backoff, a fresh socket after silence, and giving up
/// are tested without sockets. `Worker.run` owns the socket and carries the actions out.
public struct WorkerLink: Sendable {
    public struct Settings: Sendable {
        public var heartbeatInterval: Double
        /// Silence after which the coordinator counts as gone and this worker registers again.
        public var coordinatorTimeout: Double
        /// Silence after which the worker gives up (exit 2).
        public var giveUpAfter: Double
        /// Longest wait between unanswered registrations (the backoff doubles up to it).
        public var maxBackoff: Double

        public init(heartbeatInterval: Double, coordinatorTimeout: Double, giveUpAfter: Double, maxBackoff: Double = 30) {
            self.heartbeatInterval = heartbeatInterval; self.coordinatorTimeout = coordinatorTimeout
            self.giveUpAfter = giveUpAfter; self.maxBackoff = maxBackoff
        }
    }

    public enum Action: Sendable, Equatable {
        /// Close the control socket and open a new one (a new connection and identity:
        /// nothing queued for a coordinator that is gone is sent to the next one).
        case recreateSocket
        /// Send the registration. `silentFor`: a re-registration after that much silence.
        case register(silentFor: Double?)
        case heartbeat
        /// Nothing from any coordinator for `giveUpAfter` seconds.
        case giveUp
    }

    public let settings: Settings
    var registered = false
    var lastRegister = -Double.infinity
    var lastHeartbeat: Double
    /// Last message from a coordinator, or the last registration (which restarts the
    /// silence count); and the last message of any kind (for giving up).
    var lastHeard: Double
    var lastMessage: Double
    /// Registrations sent since the coordinator was last heard.
    public private(set) var unanswered = 0

    public init(settings: Settings, now: Double) {
        self.settings = settings
        lastHeartbeat = now
        lastHeard = now
        lastMessage = now
    }

    /// The wait before the next registration when `unanswered` went without an answer:
    /// the coordinator timeout, doubled per unanswered registration, at most `maxBackoff`.
    public var backoff: Double {
        guard unanswered > 0 else { return settings.coordinatorTimeout }
        let doublings = Double(min(unanswered - 1, 16))
        return min(settings.coordinatorTimeout * Double.pow(2, doublings), max(settings.maxBackoff, settings.coordinatorTimeout))
    }

    public mutating func tick(now: Double) -> [Action] {
        if now - lastMessage > settings.giveUpAfter { return [.giveUp] }
        var out: [Action] = []
        let silent = registered && now - lastHeard > settings.coordinatorTimeout
        if (!registered || silent) && now - lastRegister >= backoff {
            // After silence, or a registration nobody answered, start over on a new socket.
            if silent || unanswered > 0 { out.append(.recreateSocket) }
            out.append(.register(silentFor: registered ? now - lastHeard : nil))
            registerSent(now: now)
            unanswered += 1
        }
        if now - lastHeartbeat > settings.heartbeatInterval {
            out.append(.heartbeat)
            lastHeartbeat = now
        }
        return out
    }

    /// A message from the coordinator arrived. `registerAgain`: it does not know this
    /// worker (restarted, or declared it lost): register at once.
    public mutating func heard(now: Double, registerAgain: Bool = false) {
        lastHeard = now
        lastMessage = now
        unanswered = 0
        if registerAgain && now - lastRegister > 0.5 {
            registered = false
            lastRegister = -Double.infinity
        }
    }

    /// A registration went out outside `tick` (the answer to a challenge).
    public mutating func registerSent(now: Double) {
        lastRegister = now
        registered = true
        lastHeard = now
    }
}
