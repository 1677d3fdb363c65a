import Foundation
import MBQDevice
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor

/// The compute backend on a `Device`: a GPU through CUDA (`CUDADevice`), or the emulated
/// device, which runs the same kernels' source and the same products on the host (issue
/// 25). Weights, activations, captures and saved forwards live on the device; the block
/// forward and backward and the MBQ search's candidates run there, each op mirroring the
/// CPU reference's call (DeviceBlockPasses.swift, DeviceOps), so that the emulated device
/// reproduces `CPUBackend` bit for bit and a GPU agrees within its rounding
/// (`BackendConformance`).
///
/// What runs on the host, reading the device's values back (each once per layer or per
/// sample, not per grid point): the gradient means' last sums, the finiteness check,
/// SmoothQuant's scales, applying scales, quantizing, and GPTQ.
public struct CUDABackend: ComputeBackend {
    public let ops: DeviceOps
    /// The device it computes on.
    public var accelerator: Device { ops.device }
    let cpu = CPUBackend()
    let widened: WidenedLinears

    /// `precision`: strict fp32 GEMMs (the default, for parity with the CPU) or bf16
    /// inputs with fp32 accumulation (`GEMMPrecision`).
    public init(device: Device, precision: GEMMPrecision = .strict) {
        ops = DeviceOps(device: device, precision: precision)
        widened = WidenedLinears(ops: ops)
    }

    public var name: String { (accelerator is EmulatedDevice ? "cuda-emulated" : "cuda") + (ops.precision == .bf16 ? " bf16" : "") }

    /// What it computes on, as a worker registers it: the GPU's name and memory, or the
    /// emulated device and the CPU under it.
    public var device: String {
        let gemms = ops.precision == .bf16 ? ", bf16 GEMMs" : ""
        guard accelerator is EmulatedDevice else {
            let total = (try? accelerator.memoryInfo().total) ?? 0
            return "\(accelerator.name) (\(String(format: "%.0f", Double(total) / Double(1 << 30))) GiB\(gemms))"
        }
        return "emulated CUDA device on \(cpu.device)\(gemms)"
    }

    public var deviceMemoryBytes: UInt64? { (try? accelerator.memoryInfo()).map { UInt64($0.free) } }

    func tensor(_ x: BackendTensor) -> DeviceTensor {
        guard let t = x as? DeviceTensor else { preconditionFailure("a \(type(of: x)) handed to the CUDA backend") }
        return t
    }
    func block(_ b: BackendBlock) -> DeviceBlock {
        guard let d = b as? DeviceBlock else { preconditionFailure("a \(type(of: b)) handed to the CUDA backend") }
        return d
    }

    // MARK: memory

    /// Norms and biases in fp32; the linears as bf16 or fp16 bits when every one of their
    /// values is exactly one (a bf16 or fp16 checkpoint's, widened exactly when read), else fp32.
    public func loadBlock(_ w: DecoderBlockWeights<Float>) throws -> BackendBlock {
        var arrays: [String: DeviceArray] = [:], shapes: [String: [Int]] = [:]
        func put(_ key: String, _ t: Tensor<Float>) throws { arrays[key] = try DeviceArray(accelerator, t.data); shapes[key] = t.shape }
        for (key, path) in DeviceBlock.norms { try put(key, w[keyPath: path]) }
        for (key, path) in DeviceBlock.biases { if let t = w[keyPath: path] { try put(key, t) } }
        let linears = DecoderBlockWeights<Float>.linears.map { ($0.role, w[keyPath: $0.path]) }
        for dtype in [DeviceBlock.Narrow.bf16, .fp16] {
            var bits: [String: [UInt16]] = [:]
            for (role, t) in linears {
                guard let b = Self.narrowed(t.data, to: dtype) else { break }
                bits[role] = b
            }
            guard bits.count == linears.count else { continue }
            var stored: [String: DeviceArray] = [:]
            for (role, t) in linears {
                stored[role] = try DeviceArray(accelerator, bits: bits[role]!)
                shapes[role] = t.shape
            }
            return DeviceBlock(arrays: arrays, narrow: (dtype, stored), shapes: shapes, attention: w.shape, rmsNormEps: w.rmsNormEps,
                               widened: widened)
        }
        for (role, t) in linears { try put(role, t) }
        return DeviceBlock(arrays: arrays, narrow: nil, shapes: shapes, attention: w.shape, rmsNormEps: w.rmsNormEps, widened: widened)
    }

    /// `values` as 16-bit bits of `dtype` when every one is exactly such a value (nil at
    /// the first that is not).
    static func narrowed(_ values: [Float], to dtype: DeviceBlock.Narrow) -> [UInt16]? {
        var out = [UInt16](repeating: 0, count: values.count)
        let exact = values.withUnsafeBufferPointer { p in
            out.withUnsafeMutableBufferPointer { q in
                for i in 0..<p.count {
                    let h = dtype == .bf16 ? HalfPrecision.floatToBF16(p[i]) : HalfPrecision.floatToFP16(p[i])
                    let back = dtype == .bf16 ? HalfPrecision.bf16ToFloat(h) : HalfPrecision.fp16ToFloat(h)
                    guard back.bitPattern == p[i].bitPattern else { return false }
                    q[i] = h
                }
                return true
            }
        }
        return exact ? out : nil
    }

    public func loadHead(norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float) throws -> BackendHead {
        let (vocab, hidden) = (lmHead.shape[0], lmHead.shape[1])
        for dtype in [DeviceBlock.Narrow.bf16, .fp16] {
            if let bits = Self.narrowed(lmHead.data, to: dtype) {
                return DeviceHead(norm: try DeviceArray(accelerator, norm.data), lmHead: try DeviceArray(accelerator, bits: bits), narrow: dtype,
                                  vocab: vocab, hidden: hidden, eps: eps)
            }
        }
        return DeviceHead(norm: try DeviceArray(accelerator, norm.data), lmHead: try DeviceArray(accelerator, lmHead.data), narrow: nil,
                          vocab: vocab, hidden: hidden, eps: eps)
    }

    public func upload(_ x: Tensor<Float>) throws -> BackendTensor { DeviceTensor(try DeviceArray(accelerator, x.data), shape: x.shape) }

    public func download(_ x: BackendTensor) throws -> Tensor<Float> {
        let t = tensor(x)
        return Tensor(shape: t.shape, data: Array(try t.array.download().prefix(t.count)))
    }

    public func downloadBlock(_ b: BackendBlock) throws -> DecoderBlockWeights<Float> {
        let d = block(b)
        func get(_ key: String) throws -> Tensor<Float> {
            guard let shape = d.shapes[key] else { preconditionFailure("the device block has no \(key)") }
            let n = shape.reduce(1, *)
            return Tensor(shape: shape, data: try accelerator.download(try d.weight(key), count: n))
        }
        func maybe(_ key: String) throws -> Tensor<Float>? { d.arrays[key] == nil ? nil : try get(key) }
        return DecoderBlockWeights(inputNorm: try get("inputNorm"), postAttentionNorm: try get("postAttentionNorm"),
                                   q: try get("q"), k: try get("k"), v: try get("v"), o: try get("o"),
                                   qBias: try maybe("qBias"), kBias: try maybe("kBias"), vBias: try maybe("vBias"), oBias: try maybe("oBias"),
                                   gate: try get("gate"), up: try get("up"), down: try get("down"),
                                   shape: d.attention, rmsNormEps: d.rmsNormEps)
    }

    // MARK: the model

    public func blockForward(_ x: BackendTensor, _ b: BackendBlock, rope: RoPETable<Float>, mask: [Bool],
                             save: Bool, capture: Bool, actBits: Int?) throws -> BackendForward {
        precondition(actBits == nil || !save, "backward through activation quantization is not defined")
        let f = try forward(tensor(x), block(b), sequence: DeviceSequence(accelerator, rope: rope, mask: mask), save: save, capture: capture,
                            actBits: actBits)
        return BackendForward(output: f.output, saved: f.saved, captures: f.captures)
    }

    public func blockBackward(_ dy: BackendTensor, _ saved: BackendSaved, _ b: BackendBlock,
                              rope: RoPETable<Float>, mask: [Bool], outputNorms: Bool) throws -> BackendGradients {
        guard let s = saved as? DeviceSaved else { preconditionFailure("a \(type(of: saved)) handed to the CUDA backend") }
        var norms: [String: [Float]] = [:]
        let g = tensor(dy)
        let r = try backward(g, s, block(b), sequence: DeviceSequence(accelerator, rope: rope, mask: mask),
                             outputGradient: outputNorms ? { role, d in norms[role] = GPTQLayer.rowSquaredNorms(try download(d)) } : nil)
        return BackendGradients(input: r.input, attentionOutput: r.attentionOutput, mlpOutput: g, outputSquaredNorms: norms)
    }

    /// MBQModel `lossHeadForward` + `lossHeadBackward` on the device: the rows that predict
    /// a caption label gathered, normed and projected to [P, vocab] log-probabilities; the
    /// loss is their targets' values summed on the host in the CPU's order; the gradient
    /// (softmax − one-hot) / P goes back through lm_head and the norm, scattered into [T, C].
    public func lossGradient(_ h: BackendTensor, _ head: BackendHead, labels: [Int]) throws -> (loss: Float, count: Int, grad: BackendTensor) {
        guard let hd = head as? DeviceHead else { preconditionFailure("a \(type(of: head)) handed to the CUDA backend") }
        let x = tensor(h), t = x.rows, c = hd.hidden, v = hd.vocab
        precondition(labels.count == t && x.cols == c, "loss head: h \(x.shape), lm_head [\(v), \(c)], labels \(labels.count)")
        let rows = (0..<max(0, t - 1)).filter { labels[$0 + 1] != -100 }
        let targets = rows.map { labels[$0 + 1] }
        precondition(targets.allSatisfy { $0 >= 0 && $0 < v }, "label outside the vocabulary")
        let dh = try new([t, c])
        try ops.fill(dh.pointer, with: 0, count: t * c)
        guard !rows.isEmpty else { return (0, 0, dh) }
        let p = rows.count
        let rowIndex = try DeviceArray(accelerator, int64: rows), targetIndex = try DeviceArray(accelerator, int64: targets)
        let gathered = try new([p, c])
        try ops.gatherRows(x.pointer, indices: rowIndex.pointer, count: p, cols: c, into: gathered.pointer)
        let (normed, inv) = try rmsNorm(gathered, hd.norm.pointer, eps: Double(hd.eps))
        var widened: DeviceArray? = nil
        if let narrow = hd.narrow {
            widened = try DeviceArray(accelerator, count: v * c)
            try ops.widen(hd.lmHead.pointer, bf16: narrow == .bf16, into: widened!.pointer, count: v * c)
        }
        let w = widened?.pointer ?? hd.lmHead.pointer
        let logits = try linear(normed, w, out: v)
        try ops.logSoftmaxRows(logits.pointer, rows: p, cols: v)
        let picked = try DeviceArray(accelerator, count: p)
        try ops.pickPerRow(logits.pointer, indices: targetIndex.pointer, rows: p, cols: v, into: picked.pointer)
        var total: Float = 0
        for lp in try picked.download() { total -= lp }
        try ops.exp(logits.pointer, count: p * v)
        try ops.addPerRow(logits.pointer, indices: targetIndex.pointer, value: -1, rows: p, cols: v)
        try ops.scale(logits.pointer, by: 1 / Float(p), count: p * v)
        let dnormed = try new([p, c])
        try ops.linearBackward(logits.pointer, weight: w, into: dnormed.pointer, rows: p, inFeatures: c, outFeatures: v)
        let dg = try rmsNormBackward(dnormed, x: gathered, hd.norm.pointer, invRms: inv)
        try ops.scatterRows(dg.pointer, indices: rowIndex.pointer, count: p, cols: c, into: dh.pointer)
        return (total / Float(p), p, dh)
    }

    /// Each row's Σ|x| on the device (`row_error` against zeros: x − 0 is x exactly), the
    /// rows added in Double on the host (`GradientStatistics.meanAbs`).
    public func meanAbs(_ x: BackendTensor, rows: [Bool]) throws -> Double {
        let t = tensor(x)
        let zeros = try new(t.shape)
        try ops.fill(zeros.pointer, with: 0, count: zeros.count)
        let sums = try rowErrors(t, zeros, squared: false)
        var s = 0.0, n = 0
        for r in 0..<t.rows where rows[r] { s += Double(sums[r]); n += t.cols }
        return s / Double(n)
    }

    public func allFinite(_ x: BackendTensor) throws -> Bool { MBQTensor.allFinite(try download(x)) }

    // MARK: the search's ops

    public func addColumnAbsSums(_ x: BackendTensor, rows: [Bool], into sums: inout [Double]) throws {
        let t = tensor(x)
        precondition(sums.count == t.cols && rows.count == t.rows, "column sums: \(sums.count) sums, \(rows.count) rows for \(t.shape)")
        let d = try DeviceArray(accelerator, count: 2 * t.cols), mask = try DeviceArray(accelerator, int32: rows.map { $0 ? 1 : 0 })
        try sums.withUnsafeBytes { try accelerator.copy($0, to: d.pointer) }
        try ops.columnAbsSums(t.pointer, mask: mask.pointer, rows: t.rows, cols: t.cols, into: d.pointer)
        try sums.withUnsafeMutableBytes { try accelerator.copy(d.pointer, to: $0) }
        try accelerator.synchronize()
    }

    public func gatherRows(_ parts: [(BackendTensor, [Int])]) throws -> BackendTensor {
        let cols = parts.first.map { tensor($0.0).cols } ?? 0
        let out = try new([parts.reduce(0) { $0 + $1.1.count }, cols])
        var at = 0
        for (x, rows) in parts where !rows.isEmpty {
            let idx = try DeviceArray(accelerator, int64: rows)
            try ops.gatherRows(tensor(x).pointer, indices: idx.pointer, count: rows.count, cols: cols, into: out.array.at(at * cols))
            at += rows.count
        }
        return out
    }

    public func concatRows(_ a: BackendTensor, _ b: BackendTensor) throws -> BackendTensor {
        let x = tensor(a), y = tensor(b)
        let out = try new([x.rows + y.rows, x.cols])
        try accelerator.copy(x.pointer, to: out.pointer, bytes: x.count * 4)
        try accelerator.copy(y.pointer, to: out.array.at(x.count), bytes: y.count * 4)
        return out
    }

    public func splitRows(_ x: BackendTensor, at n: Int) throws -> (BackendTensor, BackendTensor) {
        let t = tensor(x), c = t.cols
        let head = try new([n, c]), rest = try new([t.rows - n, c])
        try accelerator.copy(t.pointer, to: head.pointer, bytes: n * c * 4)
        try accelerator.copy(t.array.at(n * c), to: rest.pointer, bytes: rest.count * 4)
        return (head, rest)
    }

    /// `ScaleSearch.searchWeight` on the device: weight-only group quantization in one
    /// kernel (Q(W diag(s)) diag(s)⁻¹); otherwise W diag(s), quantized, and divided back
    /// unless activations are quantized too.
    public func candidateWeights(_ g: SearchGroup, _ b: BackendBlock, scales: [Float], options o: SearchOptions) throws -> BackendCandidate {
        let d = block(b)
        let s = try DeviceArray(accelerator, scales)
        var out: [String: DeviceArray] = [:]
        for role in g.spec.roles {
            guard let shape = d.shapes[role] else { preconditionFailure("the device block has no \(role)") }
            let (rows, cols) = (shape[0], shape[1])
            let w = try DeviceArray(accelerator, count: rows * cols)
            if o.actBits == nil, case let .groupAsymmetric(bits, group) = o.weights {
                try ops.fakeQuantGroups(d.weight(role), scales: s.pointer, into: w.pointer, rows: rows, cols: cols, group: group, bits: bits)
            } else {
                let scaled = try DeviceArray(accelerator, count: rows * cols)
                try accelerator.copy(d.weight(role), to: scaled.pointer, bytes: rows * cols * 4)
                try ops.scaleColumns(scaled.pointer, by: s.pointer, rows: rows, cols: cols)
                switch o.weights {
                case let .groupAsymmetric(bits, group):
                    try ops.fakeQuantGroups(scaled.pointer, into: w.pointer, rows: rows, cols: cols, group: group, bits: bits)
                case let .channelSymmetric(bits):
                    try accelerator.copy(scaled.pointer, to: w.pointer, bytes: rows * cols * 4)
                    try ops.fakeQuantRows(w.pointer, rows: rows, cols: cols, bits: bits)
                }
                if o.actBits == nil { try ops.scaleColumns(w.pointer, by: s.pointer, rows: rows, cols: cols, divide: true) }
            }
            out[role] = w
        }
        return DeviceCandidate(out)
    }

    /// `ScaleSearch.runModule` on the accelerator.
    public func runCandidate(_ g: SearchGroup, _ b: BackendBlock, _ c: BackendCandidate, input x: BackendTensor, scales: [Float],
                             rope: RoPETable<Float>?, mask: [Bool], options o: SearchOptions) throws -> BackendTensor {
        guard let cand = c as? DeviceCandidate else { preconditionFailure("a \(type(of: c)) handed to the CUDA backend") }
        let d = block(b)
        func q(_ role: String) -> DevicePointer {
            guard let a = cand.weights[role] else { preconditionFailure("no candidate weight for \(role)") }
            return a.pointer
        }
        var input = tensor(x)
        if let bits = o.actBits {   // ScaleSearch.quantizedScaledInput: x / s, then per token
            input = try copy(input)
            let s = try DeviceArray(accelerator, scales)
            try ops.scaleColumns(input.pointer, by: s.pointer, rows: input.rows, cols: input.cols, divide: true)
            try ops.fakeQuantRows(input.pointer, rows: input.rows, cols: input.cols, bits: bits)
        }
        let hidden = d.hiddenSize
        switch g.spec.module {
        case .attention:
            var w = try AttentionWeights(d)
            w.q = q("q"); w.k = q("k"); w.v = q("v")
            return try selfAttention(input, w, shape: d.attention, hidden: hidden, sequence: DeviceSequence(accelerator, rope: rope, mask: mask),
                                     actBits: nil).out
        case let .linear(bias):
            // The scaled linear with the block's bias, if the table names one and the block has it.
            let role = g.spec.roles[0]
            let key = bias.flatMap { b in DeviceBlock.biases.first { ($0.path as AnyKeyPath) == (b as AnyKeyPath) }?.key }
            return try linear(input, q(role), bias: key.map(d.optional) ?? 0, out: d.shapes[role]?[0] ?? 0)
        case .mlp:
            return try mlp(input, gate: q("gate"), up: q("up"), down: d.weight("down"), intermediate: d.intermediateSize, hidden: hidden,
                           actBits: nil).y
        }
    }

    public func rowErrors(_ a: BackendTensor, _ b: BackendTensor, squared: Bool) throws -> [Float] {
        let x = tensor(a), y = tensor(b)
        precondition(x.shape == y.shape, "row errors: \(x.shape) vs \(y.shape)")
        let out = try DeviceArray(accelerator, count: x.rows)
        try ops.rowError(x.pointer, y.pointer, into: out.pointer, rows: x.rows, cols: x.cols, squared: squared)
        return Array(try out.download().prefix(x.rows))
    }

    // MARK: on the host

    func hostSample(_ s: BackendLayerSample) throws -> LayerSample {
        LayerSample(captures: try s.captures.host(download), rope: s.rope, attention: s.attention, vision: s.vision, caption: s.caption)
    }

    public func smoothQuantScales(_ b: BackendBlock, samples: SampleChunks<BackendLayerSample>) throws -> (qkv: [Float], gateUp: [Float]) {
        try ApplyScales.smoothQuantLayer(try downloadBlock(b), samples: samples.map(hostSample))
    }

    public func applyScales(_ scales: [(group: SearchGroup, scales: [Float])], to b: BackendBlock) throws -> BackendBlock {
        var w = try downloadBlock(b)
        for (g, s) in scales { ApplyScales.apply(g, scales: s, to: &w) }
        return try loadBlock(w)
    }

    public func quantize(_ b: BackendBlock, with q: WeightQuantizer, precision: ScalePrecision) throws
        -> (block: BackendBlock, codes: [String: QuantizedWeight]) {
        var w = try downloadBlock(b)
        let codes = ApplyScales.quantizeLinears(&w, with: q, precision: precision)
        return (try loadBlock(w), codes)
    }

    public func gptqLayer(_ l: Int, _ b: BackendBlock, samples: SampleChunks<(sample: BackendLayerSample, weights: TokenWeightSet)>,
                          settings: GPTQSettings, perLinear: Bool, rtn: WeightQuantizer,
                          precision: ScalePrecision) throws -> (block: BackendBlock, codes: [String: QuantizedWeight], reports: [GPTQLinearReport]) {
        let hessians = LayerHessians(perLinear: perLinear)
        for i in 0..<samples.count {
            for s in try samples.read(i) { hessians.add(try hostSample(s.sample).captures, weights: s.weights) }
        }
        let q = try GPTQLayer.quantize(try downloadBlock(b), layer: l, hessians: hessians, settings: settings, rtn: rtn, precision: precision)
        return (try loadBlock(q.block), q.codes, q.reports)
    }

    // MARK: rates

    /// GFLOP/s of n×n×n fp32 GEMMs on the accelerator, the best of a few runs after one warm-up.
    public func measureGEMMRates(sizes: [Int]) -> [Double] {
        sizes.map { n in
            var rng = SeededRandom(seed: UInt64(n))
            guard let a = try? DeviceArray(accelerator, rng.normalTensor([n, n]).data), let b = try? DeviceArray(accelerator, rng.normalTensor([n, n]).data),
                  let c = try? DeviceArray(accelerator, count: n * n) else { return 0 }
            let g = GEMM(transA: .none, transB: .none, m: n, n: n, k: n, a: a.pointer, lda: n, b: b.pointer, ldb: n, c: c.pointer, ldc: n)
            var best = 0.0
            for run in 0..<4 {
                let t0 = DispatchTime.now().uptimeNanoseconds
                guard (try? accelerator.gemm(g)) != nil, (try? accelerator.synchronize()) != nil else { return 0 }
                let rate = 2 * Double(n * n * n) / (Double(DispatchTime.now().uptimeNanoseconds - t0))
                if run > 0 { best = max(best, rate) }
            }
            return best
        }
    }

    /// The search's group quantizer on a [2048, 4096] weight (8 bytes per weight), in GB/s
    /// per engine thread, as `CPUBackend.measureLoopGBps` reports it.
    public func measureLoopGBps() -> Double {
        let rows = 2048, cols = 4096
        guard let w = try? DeviceArray(accelerator, (0..<(rows * cols)).map { Float(($0 &* 40503) & 1023) - 511.5 }),
              let out = try? DeviceArray(accelerator, count: rows * cols) else { return 0 }
        var best = 0.0
        for run in 0..<4 {
            let t0 = DispatchTime.now().uptimeNanoseconds
            guard (try? ops.fakeQuantGroups(w.pointer, into: out.pointer, rows: rows, cols: cols, group: 128, bits: 4)) != nil,
                  (try? accelerator.synchronize()) != nil else { return 0 }
            let rate = Double(rows * cols) * 8 / Double(DispatchTime.now().uptimeNanoseconds - t0)
            if run > 0 { best = max(best, rate) }
        }
        return best / Double(max(1, EngineThreads.count))
    }
}
