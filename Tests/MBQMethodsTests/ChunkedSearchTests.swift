import Foundation
import MBQFormats
@testable import MBQMethods
import MBQModel
import MBQTensor
import XCTest

/// The search read in chunks of samples (`LayerStep.search`, `--chunk-tokens`) gives the
/// bits of the search on all samples at once: grid points, every loss of every curve,
/// scales, SmoothQuant's scales and the layer's outputs.
final class ChunkedSearchTests: XCTestCase {
    func testChunkingChangesNoBit() throws {
        let tmp = NSTemporaryDirectory() + "mbq-chunks-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        var spec = SyntheticModelSpec()
        spec.layers = 1; spec.kvHeads = 4   // no GQA: the o group is searched too
        try spec.write(to: tmp)
        let model = try LanguageModel<Float>.load(try Checkpoint(directory: tmp))
        // 14 samples x 96 tokens, 40 image and 12 caption tokens each: 728 loss rows per
        // token-wise group, so the rows cross a GEMM row tile (512) inside a chunk.
        let samples = spec.calibrationSamples(count: 14, length: 96, imageTokens: 40, captionTokens: 12, leftPadding: true, seed: 5)
        XCTAssertGreaterThan(samples.count * 52, TiledGEMM.rowTile)
        let backend = CPUBackend()
        let block = backend.loadBlock(model.blocks[0])
        let inputs = samples.map { backend.upload($0.embeds) }
        let rope = { (s: CalibrationSample) in model.ropeTable(s.positions) }
        for (method, aBit) in [(QuantMethod.mbq, nil as Int?), (.awq, 8), (.smoothquant, 8)] {
            var o = QuantizeOptions()
            o.method = method; o.wBit = method == .smoothquant ? 8 : 3; o.aBit = aBit
            func run(_ chunkTokens: Int?) throws -> ([GroupResult], [Tensor<Float>]) {
                var outputs = [Tensor<Float>?](repeating: nil, count: samples.count)
                let r = try LayerStep.search(layer: 0, block: block, samples: samples, input: { inputs[$0] },
                                             output: { outputs[$0] = try backend.download($1) }, rope: rope, chunkTokens: chunkTokens,
                                             attnRatio: 0.3, mlpRatio: 0.4, options: o, backend: backend)
                return (r, outputs.map { $0! })
            }
            let (whole, wholeOut) = try run(nil)
            // 1 sample, 5 samples (chunk bounds inside a row tile), 13 + 1.
            for (tokens, count) in [(1, 14), (5 * 96, 3), (13 * 96, 2)] {
                XCTAssertEqual(LayerStep.chunks(lengths: samples.map(\.length), chunkTokens: tokens).count, count)
                let (chunked, out) = try run(tokens)
                XCTAssertEqual(chunked.count, whole.count)
                for (a, b) in zip(chunked, whole) {
                    let tag = "\(method.rawValue) \(a.group.rawValue), chunks of \(tokens) tokens"
                    XCTAssertEqual(a.bestIndex, b.bestIndex, tag)
                    XCTAssertEqual(a.losses, b.losses, tag)
                    XCTAssertEqual(a.scales, b.scales, tag)
                }
                XCTAssertEqual(out.map(\.data), wholeOut.map(\.data), "\(method.rawValue): outputs")
            }
        }
    }

    func testChunksAreWholeSamplesInOrder() {
        XCTAssertEqual(LayerStep.chunks(lengths: [4, 4, 4], chunkTokens: nil), [0..<3])
        XCTAssertEqual(LayerStep.chunks(lengths: [4, 4, 4], chunkTokens: 8), [0..<2, 2..<3])
        XCTAssertEqual(LayerStep.chunks(lengths: [4, 9, 4], chunkTokens: 8), [0..<1, 1..<2, 2..<3])
        XCTAssertEqual(LayerStep.chunks(lengths: [4, 4, 4], chunkTokens: 1), [0..<1, 1..<2, 2..<3])
        XCTAssertEqual(LayerStep.chunks(lengths: [], chunkTokens: 8), [])
    }
}
