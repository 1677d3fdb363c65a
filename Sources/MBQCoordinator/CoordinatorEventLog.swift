import Foundation
import MBQFormats
import MBQWire

/// Renders coordinator events: the human text log, or one JSON object per line
/// (`--log-format json`; schema in docs/DESIGN.md §3.4: `t` seconds since start, `event`
/// the event's name, `phase` and `epoch` of the job when it was logged, then the
/// event's own fields in a fixed order).
public enum CoordinatorEventLog {
    /// One event described once: its stable name (the JSON `event` field), its own
    /// fields in a fixed order (the JSON object), and its text line, all built in one
    /// place from the same values.
    public struct Description {
        public var name: String
        public var fields: [(String, JSONText)]
        public var text: String
    }

    public static func describe(_ e: CoordinatorEvent) -> Description {
        func d(_ x: Double) -> JSONText { .double(x) }
        func i<I: BinaryInteger>(_ x: I) -> JSONText { .int(Int(x)) }
        func str(_ x: String) -> JSONText { .string(x) }
        func opt(_ x: Double?) -> JSONText { x.map { .double($0) } ?? .null }
        func rangeJSON(_ r: Range<Int>?) -> JSONText { r.map { .array([.int($0.lowerBound), .int($0.upperBound)]) } ?? .null }
        func range(_ r: Range<Int>?) -> String { r.map { "\($0.lowerBound)..<\($0.upperBound)" } ?? "none" }
        func doubles(_ v: [Double]) -> JSONText { .array(v.map { .double($0) }) }
        func map(_ m: [String: Double], _ order: [String]) -> JSONText { .object(order.map { ($0, .double(m[$0] ?? 0)) }) }
        func event(_ name: String, _ fields: [(String, JSONText)], _ text: String) -> Description {
            Description(name: name, fields: fields, text: text)
        }
        switch e {
        case let .listening(endpoint, curveKeys, workers, job, layers, samples):
            return event("listening", [("endpoint", str(endpoint)), ("curve_keys", curveKeys.map { .int($0) } ?? .null), ("workers", i(workers)),
                                       ("job", str(job)), ("layers", i(layers)), ("samples", i(samples))],
                         "listening on \(endpoint)\(curveKeys.map { " (CurveZMQ, \($0) authorized key(s))" } ?? ""), waiting for \(workers) worker(s); job \(job), \(layers) layers, \(samples) samples")
        case let .resumed(finished, statistics):
            return event("resumed", [("finished_layers", .array(finished.map { .int($0) })), ("statistics", .bool(statistics))],
                         "resume: journal has \(finished.count) finished layer(s) \(finished) and \(statistics ? "complete" : "no") gradient statistics; they are not recomputed")
        case let .messageRejected(reason):
            return event("message_rejected", [("reason", str(reason))], "rejected a message: \(reason)")
        case let .messagesSuppressed(source, count, seconds):
            return event("messages_suppressed", [("source", str(source)), ("count", .int(count)), ("seconds", d(seconds))],
                         "\(count) more rejected or unauthenticated message(s) from \(source) in the last \(String(format: "%.0f", seconds)) s (not logged one by one)")
        case let .curveAuth(line):
            return event("curve_auth", [("line", str(line))], line)
        case let .costModelPredicted(phases, order, total):
            return event("cost_model_predicted", [("predicted_s", map(phases, order)), ("total_s", d(total))],
                         "cost model: predicted " + order.map { String(format: "%@ %.2f s", $0, phases[$0] ?? 0) }.joined(separator: ", ")
                             + String(format: "; total %.2f s", total))
        case let .costModelMeasured(measured, predicted, order, total, predictedTotal):
            func pct(_ m: Double, _ p: Double) -> Double { 100 * (m / max(p, 1e-9) - 1) }
            return event("cost_model_measured", [("measured_s", map(measured, order)), ("predicted_s", map(predicted, order)),
                                                 ("total_s", d(total)), ("predicted_total_s", d(predictedTotal))],
                         "cost model: measured " + order.map { ph in
                             let m = measured[ph] ?? 0, p = predicted[ph] ?? 0
                             return String(format: "%@ %.2f s (predicted %.2f, %+.0f%%)", ph, m, p, pct(m, p))
                         }.joined(separator: ", ") + String(format: "; total %.2f s (predicted %.2f, %+.0f%%)", total, predictedTotal, pct(total, predictedTotal)))
        case let .wrote(path, seconds):
            return event("wrote", [("path", str(path)), ("seconds", d(seconds))], "wrote \(path) in \(String(format: "%.1f", seconds)) s total")
        case let .workerRegistered(worker, host, device, threads, cores, gflops, rates, loop, memory, scratch, reconnect):
            let curve = rates.isEmpty ? "" : " (GEMM 64..1024: " + rates.map { String(format: "%.0f", $0) }.joined(separator: "/") + ")"
            let sc = scratch > 0 ? String(format: ", scratch %.0f GiB free", Double(scratch) / 1073741824) : ""
            let l = loop > 0 ? String(format: ", loops %.2f GB/s per thread", loop) : ""
            return event("worker_registered", [("worker", str(worker)), ("host", str(host)), ("device", str(device)), ("threads", i(threads)), ("cores", i(cores)),
                                               ("gflops", d(gflops)), ("gemm_rates", doubles(rates)), ("loop_gbps", d(loop)),
                                               ("memory_bytes", i(memory)), ("scratch_bytes", i(scratch)), ("reconnect", .bool(reconnect))],
                         String(format: "worker=%@ registered from %@ (%@): %d threads of %d cores, %.0f GFLOP/s%@%@, %.1f GiB%@%@", worker, host, device.isEmpty ? "device not reported" : device,
                                threads, cores, gflops, curve, l, Double(memory) / 1073741824, sc, reconnect ? " (reconnect: its state is gone)" : ""))
        case let .workerRefused(worker, host, reason):
            return event("worker_refused", [("worker", str(worker)), ("host", str(host)), ("reason", str(reason))],
                         "refused worker '\(worker)' from \(host): \(reason)")
        case let .workerLost(worker, silent, layers):
            return event("worker_lost", [("worker", str(worker)), ("silent_s", d(silent)), ("layers", rangeJSON(layers))],
                         "worker=\(worker) lost: no heartbeat for \(String(format: "%.1f", silent)) s (held layers \(range(layers)))")
        case let .workerSpare(worker):
            return event("worker_spare", [("worker", str(worker))], "worker=\(worker) joins as a spare")
        case let .workerError(worker, message, fatal):
            return event("worker_error", [("worker", str(worker)), ("message", str(message)), ("fatal", .bool(fatal))],
                         "worker=\(worker) error: \(message)")
        case let .workerLateCompletion(worker, phase):
            return event("worker_late_completion", [("worker", str(worker)), ("of_phase", str(phase))],
                         "worker=\(worker) done with \(phase) (its results had completed the phase)")
        case let .messageDropped(what, from, reason):
            return event("message_dropped", [("what", str(what)), ("from", from.map { .string($0) } ?? .null), ("reason", str(reason))],
                         "dropped \(what)\(from.map { " from \($0)" } ?? ""): \(reason)")
        case let .planned(epoch, reason, plan):
            return event("planned", [("plan_epoch", i(epoch)), ("reason", str(reason)),
                                     ("plan", .array(plan.map { .object([("worker", .string($0.worker)), ("layers", rangeJSON($0.layers))]) }))],
                         "plan epoch=\(epoch) (\(reason)): " + plan.map { "\($0.worker)=layers \(range($0.layers))" }.joined(separator: ", "))
        case let .waitingForWorkers(reason):
            return event("waiting_for_workers", [("reason", str(reason))], "phase=waiting \(reason); no worker left: waiting for one to join")
        case let .waitingForMemory(reason, live, held, layers, weight, input, fixed):
            return event("waiting_for_memory", [("reason", str(reason)), ("live_workers", i(live)), ("layers_held", i(held)), ("layers", i(layers)),
                                                ("layer_weight_bytes", d(weight)), ("stage_input_bytes", d(input)), ("fixed_bytes", d(fixed))],
                         String(format: "phase=waiting %@; the memory of the %d live worker(s) holds %d of %d layers (%.3f GiB per layer, twice %.3f GiB of block inputs unless the worker has --scratch, %.3f GiB fixed per worker): waiting for more workers",
                                reason, live, held, layers, weight / 1073741824, input / 1073741824, fixed / 1073741824))
        case let .phaseStarted(phase, epoch, workers):
            return event("phase_started", [("of_phase", str(phase)), ("plan_epoch", i(epoch)), ("workers", i(workers))],
                         "phase=\(phase) epoch=\(epoch) started on \(workers) worker(s)")
        case let .workerFinishedPhase(phase, worker, seconds, rate, moved, transfer, spilled, done, of):
            var t = "phase=\(phase) worker=\(worker) done in \(String(format: "%.2f", seconds)) s"
            if let rate { t += String(format: ", %.0f block-samples/s", rate) }
            if moved > 0 { t += String(format: ", moved %.1f MB in %.2f s", Double(moved) / 1e6, transfer) }
            if spilled > 0 { t += String(format: ", %.1f MB of block inputs in scratch", Double(spilled) / 1e6) }
            return event("worker_finished_phase", [("of_phase", str(phase)), ("worker", str(worker)), ("seconds", d(seconds)),
                                                   ("block_samples_per_s", opt(rate)), ("bytes_moved", i(moved)), ("transfer_s", d(transfer)),
                                                   ("spilled_bytes", i(spilled)), ("done", i(done)), ("of", i(of))],
                         t + " (\(done)/\(of))")
        case let .gradientStatistics(samples, attn, mlp):
            return event("gradient_statistics", [("samples", i(samples)), ("attn_ratios", doubles(attn)), ("mlp_ratios", doubles(mlp))],
                         "phase=backward gradient statistics over \(samples) samples; ratios attn/mlp: "
                             + zip(attn, mlp).map { String(format: "%.3f/%.3f", $0, $1) }.joined(separator: " "))
        case let .layerSearched(layer, worker, alphas, groups, done, of, perMinute, eta):
            let picks = groups.map { "\($0)=\(String(format: "%.2f", alphas[$0] ?? 0))" }.joined(separator: " ")
            return event("layer_searched", [("layer", i(layer)), ("worker", str(worker)), ("alphas", map(alphas, groups)), ("done", i(done)),
                                            ("of", i(of)), ("layers_per_min", opt(perMinute)), ("eta_s", opt(eta))],
                         "phase=search layer=\(layer) worker=\(worker) \(picks) progress=\(done)/\(of)"
                             + (perMinute.map { String(format: " %.1f layers/min", $0) } ?? "") + (eta.map { String(format: " eta=%.1fs", $0) } ?? ""))
        case let .blockReceived(layer, worker, done, of):
            return event("block_received", [("layer", i(layer)), ("worker", str(worker)), ("done", i(done)), ("of", i(of))],
                         "phase=apply layer=\(layer) worker=\(worker) quantized block received (\(done)/\(of))")
        case let .blockWritten(layer, worker, file, bytes, done, of):
            return event("block_written", [("layer", i(layer)), ("worker", str(worker)), ("file", str(file)), ("bytes", i(bytes)),
                                           ("done", i(done)), ("of", i(of))],
                         String(format: "phase=apply layer=%d worker=%@ wrote %@ (%.1f MB) into the output (%d/%d)", layer, worker, file,
                                Double(bytes) / 1e6, done, of))
        case let .jobDone(layers, written, streamed, moved, transfer, workers, wall):
            var t = "phase=done all \(layers) blocks quantized (\(written) written by workers, \(streamed) streamed here)"
            if let wall {
                let w = Double(max(workers, 1))
                t += String(format: "\ntransfers: %.1f MB of activations and gradients worker to worker, %.3f s of %.0f worker(s) x %.2f s wall = %.2f%% of worker time moving tensors",
                            Double(moved) / 1e6, transfer, w, wall, 100 * transfer / (wall * w))
            }
            return event("job_done", [("layers", i(layers)), ("written_by_workers", i(written)), ("streamed", i(streamed)),
                                      ("bytes_moved", i(moved)), ("transfer_s", d(transfer)), ("workers", i(workers)), ("wall_s", opt(wall))], t)
        }
    }

    public static func text(_ e: CoordinatorEvent) -> String { describe(e).text }

    /// The event's own fields, in a fixed order.
    public static func fields(_ e: CoordinatorEvent) -> [(String, JSONText)] { describe(e).fields }

    /// One line: `[   12.34s] text` (every line of a multi-line text prefixed), or the
    /// JSON object.
    public static func line(_ e: CoordinatorEvent, t: Double, phase: String, epoch: UInt32, json: Bool) -> String {
        let described = describe(e)
        if json {
            let obj: JSONText = .object([("t", .double((t * 1000).rounded() / 1000)), ("event", .string(described.name)),
                                         ("phase", .string(phase)), ("epoch", .int(Int(epoch)))] + described.fields)
            return obj.rendered(indent: "", level: 0)
        }
        return described.text.split(separator: "\n").map { String(format: "[%8.2fs] ", t) + $0 }.joined(separator: "\n")
    }
}
