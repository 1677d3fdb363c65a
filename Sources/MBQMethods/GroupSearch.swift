import MBQModel
import MBQTensor

/// Per input channel sum of |x| over non-padding rows, added sample by sample (Double,
/// in the order given, so chunking the samples changes no bit). The sums are the
/// backend's op (`ComputeBackend.addColumnAbsSums`); the rows are counted here.
struct ChannelMeanAbs {
    var sum: [Double] = []
    var rows = 0

    /// inputs: one [T, C] per sample; masks: the rows that count.
    mutating func add(_ inputs: [BackendTensor], masks: [[Bool]], backend: ComputeBackend) throws {
        guard let first = inputs.first else { return }
        if sum.isEmpty { sum = [Double](repeating: 0, count: first.shape[1]) }
        for (x, m) in zip(inputs, masks) {
            try backend.addColumnAbsSums(x, rows: m, into: &sum)
            rows += m.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
    }

    /// -> [C]
    var mean: [Float] { sum.map { Float($0 / Double(Swift.max(rows, 1))) } }
}

/// The rows of one token-wise group (o, gate_up, down) that enter its loss: caption and
/// vision rows with reweighting, every non-padding row without, gathered from samples
/// into one batch (one GEMM per linear instead of one per sample, none for ignored rows).
/// The gathered tensors are the backend's.
struct LossRows {
    var input: BackendTensor?     // [R, C_in]; nil while empty
    var target: BackendTensor?    // [R, C]: the fp module output
    var vision: [Bool] = []
    var caption: [Bool] = []

    var count: Int { vision.count }

    init() {}

    init(_ g: SearchGroup, _ samples: [BackendLayerSample], reweight: Bool, backend: ComputeBackend) throws {
        var picks: [[Int]] = []
        for s in samples {
            let rows = (0..<s.attention.count).filter { reweight ? (s.caption[$0] || s.vision[$0]) : s.attention[$0] }
            picks.append(rows)
            vision += rows.map { s.vision[$0] }
            caption += rows.map { s.caption[$0] }
        }
        guard count > 0 else { return }
        input = try backend.gatherRows(zip(samples, picks).map { ($0.captures[g.spec.input], $1) })
        target = try backend.gatherRows(zip(samples, picks).map { ($0.captures[g.spec.judged], $1) })
    }

    /// These rows followed by `next`'s.
    mutating func append(_ next: LossRows, backend: ComputeBackend) throws {
        guard next.count > 0 else { return }
        guard count > 0, let input, let target, let ni = next.input, let nt = next.target else { self = next; return }
        self.input = try backend.concatRows(input, ni)
        self.target = try backend.concatRows(target, nt)
        vision += next.vision; caption += next.caption
    }

    /// The first `n` rows; these keep the rest.
    mutating func takePrefix(_ n: Int, backend: ComputeBackend) throws -> LossRows {
        if n == count {  // all of them: hand the handles over, no copy
            let all = self
            self = LossRows()
            return all
        }
        var head = LossRows()
        guard n > 0, let input, let target else { return head }
        (head.input, self.input) = try backend.splitRows(input, at: n)
        (head.target, self.target) = try backend.splitRows(target, at: n)
        head.vision = Array(vision.prefix(n)); head.caption = Array(caption.prefix(n))
        vision = Array(vision.dropFirst(n)); caption = Array(caption.dropFirst(n))
        return head
    }
}

/// What one candidate runs on: a whole sample (attention mixes its rows), or a batch of
/// gathered loss rows (every row attended; no positions needed).
struct SearchBatch {
    var input: BackendTensor
    var target: BackendTensor
    var rope: RoPETable<Float>?
    var attention: [Bool]
    var vision: [Bool]
    var caption: [Bool]

    init(_ s: BackendLayerSample, _ g: SearchGroup) {
        input = s.captures[g.spec.input]; target = s.captures[g.spec.judged]
        rope = s.rope; attention = s.attention; vision = s.vision; caption = s.caption
    }

    init?(_ rows: LossRows) {
        guard let input = rows.input, let target = rows.target else { return nil }
        self.input = input; self.target = target
        rope = nil; attention = [Bool](repeating: true, count: rows.count); vision = rows.vision; caption = rows.caption
    }
}

/// One group's search over chunks of samples (docs/DESIGN.md §2.2): the loss of every
/// grid point a = k / grid, added chunk by chunk; the lowest wins, first on ties. The
/// arithmetic of a candidate is the backend's (`candidateWeights`, `runCandidate`,
/// `rowErrors`); the grid, the batching and the loss are this one code for every backend.
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
    var pending = LossRows()

    init(_ g: SearchGroup, xMean: [Float], options: SearchOptions) {
        group = g; self.xMean = xMean; self.options = options
        losses = [LossAccumulator](repeating: LossAccumulator(), count: options.grid)
    }

    func scales(_ k: Int) -> [Float] { ScaleSearch.scales(xMean, alpha: Float(k) / Float(options.grid)) }

    /// Adds one chunk's samples to every grid point's loss. `last`: no chunk follows.
    mutating func add(_ chunk: [BackendLayerSample], block b: BackendBlock, last: Bool, backend: ComputeBackend) throws {
        let batch: [SearchBatch]
        if group == .qkv {
            batch = chunk.map { SearchBatch($0, group) }
        } else {
            try pending.append(LossRows(group, chunk, reweight: options.reweight, backend: backend), backend: backend)
            let ready = last ? pending.count : pending.count / TiledGEMM.rowTile * TiledGEMM.rowTile
            batch = SearchBatch(try pending.takePrefix(ready, backend: backend)).map { [$0] } ?? []
        }
        guard !batch.isEmpty else { return }
        for k in 0..<options.grid {
            let s = scales(k)
            let candidate = try backend.candidateWeights(group, b, scales: s, options: options)
            for x in batch {
                let out = try backend.runCandidate(group, b, candidate, input: x.input, scales: s, rope: x.rope, mask: x.attention,
                                                   options: options)
                losses[k].add(try backend.rowErrors(out, x.target, squared: options.loss == .mse), cols: x.target.shape[1],
                              attention: x.attention, vision: x.vision, caption: x.caption)
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
