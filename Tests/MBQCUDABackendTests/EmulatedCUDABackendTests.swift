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

    /// Linears stay in the checkpoint's dtype on the device (bf16 for qwen2vl's fixture,
    /// fp16 when every value is one, fp32 otherwise) and read back exactly; blocks used in
    /// turn each compute with their own weights (the one widened working copy follows the
    /// block in use).
    func testLinearsStayInTheirStoredDTypeAndEachBlockUsesItsOwn() throws {
        let backend = CUDABackend(device: EmulatedDevice())
        let (qwen, bundle) = try load("qwen2vl")   // stored bf16
        let (llava, _) = try load("llava15")       // stored fp32
        var fp16 = llava.blocks[0]
        for (_, path) in DecoderBlockWeights<Float>.linears {
            fp16[keyPath: path].data = fp16[keyPath: path].data.map { HalfPrecision.fp16ToFloat(HalfPrecision.floatToFP16($0)) }
        }
        for (w, narrow) in [(qwen.blocks[0], true), (llava.blocks[0], false), (fp16, true)] {
            let b = try backend.loadBlock(w)
            let linears = DecoderBlockWeights<Float>.linears.reduce(0) { $0 + w[keyPath: $1.path].count }
            XCTAssertEqual(b.residentBytes, w.parameterCount * 4 - (narrow ? linears * 2 : 0))
            let back = try backend.downloadBlock(b)
            for (role, path) in DecoderBlockWeights<Float>.linears { XCTAssertEqual(back[keyPath: path].data, w[keyPath: path].data, role) }
        }
        let blocks = try qwen.blocks.map { try backend.loadBlock($0) }
        let cpu = CPUBackend()
        let s = bundle.samples[0]
        let x = try backend.upload(s.embeds)
        for l in [0, 1, 0, 2, 1] {
            let got = try backend.download(try backend.blockForward(x, blocks[l], rope: qwen.ropeTable(s.positions), mask: s.attention,
                                                                   save: false, capture: false, actBits: nil).output)
            let want = cpu.download(cpu.blockForward(cpu.upload(try backend.download(x)), cpu.loadBlock(qwen.blocks[l]), rope: qwen.ropeTable(s.positions),
                                                     mask: s.attention, save: false, capture: false, actBits: nil).output)
            XCTAssertEqual(got.data, want.data, "layer \(l)")
        }
    }

    /// bf16 GEMMs (`--precision bf16`): every GEMM's operands rounded to bf16, so the
    /// losses move; the jobs finish with finite weights, and most grid points stay. How
    /// many moved is printed (near-ties move first), not promised.
    func testBF16PrecisionRunsWholeJobs() throws {
        var moved = 0, groups = 0
        for arch in ["llava15", "qwen2vl", "internvl2"] {
            let (model, bundle) = try load(arch)
            var o = QuantizeOptions()
            o.method = .mbq; o.wBit = 4; o.group = 128
            let strict = try QuantizeJob.run(model: model, samples: bundle.samples, options: o, backend: CUDABackend(device: EmulatedDevice()))
            let bf16 = try QuantizeJob.run(model: model, samples: bundle.samples, options: o,
                                           backend: CUDABackend(device: EmulatedDevice(), precision: .bf16))
            XCTAssertEqual(bf16.groups.count, strict.groups.count, arch)
            XCTAssertNotEqual(bf16.groups.map(\.losses), strict.groups.map(\.losses), "\(arch): bf16 GEMMs move the losses")
            for b in bf16.blocks { for (role, path) in DecoderBlockWeights<Float>.linears { XCTAssertTrue(allFinite(b[keyPath: path]), "\(arch) \(role)") } }
            for (g, s) in zip(bf16.groups, strict.groups) where g.bestIndex != s.bestIndex { moved += 1 }
            groups += strict.groups.count
        }
        print("bf16 GEMMs on the emulated device: \(moved) of \(groups) grid points moved from strict")
        XCTAssertLessThan(moved, groups / 2)
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
