import Foundation
import MBQMethods
import MBQModel
import MBQTensor

/// The arithmetic a worker runs, behind a small interface so that another backend
/// (CUDA) can be added without touching the protocol or the coordinator.
public protocol ComputeBackend: Sendable {
    var name: String { get }
    func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                      save: Bool, capture: Bool) -> DecoderBlockForward<Float>
    func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                       rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float>
    func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                     options: SearchOptions) -> [GroupResult]
    func measureGFLOPS() -> Double
}

public struct CPUBackend: ComputeBackend {
    public init() {}
    public var name: String { "cpu" }
    public func blockForward(_ x: Tensor<Float>, _ w: DecoderBlockWeights<Float>, rope: RoPETable<Float>, mask: [Bool],
                             save: Bool, capture: Bool) -> DecoderBlockForward<Float> {
        decoderBlockForward(x, weights: w, rope: rope, mask: mask, save: save, capture: capture)
    }
    public func blockBackward(_ dy: Tensor<Float>, _ saved: DecoderBlockSaved<Float>, _ w: DecoderBlockWeights<Float>,
                              rope: RoPETable<Float>, mask: [Bool]) -> DecoderBlockGradients<Float> {
        decoderBlockBackward(dy, saved: saved, weights: w, rope: rope, mask: mask)
    }
    public func searchLayer(_ l: Int, _ w: DecoderBlockWeights<Float>, samples: [LayerSample], attnRatio: Double, mlpRatio: Double,
                            options: SearchOptions) -> [GroupResult] {
        ScaleSearch.searchLayer(l, weights: w, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio, options: options)
    }
    public func measureGFLOPS() -> Double {
        var rng = SeededRandom(seed: 1)
        let a: Tensor<Float> = rng.normalTensor([512, 512]), b: Tensor<Float> = rng.normalTensor([512, 512])
        _ = matmul(a, b)
        let t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<4 { _ = matmul(a, b) }
        let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        return 4 * 2 * 512 * 512 * 512 / dt / 1e9
    }
}
