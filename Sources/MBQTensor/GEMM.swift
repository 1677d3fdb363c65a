/// Matrix products on `Tensor`, all through `BLASScalar.gemm` (cblas_sgemm for Float).
/// Tensors of any rank are viewed as matrices [rows, lastDim].

/// C = alpha * op(A) op(B) + beta * C.
/// A: [m, k] (or [k, m] with transA), B: [k, n] (or [n, k] with transB), C: [m, n].
@inlinable
public func gemm<T: BLASScalar>(_ a: Tensor<T>, _ b: Tensor<T>, transA: Bool = false,
                                transB: Bool = false, alpha: T = 1, beta: T = 0,
                                into c: inout Tensor<T>) {
    let m = transA ? a.cols : a.rows
    let k = transA ? a.rows : a.cols
    let kb = transB ? b.cols : b.rows
    let n = transB ? b.rows : b.cols
    precondition(k == kb, "gemm inner dimensions differ: \(a.shape) x \(b.shape) (transA \(transA), transB \(transB))")
    precondition(c.rows == m && c.cols == n, "gemm output \(c.shape) is not [\(m), \(n)]")
    if m == 0 || n == 0 { return }
    if k == 0 {
        for i in 0..<c.count { c.data[i] = beta == 0 ? 0 : beta * c.data[i] }
        return
    }
    let lda = a.cols, ldb = b.cols, ldc = c.cols
    a.data.withUnsafeBufferPointer { pa in
        b.data.withUnsafeBufferPointer { pb in
            c.data.withUnsafeMutableBufferPointer { pc in
                T.gemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha,
                       a: pa.baseAddress!, lda: lda, b: pb.baseAddress!, ldb: ldb,
                       beta: beta, c: pc.baseAddress!, ldc: ldc)
            }
        }
    }
}

/// op(A) op(B) as a new [m, n] tensor.
@inlinable
public func matmul<T: BLASScalar>(_ a: Tensor<T>, _ b: Tensor<T>, transA: Bool = false,
                                  transB: Bool = false) -> Tensor<T> {
    let m = transA ? a.cols : a.rows
    let n = transB ? b.rows : b.cols
    let k = transA ? a.rows : a.cols
    var c = k == 0 ? Tensor<T>(zeros: [m, n]) : Tensor<T>(uninitialized: [m, n])
    gemm(a, b, transA: transA, transB: transB, into: &c)
    return c
}

/// A linear layer as PyTorch stores it: y = x W^T + b.
/// x: [..., in], weight: [out, in], bias: [out] -> y: [..., out]
@inlinable
public func linearForward<T: BLASScalar>(_ x: Tensor<T>, weight: Tensor<T>, bias: Tensor<T>? = nil) -> Tensor<T> {
    precondition(weight.rank == 2 && x.cols == weight.shape[1],
                 "linear: input \(x.shape) does not match weight \(weight.shape)")
    var outShape = x.shape
    outShape[outShape.count - 1] = weight.shape[0]
    if bias == nil && x.cols > 0 {
        var y = Tensor<T>(uninitialized: outShape)
        gemm(x, weight, transB: true, into: &y)
        return y
    }
    var y = Tensor<T>(zeros: outShape)
    if let bias {
        precondition(bias.count == weight.shape[0], "linear: bias \(bias.shape) vs weight \(weight.shape)")
        let n = bias.count
        y.data.withUnsafeMutableBufferPointer { py in
            bias.data.withUnsafeBufferPointer { pb in
                for r in 0..<(py.count / Swift.max(n, 1)) {
                    for j in 0..<n { py[r * n + j] = pb[j] }
                }
            }
        }
        gemm(x, weight, transB: true, beta: 1, into: &y)
    } else {
        gemm(x, weight, transB: true, into: &y)
    }
    return y
}

/// Input gradient of `linearForward`: dx = dy W. (Weight gradients are never needed:
/// MBQ only reads gradients of activations.)
/// dy: [..., out], weight: [out, in] -> dx: [..., in]
@inlinable
public func linearBackward<T: BLASScalar>(_ dy: Tensor<T>, weight: Tensor<T>) -> Tensor<T> {
    precondition(dy.cols == weight.shape[0], "linear backward: grad \(dy.shape) vs weight \(weight.shape)")
    var shape = dy.shape
    shape[shape.count - 1] = weight.shape[1]
    var dx = dy.cols > 0 ? Tensor<T>(uninitialized: shape) : Tensor<T>(zeros: shape)
    gemm(dy, weight, into: &dx)
    return dx
}

/// dx += dy W, for summing the input gradients of linears that share one input.
@inlinable
public func linearBackwardAccumulate<T: BLASScalar>(_ dy: Tensor<T>, weight: Tensor<T>, into dx: inout Tensor<T>) {
    precondition(dy.cols == weight.shape[0] && dx.cols == weight.shape[1] && dx.rows == dy.rows,
                 "linear backward: grad \(dy.shape), weight \(weight.shape), dx \(dx.shape)")
    gemm(dy, weight, beta: 1, into: &dx)
}
