import Foundation
import MBQTensor

/// What makes two runs the same job: every input that changes the output. The job id is
/// derived from it, the journal records it, and `--resume` refuses a journal whose
/// identity differs, naming each field that does (a resumed job never mixes two runs).
/// Fields: the model and bundle paths as the workers will open them, their content
/// fingerprints (`Fingerprint`: headers and sampled data, cheap on 140 GB), the canonical
/// options and the number of calibration samples.
public struct JobIdentity: Equatable, Sendable {
    public var fields: [String: String]

    public init(fields: [String: String]) { self.fields = fields }

    public init(modelDir: String, calibPath: String, modelContent: String, calibContent: String, options: String, samples: Int) {
        fields = ["model": modelDir, "calib": calibPath, "model_content": modelContent, "calib_content": calibContent,
                  "options": options, "samples": String(samples)]
    }

    /// "mbq-" and 12 hex digits of SHA-256 over the sorted fields.
    public var jobID: String {
        "mbq-" + SHA256.hex(Array(fields.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "|").utf8)).prefix(12)
    }

    /// One phrase per field that differs: "samples: 8 in the journal, 4 now".
    public func differences(from journal: JobIdentity) -> [String] {
        Set(fields.keys).union(journal.fields.keys).sorted().compactMap { k in
            let (was, now) = (journal.fields[k], fields[k])
            guard was != now else { return nil }
            func show(_ v: String?) -> String {
                guard let v else { return "absent" }
                return k.hasSuffix("_content") ? String(v.prefix(12)) : v
            }
            return "\(k): \(show(was)) in the journal, \(show(now)) now"
        }
    }
}
