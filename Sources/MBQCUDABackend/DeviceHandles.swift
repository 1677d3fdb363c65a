import MBQDevice
import MBQMethods
import MBQModel
import MBQTensor

// What the CUDA backend's handles hold: device arrays (`DeviceArray`, freed with their
// last reference) and their shapes. Only the backend that made a handle reads it.

/// An activation, gradient or capture on the device. [rows, cols] fp32, row-major.
final class DeviceTensor: BackendTensor, @unchecked Sendable {
    let array: DeviceArray
    let shape: [Int]
    init(_ array: DeviceArray, shape: [Int]) { self.array = array; self.shape = shape }
    var pointer: DevicePointer { array.pointer }
    var rows: Int { shape.count == 2 ? shape[0] : 1 }
    var cols: Int { shape.last ?? 0 }
    var count: Int { shape.reduce(1, *) }
}

/// A decoder block's weights on the device (fp32), with what the host needs to name them.
final class DeviceBlock: BackendBlock, @unchecked Sendable {
    /// By `DecoderBlockWeights` key: "inputNorm", "postAttentionNorm", the linear roles,
    /// "qBias" ... "oBias" when present.
    let arrays: [String: DeviceArray]
    let shapes: [String: [Int]]
    let attention: AttentionShape
    let rmsNormEps: Double
    let parameterCount: Int

    init(arrays: [String: DeviceArray], shapes: [String: [Int]], attention: AttentionShape, rmsNormEps: Double) {
        self.arrays = arrays; self.shapes = shapes; self.attention = attention; self.rmsNormEps = rmsNormEps
        parameterCount = shapes.values.reduce(0) { $0 + $1.reduce(1, *) }
    }

    var residentBytes: Int { parameterCount * 4 }
    var linearShapes: [String: [Int]] {
        Dictionary(uniqueKeysWithValues: DecoderBlockWeights<Float>.linears.compactMap { l in shapes[l.role].map { (l.role, $0) } })
    }
    func weight(_ key: String) -> DevicePointer {
        guard let a = arrays[key] else { preconditionFailure("the device block has no \(key)") }
        return a.pointer
    }
    func optional(_ key: String) -> DevicePointer { arrays[key]?.pointer ?? 0 }
    var hiddenSize: Int { shapes["inputNorm"]?[0] ?? 0 }
    var intermediateSize: Int { shapes["gate"]?[0] ?? 0 }

    /// The block's tensors by key, in `DecoderBlockWeights` terms.
    static let norms: [(key: String, path: WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>>)] =
        [("inputNorm", \.inputNorm), ("postAttentionNorm", \.postAttentionNorm)]
    static let biases: [(key: String, path: WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>?>)] =
        [("qBias", \.qBias), ("kBias", \.kBias), ("vBias", \.vBias), ("oBias", \.oBias)]
}

/// What a forward with `save` keeps for the backward (MBQModel `DecoderBlockSaved`).
final class DeviceSaved: BackendSaved, @unchecked Sendable {
    let x: DeviceTensor, invRms1: DeviceArray
    let q: DeviceTensor, k: DeviceTensor, v: DeviceTensor, ctx: DeviceTensor, lse: DeviceArray
    let h: DeviceTensor, invRms2: DeviceArray
    let gate: DeviceTensor, up: DeviceTensor

    init(x: DeviceTensor, invRms1: DeviceArray, q: DeviceTensor, k: DeviceTensor, v: DeviceTensor, ctx: DeviceTensor, lse: DeviceArray,
         h: DeviceTensor, invRms2: DeviceArray, gate: DeviceTensor, up: DeviceTensor) {
        self.x = x; self.invRms1 = invRms1; self.q = q; self.k = k; self.v = v; self.ctx = ctx; self.lse = lse
        self.h = h; self.invRms2 = invRms2; self.gate = gate; self.up = up
    }
}

/// A search candidate's linears on the device, by role.
final class DeviceCandidate: BackendCandidate, @unchecked Sendable {
    let weights: [String: DeviceArray]
    init(_ weights: [String: DeviceArray]) { self.weights = weights }
}

/// The final norm and output projection, kept on the host: the caption loss runs there
/// (one [T, vocab] product per sample at the last layer; docs/DESIGN.md "Compute backends").
final class DeviceHead: BackendHead, @unchecked Sendable {
    let norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float
    init(norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float) { self.norm = norm; self.lmHead = lmHead; self.eps = eps }
}
