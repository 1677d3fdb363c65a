import Foundation
import MBQFormats
import MBQMessages
import MBQMethods
import MBQTensor
import MBQWire

/// The job directory's record of finished work: gradient statistics and every finished
/// layer's results (its searched groups' and, with GPTQ, its report). Written atomically after each change, with a SHA-256 of its
/// body so that a torn or edited file is detected on resume rather than trusted.
public enum Journal {
    public struct Contents {
        public var jobID: String
        public var stats: GradientStatistics?
        public var results: [Int: LayerResults]
        public var epoch: UInt32 = 0
        /// The job's identity (empty in journals written before it was recorded).
        public var identity = JobIdentity(fields: [:])

        public init(jobID: String, stats: GradientStatistics?, results: [Int: LayerResults], epoch: UInt32 = 0,
                    identity: JobIdentity = JobIdentity(fields: [:])) {
            self.jobID = jobID; self.stats = stats; self.results = results; self.epoch = epoch; self.identity = identity
        }
    }

    public static func path(_ jobDir: String) -> String { jobDir + "/journal.json" }

    /// 2: a layer is an object with its groups (named as `SearchGroup` spells them) and
    /// its GPTQ report; 1 (before the GPTQ report was its own message) is not read.
    static let version = 2

    // Numbers are stored as the hex of their bit patterns: JSON's decimal form does not
    // round-trip every double, and a resumed job must continue from exactly these values.
    static func hex(_ d: Double) -> String { String(d.bitPattern, radix: 16) }
    static func unhex(_ v: Any?) -> Double? { (v as? String).flatMap { UInt64($0, radix: 16) }.map(Double.init(bitPattern:)) }

    static func body(_ c: Contents) -> [String: Any] {
        var b: [String: Any] = ["job_id": c.jobID, "epoch": c.epoch, "identity": c.identity.fields]
        if let s = c.stats {
            b["stats"] = ["samples_used": s.samplesUsed, "skipped": s.skipped,
                          "layers": s.layers.map { [$0.attnVis, $0.attnCap, $0.mlpVis, $0.mlpCap].map(hex) }] as [String: Any]
        }
        var r: [String: Any] = [:]
        for (l, done) in c.results {
            var layer: [String: Any] = ["groups": done.groups.map { g in
                ["group": g.searchGroup?.rawValue ?? "", "best_idx": g.bestIdx, "alpha": hex(g.alpha), "loss": g.loss.map(hex),
                 "ratio": hex(g.ratio), "scales": g.scales.map { $0.bitPattern }] as [String: Any]
            }]
            if let q = done.gptq {
                layer["gptq"] = q.linears.map { ["role": $0.role, "tokens": $0.tokens, "error_before": hex($0.errorBefore),
                                                 "error_after": hex($0.errorAfter)] as [String: Any] }
            }
            r[String(l)] = layer
        }
        b["results"] = r
        return b
    }

    static func digest(_ data: Data) -> String {
        SHA256.hex(Array(data))
    }

    public static func write(_ c: Contents, jobDir: String) throws {
        let bodyData = try JSONSerialization.data(withJSONObject: body(c), options: [.sortedKeys])
        let doc: [String: Any] = ["format": "mbq-journal", "version": version, "sha256": digest(bodyData),
                                  "body": String(decoding: bodyData, as: UTF8.self)]
        try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: doc, options: [.sortedKeys]), to: path(jobDir))
    }

    public static func read(jobDir: String) throws -> Contents {
        let p = path(jobDir)
        guard let data = FileManager.default.contents(atPath: p) else {
            throw CoordinatorError.journal(path: p, reason: "no journal in the job directory (nothing to resume)")
        }
        guard let doc = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
              doc["format"] as? String == "mbq-journal", let bodyText = doc["body"] as? String, let sum = doc["sha256"] as? String else {
            throw CoordinatorError.journal(path: p, reason: "not an mbq journal (torn write?)")
        }
        guard (doc["version"] as? NSNumber)?.intValue == version else {
            throw CoordinatorError.journal(path: p, reason: "journal version \(doc["version"] ?? "?") was written by another mbq release (this one reads \(version)): finish it with that release, or start a new --job-dir")
        }
        let bodyData = Data(bodyText.utf8)
        guard digest(bodyData) == sum else {
            throw CoordinatorError.journal(path: p, reason: "journal checksum mismatch: the file is torn or was edited")
        }
        guard let b = (try? JSONSerialization.jsonObject(with: bodyData)) as? [String: Any], let job = b["job_id"] as? String else {
            throw CoordinatorError.journal(path: p, reason: "journal body unreadable")
        }
        var stats: GradientStatistics? = nil
        func doubles(_ v: Any?) -> [Double]? { (v as? [Any])?.compactMap(unhex) }
        if let s = b["stats"] as? [String: Any], let layers = (s["layers"] as? [Any])?.compactMap(doubles), layers.allSatisfy({ $0.count == 4 }) {
            let sums = layers.map { v -> GradientStatistics.Layer in
                var l = GradientStatistics.Layer()
                l.attnVis = v[0]; l.attnCap = v[1]; l.mlpVis = v[2]; l.mlpCap = v[3]
                return l
            }
            // Stored as averages; finalize with used = 1 recomputes ratios and the clamp exactly.
            let f = GradientStatistics.finalize(sums: sums, used: 1, skipped: s["skipped"] as? [String] ?? [])
            stats = GradientStatistics(layers: f.layers, samplesUsed: (s["samples_used"] as? NSNumber)?.intValue ?? 0, skipped: f.skipped)
        }
        var results: [Int: LayerResults] = [:]
        for (k, v) in b["results"] as? [String: Any] ?? [:] {
            guard let l = Int(k), let layer = v as? [String: Any], let groups = layer["groups"] as? [[String: Any]] else {
                throw CoordinatorError.journal(path: p, reason: "layer '\(k)' is not a layer's results")
            }
            var done = LayerResults()
            done.groups = try groups.map { g in
                var m = Mbq_GroupResult()
                m.layer = UInt32(l)
                guard let group = (g["group"] as? String).flatMap(SearchGroup.init(rawValue:)) else {
                    throw CoordinatorError.journal(path: p, reason: "layer \(l): unknown group \(g["group"] ?? "?")")
                }
                m.group = group.wire
                m.bestIdx = (g["best_idx"] as? NSNumber)?.uint32Value ?? 0
                m.alpha = unhex(g["alpha"]) ?? 0
                m.loss = doubles(g["loss"]) ?? []
                m.ratio = unhex(g["ratio"]) ?? 1
                m.scales = ((g["scales"] as? [Any]) ?? []).compactMap { ($0 as? NSNumber)?.uint32Value }.map { Float(bitPattern: $0) }
                return m
            }
            if let q = layer["gptq"] as? [[String: Any]] {
                var report = Mbq_GptqReport()
                report.layer = UInt32(l)
                report.linears = q.map { e in
                    var m = Mbq_LinearError()
                    m.role = e["role"] as? String ?? ""
                    m.tokens = (e["tokens"] as? NSNumber)?.uint64Value ?? 0
                    m.errorBefore = unhex(e["error_before"]) ?? .nan
                    m.errorAfter = unhex(e["error_after"]) ?? .nan
                    return m
                }
                done.gptq = report
            }
            results[l] = done
        }
        return Contents(jobID: job, stats: stats, results: results, epoch: (b["epoch"] as? NSNumber)?.uint32Value ?? 0,
                        identity: JobIdentity(fields: b["identity"] as? [String: String] ?? [:]))
    }
}
