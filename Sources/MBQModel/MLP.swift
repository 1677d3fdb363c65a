import MBQTensor

// SwiGLU MLP (LlamaMLP / Qwen2MLP): y = down( silu(gate(x)) * up(x) ), no biases.

/// What MLP backward needs: the gate and up pre-activations.
public struct MLPSaved<T: BLASScalar>: Sendable {
    public var gate: Tensor<T>  // [T, I]
    public var up: Tensor<T>    // [T, I]

    @inlinable
    public init(gate: Tensor<T>, up: Tensor<T>) {
        self.gate = gate
        self.up = up
    }
}

/// silu(g) * u elementwise. g, u: [T, I] -> [T, I] (the input of down_proj)
@inlinable
public func swiglu<T: BLASScalar>(gate: Tensor<T>, up: Tensor<T>) -> Tensor<T> {
    precondition(gate.shape == up.shape, "swiglu: \(gate.shape) vs \(up.shape)")
    var out = [[T]](arrayLiteral: [T](repeating: 0, count: gate.count))
    withBuffers([gate.data, up.data], writing: &out) { r, w in
        let (pg, pu, pa) = (r[0], r[1], w[0])
        parallelChunks(pa.count, minChunk: 1 << 14) { r in
            for i in r { pa[i] = pg[i] * sigmoid(pg[i]) * pu[i] }
        }
    }
    return Tensor(shape: gate.shape, data: out[0])
}

/// x: [T, C], gate/up: [I, C], down: [C, I] -> y: [T, C], downInput: [T, I]
@inlinable
public func mlpForward<T: BLASScalar>(_ x: Tensor<T>, gate: Tensor<T>, up: Tensor<T>, down: Tensor<T>,
                                      actBits: Int? = nil)
    -> (y: Tensor<T>, downInput: Tensor<T>, saved: MLPSaved<T>) {
    let xin = quantizedInput(x, bits: actBits)
    let g = linearForward(xin, weight: gate)
    let u = linearForward(xin, weight: up)
    let a = swiglu(gate: g, up: u)
    let y = linearForward(quantizedInput(a, bits: actBits), weight: down)
    return (y, a, MLPSaved(gate: g, up: u))
}

/// dy: [T, C] -> dx: [T, C].  With s = sigmoid(g): da = dy W_down,
/// dg = da * u * s * (1 + g (1 - s)),  du = da * g * s,  dx = dg W_gate + du W_up.
@inlinable
public func mlpBackward<T: BLASScalar>(_ dy: Tensor<T>, saved: MLPSaved<T>, gate: Tensor<T>, up: Tensor<T>,
                                       down: Tensor<T>, outputGradients: ((String, Tensor<T>) -> Void)? = nil) -> Tensor<T> {
    let da = linearBackward(dy, weight: down)
    var out = [[T]](arrayLiteral: [T](repeating: 0, count: da.count), [T](repeating: 0, count: da.count))  // dg, du
    withBuffers([da.data, saved.gate.data, saved.up.data], writing: &out) { r, w in
        let (pda, pg, pu) = (r[0], r[1], r[2]), (pdg, pdu) = (w[0], w[1])
        parallelChunks(pda.count, minChunk: 1 << 14) { r in
            for i in r {
                let g = pg[i], s = sigmoid(g)
                pdg[i] = pda[i] * pu[i] * s * (1 + g * (1 - s))
                pdu[i] = pda[i] * g * s
            }
        }
    }
    let dg = Tensor(shape: da.shape, data: out[0]), du = Tensor(shape: da.shape, data: out[1])
    outputGradients?("gate", dg)
    outputGradients?("up", du)
    var dx = linearBackward(dg, weight: gate)
    linearBackwardAccumulate(du, weight: up, into: &dx)
    return dx
}
