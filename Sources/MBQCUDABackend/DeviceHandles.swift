import Foundation
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

/// A decoder block's weights on the device. Norms and biases are fp32; the seven linears
/// stay in the checkpoint's dtype when their values are exactly bf16 or fp16 (half the
/// bytes) and are widened on the device, all seven at once, into the backend's one fp32
/// working copy when the block is used (`WidenedLinears`); otherwise they are fp32.
final class DeviceBlock: BackendBlock, @unchecked Sendable {
    /// Stored 16-bit linears: bf16 or fp16 bits by role.
    enum Narrow: Sendable { case bf16, fp16 }

    /// By `DecoderBlockWeights` key: "inputNorm", "postAttentionNorm", the linear roles
    /// (fp32 linears only), "qBias" ... "oBias" when present.
    let arrays: [String: DeviceArray]
    /// The linears' bits by role when they are stored narrow.
    let narrow: (dtype: Narrow, bits: [String: DeviceArray])?
    let shapes: [String: [Int]]
    let attention: AttentionShape
    let rmsNormEps: Double
    let parameterCount: Int
    let widened: WidenedLinears

    init(arrays: [String: DeviceArray], narrow: (dtype: Narrow, bits: [String: DeviceArray])?, shapes: [String: [Int]],
         attention: AttentionShape, rmsNormEps: Double, widened: WidenedLinears) {
        self.arrays = arrays; self.narrow = narrow; self.shapes = shapes; self.attention = attention; self.rmsNormEps = rmsNormEps
        self.widened = widened
        parameterCount = shapes.values.reduce(0) { $0 + $1.reduce(1, *) }
    }

    var linearCount: Int { DecoderBlockWeights<Float>.linears.reduce(0) { $0 + (shapes[$1.role]?.reduce(1, *) ?? 0) } }
    var residentBytes: Int { parameterCount * 4 - (narrow == nil ? 0 : linearCount * 2) }
    var linearShapes: [String: [Int]] {
        Dictionary(uniqueKeysWithValues: DecoderBlockWeights<Float>.linears.compactMap { l in shapes[l.role].map { (l.role, $0) } })
    }

    /// An fp32 tensor of the block: a norm, a bias, or a linear (widened first when stored narrow).
    func weight(_ key: String) throws -> DevicePointer {
        if let a = arrays[key] { return a.pointer }
        if narrow != nil, shapes[key] != nil { return try widened.pointer(key, of: self) }
        preconditionFailure("the device block has no \(key)")
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

/// The backend's one fp32 working copy of a narrow-stored block's linears (after the CPU
/// backend's `WidenedBlock`): kept for the next use of the same block, overwritten in
/// place for another (its buffers reused when the shapes agree). A pointer from it is
/// good until another block is used; every op asks for its block's pointers when it runs,
/// and a backend is used from one thread at a time (the job and the worker are sequential).
final class WidenedLinears: @unchecked Sendable {
    let device: Device
    let ops: DeviceOps
    private let lock = NSLock()
    private weak var owner: DeviceBlock?
    private var arrays: [String: DeviceArray] = [:]

    init(ops: DeviceOps) { self.ops = ops; device = ops.device }

    func pointer(_ role: String, of b: DeviceBlock) throws -> DevicePointer {
        try lock.withLock {
            if owner !== b {
                guard let narrow = b.narrow else { preconditionFailure("widening an fp32 block") }
                for (role, bits) in narrow.bits {
                    let n = b.shapes[role]!.reduce(1, *)
                    if arrays[role]?.count != n { arrays[role] = try DeviceArray(device, count: n) }
                    try ops.widen(bits.pointer, bf16: narrow.dtype == .bf16, into: arrays[role]!.pointer, count: n)
                }
                owner = b
            }
            guard let a = arrays[role] else { preconditionFailure("the device block has no \(role)") }
            return a.pointer
        }
    }
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

/// The final norm and output projection on the device (the caption loss's gradient at
/// the last layer). lm_head stays in the checkpoint's dtype when every value is exactly
/// bf16 or fp16 and is widened into a temporary for each use (a 152k x 8192 head is 2.5
/// GB as bf16, 5 GB as fp32).
final class DeviceHead: BackendHead, @unchecked Sendable {
    let norm: DeviceArray
    let lmHead: DeviceArray
    let narrow: DeviceBlock.Narrow?
    let vocab: Int, hidden: Int
    let eps: Float

    init(norm: DeviceArray, lmHead: DeviceArray, narrow: DeviceBlock.Narrow?, vocab: Int, hidden: Int, eps: Float) {
        self.norm = norm; self.lmHead = lmHead; self.narrow = narrow; self.vocab = vocab; self.hidden = hidden; self.eps = eps
    }
}
