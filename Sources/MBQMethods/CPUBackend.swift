import Foundation
import MBQModel
import MBQQuant
import MBQTensor

/// The reference backend: host fp32 tensors, OpenBLAS GEMMs, the model's own forward
/// and backward (proven against transformers by the parity tests). Its handles wrap
/// host values, so uploads and downloads cost nothing.
///
/// With `keepStoredPrecision` (the workers, which hold their layers for the whole job), a
/// loaded block whose linear weights are all bf16 values (a bf16 checkpoint's, widened
/// exactly) is kept as bf16 and widened to fp32 when used: half the memory, the same
/// numbers. Scaled and quantized blocks are fp32 and stay so. The widened copy is the
/// backend's one fp32 working copy of a layer (`MemoryNeeds.layerWorkingBytes`): kept for
/// the next use of the same block, overwritten in place for another.
public struct CPUBackend: ComputeBackend {
    public let keepStoredPrecision: Bool
    let widened = WidenedBlock()
    public init(keepStoredPrecision: Bool = false) { self.keepStoredPrecision = keepStoredPrecision }
    public var name: String { "cpu" }

    /// The CPU's model name (/proc/cpuinfo) and its cores.
    public var device: String {
        let info = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = info.split(separator: "\n").first { $0.hasPrefix("model name") }
            .flatMap { $0.split(separator: ":", maxSplits: 1).last }
            .map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
        return "\(model) (\(ProcessInfo.processInfo.activeProcessorCount) cores)"
    }

    final class HostTensor: BackendTensor {
        let value: Tensor<Float>
        init(_ value: Tensor<Float>) { self.value = value }
        var shape: [Int] { value.shape }
    }

    final class HostBlock: BackendBlock {
        let weights: DecoderBlockWeights<Float>
        init(_ weights: DecoderBlockWeights<Float>) { self.weights = weights }
        var parameterCount: Int { weights.parameterCount }
        var residentBytes: Int { weights.parameterCount * 4 }
        var linearShapes: [String: [Int]] {
            Dictionary(uniqueKeysWithValues: DecoderBlockWeights<Float>.linears.map { ($0.role, weights[keyPath: $0.path].shape) })
        }
    }

    /// A search candidate's weights by role.
    final class HostCandidate: BackendCandidate {
        let weights: [String: Tensor<Float>]
        init(_ weights: [String: Tensor<Float>]) { self.weights = weights }
    }

    /// A block whose seven linears are held as bf16 bits (norms and biases stay fp32).
    final class BF16Block: BackendBlock {
        let template: DecoderBlockWeights<Float>   // norms, biases; linears emptied
        let linears: [[UInt16]]                    // in DecoderBlockWeights.linears order
        let shapes: [[Int]]
        let parameterCount: Int

        /// nil when some linear weight is not a bf16 value.
        init?(_ w: DecoderBlockWeights<Float>) {
            var bits: [[UInt16]] = []
            for (_, path) in DecoderBlockWeights<Float>.linears {
                let t = w[keyPath: path]
                var h = [UInt16](repeating: 0, count: t.count)
                var exact = true
                t.data.withUnsafeBufferPointer { p in
                    h.withUnsafeMutableBufferPointer { q in
                        for i in 0..<p.count {
                            let b = p[i].bitPattern
                            if b & 0xFFFF != 0 { exact = false; break }
                            q[i] = UInt16(truncatingIfNeeded: b >> 16)
                        }
                    }
                }
                guard exact else { return nil }
                bits.append(h)
            }
            var t = w
            for (_, path) in DecoderBlockWeights<Float>.linears { t[keyPath: path] = Tensor(shape: [0], data: []) }
            template = t
            linears = bits
            shapes = DecoderBlockWeights<Float>.linears.map { w[keyPath: $0.path].shape }
            parameterCount = w.parameterCount
        }

        var residentBytes: Int { parameterCount * 4 - linears.reduce(0) { $0 + $1.count } * 2 }
        var linearShapes: [String: [Int]] {
            Dictionary(uniqueKeysWithValues: zip(DecoderBlockWeights<Float>.linears.map(\.role), shapes).map { ($0, $1) })
        }

        /// The fp32 block (exact), its linears written into `old`'s arrays where no one
        /// else holds them and the shapes agree: into fresh pages, widening a 72B-shaped
        /// layer cost 3.3-5.3 ns per weight (measured on an AMD EPYC), mostly page faults.
        func widened(reusing old: inout DecoderBlockWeights<Float>?) -> DecoderBlockWeights<Float> {
            var w = template
            for (((_, path), h), shape) in zip(zip(DecoderBlockWeights<Float>.linears, linears), shapes) {
                var data: [Float]
                if old != nil, old![keyPath: path].shape == shape {
                    data = old![keyPath: path].data
                    old![keyPath: path] = Tensor(shape: [0], data: [])  // `data` is now its buffer's only owner, unless a caller still holds it
                } else {
                    data = [Float](unsafeUninitializedCapacity: h.count) { _, n in n = h.count }
                }
                data.withUnsafeMutableBufferPointer { buf in
                    h.withUnsafeBufferPointer { p in
                        for i in 0..<p.count { buf[i] = Float(bitPattern: UInt32(p[i]) << 16) }
                    }
                }
                w[keyPath: path] = Tensor(shape: shape, data: data)
            }
            return w
        }
    }

    /// The fp32 copy of the last bf16-held block used. A later use of that block takes it
    /// as is (the backward's recompute and its gradients, a stage of one layer); another
    /// block's widening overwrites its arrays (copy-on-write keeps any that a caller still
    /// holds, such as a downloaded block, intact).
    final class WidenedBlock: @unchecked Sendable {
        private let lock = NSLock()
        private weak var owner: BF16Block?   // weak: a freed block can never match a new one
        private var weights: DecoderBlockWeights<Float>?

        func weights(of b: BF16Block) -> DecoderBlockWeights<Float> {
            lock.lock(); defer { lock.unlock() }
            if let w = weights, owner === b { return w }
            var reuse: DecoderBlockWeights<Float>? = nil
            swap(&reuse, &weights)   // the arrays' only owner is now `reuse`
            let w = b.widened(reusing: &reuse)
            weights = w
            owner = b
            return w
        }
    }

    final class HostHead: BackendHead {
        let norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float
        init(norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float) { self.norm = norm; self.lmHead = lmHead; self.eps = eps }
    }

    final class HostSaved: BackendSaved {
        let value: DecoderBlockSaved<Float>
        init(_ value: DecoderBlockSaved<Float>) { self.value = value }
    }

    // A handle from another backend is a programmer's mistake, not bad input.
    func host(_ x: BackendTensor) -> Tensor<Float> {
        guard let h = x as? HostTensor else { preconditionFailure("a \(type(of: x)) handed to the CPU backend") }
        return h.value
    }
    func host(_ b: BackendBlock) -> DecoderBlockWeights<Float> {
        if let h = b as? HostBlock { return h.weights }
        if let h = b as? BF16Block { return widened.weights(of: h) }
        preconditionFailure("a \(type(of: b)) handed to the CPU backend")
    }
    /// A host sample as the backend's handles (wrapping, no copy).
    func handles(_ s: LayerSample) -> BackendLayerSample {
        BackendLayerSample(captures: BackendCaptures(s.captures, HostTensor.init), rope: s.rope, attention: s.attention,
                           vision: s.vision, caption: s.caption)
    }
    func host(_ s: BackendLayerSample) -> LayerSample {
        LayerSample(captures: s.captures.host(host), rope: s.rope, attention: s.attention, vision: s.vision, caption: s.caption)
    }

    // MARK: memory

    public func loadBlock(_ w: DecoderBlockWeights<Float>) -> BackendBlock {
        if keepStoredPrecision, let b = BF16Block(w) { return b }
        return HostBlock(w)
    }
    public func loadHead(norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float) -> BackendHead {
        HostHead(norm: norm, lmHead: lmHead, eps: eps)
    }
    public func upload(_ x: Tensor<Float>) -> BackendTensor { HostTensor(x) }
    public func download(_ x: BackendTensor) -> Tensor<Float> { host(x) }
    public func downloadBlock(_ b: BackendBlock) -> DecoderBlockWeights<Float> { host(b) }

    // MARK: the model

    public func blockForward(_ x: BackendTensor, _ b: BackendBlock, rope: RoPETable<Float>, mask: [Bool],
                             save: Bool, capture: Bool, actBits: Int?) -> BackendForward {
        let f = decoderBlockForward(host(x), weights: host(b), rope: rope, mask: mask, save: save, capture: capture, actBits: actBits)
        return BackendForward(output: HostTensor(f.output), saved: f.saved.map(HostSaved.init),
                              captures: f.captures.map { BackendCaptures($0, HostTensor.init) })
    }

    public func blockBackward(_ dy: BackendTensor, _ saved: BackendSaved, _ b: BackendBlock,
                              rope: RoPETable<Float>, mask: [Bool], outputNorms: Bool) -> BackendGradients {
        guard let s = saved as? HostSaved else { preconditionFailure("a \(type(of: saved)) handed to the CPU backend") }
        var norms: [String: [Float]] = [:]
        let g = decoderBlockBackward(host(dy), saved: s.value, weights: host(b), rope: rope, mask: mask,
                                     outputGradients: outputNorms ? { role, d in norms[role] = GPTQLayer.rowSquaredNorms(d) } : nil)
        return BackendGradients(input: HostTensor(g.input), attentionOutput: HostTensor(g.attentionOutput),
                                mlpOutput: HostTensor(g.mlpOutput), outputSquaredNorms: norms)
    }

    public func lossGradient(_ h: BackendTensor, _ head: BackendHead, labels: [Int]) -> (loss: Float, count: Int, grad: BackendTensor) {
        guard let hd = head as? HostHead else { preconditionFailure("a \(type(of: head)) handed to the CPU backend") }
        let f = lossHeadForward(host(h), norm: hd.norm, lmHead: hd.lmHead, labels: labels, eps: hd.eps)
        return (f.loss, f.count, HostTensor(lossHeadBackward(saved: f.saved, norm: hd.norm, lmHead: hd.lmHead)))
    }

    public func meanAbs(_ x: BackendTensor, rows: [Bool]) -> Double {
        let m = GradientStatistics.meanAbs(host(x), rows: rows)
        return m.sum / Double(m.count)
    }

    public func allFinite(_ x: BackendTensor) -> Bool { MBQTensor.allFinite(host(x)) }

    // MARK: the method

    public func addColumnAbsSums(_ x: BackendTensor, rows: [Bool], into sums: inout [Double]) {
        let t = host(x), c = t.cols
        precondition(sums.count == c && rows.count == t.rows, "column sums: \(sums.count) sums, \(rows.count) rows for \(t.shape)")
        t.data.withUnsafeBufferPointer { p in
            for r in 0..<t.rows where rows[r] {
                for j in 0..<c { sums[j] += Double(Swift.abs(p[r * c + j])) }
            }
        }
    }

    public func gatherRows(_ parts: [(BackendTensor, [Int])]) -> BackendTensor {
        let cols = parts.first.map { host($0.0).cols } ?? 0
        var out = Tensor<Float>(uninitialized: [parts.reduce(0) { $0 + $1.1.count }, cols])
        out.data.withUnsafeMutableBufferPointer { po in
            var k = 0
            for (x, rows) in parts {
                host(x).data.withUnsafeBufferPointer { pi in
                    for r in rows {
                        for j in 0..<cols { po[k * cols + j] = pi[r * cols + j] }
                        k += 1
                    }
                }
            }
        }
        return HostTensor(out)
    }

    public func concatRows(_ a: BackendTensor, _ b: BackendTensor) -> BackendTensor {
        let x = host(a), y = host(b)
        return HostTensor(Tensor(shape: [x.rows + y.rows, x.cols], data: x.data + y.data))
    }

    public func splitRows(_ x: BackendTensor, at n: Int) -> (BackendTensor, BackendTensor) {
        let t = host(x), c = t.cols
        return (HostTensor(Tensor(shape: [n, c], data: Array(t.data.prefix(n * c)))),
                HostTensor(Tensor(shape: [t.rows - n, c], data: Array(t.data.dropFirst(n * c)))))
    }

    public func candidateWeights(_ g: SearchGroup, _ b: BackendBlock, scales: [Float], options: SearchOptions) -> BackendCandidate {
        let w = host(b)
        var q: [String: Tensor<Float>] = [:]
        for (role, path) in g.spec.linears { q[role] = ScaleSearch.searchWeight(w[keyPath: path], scales, options) }
        return HostCandidate(q)
    }

    public func runCandidate(_ g: SearchGroup, _ b: BackendBlock, _ c: BackendCandidate, input x: BackendTensor, scales: [Float],
                             rope: RoPETable<Float>?, mask: [Bool], options: SearchOptions) -> BackendTensor {
        guard let q = c as? HostCandidate else { preconditionFailure("a \(type(of: c)) handed to the CPU backend") }
        return HostTensor(ScaleSearch.runModule(g, host(b), scales, input: host(x), rope: rope, mask: mask, options, quantized: q.weights))
    }

    public func rowErrors(_ a: BackendTensor, _ b: BackendTensor, squared: Bool) -> [Float] {
        let out = host(a), ref = host(b), c = out.cols
        precondition(out.shape == ref.shape, "row errors: \(out.shape) vs \(ref.shape)")
        return out.data.withUnsafeBufferPointer { po in
            ref.data.withUnsafeBufferPointer { pr in
                (0..<out.rows).map { r in
                    var rs: Float = 0
                    for j in 0..<c {
                        let d = po[r * c + j] - pr[r * c + j]
                        rs += squared ? d * d : Swift.abs(d)
                    }
                    return rs
                }
            }
        }
    }

    public func smoothQuantScales(_ b: BackendBlock, samples: SampleChunks<BackendLayerSample>) throws -> (qkv: [Float], gateUp: [Float]) {
        try ApplyScales.smoothQuantLayer(host(b), samples: samples.map(host))
    }

    public func applyScales(_ scales: [(group: SearchGroup, scales: [Float])], to b: BackendBlock) -> BackendBlock {
        var w = host(b)
        for (g, s) in scales { ApplyScales.apply(g, scales: s, to: &w) }
        return HostBlock(w)
    }

    public func quantize(_ b: BackendBlock, with q: WeightQuantizer, precision: ScalePrecision) -> (block: BackendBlock, codes: [String: QuantizedWeight]) {
        var w = host(b)
        let codes = ApplyScales.quantizeLinears(&w, with: q, precision: precision)
        return (HostBlock(w), codes)
    }

    public func gptqLayer(_ l: Int, _ b: BackendBlock, samples: SampleChunks<(sample: BackendLayerSample, weights: TokenWeightSet)>,
                          settings: GPTQSettings, perLinear: Bool, rtn: WeightQuantizer,
                          precision: ScalePrecision) throws -> (block: BackendBlock, codes: [String: QuantizedWeight], reports: [GPTQLinearReport]) {
        let hessians = LayerHessians(perLinear: perLinear)
        for i in 0..<samples.count {
            for s in try samples.read(i) { hessians.add(host(s.sample).captures, weights: s.weights) }
        }
        let q = try GPTQLayer.quantize(host(b), layer: l, hessians: hessians, settings: settings, rtn: rtn, precision: precision)
        return (HostBlock(q.block), q.codes, q.reports)
    }

    public func measureLoopGBps() -> Double {
        // A [2048, 4096] weight (32 MiB in, 32 out: past the caches) quantized in groups
        // of 128, as the search quantizes each candidate, for about 0.1 s. The values only
        // need a spread.
        let n = 2048 * 4096
        let w = Tensor<Float>(shape: [2048, 4096], data: (0..<n).map { Float(($0 &* 40503) & 1023) - 511.5 })
        let q = WeightQuantizer.groupAsymmetric(bits: 4, group: 128)
        let best = Self.bestRate(work: Double(n) * 8 / 1e9, seconds: 0.1) { _ = q.apply(w) }   // 4 bytes read, 4 written
        return best / Double(max(1, EngineThreads.count))
    }

    /// `work` per second of the fastest of at least three runs of `body` in about
    /// `seconds`, after one run that warms up threads, caches and the output's pages.
    static func bestRate(work: Double, seconds: Double, _ body: () -> Void) -> Double {
        body()
        var best = 0.0, runs = 0
        let end = DispatchTime.now().uptimeNanoseconds + UInt64(seconds * 1e9)
        repeat {
            best = max(best, rate(work: work, body))
            runs += 1
        } while runs < 3 || DispatchTime.now().uptimeNanoseconds < end
        return best
    }

    /// `work` per second of one run of `body`.
    static func rate(work: Double, _ body: () -> Void) -> Double {
        let t0 = DispatchTime.now().uptimeNanoseconds
        body()
        return work / (Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
    }

    /// `work` per second of the median of `runs` runs of `body` (after one warm-up
    /// run): what a long sequence of such calls sustains. The fastest of a few short runs
    /// catches bursts, and the search's prediction then moves with them
    /// (docs/BENCHMARKS.md, "Cost model constants").
    static func medianRate(work: Double, runs: Int, _ body: () -> Void) -> Double {
        body()
        return GradientStatistics.median((0..<runs).map { _ in rate(work: work, body) })
    }

    public func measureGEMMRates(sizes: [Int]) -> [Double] {
        let operands = sizes.map { n -> (Tensor<Float>, Tensor<Float>) in
            var rng = SeededRandom(seed: UInt64(n))
            return (rng.normalTensor([n, n]), rng.normalTensor([n, n]))
        }
        // Three passes over the sizes, then the median pass: workers starting together on
        // one host measure at the same time (the cost model accounts for shared cores
        // itself), and one pass can still be disturbed (another process's burst, the kernel
        // writing back dirty pages). Below 1024 the best of repeated runs for about 25 ms
        // (the least disturbed); the largest size, whose rate every larger GEMM of a
        // real-shape job takes, as the median of 7 runs (medianRate).
        var passes = [[Double]](repeating: [], count: sizes.count)
        for _ in 0..<3 {
            for (i, n) in sizes.enumerated() {
                let (a, b) = operands[i]
                let work = 2 * Double(n * n * n) / 1e9
                passes[i].append(n >= 1024 ? Self.medianRate(work: work, runs: 7) { _ = matmul(a, b) }
                                           : Self.bestRate(work: work, seconds: 0.025) { _ = matmul(a, b) })
            }
        }
        return passes.map(GradientStatistics.median)
    }
}
