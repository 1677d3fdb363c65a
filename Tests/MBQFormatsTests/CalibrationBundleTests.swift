import Foundation
import MBQFormats
import MBQModel
import MBQTensor
import XCTest

final class CalibrationBundleTests: XCTestCase {
    func samples(mrope: Bool = false) -> [CalibrationSample] {
        var spec = SyntheticModelSpec()
        spec.layout = mrope ? .qwen2vl : .llava
        spec.hiddenSize = 16; spec.heads = 2; spec.kvHeads = 2; spec.vocabSize = 30
        return spec.calibrationSamples(count: 3, length: 12, imageTokens: 4, captionTokens: 3, leftPadding: true, seed: 5)
    }

    func testRoundTrip() throws {
        let dir = TempDir()
        for mrope in [false, true] {
            let s = samples(mrope: mrope)
            try CalibrationBundle.write(s, to: dir.file("b.safetensors"))
            let b = try CalibrationBundle.load(path: dir.file("b.safetensors"), hiddenSize: 16, vocabSize: 30,
                                               positionRows: mrope ? 3 : 1)
            XCTAssertEqual(b.count, 3)
            for i in 0..<3 {
                XCTAssertEqual(b.samples[i].embeds.data, s[i].embeds.data)
                XCTAssertEqual(b.samples[i].attention, s[i].attention)
                XCTAssertEqual(b.samples[i].positions, s[i].positions)
                XCTAssertEqual(b.samples[i].vision, s[i].vision)
                XCTAssertEqual(b.samples[i].labels, s[i].labels)
            }
            XCTAssertTrue(b.samples[1].attention.contains(false), "odd samples are padded")
        }
    }

    /// Rewrites the bundle with one tensor or the metadata replaced.
    func writeVariant(_ path: String, metadata: [String: String] = ["format": "mbq-calib", "version": "1"],
                      _ edit: (inout [String: (DType, [Int], [UInt8])]) -> Void) throws {
        let base = TempDir()
        try CalibrationBundle.write(samples(), to: base.file("ok.safetensors"))
        let f = try SafetensorsFile(path: base.file("ok.safetensors"))
        var tensors: [String: (DType, [Int], [UInt8])] = [:]
        for n in f.tensorNames { tensors[n] = (f.entries[n]!.dtype, f.entries[n]!.shape, Array(try f.rawBytes(n))) }
        edit(&tensors)
        var w = SafetensorsWriter()
        for (n, t) in tensors.sorted(by: { $0.key < $1.key }) { w.add(n, dtype: t.0, shape: t.1, bytes: t.2) }
        try w.write(to: path, metadata: metadata)
    }

    func setInt64(_ t: inout [String: (DType, [Int], [UInt8])], _ name: String, at i: Int, _ v: Int64) {
        var (d, s, b) = t[name]!
        withUnsafeBytes(of: v.littleEndian) { for k in 0..<8 { b[i * 8 + k] = $0[k] } }
        t[name] = (d, s, b)
    }

    func testMalformedBundlesAreRefused() throws {
        let dir = TempDir()
        let cases: [(String, [String: String]?, (inout [String: (DType, [Int], [UInt8])]) -> Void, [String])] = [
            ("format", ["format": "other", "version": "1"], { _ in }, ["format is 'other'"]),
            ("version", ["format": "mbq-calib", "version": "2"], { _ in }, ["version is '2'"]),
            ("no-meta", [:], { _ in }, ["format is missing"]),
            ("missing-labels", nil, { $0["labels"] = nil }, ["missing tensor 'labels'"]),
            ("mask-value", nil, { self.setInt64(&$0, "attention_mask", at: 5, 2) }, ["attention_mask holds 2 at flat index 5"]),
            ("vision-value", nil, { self.setInt64(&$0, "vision_mask", at: 1, -1) }, ["vision_mask holds -1"]),
            ("label-range", nil, { self.setInt64(&$0, "labels", at: 11, 30) }, ["labels holds 30 at flat index 11"]),
            ("label-negative", nil, { self.setInt64(&$0, "labels", at: 11, -5) }, ["labels holds -5"]),
            ("pos-rank", nil, { $0["position_ids"]!.1 = [36] }, ["'position_ids' has shape [36]"]),
            ("mask-shape", nil, { $0["attention_mask"]!.1 = [12, 3] }, ["'attention_mask' has shape [12, 3], expected [3, 12]"]),
            ("embeds-rank", nil, { $0["inputs_embeds"]!.1 = [36, 16] }, ["inputs_embeds has shape [36, 16]"]),
            ("embeds-nan", nil, { t in
                var (d, s, b) = t["inputs_embeds"]!
                withUnsafeBytes(of: Float.nan.bitPattern.littleEndian) { for k in 0..<4 { b[40 + k] = $0[k] } }
                t["inputs_embeds"] = (d, s, b)
            }, ["'inputs_embeds' holds a NaN or Inf at flat index 10"]),
            ("padded-label", nil, { t in
                self.setInt64(&t, "attention_mask", at: 0, 0)
                self.setInt64(&t, "labels", at: 0, 3)
            }, ["sample 0 position 0 is padding"]),
            ("labels-float", nil, { t in t["labels"] = (.f32, [3, 12], [UInt8](repeating: 0, count: 144)) }, ["'labels' has dtype F32"]),
        ]
        for (name, meta, edit, needles) in cases {
            let path = dir.file(name + ".safetensors")
            try writeVariant(path, metadata: meta ?? ["format": "mbq-calib", "version": "1"], edit)
            XCTAssertThrowsError(try CalibrationBundle.load(path: path, vocabSize: 30), name) { e in
                let msg = "\(e)"
                XCTAssert(msg.contains(name + ".safetensors"), "\(name): \(msg)")
                for n in needles { XCTAssert(msg.contains(n), "\(name): '\(n)' not in: \(msg)") }
            }
        }
        // A bundle for another model.
        try writeVariant(dir.file("ok.safetensors")) { _ in }
        XCTAssertThrowsError(try CalibrationBundle.load(path: dir.file("ok.safetensors"), hiddenSize: 32)) { e in
            XCTAssert("\(e)".contains("expected [3, 12, 32]"), "\(e)")
        }
        XCTAssertThrowsError(try CalibrationBundle.load(path: dir.file("ok.safetensors"), positionRows: 3)) { e in
            XCTAssert("\(e)".contains("position_ids"), "\(e)")
        }
    }
}
