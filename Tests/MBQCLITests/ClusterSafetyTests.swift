import Foundation
import MBQFormats
import MBQWire
import XCTest

/// The cluster paths a real cluster takes (docs/OPERATIONS.md): relative paths, resumes
/// with other inputs, a second process under a worker's id, a worker of another job, a
/// flood of unauthenticated messages, a worker whose files differ.
extension ClusterProcessTests {
    /// Runs `args` in `cwd` and waits; -> exit status and log text.
    func run(_ args: [String], log: String, env: [String: String] = [:], cwd: String? = nil, timeout: Double = 90) throws -> (Int32, String) {
        let p = try spawn(args, log: log, env: env, cwd: cwd)
        XCTAssertTrue(waitExit(p, timeout: timeout), "\(args) did not finish: \(text(log).suffix(2000))")
        return (p.terminationStatus, text(log))
    }

    /// The README's relative `--calib calib.safetensors`, the workers started elsewhere:
    /// the coordinator hands out absolute paths.
    func testRelativePathsWorkForWorkersStartedElsewhere() throws {
        let fx = tmp + "/fx"
        try FileManager.default.copyItem(atPath: CLITests.fixtures + "/onevision_mha", toPath: fx)
        let p = port()
        let clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", "model", "--calib", "calib.safetensors", "--w-bit", "3", "--out", "out",
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "1", "--log-format", "json"], log: clog, cwd: fx)
        let w = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w0", "--threads", "1"], log: tmp + "/w.log", cwd: "/")
        defer { for x in [coord, w] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog) + text(tmp + "/w.log"))
        try assertSameAsReference(fx + "/out")
    }

    /// `--resume` with other samples or another bundle's content is refused, naming what
    /// differs; nothing is mixed into the output.
    func testResumeWithOtherInputsIsRefusedNamingWhatDiffers() throws {
        let fx = tmp + "/fx"
        try FileManager.default.copyItem(atPath: CLITests.fixtures + "/onevision_mha", toPath: fx)
        let p = port()
        let job = tmp + "/job"
        let args = ["coordinator", "--model", fx + "/model", "--calib", fx + "/calib.safetensors", "--method", "rtn", "--out", tmp + "/out",
                    "--bind", "tcp://127.0.0.1:\(p)", "--workers", "1", "--job-dir", job, "--samples", "3"]
        let coord = try spawn(args, log: tmp + "/c1.log")
        let w = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "w0", "--threads", "1"], log: tmp + "/w.log")
        defer { for x in [coord, w] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitExit(coord), text(tmp + "/c1.log"))
        XCTAssertEqual(coord.terminationStatus, 0, text(tmp + "/c1.log"))
        var (status, log) = try run(args.filter { $0 != "3" && $0 != "--samples" } + ["--samples", "2", "--resume", "--overwrite"], log: tmp + "/c2.log")
        XCTAssertEqual(status, 1, log)
        XCTAssertTrue(log.contains("--resume refused") && log.contains("samples: 3 in the journal, 2 now"), log)
        // The same path, other content.
        let b = try CalibrationBundle.load(path: fx + "/calib.safetensors")
        var samples = b.samples
        samples[0].embeds.data[0] += 1
        try CalibrationBundle.write(samples, to: fx + "/calib.safetensors")
        (status, log) = try run(args + ["--resume", "--overwrite"], log: tmp + "/c3.log")
        XCTAssertEqual(status, 1, log)
        XCTAssertTrue(log.contains("calib_content:"), log)
        XCTAssertFalse(log.contains("samples:"), log)
    }

    /// Two workers under one id: the second is refused and exits with an error instead of
    /// the two evicting each other. A worker left from another job is told so and exits.
    func testDuplicateIdsAndWorkersOfAnotherJobAreRefused() throws {
        let p = port()
        let clog = tmp + "/coord.log"
        let base = ["coordinator", "--model", Self.model, "--calib", Self.calib, "--out", tmp + "/out", "--bind", "tcp://127.0.0.1:\(p)",
                    "--workers", "2", "--log-format", "json"]
        let coord = try spawn(base + ["--method", "rtn"], log: clog)
        let first = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "same", "--threads", "1"], log: tmp + "/first.log")
        defer { for x in [coord, first] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitForEvent(clog, "worker_registered") { $0["worker"] as? String == "same" }, text(clog))
        // It registers what it computes on: the CPU's model and its cores.
        let device = events(clog, "worker_registered").first { $0["worker"] as? String == "same" }?["device"] as? String ?? ""
        XCTAssertTrue(device.hasSuffix(" (\(ProcessInfo.processInfo.activeProcessorCount) cores)") && device.count > 10, device)
        let (status, log) = try run(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "same", "--threads", "1"], log: tmp + "/second.log",
                                    timeout: 30)
        XCTAssertEqual(status, 1, log)
        XCTAssertTrue(log.contains("worker id 'same' is taken by a live worker"), log)
        XCTAssertEqual(events(clog, "worker_registered").filter { $0["worker"] as? String == "same" }.count, 1, text(clog))
        // Another job takes the port: the first worker, still of the old job, is refused.
        kill(coord.processIdentifier, SIGKILL)
        coord.waitUntilExit()
        let other = try spawn(base + ["--method", "awq", "--out", tmp + "/out2"], log: tmp + "/other.log")
        defer { if other.isRunning { other.terminate() } }
        XCTAssertTrue(waitExit(first, timeout: 30), text(tmp + "/first.log"))
        XCTAssertEqual(first.terminationStatus, 1, text(tmp + "/first.log"))
        XCTAssertTrue(text(tmp + "/first.log").contains("belongs to job"), text(tmp + "/first.log"))
    }

    /// 2000 small well-formed unauthenticated messages: a handful of log lines and a count,
    /// not a line each.
    func testAFloodOfUnauthenticatedMessagesIsCountedNotLogged() throws {
        let p = port()
        let clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--out", tmp + "/out",
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "1", "--log-format", "json"], log: clog,
                              env: ["MBQ_SECRET": "a-secret-of-more-than-16-bytes"])
        defer { if coord.isRunning { coord.terminate() } }
        XCTAssertTrue(waitForEvent(clog, "listening"), text(clog))
        let s = try ZMQSocket(.dealer)
        try s.connect("tcp://127.0.0.1:\(p)")
        var hb = Mbq_Heartbeat()
        hb.workerID = "intruder"
        for _ in 0..<2000 { try s.send(try Wire.encode(Wire.envelope(job: "", .heartbeat(hb)))) }
        for _ in 0..<200 { try s.send([[1, 2, 3]]) }
        // The counts come as the throttle's 10-s windows close.
        func suppressed() -> Int { events(clog, "messages_suppressed").reduce(0) { $0 + ($1["count"] as? Int ?? 0) } }
        let end = Date().addingTimeInterval(45)
        while suppressed() <= 2000 && Date() < end { Thread.sleep(forTimeInterval: 0.2) }
        let lines = text(clog).split(separator: "\n").count
        XCTAssertLessThan(lines, 40, text(clog))
        XCTAssertGreaterThan(suppressed(), 2000, text(clog))
        XCTAssertEqual(events(clog, "messages_suppressed").first?["source"] as? String, "127.0.0.1", text(clog))
        print("flood: 2200 messages -> \(lines) log lines, \(suppressed()) counted in \(events(clog, "messages_suppressed").count) messages_suppressed line(s)")
    }

    /// A worker that sees other files at the job's paths (another copy of the bundle) is
    /// refused at its assignment, dropped, and its layers re-planned on the other: the
    /// output is still the one-process output. Needs `unshare --mount` (root).
    func testAWorkerWithOtherFilesIsDroppedAndTheJobGoesOn() throws {
        guard getuid() == 0, FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") else { throw XCTSkip("needs root and unshare") }
        let b = try CalibrationBundle.load(path: Self.calib)
        var samples = b.samples
        samples[0].embeds.data[0] += 1
        try CalibrationBundle.write(samples, to: tmp + "/other.safetensors")
        let p = port()
        let clog = tmp + "/coord.log"
        let coord = try spawn(["coordinator", "--model", Self.model, "--calib", Self.calib, "--w-bit", "3", "--out", tmp + "/out",
                               "--bind", "tcp://127.0.0.1:\(p)", "--workers", "2", "--log-format", "json"], log: clog)
        let good = try spawn(["worker", "--connect", "tcp://127.0.0.1:\(p)", "--id", "good", "--threads", "1"], log: tmp + "/good.log")
        let odd = Process()
        odd.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        odd.arguments = ["--mount", "sh", "-c", "mount --bind '\(tmp)/other.safetensors' '\(Self.calib)' && exec '\(CLITests.binary)' worker --connect tcp://127.0.0.1:\(p) --id odd --threads 1"]
        FileManager.default.createFile(atPath: tmp + "/odd.log", contents: nil)
        odd.standardError = FileHandle(forWritingAtPath: tmp + "/odd.log")
        odd.environment = ProcessInfo.processInfo.environment.merging(["MBQ_KEEP_BLAS_ENV": "1"]) { $1 }
        try odd.run()
        defer { for x in [coord, good, odd] where x.isRunning { x.terminate() } }
        XCTAssertTrue(waitExit(coord), text(clog))
        XCTAssertEqual(coord.terminationStatus, 0, text(clog))
        XCTAssertTrue(hasEvent(clog, "worker_error") { ($0["message"] as? String ?? "").contains("differs from the coordinator's") }, text(clog))
        XCTAssertTrue(hasEvent(clog, "planned") { ($0["reason"] as? String ?? "").contains("dropped odd") }, text(clog))
        XCTAssertTrue(waitExit(odd, timeout: 30))
        XCTAssertEqual(odd.terminationStatus, 1, text(tmp + "/odd.log"))
        try assertSameAsReference(tmp + "/out")
    }
}

/// Cluster/launch-workers.sh over a stand-in for ssh that runs each "host" on this machine
/// with its own HOME: it waits for registrations, reports a worker that died with its
/// status and log, and --stop ends exactly the workers it started.
final class LaunchWorkersTests: XCTestCase {
    func testLaunchWaitsForRegistrationReportsFailuresAndStopsOnlyItsWorkers() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let tmp = NSTemporaryDirectory() + "mbq-launch-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: tmp + "/hosts", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let ssh = tmp + "/fake-ssh"
        try """
        #!/bin/sh
        # ssh's stand-in: options dropped, the command run here with HOME=$FAKE_HOSTS/HOST.
        while [ "${1#-}" != "$1" ]; do shift; done
        host=$1; shift
        mkdir -p "$FAKE_HOSTS/$host"
        HOME="$FAKE_HOSTS/$host" exec sh -c "$*"
        """.write(toFile: ssh, atomically: true, encoding: .utf8)
        chmod(ssh, 0o755)
        // scp's stand-in records what it was asked to copy where.
        let scp = tmp + "/fake-scp"
        try "#!/bin/sh\necho \"$@\" >> \"$FAKE_HOSTS/scp.log\"\n".write(toFile: scp, atomically: true, encoding: .utf8)
        chmod(scp, 0o755)
        let p = Int.random(in: 20000..<60000)
        try """
        # name ssh threads memory data-ip scratch mbq
        h1  h1  1  2GiB  127.0.0.1  -            \(CLITests.binary)
        h2  h2  1  2GiB  127.0.0.1  -            \(CLITests.binary)
        bad bad 1  2GiB  127.0.0.1  /nonexistent \(CLITests.binary)
        """.write(toFile: tmp + "/hosts.txt", atomically: true, encoding: .utf8)
        /// Runs bash with `args` through system(3), output to a file: Foundation's Process
        /// did not reap the script beside the other children here.
        func sh(_ args: [String], env: [String: String] = [:]) throws -> (Int32, String) {
            let log = tmp + "/sh-\(UUID().uuidString).log"
            func q(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }
            let vars = ["SSH": ssh, "SCP": scp, "FAKE_HOSTS": tmp + "/hosts", "MBQ_KEEP_BLAS_ENV": "1"].merging(env) { $1 }
            let cmd = vars.map { "\($0.key)=\(q($0.value))" }.joined(separator: " ") + " bash " + args.map(q).joined(separator: " ")
                + " > " + q(log) + " 2>&1 < /dev/null"
            let r = system(cmd)
            return ((r >> 8) & 0xff, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        }
        let secret = ["MBQ_SECRET": "launch-test-secret-0123456789"]
        // The coordinator waits for three workers: the bad one never comes.
        let coord = Process()
        coord.executableURL = URL(fileURLWithPath: CLITests.binary)
        coord.arguments = ["coordinator", "--model", ClusterProcessTests.model, "--calib", ClusterProcessTests.calib, "--out", tmp + "/out",
                           "--bind", "tcp://127.0.0.1:\(p)", "--workers", "3"]
        coord.environment = ProcessInfo.processInfo.environment.merging(secret) { $1 }
        coord.standardError = FileHandle.nullDevice
        try coord.run()
        defer { if coord.isRunning { coord.terminate() } }
        // A process that looks like a worker but is not ours: --stop must leave it.
        let decoy = Process()
        decoy.executableURL = URL(fileURLWithPath: "/bin/bash")
        decoy.arguments = ["-c", "exec -a 'mbq worker --connect tcp://127.0.0.1:1' sleep 120"]
        try decoy.run()
        defer { if decoy.isRunning { decoy.terminate() } }
        let (status, out) = try sh([root + "/Cluster/launch-workers.sh", tmp + "/hosts.txt", "tcp://127.0.0.1:\(p)", "--wait", "60",
                                    "--copy", ClusterProcessTests.calib], env: secret)
        // These "hosts" share this disk, where the bundle already is: --copy never copies
        // over it (scp onto the file it reads would truncate it).
        let copies = (try? String(contentsOfFile: tmp + "/hosts/scp.log", encoding: .utf8)) ?? ""
        XCTAssertEqual(copies, "", "nothing copied over an existing path")
        for h in ["h1", "h2", "bad"] {
            XCTAssertTrue(out.contains("\(h): \(ClusterProcessTests.calib) is already there, not copied"), out)
        }
        XCTAssertNotNil(try? CalibrationBundle.load(path: ClusterProcessTests.calib), "the bundle is intact")
        XCTAssertEqual(status, 1, out)
        XCTAssertTrue(out.contains("h1: registered") && out.contains("h2: registered"), out)
        XCTAssertTrue(out.contains("bad: FAILED: the worker exited with status 1"), out)
        XCTAssertTrue(out.contains("--scratch /nonexistent: not a directory"), out)
        let secretFile = tmp + "/hosts/h1/.mbq/secret"
        XCTAssertEqual((try FileManager.default.attributesOfItem(atPath: secretFile)[.posixPermissions] as? NSNumber)?.intValue, 0o600)
        let pids = try ["h1", "h2"].map { h in
            Int32(try String(contentsOfFile: tmp + "/hosts/\(h)/.mbq/worker-\(h).pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
        }
        // Each pid file holds the process group of a worker and its wrapper.
        for pid in pids { XCTAssertEqual(kill(-pid, 0), 0, "worker group \(pid) runs") }
        let (stopStatus, stopped) = try sh([root + "/Cluster/launch-workers.sh", tmp + "/hosts.txt", "--stop"])
        XCTAssertEqual(stopStatus, 0, stopped)
        XCTAssertTrue(stopped.contains("h1: stopped") && stopped.contains("h2: stopped") && stopped.contains("bad: not running"), stopped)
        let end = Date().addingTimeInterval(10)
        while Date() < end && pids.contains(where: { kill(-$0, 0) == 0 }) { Thread.sleep(forTimeInterval: 0.1) }
        XCTAssertFalse(pids.contains(where: { kill(-$0, 0) == 0 }), "every process of the workers' groups stopped")
        XCTAssertTrue(decoy.isRunning, "a process the script did not start is left alone")
    }
}
