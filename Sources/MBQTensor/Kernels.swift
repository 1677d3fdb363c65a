/// Elementwise kernels shared by the layers. Shapes must agree exactly (no broadcasting
/// beyond what each function states).

/// x += y. x, y: same shape.
@inlinable
public func addInPlace<T: BLASScalar>(_ x: inout Tensor<T>, _ y: Tensor<T>) {
    precondition(x.count == y.count, "addInPlace: \(x.shape) vs \(y.shape)")
    x.data.withUnsafeMutableBufferPointer { px in
        y.data.withUnsafeBufferPointer { py in
            for i in 0..<px.count { px[i] += py[i] }
        }
    }
}

/// x + y. x, y: same shape.
@inlinable
public func add<T: BLASScalar>(_ x: Tensor<T>, _ y: Tensor<T>) -> Tensor<T> {
    var z = x
    addInPlace(&z, y)
    return z
}

/// Logistic sigmoid, written to stay finite for large |x| in both float types.
@inlinable @inline(__always)
public func sigmoid<T: BLASScalar>(_ x: T) -> T {
    if x >= 0 {
        return 1 / (1 + T.exp(-x))
    }
    let e = T.exp(x)
    return e / (1 + e)
}

/// True if every element is finite.
@inlinable
public func allFinite<T: BLASScalar>(_ x: Tensor<T>) -> Bool {
    x.data.withUnsafeBufferPointer { p in
        for v in p where !v.isFinite { return false }
        return true
    }
}

/// Index of the first non-finite element, if any.
@inlinable
public func firstNonFinite<T: BLASScalar>(_ x: Tensor<T>) -> Int? {
    x.data.firstIndex { !$0.isFinite }
}

/// Multiplies (or divides) every column j of w by s[j]: W diag(s) or W diag(s)^-1, the
/// one column scaling of the search's candidates, its scaled activations and the apply.
/// Element by element, so the row chunks on threads change no bit. w: [R, C], s: [C]
public func scaleColumnsInPlace(_ w: inout Tensor<Float>, by s: [Float], divide: Bool = false) {
    precondition(w.cols == s.count, "columns of \(w.shape) vs \(s.count) scales")
    let c = w.cols, rows = w.rows
    w.data.withUnsafeMutableBufferPointer { p in
        s.withUnsafeBufferPointer { ps in
            let p = p, ps = ps
            parallelChunks(rows, minChunk: 64) { chunk in
                for r in chunk {
                    if divide {
                        for j in 0..<c { p[r * c + j] /= ps[j] }
                    } else {
                        for j in 0..<c { p[r * c + j] *= ps[j] }
                    }
                }
            }
        }
    }
}
