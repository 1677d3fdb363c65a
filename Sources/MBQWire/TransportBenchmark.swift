import Foundation
import MBQTensor

/// Worker-to-worker activation streaming as the workers do it: PUSH -> PULL over TCP,
/// each tensor as an envelope + 1 MiB raw frames with a checksum, decoded and verified
/// on the receiving side. Reports GB/s of tensor payload.
public enum TransportBenchmark {
    /// `sender`: a command line that runs `send` in another process (two processes, as
    /// two workers are; the endpoint is appended); nil: a thread of this process.
    public static func run(endpoint: String = "tcp://127.0.0.1:*", megabytes: Int = 64, count: Int = 16,
                           sender command: [String]? = nil) throws -> Double {
        let pull = try ZMQSocket(.pull)
        try pull.configureForTensors()
        try pull.bind(endpoint)
        let target = pull.lastEndpoint
        var child: Process?
        let done = DispatchSemaphore(value: 0)
        final class ErrorBox: @unchecked Sendable { var error: Error? }  // written before `done` is signalled
        let failure = ErrorBox()
        if let command {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: command[0])
            p.arguments = Array(command.dropFirst()) + [target]
            try p.run()
            child = p
        } else {
            let sender = Thread {
                do {
                    try send(to: target, megabytes: megabytes, count: count + 1)
                    done.wait()  // keep the socket open until everything is received
                } catch {
                    failure.error = error
                }
            }
            sender.start()
        }
        defer {
            if let child, child.isRunning { child.terminate(); child.waitUntilExit() }
        }
        // The first tensor warms up the connection and is not timed.
        _ = try receiveOne(pull)
        let t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<count { _ = try receiveOne(pull) }
        let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        done.signal()
        if let e = failure.error { throw e }
        return Double(count * megabytes * (1 << 20)) / dt / 1e9
    }

    /// The sending side: `count` tensors of `megabytes` MiB to `endpoint`.
    public static func send(to endpoint: String, megabytes: Int = 64, count: Int = 17) throws {
        let n = megabytes * (1 << 20) / 4
        var rng = SeededRandom(seed: 9)
        let t: Tensor<Float> = rng.normalTensor([n / 1024, 1024])
        let push = try ZMQSocket(.push)
        try push.configureForTensors()
        try push.setInt(17 /* ZMQ_LINGER */, -1)  // queued frames still go out after close
        try push.connect(endpoint)
        for i in 0..<count { try Wire.send(push, job: "bench", name: .activation(sample: i), tensor: t, epoch: 1) }
    }

    static func receiveOne(_ s: ZMQSocket) throws -> Tensor<Float> {
        while true {
            guard let f = try s.receiveRaw(timeoutMs: 30_000, maxFrameBytes: maxFrameBytes) else {
                throw TransportError.zmq("receive (no tensor within 30 s)", ETIMEDOUT)
            }
            if let t = try Wire.decode(f).tensor { return t }
        }
    }
}
