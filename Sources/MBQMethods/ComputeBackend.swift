import Foundation
import MBQModel
import MBQTensor

/// The arithmetic of a job, behind a small interface so that another backend (CUDA) can
/// be added without touching the layer step, the protocol or the coordinator. The
/// one-process job and the workers both run through it (`LayerStep`).
public protocol ComputeBackend: Sendable {
    var name: String { get }
    /// `actBits`: per-token activation quantization of every linear's input (the
    /// `--distort` forward of W-A schemes).
    func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                      save: Bool, capture: Bool, actBits: Int?) -> DecoderBlockForward<Float>
    func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                       rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float>
    func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                     options: SearchOptions) -> [GroupResult]
    /// GEMM rate (GFLOP/s) on n x n x n products for each n of `sizes`, with the threads
    /// this worker computes with: the cost model reads the efficiency of small GEMMs
    /// from it, the plan the speed of large ones.
    func measureGEMMRates(sizes: [Int]) -> [Double]
}

public struct CPUBackend: ComputeBackend {
    public init() {}
    public var name: String { "cpu" }
    public func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                             save: Bool, capture: Bool, actBits: Int?) -> DecoderBlockForward<Float> {
        decoderBlockForward(x, weights: w, rope: rope, mask: mask, save: save, capture: capture, actBits: actBits)
    }
    public func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                              rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float> {
        decoderBlockBackward(dy, saved: saved, weights: w, rope: rope, mask: mask)
    }
    public func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                            options: SearchOptions) -> [GroupResult] {
        ScaleSearch.searchLayer(l, weights: w, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio, options: options)
    }
    public func measureGEMMRates(sizes: [Int]) -> [Double] {
        let operands = sizes.map { n -> (Tensor<Float>, Tensor<Float>) in
            var rng = SeededRandom(seed: UInt64(n))
            return (rng.normalTensor([n, n]), rng.normalTensor([n, n]))
        }
        var best = [Double](repeating: 0, count: sizes.count)
        // Two passes over the sizes, best of repeated runs for about 25 ms each: workers
        // starting together on one host measure at the same time, and the best run is
        // the one least disturbed (the cost model accounts for shared cores itself).
        for _ in 0..<2 {
            for (i, n) in sizes.enumerated() {
                let (a, b) = operands[i]
                _ = matmul(a, b)  // warm-up: threads, caches, page faults
                let end = DispatchTime.now().uptimeNanoseconds + 25_000_000
                repeat {
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    _ = matmul(a, b)
                    let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
                    best[i] = max(best[i], 2 * Double(n * n * n) / dt / 1e9)
                } while DispatchTime.now().uptimeNanoseconds < end
            }
        }
        return best
    }
}
