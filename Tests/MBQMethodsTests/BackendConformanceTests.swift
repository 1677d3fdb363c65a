import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
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
        var device: String { cpu.device }
        func nudged(_ x: BackendTensor, _ change: (inout Tensor<Float>) -> Void) -> BackendTensor {
            var t = cpu.download(x)
            change(&t)
            return cpu.upload(t)
        }
        func loadBlock(_ w: DecoderBlockWeights<Float>) -> BackendBlock {
            var w = w
            if where_ == "load" { w.down.data[5] += 1e-3 }
            return cpu.loadBlock(w)
        }
        func loadHead(norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float) -> BackendHead { cpu.loadHead(norm: norm, lmHead: lmHead, eps: eps) }
        func upload(_ x: Tensor<Float>) -> BackendTensor { cpu.upload(x) }
        func download(_ x: BackendTensor) -> Tensor<Float> { cpu.download(x) }
        func downloadBlock(_ b: BackendBlock) -> DecoderBlockWeights<Float> { cpu.downloadBlock(b) }
        func blockForward(_ x: BackendTensor, _ b: BackendBlock, rope: RoPETable<Float>, mask: [Bool],
                          save: Bool, capture: Bool, actBits: Int?) -> BackendForward {
            var f = cpu.blockForward(x, b, rope: rope, mask: mask, save: save, capture: capture, actBits: actBits)
            if where_ == "forward" && actBits == nil { f.output = nudged(f.output) { $0.data[3] += 1e-3 * max(1, abs($0.data[3])) } }
            if where_ == "distort" && actBits != nil { f.output = nudged(f.output) { $0.data[0] *= 1.01 } }
            if where_ == "capture", var c = f.captures { c.downInput = nudged(c.downInput) { $0.data[2] += 0.25 }; f.captures = c }
            return f
        }
        func blockBackward(_ dy: BackendTensor, _ saved: BackendSaved, _ b: BackendBlock, rope: RoPETable<Float>, mask: [Bool],
                           outputNorms: Bool) -> BackendGradients {
            var g = cpu.blockBackward(dy, saved, b, rope: rope, mask: mask, outputNorms: outputNorms)
            if where_ == "backward" { g.input = nudged(g.input) { $0.data[1] += 0.5 } }
            if where_ == "norms", outputNorms { g.outputSquaredNorms["k"]![0] *= 1.5 }
            return g
        }
        func lossGradient(_ h: BackendTensor, _ head: BackendHead, labels: [Int]) -> (loss: Float, count: Int, grad: BackendTensor) {
            var r = cpu.lossGradient(h, head, labels: labels)
            if where_ == "head" { r.grad = nudged(r.grad) { for i in $0.data.indices { $0.data[i] *= 1.001 } } }
            return r
        }
        func meanAbs(_ x: BackendTensor, rows: [Bool]) -> Double { cpu.meanAbs(x, rows: rows) * (where_ == "means" ? 1.01 : 1) }
        func allFinite(_ x: BackendTensor) -> Bool { where_ == "finite" ? true : cpu.allFinite(x) }
        func addColumnAbsSums(_ x: BackendTensor, rows: [Bool], into sums: inout [Double]) {
            cpu.addColumnAbsSums(x, rows: rows, into: &sums)
        }
        func gatherRows(_ parts: [(BackendTensor, [Int])]) -> BackendTensor { cpu.gatherRows(parts) }
        func concatRows(_ a: BackendTensor, _ b: BackendTensor) -> BackendTensor { cpu.concatRows(a, b) }
        func splitRows(_ x: BackendTensor, at n: Int) -> (BackendTensor, BackendTensor) { cpu.splitRows(x, at: n) }
        // Deviating search: each candidate built with its scales in reverse channel order.
        func candidateWeights(_ g: SearchGroup, _ b: BackendBlock, scales: [Float], options: SearchOptions) -> BackendCandidate {
            cpu.candidateWeights(g, b, scales: where_ == "search" ? scales.reversed() : scales, options: options)
        }
        func runCandidate(_ g: SearchGroup, _ b: BackendBlock, _ c: BackendCandidate, input x: BackendTensor, scales: [Float],
                          rope: RoPETable<Float>?, mask: [Bool], options: SearchOptions) -> BackendTensor {
            cpu.runCandidate(g, b, c, input: x, scales: scales, rope: rope, mask: mask, options: options)
        }
        func rowErrors(_ a: BackendTensor, _ b: BackendTensor, squared: Bool) -> [Float] { cpu.rowErrors(a, b, squared: squared) }
        func smoothQuantScales(_ b: BackendBlock, samples: SampleChunks<BackendLayerSample>) throws -> (qkv: [Float], gateUp: [Float]) {
            var s = try cpu.smoothQuantScales(b, samples: samples)
            if where_ == "smoothquant" { s.gateUp[0] *= 1.1 }
            return s
        }
        func applyScales(_ scales: [(group: SearchGroup, scales: [Float])], to b: BackendBlock) -> BackendBlock {
            // Deviating: the last group's scales left out.
            cpu.applyScales(where_ == "apply" ? Array(scales.dropLast()) : scales, to: b)
        }
        func quantize(_ b: BackendBlock, with q: WeightQuantizer, precision: ScalePrecision) -> (block: BackendBlock, codes: [String: QuantizedWeight]) {
            var r = cpu.quantize(b, with: q, precision: precision)
            if where_ == "codes" { r.codes["up"]!.codes[7] ^= 1 }
            return r
        }
        func gptqLayer(_ l: Int, _ b: BackendBlock, samples: SampleChunks<(sample: BackendLayerSample, weights: TokenWeightSet)>,
                       settings: GPTQSettings, perLinear: Bool, rtn: WeightQuantizer,
                       precision: ScalePrecision) throws -> (block: BackendBlock, codes: [String: QuantizedWeight], reports: [GPTQLinearReport]) {
            // Deviating: a damping ten times the one asked for.
            var s = settings
            if where_ == "gptq" { s.damp *= 10 }
            return try cpu.gptqLayer(l, b, samples: samples, settings: s, perLinear: perLinear, rtn: rtn, precision: precision)
        }
        func measureGEMMRates(sizes: [Int]) -> [Double] { cpu.measureGEMMRates(sizes: sizes) }
        func measureLoopGBps() -> Double { cpu.measureLoopGBps() }
    }

    func fixture(_ arch: String) throws -> (LanguageModel<Float>, CalibrationBundle) {
        let ckpt = try Checkpoint(directory: MethodsTests.fixtures + "/\(arch)/model")
        return (try LanguageModel<Float>.load(ckpt), try CalibrationBundle.load(path: MethodsTests.fixtures + "/\(arch)/calib.safetensors"))
    }

    func testCPUBackendConforms() throws {
        for arch in ["llava15", "onevision_mha", "qwen2vl"] {
            let (model, bundle) = try fixture(arch)
            let checks = try BackendConformance.run(CPUBackend(), model: model, samples: Array(bundle.samples.prefix(2)), tolerance: 0)
            for c in checks { print("conformance cpu \(arch): \(c)") }
            XCTAssertTrue(checks.allSatisfy(\.passed), "\(arch): \(checks.filter { !$0.passed })")
            XCTAssertGreaterThan(checks.count, 10)
        }
    }

    /// The workers' CPU backend keeps a bf16 checkpoint's blocks in bf16 (half the
    /// bytes) and computes exactly what the fp32 one does; an fp32 checkpoint's blocks
    /// stay fp32.
    func testStoredPrecisionBlocksConformExactly() throws {
        let kept = CPUBackend(keepStoredPrecision: true)
        let (qwen, bundle) = try fixture("qwen2vl")   // stored bf16
        let b = kept.loadBlock(qwen.blocks[0])
        let linears = ApplyScales.linears.reduce(0) { $0 + qwen.blocks[0][keyPath: $1.path].count }
        XCTAssertEqual(b.residentBytes, qwen.blocks[0].parameterCount * 4 - linears * 2)
        let checks = try BackendConformance.run(kept, model: qwen, samples: Array(bundle.samples.prefix(2)), tolerance: 0)
        XCTAssertTrue(checks.allSatisfy(\.passed), "\(checks.filter { !$0.passed })")
        let (llava, _) = try fixture("llava15")      // stored fp32
        XCTAssertEqual(kept.loadBlock(llava.blocks[0]).residentBytes, llava.blocks[0].parameterCount * 4)
    }

    /// The widened fp32 copy is reused from one block to the next: whatever order blocks
    /// are used in, and whatever a caller does with a copy it holds, each use sees exactly
    /// its own block.
    func testWidenedCopiesAreEachBlocksOwn() throws {
        let kept = CPUBackend(keepStoredPrecision: true)
        let (qwen, _) = try fixture("qwen2vl")
        XCTAssertGreaterThanOrEqual(qwen.blocks.count, 2)
        let blocks = qwen.blocks.prefix(2).map(kept.loadBlock)
        func same(_ a: DecoderBlockWeights<Float>, _ b: DecoderBlockWeights<Float>) -> Bool {
            ApplyScales.linears.allSatisfy { a[keyPath: $0.path].data == b[keyPath: $0.path].data }
                && a.inputNorm.data == b.inputNorm.data && a.postAttentionNorm.data == b.postAttentionNorm.data
        }
        var held = kept.downloadBlock(blocks[0])
        XCTAssertTrue(same(held, qwen.blocks[0]))
        for l in [1, 0, 0, 1, 0] {
            XCTAssertTrue(same(kept.downloadBlock(blocks[l]), qwen.blocks[l]), "use of block \(l)")
        }
        XCTAssertTrue(same(held, qwen.blocks[0]), "a held copy is untouched by later widening")
        held.q.data[0] += 1                                   // a caller scaling its copy
        XCTAssertTrue(same(kept.downloadBlock(blocks[0]), qwen.blocks[0]), "nor does a caller's change reach the next use")
    }

    func testADeviatingBackendFailsNamingWhere() throws {
        let (model, bundle) = try fixture("onevision_mha")
        let samples = Array(bundle.samples.prefix(1))
        for (where_, needle) in [("load", "block loaded"), ("forward", "block output"), ("capture", "captured down input"),
                                 ("backward", "backward dL/dx"), ("head", "caption loss gradient"), ("means", "gradient means"),
                                 ("finite", "allFinite"), ("distort", "8-bit activations"), ("search", "search loss curves"),
                                 ("smoothquant", "SmoothQuant"), ("apply", "scales applied"), ("codes", "quantized codes"),
                                 ("norms", "output-gradient norms"), ("gptq", "GPTQ codes")] {
            let failed = try BackendConformance.run(Perturbed(where_: where_), model: model, samples: samples).filter { !$0.passed }
            XCTAssertTrue(failed.contains { $0.name.contains(needle) }, "\(where_): \(failed)")
        }
    }

    /// A failing check names the first element past the tolerance, as [row, col] of the
    /// tensor: the perturbed forward changed element 3 of the block output (row 0), the
    /// perturbed backward element 1 of dL/dx, the perturbed load element 5 of down_proj.
    func testADeviationIsLocated() throws {
        let (model, bundle) = try fixture("onevision_mha")
        let samples = Array(bundle.samples.prefix(1))
        for (where_, name, at) in [("forward", "block output", "[0, 3]"), ("backward", "backward dL/dx", "[0, 1]"),
                                   ("load", "block loaded and read back", "[0, 5]")] {
            let checks = try BackendConformance.run(Perturbed(where_: where_), model: model, samples: samples)
            let c = checks.first { $0.name == name }
            XCTAssertEqual(c?.passed, false, "\(where_)")
            XCTAssertTrue(c?.firstDeviation?.hasPrefix(at + " (") == true, "\(where_): \(String(describing: c))")
            XCTAssertTrue(c?.description.contains("first at \(at)") == true, "\(where_): \(String(describing: c))")
        }
    }
}
