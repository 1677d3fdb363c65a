import MBQQuant
import MBQTensor

/// Per-token symmetric fake quantization of a linear's input (W-A schemes), or nothing.
@inlinable
func quantizedInput<T: BLASScalar>(_ x: Tensor<T>, bits: Int?) -> Tensor<T> {
    guard let bits else { return x }
    var q = x
    Quantize.rowSymmetricInPlace(&q, bits: bits)
    return q
}

// A Llama / Qwen2 decoder block (transformers' LlamaDecoderLayer):
//   h   = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = input_layernorm(x)
//   out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                         n2 = post_attention_layernorm(h)

/// The inputs of every linear and the outputs of the two modules the MBQ search
/// compares (docs/DESIGN.md §2 groups A-D). All [T, ·].
public struct BlockCaptures<T: BLASScalar>: Sendable {
    public var qkvInput: Tensor<T>     // n1: input of q, k, v          [T, C]
    public var oInput: Tensor<T>       // attention context              [T, heads*D]
    public var gateUpInput: Tensor<T>  // n2: input of gate, up          [T, C]
    public var downInput: Tensor<T>    // silu(gate) * up                [T, I]
    public var attentionOutput: Tensor<T>  // o_proj output              [T, C]
    public var mlpOutput: Tensor<T>        // down_proj output           [T, C]

    @inlinable
    public init(qkvInput: Tensor<T>, oInput: Tensor<T>, gateUpInput: Tensor<T>, downInput: Tensor<T>, attentionOutput: Tensor<T>, mlpOutput: Tensor<T>) {
        self.qkvInput = qkvInput
        self.oInput = oInput
        self.gateUpInput = gateUpInput
        self.downInput = downInput
        self.attentionOutput = attentionOutput
        self.mlpOutput = mlpOutput
    }
}

/// What block backward needs (no linear inputs: weight gradients are never taken).
public struct DecoderBlockSaved<T: BLASScalar>: Sendable {
    public var x: Tensor<T>           // block input  [T, C]
    public var invRms1: [T]           // [T]
    public var attention: AttentionSaved<T>
    public var h: Tensor<T>           // x + attention output [T, C]
    public var invRms2: [T]           // [T]
    public var mlp: MLPSaved<T>

    @inlinable
    public init(x: Tensor<T>, invRms1: [T], attention: AttentionSaved<T>, h: Tensor<T>, invRms2: [T], mlp: MLPSaved<T>) {
        self.x = x
        self.invRms1 = invRms1
        self.attention = attention
        self.h = h
        self.invRms2 = invRms2
        self.mlp = mlp
    }
}

public struct DecoderBlockForward<T: BLASScalar>: Sendable {
    public var output: Tensor<T>
    public var saved: DecoderBlockSaved<T>?
    public var captures: BlockCaptures<T>?

    @inlinable
    public init(output: Tensor<T>, saved: DecoderBlockSaved<T>?, captures: BlockCaptures<T>?) {
        self.output = output
        self.saved = saved
        self.captures = captures
    }
}

/// The gradients MBQ reads: w.r.t. the block input, the o_proj output (= the residual
/// stream after attention) and the down_proj output (= the block output).
public struct DecoderBlockGradients<T: BLASScalar>: Sendable {
    public var input: Tensor<T>            // [T, C]
    public var attentionOutput: Tensor<T>  // [T, C]
    public var mlpOutput: Tensor<T>        // [T, C]

    @inlinable
    public init(input: Tensor<T>, attentionOutput: Tensor<T>, mlpOutput: Tensor<T>) {
        self.input = input
        self.attentionOutput = attentionOutput
        self.mlpOutput = mlpOutput
    }
}

/// Self-attention with projections and RoPE. n1: [T, C] -> out: [T, C], ctx: [T, heads*D]
@inlinable
public func selfAttentionForward<T: BLASScalar>(_ n1: Tensor<T>, weights w: DecoderBlockWeights<T>,
                                                rope: RoPETable<T>, mask: [Bool], actBits: Int? = nil)
    -> (out: Tensor<T>, saved: AttentionSaved<T>) {
    let xin = quantizedInput(n1, bits: actBits)
    var q = linearForward(xin, weight: w.q, bias: w.qBias)
    var k = linearForward(xin, weight: w.k, bias: w.kBias)
    let v = linearForward(xin, weight: w.v, bias: w.vBias)
    ropeForward(&q, table: rope)
    ropeForward(&k, table: rope)
    let (ctx, lse) = attentionCoreForward(q: q, k: k, v: v, mask: mask, shape: w.shape)
    let out = linearForward(quantizedInput(ctx, bits: actBits), weight: w.o, bias: w.oBias)
    return (out, AttentionSaved(q: q, k: k, v: v, ctx: ctx, lse: lse))
}

/// dout: [T, C] -> dn1: [T, C]. `outputGradients` receives the gradients of the q, k and
/// v projections' outputs (before RoPE) by role.
@inlinable
public func selfAttentionBackward<T: BLASScalar>(_ dout: Tensor<T>, saved: AttentionSaved<T>,
                                                 weights w: DecoderBlockWeights<T>, rope: RoPETable<T>,
                                                 mask: [Bool], outputGradients: ((String, Tensor<T>) -> Void)? = nil) -> Tensor<T> {
    let dctx = linearBackward(dout, weight: w.o)
    var (dq, dk, dv) = attentionCoreBackward(dctx: dctx, saved: saved, mask: mask, shape: w.shape)
    ropeBackward(&dq, table: rope)
    ropeBackward(&dk, table: rope)
    if let og = outputGradients { og("q", dq); og("k", dk); og("v", dv) }
    var dn1 = linearBackward(dq, weight: w.q)
    linearBackwardAccumulate(dk, weight: w.k, into: &dn1)
    linearBackwardAccumulate(dv, weight: w.v, into: &dn1)
    return dn1
}

/// x: [T, C], mask: [T] (false = padding) -> output: [T, C]
/// `save` keeps what backward needs; `capture` keeps the linear inputs and module outputs;
/// `actBits` fake-quantizes every linear's input per token (W-A schemes; forward only).
@inlinable
public func decoderBlockForward<T: BLASScalar>(_ x: Tensor<T>, weights w: DecoderBlockWeights<T>,
                                               rope: RoPETable<T>, mask: [Bool],
                                               save: Bool = false, capture: Bool = false,
                                               actBits: Int? = nil) -> DecoderBlockForward<T> {
    precondition(actBits == nil || !save, "backward through activation quantization is not defined")
    precondition(x.rank == 2 && x.cols == w.hiddenSize && x.rows == mask.count && rope.length == x.rows,
                 "block: input \(x.shape), hidden \(w.hiddenSize), mask \(mask.count), rope \(rope.length)")
    let eps = T(w.rmsNormEps)
    let (n1, inv1) = rmsNormForward(x, weight: w.inputNorm, eps: eps)
    let (attnOut, attnSaved) = selfAttentionForward(n1, weights: w, rope: rope, mask: mask, actBits: actBits)
    let h = add(x, attnOut)
    let (n2, inv2) = rmsNormForward(h, weight: w.postAttentionNorm, eps: eps)
    let (mlpOut, downInput, mlpSaved) = mlpForward(n2, gate: w.gate, up: w.up, down: w.down, actBits: actBits)
    let out = add(h, mlpOut)
    let saved = save ? DecoderBlockSaved(x: x, invRms1: inv1, attention: attnSaved, h: h, invRms2: inv2, mlp: mlpSaved) : nil
    let captures = capture ? BlockCaptures(qkvInput: n1, oInput: attnSaved.ctx, gateUpInput: n2, downInput: downInput,
                                           attentionOutput: attnOut, mlpOutput: mlpOut) : nil
    return DecoderBlockForward(output: out, saved: saved, captures: captures)
}

/// dy: [T, C] (gradient w.r.t. the block output) -> gradients w.r.t. input and module outputs.
/// `outputGradients` receives every linear's output gradient by role ("q", ..., "down";
/// GPTQ's gradient-weighted Hessians read their per-token norms).
@inlinable
public func decoderBlockBackward<T: BLASScalar>(_ dy: Tensor<T>, saved s: DecoderBlockSaved<T>,
                                                weights w: DecoderBlockWeights<T>, rope: RoPETable<T>,
                                                mask: [Bool], outputGradients: ((String, Tensor<T>) -> Void)? = nil) -> DecoderBlockGradients<T> {
    precondition(dy.shape == s.x.shape, "block backward: grad \(dy.shape) vs input \(s.x.shape)")
    outputGradients?("down", dy)
    // out = h + mlp(norm2(h)): dL/d(down_proj out) = dy.
    let dn2 = mlpBackward(dy, saved: s.mlp, gate: w.gate, up: w.up, down: w.down, outputGradients: outputGradients)
    var dh = rmsNormBackward(dn2, x: s.h, weight: w.postAttentionNorm, invRms: s.invRms2)
    addInPlace(&dh, dy)
    // h = x + attn(norm1(x)): dL/d(o_proj out) = dh.
    outputGradients?("o", dh)
    let dn1 = selfAttentionBackward(dh, saved: s.attention, weights: w, rope: rope, mask: mask, outputGradients: outputGradients)
    var dx = rmsNormBackward(dn1, x: s.x, weight: w.inputNorm, invRms: s.invRms1)
    addInPlace(&dx, dh)
    return DecoderBlockGradients(input: dx, attentionOutput: dh, mlpOutput: dy)
}
