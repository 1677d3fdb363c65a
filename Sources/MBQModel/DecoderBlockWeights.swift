import MBQFormats
import MBQTensor

/// One decoder block's parameters (Llama / Qwen2 / Qwen2-VL layout), as fp32 or fp64.
/// Linear weights are [out, in] as PyTorch stores them.
public struct DecoderBlockWeights<T: BLASScalar>: Sendable {
    public var inputNorm: Tensor<T>          // [C]
    public var postAttentionNorm: Tensor<T>  // [C]
    public var q: Tensor<T>                  // [heads*D, C]
    public var k: Tensor<T>                  // [kvHeads*D, C]
    public var v: Tensor<T>                  // [kvHeads*D, C]
    public var o: Tensor<T>                  // [C, heads*D]
    public var qBias: Tensor<T>?
    public var kBias: Tensor<T>?
    public var vBias: Tensor<T>?
    public var oBias: Tensor<T>?
    public var gate: Tensor<T>               // [I, C]
    public var up: Tensor<T>                 // [I, C]
    public var down: Tensor<T>               // [C, I]
    public var shape: AttentionShape
    public var rmsNormEps: Double

    public init(inputNorm: Tensor<T>, postAttentionNorm: Tensor<T>, q: Tensor<T>, k: Tensor<T>, v: Tensor<T>,
                o: Tensor<T>, qBias: Tensor<T>?, kBias: Tensor<T>?, vBias: Tensor<T>?, oBias: Tensor<T>?,
                gate: Tensor<T>, up: Tensor<T>, down: Tensor<T>, shape: AttentionShape, rmsNormEps: Double) {
        self.inputNorm = inputNorm; self.postAttentionNorm = postAttentionNorm
        self.q = q; self.k = k; self.v = v; self.o = o
        self.qBias = qBias; self.kBias = kBias; self.vBias = vBias; self.oBias = oBias
        self.gate = gate; self.up = up; self.down = down
        self.shape = shape; self.rmsNormEps = rmsNormEps
    }

    public var hiddenSize: Int { inputNorm.count }
    /// Every parameter of the block (norms, linears, biases).
    public var parameterCount: Int {
        [inputNorm, postAttentionNorm, q, k, v, o, gate, up, down].reduce(0) { $0 + $1.count }
            + [qBias, kBias, vBias, oBias].reduce(0) { $0 + ($1?.count ?? 0) }
    }
    public var intermediateSize: Int { gate.shape[0] }

    /// The block's linears by role (the roles `LanguageModelConfig.linearShapes` and the
    /// families' `StoredLinear`s name), in the order the output formats list them.
    public static var linears: [(role: String, path: WritableKeyPath<DecoderBlockWeights<T>, Tensor<T>>)] {
        [("q", \.q), ("k", \.k), ("v", \.v), ("o", \.o), ("gate", \.gate), ("up", \.up), ("down", \.down)]
    }

    public func converted<U: BLASScalar>(to _: U.Type) -> DecoderBlockWeights<U> {
        func c(_ t: Tensor<T>) -> Tensor<U> { t.converted(to: U.self) }
        return DecoderBlockWeights<U>(
            inputNorm: c(inputNorm), postAttentionNorm: c(postAttentionNorm), q: c(q), k: c(k), v: c(v), o: c(o),
            qBias: qBias.map(c), kBias: kBias.map(c), vBias: vBias.map(c), oBias: oBias.map(c),
            gate: c(gate), up: c(up), down: c(down), shape: shape, rmsNormEps: rmsNormEps)
    }
}

extension DecoderBlockWeights where T == Float {
    /// Loads block `layer` from a checkpoint, checking every tensor's shape against the
    /// config. Only this block's bytes are read.
    public static func load(from ckpt: Checkpoint, layer: Int) throws -> DecoderBlockWeights<Float> {
        let cfg = ckpt.config
        guard layer >= 0 && layer < cfg.numLayers else {
            throw ModelError.layerOutOfRange(layer: layer, layers: cfg.numLayers)
        }
        let n = ckpt.blockNames(layer)
        let c = cfg.hiddenSize
        let qd = cfg.numHeads * cfg.headDim, kvd = cfg.numKVHeads * cfg.headDim
        func opt(_ name: String?, _ shape: [Int]) throws -> Tensor<Float>? {
            guard let name else { return nil }
            return try ckpt.tensor(name, shape: shape)
        }
        // Each stored linear read whole, then split into the roles it holds (fused
        // families); a tensor holding one whole role is taken as it is.
        let shapes = Dictionary(uniqueKeysWithValues: cfg.linearShapes.map { ($0.role, $0.shape) })
        var linear: [String: Tensor<Float>] = [:]
        for s in n.linears {
            let cols = shapes[s.roles[0]]![1]
            precondition(s.roles.allSatisfy { shapes[$0]![1] == cols }, "\(s.name) fuses linears of different input sizes")
            let t = try ckpt.linearWeight(s.name, shape: [s.rows, cols])
            if s.pieces.count == 1 && s.rows == shapes[s.pieces[0].role]![0] {
                linear[s.pieces[0].role] = t
            } else {
                for (role, data) in s.split(t.data, cols: cols, roleRows: shapes.mapValues { $0[0] }, zero: 0) {
                    linear[role] = Tensor(shape: shapes[role]!, data: data)
                }
            }
        }
        precondition(Set(linear.keys) == Set(shapes.keys), "layer \(layer)'s stored linears cover \(linear.keys.sorted())")
        return DecoderBlockWeights<Float>(
            inputNorm: try ckpt.tensor(n.inputNorm, shape: [c]),
            postAttentionNorm: try ckpt.tensor(n.postAttentionNorm, shape: [c]),
            q: linear["q"]!, k: linear["k"]!, v: linear["v"]!, o: linear["o"]!,
            qBias: try opt(n.qBias, [qd]), kBias: try opt(n.kBias, [kvd]), vBias: try opt(n.vBias, [kvd]),
            oBias: try opt(n.oBias, [c]),
            gate: linear["gate"]!, up: linear["up"]!, down: linear["down"]!,
            shape: AttentionShape(heads: cfg.numHeads, kvHeads: cfg.numKVHeads, headDim: cfg.headDim),
            rmsNormEps: cfg.rmsNormEps)
    }
}
