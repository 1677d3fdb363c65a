import MBQDevice
import MBQMethods
import MBQModel
import MBQTensor

// A decoder block's forward and backward on the accelerator, MBQModel's `decoderBlockForward`
// and `decoderBlockBackward` op for op and product for product (DeviceOps mirrors each
// CPU call). That is what makes the emulated device reproduce the CPU bit for bit, and a
// GPU agree within its own rounding; BackendConformance holds both to it.

/// The attention's linears and biases on the device (a block's, or a search candidate's
/// q, k, v with the block's o).
struct AttentionWeights {
    var q: DevicePointer, k: DevicePointer, v: DevicePointer, o: DevicePointer
    var qBias: DevicePointer, kBias: DevicePointer, vBias: DevicePointer, oBias: DevicePointer

    init(_ b: DeviceBlock) throws {
        q = try b.weight("q"); k = try b.weight("k"); v = try b.weight("v"); o = try b.weight("o")
        qBias = b.optional("qBias"); kBias = b.optional("kBias"); vBias = b.optional("vBias"); oBias = b.optional("oBias")
    }
}

/// One sequence's positions and mask on the accelerator.
struct DeviceSequence {
    let cos: DeviceArray, sin: DeviceArray, mask: DeviceArray

    init(_ device: Device, rope: RoPETable<Float>?, mask: [Bool]) throws {
        cos = try DeviceArray(device, rope?.cos ?? [0])
        sin = try DeviceArray(device, rope?.sin ?? [0])
        self.mask = try DeviceArray(device, int32: mask.map { $0 ? 1 : 0 })
    }
}

extension CUDABackend {
    func new(_ shape: [Int]) throws -> DeviceTensor { DeviceTensor(try DeviceArray(accelerator, count: shape.reduce(1, *)), shape: shape) }

    func copy(_ x: DeviceTensor) throws -> DeviceTensor {
        let y = try new(x.shape)
        try accelerator.copy(x.pointer, to: y.pointer, bytes: x.count * 4)
        return y
    }

    /// x, or a per-token fake-quantized copy (MBQModel `quantizedInput`).
    func quantizedInput(_ x: DeviceTensor, bits: Int?) throws -> DeviceTensor {
        guard let bits else { return x }
        let q = try copy(x)
        try ops.fakeQuantRows(q.pointer, rows: q.rows, cols: q.cols, bits: bits)
        return q
    }

    func linear(_ x: DeviceTensor, _ w: DevicePointer, bias: DevicePointer = 0, out: Int) throws -> DeviceTensor {
        let y = try new([x.rows, out])
        try ops.linear(x.pointer, weight: w, bias: bias, into: y.pointer, rows: x.rows, inFeatures: x.cols, outFeatures: out)
        return y
    }

    /// MBQModel `selfAttentionForward`. n1: [T, C] -> out [T, C] and what backward needs.
    func selfAttention(_ n1: DeviceTensor, _ w: AttentionWeights, shape s: AttentionShape, hidden c: Int, sequence: DeviceSequence,
                       actBits: Int?) throws -> (out: DeviceTensor, q: DeviceTensor, k: DeviceTensor, v: DeviceTensor, ctx: DeviceTensor, lse: DeviceArray) {
        let t = n1.rows, d = s.headDim
        let xin = try quantizedInput(n1, bits: actBits)
        let q = try linear(xin, w.q, bias: w.qBias, out: s.heads * d)
        let k = try linear(xin, w.k, bias: w.kBias, out: s.kvHeads * d)
        let v = try linear(xin, w.v, bias: w.vBias, out: s.kvHeads * d)
        try ops.rope(q.pointer, cos: sequence.cos.pointer, sin: sequence.sin.pointer, rows: t, heads: s.heads, headDim: d)
        try ops.rope(k.pointer, cos: sequence.cos.pointer, sin: sequence.sin.pointer, rows: t, heads: s.kvHeads, headDim: d)
        let ctx = try new([t, s.heads * d]), lse = try DeviceArray(accelerator, count: s.heads * t)
        let scores = try DeviceArray(accelerator, count: min(attentionRowBlock, t) * t)
        try ops.attentionForward(q: q.pointer, k: k.pointer, v: v.pointer, mask: sequence.mask.pointer, into: ctx.pointer, lse: lse.pointer,
                                 scores: scores.pointer, rows: t, heads: s.heads, kvHeads: s.kvHeads, headDim: d)
        let out = try linear(try quantizedInput(ctx, bits: actBits), w.o, bias: w.oBias, out: c)
        return (out, q, k, v, ctx, lse)
    }

    /// MBQModel `mlpForward`. x: [T, C] -> y [T, C], downInput [T, I], gate and up.
    func mlp(_ x: DeviceTensor, gate: DevicePointer, up: DevicePointer, down: DevicePointer, intermediate i: Int, hidden c: Int,
             actBits: Int?) throws -> (y: DeviceTensor, a: DeviceTensor, g: DeviceTensor, u: DeviceTensor) {
        let xin = try quantizedInput(x, bits: actBits)
        let g = try linear(xin, gate, out: i), u = try linear(xin, up, out: i)
        let a = try new(g.shape)
        try ops.swigluForward(gate: g.pointer, up: u.pointer, into: a.pointer, count: a.count)
        let y = try linear(try quantizedInput(a, bits: actBits), down, out: c)
        return (y, a, g, u)
    }

    /// z = x + y (MBQTensor `add`).
    func sum(_ x: DeviceTensor, _ y: DeviceTensor) throws -> DeviceTensor {
        let z = try copy(x)
        try ops.add(y.pointer, into: z.pointer, count: z.count)
        return z
    }

    func rmsNorm(_ x: DeviceTensor, _ w: DevicePointer, eps: Double) throws -> (y: DeviceTensor, invRms: DeviceArray) {
        let y = try new(x.shape), inv = try DeviceArray(accelerator, count: x.rows)
        try ops.rmsNormForward(x.pointer, weight: w, eps: Float(eps), into: y.pointer, invRms: inv.pointer, rows: x.rows, cols: x.cols)
        return (y, inv)
    }

    func rmsNormBackward(_ dy: DeviceTensor, x: DeviceTensor, _ w: DevicePointer, invRms: DeviceArray) throws -> DeviceTensor {
        let dx = try new(x.shape)
        try ops.rmsNormBackward(dy.pointer, x: x.pointer, weight: w, invRms: invRms.pointer, into: dx.pointer, rows: x.rows, cols: x.cols)
        return dx
    }

    /// MBQModel `decoderBlockForward`.
    func forward(_ x: DeviceTensor, _ b: DeviceBlock, sequence: DeviceSequence, save: Bool, capture: Bool, actBits: Int?) throws
        -> (output: DeviceTensor, saved: DeviceSaved?, captures: BackendCaptures?) {
        let c = b.hiddenSize
        let (n1, inv1) = try rmsNorm(x, b.weight("inputNorm"), eps: b.rmsNormEps)
        let attn = try selfAttention(n1, try AttentionWeights(b), shape: b.attention, hidden: c, sequence: sequence, actBits: actBits)
        let h = try sum(x, attn.out)
        let (n2, inv2) = try rmsNorm(h, b.weight("postAttentionNorm"), eps: b.rmsNormEps)
        let m = try mlp(n2, gate: b.weight("gate"), up: b.weight("up"), down: b.weight("down"), intermediate: b.intermediateSize,
                        hidden: c, actBits: actBits)
        let out = try sum(h, m.y)
        let saved = save ? DeviceSaved(x: x, invRms1: inv1, q: attn.q, k: attn.k, v: attn.v, ctx: attn.ctx, lse: attn.lse,
                                       h: h, invRms2: inv2, gate: m.g, up: m.u) : nil
        let captures = capture ? BackendCaptures(qkvInput: n1, oInput: attn.ctx, gateUpInput: n2, downInput: m.a,
                                                         attentionOutput: attn.out, mlpOutput: m.y) : nil
        return (out, saved, captures)
    }

    /// MBQModel `decoderBlockBackward`; `outputGradient` receives each linear's output
    /// gradient by role, in the CPU's order.
    func backward(_ dy: DeviceTensor, _ s: DeviceSaved, _ b: DeviceBlock, sequence: DeviceSequence,
                  outputGradient: ((String, DeviceTensor) throws -> Void)?) throws -> (input: DeviceTensor, attentionOutput: DeviceTensor) {
        let t = dy.rows, c = b.hiddenSize, i = b.intermediateSize, a = b.attention, d = a.headDim
        try outputGradient?("down", dy)
        // mlpBackward
        let da = try new([t, i])
        try ops.linearBackward(dy.pointer, weight: b.weight("down"), into: da.pointer, rows: t, inFeatures: i, outFeatures: c)
        let dg = try new([t, i]), du = try new([t, i])
        try ops.swigluBackward(da.pointer, gate: s.gate.pointer, up: s.up.pointer, dGate: dg.pointer, dUp: du.pointer, count: t * i)
        try outputGradient?("gate", dg)
        try outputGradient?("up", du)
        let dn2 = try new([t, c])
        try ops.linearBackward(dg.pointer, weight: b.weight("gate"), into: dn2.pointer, rows: t, inFeatures: c, outFeatures: i)
        try ops.linearBackward(du.pointer, weight: b.weight("up"), into: dn2.pointer, rows: t, inFeatures: c, outFeatures: i, accumulate: true)
        let dh = try rmsNormBackward(dn2, x: s.h, b.weight("postAttentionNorm"), invRms: s.invRms2)
        try ops.add(dy.pointer, into: dh.pointer, count: dh.count)
        try outputGradient?("o", dh)
        // selfAttentionBackward
        let dctx = try new([t, a.heads * d])
        try ops.linearBackward(dh.pointer, weight: b.weight("o"), into: dctx.pointer, rows: t, inFeatures: a.heads * d, outFeatures: c)
        let dq = try new([t, a.heads * d]), dk = try new([t, a.kvHeads * d]), dv = try new([t, a.kvHeads * d])
        let rb = min(attentionRowBlock, t)
        let p = try DeviceArray(accelerator, count: rb * t), dp = try DeviceArray(accelerator, count: rb * t)
        try ops.attentionBackward(dctx: dctx.pointer, q: s.q.pointer, k: s.k.pointer, v: s.v.pointer, ctx: s.ctx.pointer, lse: s.lse.pointer,
                                  mask: sequence.mask.pointer, dq: dq.pointer, dk: dk.pointer, dv: dv.pointer, p: p.pointer, dp: dp.pointer,
                                  rows: t, heads: a.heads, kvHeads: a.kvHeads, headDim: d)
        try ops.rope(dq.pointer, cos: sequence.cos.pointer, sin: sequence.sin.pointer, rows: t, heads: a.heads, headDim: d, backward: true)
        try ops.rope(dk.pointer, cos: sequence.cos.pointer, sin: sequence.sin.pointer, rows: t, heads: a.kvHeads, headDim: d, backward: true)
        try outputGradient?("q", dq)
        try outputGradient?("k", dk)
        try outputGradient?("v", dv)
        let dn1 = try new([t, c])
        try ops.linearBackward(dq.pointer, weight: b.weight("q"), into: dn1.pointer, rows: t, inFeatures: c, outFeatures: a.heads * d)
        try ops.linearBackward(dk.pointer, weight: b.weight("k"), into: dn1.pointer, rows: t, inFeatures: c, outFeatures: a.kvHeads * d,
                               accumulate: true)
        try ops.linearBackward(dv.pointer, weight: b.weight("v"), into: dn1.pointer, rows: t, inFeatures: c, outFeatures: a.kvHeads * d,
                               accumulate: true)
        let dx = try rmsNormBackward(dn1, x: s.x, b.weight("inputNorm"), invRms: s.invRms1)
        try ops.add(dh.pointer, into: dx.pointer, count: dx.count)
        return (dx, dh)
    }
}
