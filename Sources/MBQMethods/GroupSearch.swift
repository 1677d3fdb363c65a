import MBQModel
import MBQTensor

/// Per input channel sum of |x| over non-padding rows, added sample by sample (Double,
/// in the order given, so chunking the samples changes no bit).
struct ChannelMeanAbs {
    var sum: [Double] = []
    var rows = 0

    /// inputs: one [T, C] per sample; masks: the rows that count.
    mutating func add(_ inputs: [Tensor<Float>], masks: [[Bool]]) {
        guard let first = inputs.first else { return }
        let c = first.cols
        if sum.isEmpty { sum = [Double](repeating: 0, count: c) }
        for (x, m) in zip(inputs, masks) {
            for r in 0..<x.rows where m[r] {
                for j in 0..<c { sum[j] += Double(Swift.abs(x.data[r * c + j])) }
                rows += 1
            }
        }
    }

    /// -> [C]
    var mean: [Float] { sum.map { Float($0 / Double(Swift.max(rows, 1))) } }
}

/// The rows of one token-wise group (o, gate_up, down) that enter its loss: caption and
/// vision rows with reweighting, every non-padding row without, gathered from samples
/// into one batch (one GEMM per linear instead of one per sample, none for ignored rows).
struct LossRows {
    var input: Tensor<Float>     // [R, C_in]
    var target: Tensor<Float>    // [R, C]: the fp module output
    var vision: [Bool] = []
    var caption: [Bool] = []

    var count: Int { vision.count }

    init(columns inCols: Int, _ outCols: Int) {
        input = Tensor(zeros: [0, inCols]); target = Tensor(zeros: [0, outCols])
    }

    init(_ g: SearchGroup, _ samples: [LayerSample], reweight: Bool) {
        let pickInput = { (c: BlockCaptures<Float>) in c[keyPath: g.spec.input] }
        let pickTarget = { (c: BlockCaptures<Float>) in c[keyPath: g.spec.judged] }
        var keep: [(Int, Int)] = []
        for (si, s) in samples.enumerated() {
            for r in 0..<s.attention.count where reweight ? (s.caption[r] || s.vision[r]) : s.attention[r] {
                keep.append((si, r))
            }
        }
        func gather(_ pick: (BlockCaptures<Float>) -> Tensor<Float>, cols: Int) -> Tensor<Float> {
            var out = Tensor<Float>(uninitialized: [keep.count, cols])
            out.data.withUnsafeMutableBufferPointer { po in
                for (k, (si, r)) in keep.enumerated() {
                    pick(samples[si].captures).data.withUnsafeBufferPointer { pi in
                        for j in 0..<cols { po[k * cols + j] = pi[r * cols + j] }
                    }
                }
            }
            return out
        }
        let c0 = samples.first?.captures
        input = gather(pickInput, cols: c0.map { pickInput($0).cols } ?? 0)
        target = gather(pickTarget, cols: c0.map { pickTarget($0).cols } ?? 0)
        vision = keep.map { samples[$0.0].vision[$0.1] }
        caption = keep.map { samples[$0.0].caption[$0.1] }
    }

    /// These rows followed by `next`'s.
    mutating func append(_ next: LossRows) {
        guard next.count > 0 else { return }
        guard count > 0 else { self = next; return }
        input = Tensor(shape: [count + next.count, input.cols], data: input.data + next.input.data)
        target = Tensor(shape: [count + next.count, target.cols], data: target.data + next.target.data)
        vision += next.vision; caption += next.caption
    }

    /// The first `n` rows; these keep the rest.
    mutating func takePrefix(_ n: Int) -> LossRows {
        if n == count {  // all of them: hand the buffers over, no copy
            let all = self
            self = LossRows(columns: input.cols, target.cols)
            return all
        }
        var head = self
        head.input = Tensor(shape: [n, input.cols], data: Array(input.data.prefix(n * input.cols)))
        head.target = Tensor(shape: [n, target.cols], data: Array(target.data.prefix(n * target.cols)))
        head.vision = Array(vision.prefix(n)); head.caption = Array(caption.prefix(n))
        input = Tensor(shape: [count - n, input.cols], data: Array(input.data.dropFirst(n * input.cols)))
        target = Tensor(shape: [count - n, target.cols], data: Array(target.data.dropFirst(n * target.cols)))
        vision = Array(vision.dropFirst(n)); caption = Array(caption.dropFirst(n))
        return head
    }

    /// As a sample the group's module runs on (every row attended).
    func sample(_ g: SearchGroup) -> LayerSample {
        let empty = Tensor<Float>(zeros: [count, 0])
        var caps = BlockCaptures(qkvInput: empty, oInput: empty, gateUpInput: empty, downInput: empty,
                                 attentionOutput: empty, mlpOutput: empty)
        caps[keyPath: g.spec.input] = input
        caps[keyPath: g.spec.judged] = target
        let one = RoPETable<Float>(positions: [[0]], headDim: 2, theta: 1)
        return LayerSample(captures: caps, rope: one, attention: [Bool](repeating: true, count: count), vision: vision, caption: caption)
    }
}

/// One group's search over chunks of samples (docs/DESIGN.md §2.2): the loss of every
/// grid point a = k / grid, added chunk by chunk; the lowest wins, first on ties.
///
/// Chunking changes no bit. Attention (qkv) mixes rows, so it runs on whole samples in
/// order. The token-wise groups' rows are run in batches whose bounds fall on multiples
/// of `TiledGEMM.rowTile` of the group's whole row sequence (rows short of a full tile
/// wait for the next chunk), so every GEMM tile sees the rows it would see with all
/// samples in one batch, and the loss adds the rows in the same order.
struct GroupSearch {
    let group: SearchGroup
    let xMean: [Float]
    let options: SearchOptions
    var losses: [LossAccumulator]
    var pending: LossRows?

    init(_ g: SearchGroup, xMean: [Float], options: SearchOptions) {
        group = g; self.xMean = xMean; self.options = options
        losses = [LossAccumulator](repeating: LossAccumulator(), count: options.grid)
    }

    func scales(_ k: Int) -> [Float] { ScaleSearch.scales(xMean, alpha: Float(k) / Float(options.grid)) }

    /// Adds one chunk's samples to every grid point's loss. `last`: no chunk follows.
    mutating func add(_ chunk: [LayerSample], weights w: DecoderBlockWeights<Float>, last: Bool) {
        let batch: [LayerSample]
        if group == .qkv {
            batch = chunk
        } else {
            var rows = pending ?? LossRows(columns: 0, 0)
            rows.append(LossRows(group, chunk, reweight: options.reweight))
            let ready = last ? rows.count : rows.count / TiledGEMM.rowTile * TiledGEMM.rowTile
            let now = rows.takePrefix(ready)
            pending = rows
            batch = now.count > 0 ? [now.sample(group)] : []
        }
        guard !batch.isEmpty else { return }
        for k in 0..<options.grid {
            let s = scales(k)
            var q: [String: Tensor<Float>] = [:]
            for (role, path) in group.spec.linears { q[role] = ScaleSearch.searchWeight(w[keyPath: path], s, options) }
            for sample in batch {
                let out = ScaleSearch.runModule(group, w, s, sample: sample, options, quantized: q)
                let ref = sample.captures[keyPath: group.spec.judged]
                losses[k].add(out, ref, sample: sample, squared: options.loss == .mse)
            }
        }
    }

    func result(layer: Int, ratio: Double) -> GroupResult {
        var best = 0, bestLoss = Double.infinity
        var curve: [Double] = []
        for k in 0..<options.grid {
            let loss = losses[k].loss(options.loss, reweight: options.reweight, ratio: ratio)
            curve.append(loss)
            if loss < bestLoss { bestLoss = loss; best = k }
        }
        // Every loss NaN: best stays 0, no scaling.
        return GroupResult(layer: layer, group: group, bestIndex: best, alpha: Double(best) / Double(options.grid),
                           losses: curve, ratio: ratio, scales: scales(best))
    }
}
