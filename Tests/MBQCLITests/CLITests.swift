import Foundation
import MBQFormats
import MBQModel
import MBQTensor
import XCTest

/// The `mbq` binary end to end: bad input gives one clear line on stderr and a non-zero
/// exit status, never a crash; good input gives the numbers the library computes.
final class CLITests: XCTestCase {
    static var binary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("mbq").path
    }

    static var fixtures: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("MBQModelTests/Fixtures").path
    }

    func testForwardMatchesTheReferenceLoss() throws {
        let dir = Self.fixtures + "/onevision"
        let r = try mbq(["forward", "--model", dir + "/model", "--calib", dir + "/calib.safetensors", "--json", "--gradients"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        let ref = try SafetensorsFile(path: dir + "/expected.safetensors")
        let losses = try ref.floatTensor("loss").data, counts = try ref.intValues("loss_count").values
        let expected = zip(losses, counts).reduce(0.0) { $0 + Double($1.0) * Double($1.1) } / Double(counts.reduce(0, +))
        XCTAssertEqual(obj["caption_ce"] as! Double, expected, accuracy: 1e-5)
        XCTAssertEqual((obj["grad_stats"] as! [Any]).count, 3)
    }

    func testBadInputsFailClearly() throws {
        let tmp = NSTemporaryDirectory() + "mbq-cli-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let fx = Self.fixtures
        // Missing model directory.
        try assertFails(["forward", "--model", tmp + "/none", "--calib", fx + "/llava15/calib.safetensors"],
                        mentioning: ["mbq: error:", "none/config.json"])
        // A bundle built for another model (hidden size differs).
        var spec = SyntheticModelSpec()
        spec.hiddenSize = 64; spec.intermediateSize = 128; spec.layers = 1; spec.vocabSize = 64
        try spec.write(to: tmp + "/m64")
        try assertFails(["forward", "--model", tmp + "/m64", "--calib", fx + "/llava15/calib.safetensors"],
                        mentioning: ["calib.safetensors", "inputs_embeds", "expected [3, 16, 64]"])
        // Unknown model_type.
        try FileManager.default.createDirectory(atPath: tmp + "/mamba", withIntermediateDirectories: true)
        try Data(#"{"model_type": "mamba"}"#.utf8).write(to: URL(fileURLWithPath: tmp + "/mamba/config.json"))
        try assertFails(["inspect", "--model", tmp + "/mamba"], mentioning: ["unsupported model_type 'mamba'"])
        // A truncated checkpoint.
        try FileManager.default.copyItem(atPath: fx + "/llava15/model", toPath: tmp + "/cut")
        let st = tmp + "/cut/model.safetensors"
        let data = try Data(contentsOf: URL(fileURLWithPath: st))
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: st))
        try assertFails(["inspect", "--model", tmp + "/cut"], mentioning: ["cut/model.safetensors", "past the data section"])
        // NaN in the calibration inputs.
        let b = try CalibrationBundle.load(path: fx + "/llava15/calib.safetensors")
        var samples = b.samples
        samples[1].embeds.data[5] = .infinity
        try CalibrationBundle.write(samples, to: tmp + "/nan.safetensors")
        try assertFails(["forward", "--model", fx + "/llava15/model", "--calib", tmp + "/nan.safetensors"],
                        mentioning: ["nan.safetensors", "'inputs_embeds' holds a NaN or Inf"])
        // Bad option values are refused before any work.
        try assertFails(["forward", "--model", fx + "/llava15/model", "--calib", fx + "/llava15/calib.safetensors", "--samples", "0"],
                        mentioning: ["--samples"])
        // The demo without its data, and with a repeated calibration seed.
        try assertFails(["demo", "--data", tmp + "/nodemo", "--out", tmp + "/demo-out"], mentioning: ["nodemo/model", "train_demo_vlm.py"])
        try assertFails(["demo", "--calib-seeds", "0,0", "--out", tmp + "/demo-out"], mentioning: ["--calib-seeds"])
    }

    func testQuantizeAndEvalEndToEnd() throws {
        let fx = Self.fixtures + "/qwen2vl"
        let out = NSTemporaryDirectory() + "mbq-cli-q-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: out) }
        let q = try mbq(["quantize", "--model", fx + "/model", "--calib", fx + "/calib.safetensors", "--method", "mbq",
                         "--w-bit", "3", "--out", out])
        XCTAssertEqual(q.status, 0, q.stderr)
        XCTAssert(q.stderr.contains("[search] layer 3/3"), "progress on stderr: \(q.stderr)")
        XCTAssert(q.stderr.contains("ETA"), q.stderr)
        // The search read one sample at a time writes the same bytes.
        let chunked = out + "-chunked"
        defer { try? FileManager.default.removeItem(atPath: chunked) }
        let qc = try mbq(["quantize", "--model", fx + "/model", "--calib", fx + "/calib.safetensors", "--method", "mbq",
                          "--w-bit", "3", "--out", chunked, "--chunk-tokens", "1"])
        XCTAssertEqual(qc.status, 0, qc.stderr)
        XCTAssert(qc.stderr.contains("searched in 3 chunk(s)"), qc.stderr)
        for f in try FileManager.default.contentsOfDirectory(atPath: out) where f.hasSuffix(".safetensors") {
            XCTAssert(FileManager.default.contents(atPath: out + "/" + f) == FileManager.default.contents(atPath: chunked + "/" + f),
                      "\(f) differs with --chunk-tokens 1")
        }
        let e = try mbq(["eval", "--model", out, "--calib", fx + "/calib.safetensors", "--reference", fx + "/model", "--json"])
        XCTAssertEqual(e.status, 0, e.stderr)
        let obj = try JSONSerialization.jsonObject(with: Data(e.stdout.utf8)) as! [String: Any]
        for key in ["caption_ce", "caption_ppl", "caption_accuracy", "kl_all", "kl_caption"] { XCTAssertNotNil(obj[key] as? Double, key) }
        XCTAssertGreaterThan(obj["kl_all"] as! Double, 0)
        // The fp model against itself: KL 0.
        let same = try mbq(["eval", "--model", fx + "/model", "--calib", fx + "/calib.safetensors", "--reference", fx + "/model", "--json"])
        let o2 = try JSONSerialization.jsonObject(with: Data(same.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(o2["kl_all"] as! Double, 0, accuracy: 1e-9)
        // Running again into the same directory is refused, the output untouched.
        try assertFails(["quantize", "--model", fx + "/model", "--calib", fx + "/calib.safetensors", "--out", out],
                        mentioning: ["already exists", "--overwrite"])
    }

    func testQuantizeRefusesBadCombinationsBeforeWork() throws {
        let fx = Self.fixtures + "/llava15"
        let base = ["quantize", "--model", fx + "/model", "--calib", fx + "/calib.safetensors", "--out", NSTemporaryDirectory() + "never"]
        try assertFails(base + ["--group", "96"], mentioning: ["--group 96"])
        try assertFails(base + ["--method", "smoothquant", "--w-bit", "4"], mentioning: ["smoothquant is a W8A8 method"])
        try assertFails(base + ["--a-bit", "4"], mentioning: ["--a-bit 4"])
        try assertFails(base + ["--method", "rtn", "--reweight"], mentioning: ["--reweight"])
        try assertFails(base + ["--method", "bogus"], mentioning: ["bogus"])
        try assertFails(base + ["--method", "mbq", "--then", "rtn"], mentioning: ["--then rtn", "gptq"])
        try assertFails(base + ["--method", "rtn", "--then", "gptq"], mentioning: ["--then gptq follows a scale search"])
        try assertFails(base + ["--method", "gptq", "--w-bit", "8", "--a-bit", "8"], mentioning: ["weights only"])
        try assertFails(base + ["--method", "gptq", "--act-order", "--format", "awq", "--w-bit", "4"], mentioning: ["--act-order", "g_idx"])
        try assertFails(base + ["--method", "gptq", "--damp", "-1"], mentioning: ["--damp -1"])
        try assertFails(base + ["--act-order"], mentioning: ["--act-order is a GPTQ option"])
        // Local workers too small for the model: an error naming the budget, not a wait
        // for workers that can never come.
        try assertFails(base + ["--workers", "2", "--worker-max-memory", "1KiB"], mentioning: ["--worker-max-memory 1KiB", "raise --worker-max-memory"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: NSTemporaryDirectory() + "never"))
    }

    func testInspectReadsHeadersOnly() throws {
        let r = try mbq(["inspect", "--model", Self.fixtures + "/qwen2vl/model"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssert(r.stdout.contains("M-RoPE sections [4, 6, 6]"), r.stdout)
        XCTAssert(r.stdout.contains("weight dtype      BF16"), r.stdout)
    }
}

/// One run of the `mbq` binary.
struct MBQResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs the binary the tests were built with; any test case of this target can.
extension XCTestCase {
    func mbq(_ args: [String]) throws -> MBQResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLITests.binary)
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        env["MBQ_KEEP_BLAS_ENV"] = "1"  // tests run OpenBLAS as the machine configures it
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationReason, .exit, "mbq \(args) was killed by a signal: \(String(decoding: e, as: UTF8.self))")
        return MBQResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    func assertFails(_ args: [String], mentioning needles: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try mbq(args)
        XCTAssertNotEqual(r.status, 0, "mbq \(args) should fail", file: file, line: line)
        for n in needles {
            XCTAssert(r.stderr.contains(n), "stderr of mbq \(args) lacks '\(n)': \(r.stderr)", file: file, line: line)
        }
    }
}
