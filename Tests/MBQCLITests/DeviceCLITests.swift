import Foundation
import XCTest

/// `--device` on a machine without a GPU driver, and `mbq device` on the emulated device.
final class DeviceCLITests: XCTestCase {
    var tmp = ""

    override func setUp() {
        tmp = NSTemporaryDirectory() + "mbq-device-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: tmp) }

    /// Without libcuda: one line naming it and MBQ_CUDA_LIBS, exit 1, nothing written
    /// (the device opens before the model is read).
    func testCUDAWithoutADriverIsOneClearLineAndWritesNothing() throws {
        if dlopen("libcuda.so.1", RTLD_NOW) != nil { throw XCTSkip("this machine has a CUDA driver") }
        let out = tmp + "/out"
        let model = CLITests.fixtures + "/onevision_mha/model", calib = CLITests.fixtures + "/onevision_mha/calib.safetensors"
        for args in [["quantize", "--model", model, "--calib", calib, "--out", out, "--device", "cuda"],
                     ["quantize", "--model", model, "--calib", calib, "--out", out, "--device", "cuda", "--workers", "2"],
                     ["worker", "--connect", "tcp://127.0.0.1:9", "--device", "cuda:1"],
                     ["device", "--device", "cuda", "--json", tmp + "/report.json"]] {
            let r = try mbq(args)
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("mbq: error: libcuda.so.1 not found"), "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("MBQ_CUDA_LIBS"), "\(args): \(r.stderr)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        XCTAssertFalse(FileManager.default.fileExists(atPath: out + ".job"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/report.json"))
        try assertFails(["quantize", "--model", model, "--calib", calib, "--out", out, "--device", "gpu"], mentioning: ["'gpu' is not cpu, cuda, cuda:N or cuda-emulated"])
        try assertFails(["quantize", "--model", model, "--calib", calib, "--out", out, "--precision", "bf16"], mentioning: ["--precision bf16 needs a CUDA device"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    }

    /// `mbq eval` and `mbq forward --gradients` on the emulated device print what they
    /// print on the CPU (timings aside).
    func testEvalAndForwardOnTheEmulatedDeviceMatchTheCPU() throws {
        let model = CLITests.fixtures + "/qwen2vl/model", calib = CLITests.fixtures + "/qwen2vl/calib.safetensors"
        func json(_ args: [String]) throws -> NSDictionary {
            let r = try mbq(args + ["--json"])
            XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)")
            var o = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
            o["load_s"] = nil; o["run_s"] = nil
            return o as NSDictionary
        }
        for command in [["eval", "--model", model, "--calib", calib], ["forward", "--model", model, "--calib", calib, "--gradients"]] {
            XCTAssertEqual(try json(command + ["--device", "cuda-emulated"]), try json(command), "\(command[0])")
        }
    }

    /// The per-op conformance on the emulated device from the command line, with its JSON report.
    func testDeviceCommandChecksEveryOpOnTheEmulatedDevice() throws {
        let r = try mbq(["device", "--device", "cuda-emulated", "--json", tmp + "/report.json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("per-op conformance: "), r.stdout)
        let report = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: tmp + "/report.json"))) as? [String: Any])
        XCTAssertEqual(report["passed"] as? Bool, true)
        let checks = try XCTUnwrap(report["conformance"] as? [[String: Any]])
        XCTAssertGreaterThanOrEqual(checks.count, 30)
        XCTAssertTrue(checks.allSatisfy { $0["passed"] as? Bool == true })
        XCTAssertEqual(report["device"] as? String, "emulated")
    }
}
