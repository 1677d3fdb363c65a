/// How far values are from a reference's (the conformance suites: `BackendConformance`
/// for whole backends, `OpConformance` for a device's ops): the largest absolute
/// difference, the reference's largest finite magnitude (the scale the tolerance is
/// relative to), and where the values first went past `tolerance` times the scale seen
/// so far, named as an index with both values. Equal values (infinities included) differ
/// by 0; a NaN where the reference has none is an infinite difference.
public struct Deviation: Sendable {
    public var maxAbs = 0.0
    public var scale = 0.0
    /// "[row, col] (got vs want)", "[i] (...)" or a shape mismatch; nil while within tolerance.
    public var first: String?

    public init() {}

    /// maxAbs relative to the scale.
    public var rel: Double { maxAbs / max(scale, 1e-30) }

    /// `cols`: the row length, to name a deviation [row, col] (0: a vector, [i]).
    public mutating func add(_ got: [Float], _ want: [Float], cols: Int = 0, tolerance: Double) {
        guard got.count == want.count else {
            maxAbs = .infinity
            if first == nil { first = "the shape: \(got.count) values, the reference \(want.count)" }
            return
        }
        for b in want where b.isFinite { scale = max(scale, Double(abs(b))) }
        let limit = tolerance * max(scale, 1e-30)
        for (i, (a, b)) in zip(got, want).enumerated() {
            let diff = a == b || (a.isNaN && b.isNaN) ? 0 : Double(abs(a - b))
            maxAbs = max(maxAbs, diff.isNaN ? .infinity : diff)
            if first == nil, !(diff <= limit) {
                first = (cols > 0 ? "[\(i / cols), \(i % cols)]" : "[\(i)]") + " (\(a) vs \(b))"
            }
        }
    }
}
