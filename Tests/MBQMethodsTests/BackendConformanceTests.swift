import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQTensor
import XCTest

/// The backend conformance suite on the committed fixtures: the CPU backend passes it
/// (deterministic, bit for bit), and a backend that is off anywhere fails it, naming
/// what. A CUDA backend runs the same suite on a GPU.
final class BackendConformanceTests: XCTestCase {
    /// The CPU backend with one entry point perturbed.
    struct Perturbed: ComputeBackend {
        let cpu = CPUBackend()
        let where_: String
        var name: String { "perturbed-\(where_)" }
        func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                          save: Bool, capture: Bool, actBits: Int?) -> DecoderBlockForward<Float> {
            var f = cpu.blockForward(x, w, rope: rope, mask: mask, save: save, capture: capture, actBits: actBits)
            if where_ == "forward" && actBits == nil { f.output.data[3] += 1e-3 * max(1, abs(f.output.data[3])) }
            if where_ == "distort" && actBits != nil { f.output.data[0] *= 1.01 }
            return f
        }
        func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                           rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float> {
            var g = cpu.blockBackward(dy, saved, w, rope: rope, mask: mask)
            if where_ == "backward" { g.input.data[1] += 0.5 }
            return g
        }
        func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                         options: SearchOptions) -> [GroupResult] {
            var r = cpu.searchLayer(l, w, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio, options: options)
            if where_ == "search" { r[0].bestIndex = (r[0].bestIndex + 1) % 20 }
            return r
        }
        func measureGEMMRates(sizes: [Int]) -> [Double] { cpu.measureGEMMRates(sizes: sizes) }
    }

    func fixture(_ arch: String) throws -> (LanguageModel<Float>, CalibrationBundle) {
        let ckpt = try Checkpoint(directory: MethodsTests.fixtures + "/\(arch)/model")
        return (try LanguageModel<Float>.load(ckpt), try CalibrationBundle.load(path: MethodsTests.fixtures + "/\(arch)/calib.safetensors"))
    }

    func testCPUBackendConforms() throws {
        for arch in ["llava15", "onevision_mha", "qwen2vl"] {
            let (model, bundle) = try fixture(arch)
            let checks = BackendConformance.run(CPUBackend(), model: model, samples: Array(bundle.samples.prefix(2)), tolerance: 0)
            for c in checks { print("conformance cpu \(arch): \(c)") }
            XCTAssertTrue(checks.allSatisfy(\.passed), "\(arch): \(checks.filter { !$0.passed })")
            XCTAssertGreaterThan(checks.count, 10)
        }
    }

    func testADeviatingBackendFailsNamingWhere() throws {
        let (model, bundle) = try fixture("onevision_mha")
        let samples = Array(bundle.samples.prefix(1))
        for (where_, needle) in [("forward", "block output"), ("backward", "backward dL/dx"), ("distort", "8-bit activations"),
                                 ("search", "grid points")] {
            let failed = BackendConformance.run(Perturbed(where_: where_), model: model, samples: samples).filter { !$0.passed }
            XCTAssertTrue(failed.contains { $0.name.contains(needle) }, "\(where_): \(failed)")
        }
    }
}
