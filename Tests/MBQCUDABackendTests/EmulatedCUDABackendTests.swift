import Foundation
import MBQCUDABackend
import MBQDevice
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import XCTest

/// The CUDA backend on the emulated device (its kernels' own source and cuBLAS's
/// contract, run on the host): every entry of `ComputeBackend` against the CPU
/// reference, and whole jobs on the transformers fixtures of every family, bit for bit.
/// A GPU runs the same suites with tolerances (`make device-check`).
final class EmulatedCUDABackendTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("MBQModelTests/Fixtures").path

    func load(_ arch: String) throws -> (LanguageModel<Float>, CalibrationBundle) {
        let ckpt = try Checkpoint(directory: Self.fixtures + "/\(arch)/model")
        return (try LanguageModel<Float>.load(ckpt), try CalibrationBundle.load(path: Self.fixtures + "/\(arch)/calib.safetensors"))
    }

    /// The layer-step conformance (`BackendConformance`) with tolerance 0: forward with
    /// captures, backward with output-gradient norms, the loss head, the gradient means,
    /// the 8-bit-activation forward, the search, SmoothQuant, apply, quantize, GPTQ.
    func testTheEmulatedDeviceConformsBitForBit() throws {
        for arch in ["llava15", "onevision_mha", "qwen2vl"] {
            let (model, bundle) = try load(arch)
            let checks = try BackendConformance.run(CUDABackend(device: EmulatedDevice()), model: model,
                                                    samples: Array(bundle.samples.prefix(2)), tolerance: 0)
            for c in checks { print("conformance cuda-emulated \(arch): \(c)") }
            XCTAssertGreaterThan(checks.count, 10)
            for c in checks { XCTAssertTrue(c.passed, "\(arch): \(c)") }
        }
    }

    /// Whole jobs (gradient statistics, search, apply, quantize) on every family's
    /// fixture: the same grid point in every group as the CPU (which the authors'-search
    /// parity tests hold to PyTorch), the same loss curves, weights and codes.
    func testJobsOnEveryFamilyEqualTheCPUs() throws {
        let archs = ["llava15", "onevision", "onevision_mha", "qwen2vl", "qwen2_5_vl", "internvl", "internvl2"]
        var groups = 0
        for arch in archs {
            let (model, bundle) = try load(arch)
            for (method, bits, group, abit) in [(QuantMethod.mbq, 4, 128, nil as Int?), (.awq, 4, -1, 8), (.mbq, 3, 128, nil)] {
                var o = QuantizeOptions()
                o.method = method; o.wBit = bits; o.group = group; o.aBit = abit
                let want = try QuantizeJob.run(model: model, samples: bundle.samples, options: o)
                let got = try QuantizeJob.run(model: model, samples: bundle.samples, options: o, backend: CUDABackend(device: EmulatedDevice()))
                let tag = "\(arch) \(method.rawValue) w\(bits) g\(group) a\(abit.map(String.init) ?? "16")"
                XCTAssertEqual(got.groups.count, want.groups.count, tag)
                for (g, w) in zip(got.groups, want.groups) {
                    XCTAssertEqual(g.bestIndex, w.bestIndex, "\(tag) layer \(g.layer) \(g.group.rawValue)")
                    XCTAssertEqual(g.losses, w.losses, "\(tag) layer \(g.layer) \(g.group.rawValue)")
                    XCTAssertEqual(g.scales, w.scales, "\(tag) layer \(g.layer) \(g.group.rawValue)")
                    groups += 1
                }
                if let gs = got.gradStats, let ws = want.gradStats {
                    XCTAssertEqual(gs.layers.map(\.attnRatio), ws.layers.map(\.attnRatio), tag)
                    XCTAssertEqual(gs.layers.map(\.mlpRatio), ws.layers.map(\.mlpRatio), tag)
                }
                for (l, (g, w)) in zip(got.blocks, want.blocks).enumerated() {
                    for (role, path) in DecoderBlockWeights<Float>.linears {
                        XCTAssertEqual(g[keyPath: path].data, w[keyPath: path].data, "\(tag) layer \(l) \(role)")
                    }
                }
                XCTAssertEqual(got.codes.count, want.codes.count, tag)
                for (g, w) in zip(got.codes, want.codes) { XCTAssertTrue(g == w, tag) }
            }
        }
        print("emulated CUDA backend: \(groups) searched groups on \(archs.count) families, every grid point, loss curve and weight identical to the CPU's")
    }

    /// Blocks, activations and scratch are device memory: a device too small for a block
    /// fails with the device's out-of-memory error, not a crash.
    func testADeviceTooSmallSaysSo() throws {
        let (model, _) = try load("llava15")
        let backend = CUDABackend(device: EmulatedDevice(capacity: 4096))
        XCTAssertThrowsError(try backend.loadBlock(model.blocks[0])) { e in
            XCTAssertTrue("\(e)".contains("device allocation of"), "\(e)")
        }
    }
}
