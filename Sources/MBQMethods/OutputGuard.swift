import Foundation
import Logging
import MBQFormats

/// The checks an output path must pass before any work (so a job never runs for hours
/// to fail at the write, and never deletes its own input): not equal to, inside, nor
/// containing the model or the bundle, `--overwrite` or not; its directory writable; room
/// for the predicted output. And the cleanup of temporary output directories that dead
/// processes left beside it (`OUT.partial-*`, see `QuantizedCheckpointWriter.begin`).
public enum OutputGuard {
    /// The owner file inside every temporary output directory: "host pid".
    public static let ownerFile = ".mbq-owner"

    /// `path` made absolute against the working directory, `.` and `..` removed, symbolic
    /// links kept: the spelling to hand to other machines, whose links may point elsewhere.
    public static func absolute(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.path
    }

    /// `path` absolute and without symbolic links, `.` or `..`, also when its last
    /// components do not exist yet (the longest existing prefix is resolved).
    public static func canonical(_ path: String) -> String {
        let abs = URL(fileURLWithPath: path).standardizedFileURL.path
        var head = abs, tail: [String] = []
        while !head.isEmpty && head != "/" {
            if let r = realpath(head, nil) {
                defer { free(r) }
                let base = String(cString: r)
                return tail.isEmpty ? base : (base == "/" ? "" : base) + "/" + tail.reversed().joined(separator: "/")
            }
            tail.append((head as NSString).lastPathComponent)
            head = (head as NSString).deletingLastPathComponent
        }
        return abs
    }

    static func within(_ inner: String, _ outer: String) -> Bool {
        outer == "/" ? inner != "/" : inner.hasPrefix(outer + "/")
    }

    /// Refuses `out` when it would overwrite, sit inside or contain one of `inputs`
    /// (role, path), when its parent is not a writable directory, or when the filesystem
    /// holds less free space than `predictedBytes`.
    public static func check(out: String, inputs: [(role: String, path: String)], predictedBytes: UInt64) throws {
        let o = canonical(out)
        func no(_ why: String) -> MethodsError { .output(path: out, reason: why) }
        guard o != "/" else { throw no("the output cannot be the root directory") }
        for (role, path) in inputs {
            let i = canonical(path)
            if o == i { throw no("is the \(role) (\(path)): the output must be a new directory (nothing was written)") }
            if within(o, i) { throw no("is inside the \(role) \(path): write the output beside it, not into it") }
            if within(i, o) { throw no("contains the \(role) \(path): --overwrite would delete it; choose another --out") }
        }
        let parent = (o as NSString).deletingLastPathComponent
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: parent, isDirectory: &isDir), isDir.boolValue else {
            throw no("its directory \(parent) does not exist")
        }
        guard access(parent, W_OK) == 0 else { throw no("its directory \(parent) is not writable") }
        var s = statvfs()
        if statvfs(parent, &s) == 0 {
            let free = UInt64(s.f_bavail) * UInt64(s.f_frsize)
            if free < predictedBytes {
                throw no(String(format: "the output needs about %.2f GiB; %@ has %.2f GiB free", Double(predictedBytes) / 1073741824,
                                parent, Double(free) / 1073741824))
            }
        }
    }

    /// Whether process `pid` runs on this machine (EPERM: it runs, as another user).
    public static func running(_ pid: Int32) -> Bool { pid > 0 && (kill(pid, 0) == 0 || errno == EPERM) }

    /// Removes the temporary output directories beside `out` (`OUT.partial-*`) whose
    /// owner file names a process that no longer runs on this host, and returns what it
    /// did, one line each (also for those it leaves: another host's, a live process's,
    /// or one without an owner file).
    @discardableResult
    public static func removeOrphans(of out: String, logger: Logger? = nil) -> [String] {
        let o = canonical(out)
        let dir = (o as NSString).deletingLastPathComponent, prefix = (o as NSString).lastPathComponent + ".partial-"
        let fm = FileManager.default
        let host = ProcessInfo.processInfo.hostName
        var lines: [String] = []
        for name in ((try? fm.contentsOfDirectory(atPath: dir)) ?? []).sorted() where name.hasPrefix(prefix) {
            let path = dir + "/" + name
            // Only a directory whose owner file this tool wrote is ever removed: a folder
            // that merely has the name (the user's own, or one from before owner files) is
            // reported and left.
            guard let owner = (try? String(contentsOfFile: path + "/" + ownerFile, encoding: .utf8))?
                    .split(whereSeparator: { $0 == " " || $0 == "\n" }),
                  owner.count == 2, let pid = Int32(owner[1]) else {
                lines.append("left \(path): it has the name of a temporary output but no owner file (\(ownerFile)); remove it yourself if it is one")
                continue
            }
            let ownerHost = String(owner[0])
            if ownerHost != host {
                lines.append("left \(path): written by pid \(pid) on \(ownerHost)")
            } else if running(pid) {
                lines.append("left \(path): pid \(pid) still writes it")
            } else if (try? fm.removeItem(atPath: path)) != nil {
                lines.append("removed \(path), left by pid \(pid), which no longer runs")
            } else {
                lines.append("could not remove \(path) (left by pid \(pid))")
            }
        }
        for l in lines { logger?.warning("\(l)") }
        return lines
    }

    /// Records this process as the owner of temporary output directory `tmp`.
    public static func claim(_ tmp: String) throws {
        try AtomicFile.write(data: Data("\(ProcessInfo.processInfo.hostName) \(getpid())\n".utf8), to: tmp + "/" + ownerFile)
    }
}
