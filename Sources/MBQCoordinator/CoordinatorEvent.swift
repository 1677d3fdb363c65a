import Foundation
import MBQFormats
import MBQWire

/// What happened in a distributed job, as typed values: the coordinator's state machine
/// and its shell return these, one log writer renders them (`CoordinatorEventLog`: the
/// text log, or one JSON object per line with the fields below — docs/DESIGN.md §3.4),
/// and tests and benchmarks read them, never log text.
public enum CoordinatorEvent: Sendable, Equatable {
    public struct PlanEntry: Sendable, Equatable {
        public var worker: String
        public var layers: Range<Int>
        public init(worker: String, layers: Range<Int>) { self.worker = worker; self.layers = layers }
    }

    // The shell's
    case listening(endpoint: String, curveKeys: Int?, workers: Int, job: String, layers: Int, samples: Int)
    case resumed(finishedLayers: [Int], statistics: Bool)
    case messageRejected(reason: String)
    /// Events about unauthenticated or rejected traffic from one source past the log's
    /// budget (`LogThrottle`), counted instead of written.
    case messagesSuppressed(source: String, count: Int, seconds: Double)
    case curveAuth(line: String)
    case costModelPredicted(phases: [String: Double], order: [String], total: Double)
    case costModelMeasured(measured: [String: Double], predicted: [String: Double], order: [String], total: Double, predictedTotal: Double)
    case wrote(path: String, seconds: Double)

    // The state machine's
    case workerRegistered(worker: String, host: String, device: String, threads: Int, cores: Int, gflops: Double, gemmRates: [Double],
                          loopGBps: Double, memoryBytes: UInt64, scratchBytes: UInt64, reconnect: Bool)
    case workerRefused(worker: String, host: String, reason: String)
    case workerLost(worker: String, silentSeconds: Double, layers: Range<Int>?)
    case workerSpare(worker: String)
    case workerError(worker: String, message: String, fatal: Bool)
    case workerLateCompletion(worker: String, phase: String)
    case messageDropped(what: String, from: String?, reason: String)
    case planned(epoch: UInt32, reason: String, plan: [PlanEntry])
    case waitingForWorkers(reason: String)
    case waitingForMemory(reason: String, liveWorkers: Int, layersHeld: Int, layers: Int, layerWeightBytes: Double,
                          stageInputBytes: Double, fixedBytes: Double)
    case phaseStarted(phase: String, epoch: UInt32, workers: Int)
    case workerFinishedPhase(phase: String, worker: String, seconds: Double, blockSamplesPerSecond: Double?, bytesMoved: UInt64,
                             transferSeconds: Double, spilledBytes: UInt64, done: Int, of: Int)
    case gradientStatistics(samples: Int, attnRatios: [Double], mlpRatios: [Double])
    case layerSearched(layer: Int, worker: String, alphas: [String: Double], groups: [String], done: Int, of: Int,
                       layersPerMinute: Double?, etaSeconds: Double?)
    case blockReceived(layer: Int, worker: String, done: Int, of: Int)
    case blockWritten(layer: Int, worker: String, file: String, bytes: UInt64, done: Int, of: Int)
    case jobDone(layers: Int, writtenByWorkers: Int, streamed: Int, bytesMoved: UInt64, transferSeconds: Double,
                 workers: Int, wallSeconds: Double?)

    /// The event's stable name (the JSON `event` field; `CoordinatorEventLog.describe`).
    public var name: String { CoordinatorEventLog.describe(self).name }
}
