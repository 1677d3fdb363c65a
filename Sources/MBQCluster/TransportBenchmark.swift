import Foundation
import MBQTensor

/// Worker-to-worker activation streaming as the workers do it: PUSH -> PULL over TCP,
/// each tensor as an envelope + 1 MiB raw frames with a checksum, decoded and verified
/// on the receiving side. Reports GB/s of tensor payload.
public enum TransportBenchmark {
    public static func run(endpoint: String = "tcp://127.0.0.1:*", megabytes: Int = 64, count: Int = 16) throws -> Double {
        let pull = try ZMQSocket(.pull)
        try pull.setInt(23 /* ZMQ_RCVHWM */, 0)
        try pull.bind(endpoint)
        let target = pull.lastEndpoint
        let n = megabytes * (1 << 20) / 4
        var rng = SeededRandom(seed: 9)
        let t: Tensor<Float> = rng.normalTensor([n / 1024, 1024])
        let done = DispatchSemaphore(value: 0)
        final class ErrorBox: @unchecked Sendable { var error: Error? }  // written before `done` is signalled
        let failure = ErrorBox()
        let sender = Thread {
            do {
                let push = try ZMQSocket(.push)
                try push.setInt(24 /* ZMQ_SNDHWM */, 0)
                try push.connect(target)
                for i in 0..<(count + 1) {
                    try Wire.send(push, job: "bench", name: "act/\(i)", tensor: t, epoch: 1)
                }
                // Keep the socket open until everything is received.
                done.wait()
            } catch {
                failure.error = error
            }
        }
        sender.start()
        // The first tensor warms up the connection and is not timed.
        _ = try receiveOne(pull)
        let t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<count { _ = try receiveOne(pull) }
        let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        done.signal()
        if let e = failure.error { throw e }
        return Double(count * n * 4) / dt / 1e9
    }

    static func receiveOne(_ s: ZMQSocket) throws -> Tensor<Float> {
        while true {
            if let f = try s.receiveRaw(timeoutMs: 5000, maxFrameBytes: maxFrameBytes), let t = try Wire.decode(f).tensor { return t }
        }
    }
}
