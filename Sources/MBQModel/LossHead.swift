import MBQTensor

// The loss head: final RMSNorm, lm_head, next-token cross-entropy as transformers'
// ForCausalLMLoss computes it: logits at t predict labels[t + 1]; the loss is the mean
// over positions whose shifted label is not -100. Only those rows are normed and
// projected (a 152k vocabulary times 2048 positions would be 1.2 GB of logits).

public struct LossHeadSaved<T: BLASScalar>: Sendable {
    public var rows: [Int]          // positions t that predict a label
    public var hidden: Tensor<T>    // final hidden at those rows       [P, C]
    public var invRms: [T]          // [P]
    public var probs: Tensor<T>     // softmax(logits) at those rows    [P, V]
    public var targets: [Int]       // labels[t + 1]                    [P]
    public var length: Int          // T

    @inlinable
    public init(rows: [Int], hidden: Tensor<T>, invRms: [T], probs: Tensor<T>, targets: [Int], length: Int) {
        self.rows = rows
        self.hidden = hidden
        self.invRms = invRms
        self.probs = probs
        self.targets = targets
        self.length = length
    }
}

/// Rows `rows` of h: [T, C] -> [rows.count, C]
@inlinable
public func gatherRows<T: BLASScalar>(_ h: Tensor<T>, _ rows: [Int]) -> Tensor<T> {
    let c = h.cols
    var out = Tensor<T>(zeros: [rows.count, c])
    for (r, pos) in rows.enumerated() {
        for j in 0..<c { out.data[r * c + j] = h.data[pos * c + j] }
    }
    return out
}

/// h: [T, C], norm: [C], lmHead: [V, C], labels: [T] -> mean loss over `count` predicted tokens.
/// With no labelled position the loss is 0 and `count` is 0 (the caller skips the sample).
@inlinable
public func lossHeadForward<T: BLASScalar>(_ h: Tensor<T>, norm: Tensor<T>, lmHead: Tensor<T>, labels: [Int],
                                           eps: T) -> (loss: T, count: Int, saved: LossHeadSaved<T>) {
    let t = h.rows, c = h.cols, vocab = lmHead.shape[0]
    precondition(labels.count == t && lmHead.shape[1] == c, "loss head: h \(h.shape), lm_head \(lmHead.shape), labels \(labels.count)")
    let rows = (0..<Swift.max(0, t - 1)).filter { labels[$0 + 1] != -100 }
    let targets = rows.map { labels[$0 + 1] }
    precondition(targets.allSatisfy { $0 >= 0 && $0 < vocab }, "label outside the vocabulary")
    let gathered = gatherRows(h, rows)
    let (normed, inv) = rmsNormForward(gathered, weight: norm, eps: eps)
    var probs = linearForward(normed, weight: lmHead)
    logSoftmaxRowsInPlace(&probs)
    var total: T = 0
    probs.data.withUnsafeMutableBufferPointer { pl in
        for r in 0..<rows.count {
            let row = pl.baseAddress! + r * vocab
            total -= row[targets[r]]
            for j in 0..<vocab { row[j] = T.exp(row[j]) }
        }
    }
    let loss = rows.isEmpty ? 0 : total / T(rows.count)
    return (loss, rows.count,
            LossHeadSaved(rows: rows, hidden: gathered, invRms: inv, probs: probs, targets: targets, length: t))
}

/// -> dh: [T, C], zero at positions that predict nothing.
/// dlogits = (softmax - onehot(target)) / count; dnormed = dlogits W; then RMSNorm backward.
@inlinable
public func lossHeadBackward<T: BLASScalar>(saved s: LossHeadSaved<T>, norm: Tensor<T>, lmHead: Tensor<T>) -> Tensor<T> {
    let c = lmHead.shape[1], vocab = lmHead.shape[0]
    var dh = Tensor<T>(zeros: [s.length, c])
    if s.rows.isEmpty { return dh }
    var dlogits = s.probs
    let inv = 1 / T(s.rows.count)
    for r in 0..<s.rows.count {
        dlogits.data[r * vocab + s.targets[r]] -= 1
    }
    for i in 0..<dlogits.count { dlogits.data[i] *= inv }
    let dnormed = linearBackward(dlogits, weight: lmHead)
    let dg = rmsNormBackward(dnormed, x: s.hidden, weight: norm, invRms: s.invRms)
    for (r, pos) in s.rows.enumerated() {
        for j in 0..<c { dh.data[pos * c + j] = dg.data[r * c + j] }
    }
    return dh
}

/// log softmax(lm_head(norm(h))) at the given rows. h: [T, C] -> [rows.count, V]
@inlinable
public func logProbabilities<T: BLASScalar>(_ h: Tensor<T>, rows: [Int], norm: Tensor<T>, lmHead: Tensor<T>, eps: T) -> Tensor<T> {
    var lp = linearForward(rmsNormForward(gatherRows(h, rows), weight: norm, eps: eps).y, weight: lmHead)
    logSoftmaxRowsInPlace(&lp)
    return lp
}

/// x -= logsumexp(x) per row (max-shifted for stability). x: [P, V]
@inlinable
public func logSoftmaxRowsInPlace<T: BLASScalar>(_ x: inout Tensor<T>) {
    let vocab = x.cols, rows = x.rows
    x.data.withUnsafeMutableBufferPointer { pl in
        for r in 0..<rows {
            let row = pl.baseAddress! + r * vocab
            var m = -T.infinity
            for j in 0..<vocab { m = Swift.max(m, row[j]) }
            var sum: T = 0
            for j in 0..<vocab { sum += T.exp(row[j] - m) }
            let lse = m + T.log(sum)
            for j in 0..<vocab { row[j] -= lse }
        }
    }
}
