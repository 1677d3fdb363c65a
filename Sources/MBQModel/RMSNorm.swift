import MBQTensor

// RMSNorm as in transformers' LlamaRMSNorm / Qwen2RMSNorm:
//   y = weight * (x * rsqrt(mean(x^2) + eps))      (statistics over the last dim)

/// x: [T, C], weight: [C] -> y: [T, C], invRms: [T] (the only thing backward needs besides x)
@inlinable
public func rmsNormForward<T: BLASScalar>(_ x: Tensor<T>, weight: Tensor<T>, eps: T) -> (y: Tensor<T>, invRms: [T]) {
    let rows = x.rows, c = x.cols
    precondition(weight.count == c, "rmsNorm: weight \(weight.shape) vs input \(x.shape)")
    var out = [[T]](arrayLiteral: [T](repeating: 0, count: x.count), [T](repeating: 0, count: rows))  // y, invRms
    withBuffers([x.data, weight.data], writing: &out) { r, w in
        let (px, pw) = (r[0], r[1]), (py, pinv) = (w[0], w[1])
        parallelChunks(rows, minChunk: 16) { range in
            for r in range {
                let base = r * c
                var ss: T = 0
                for j in 0..<c { ss += px[base + j] * px[base + j] }
                let ri = 1 / (ss / T(c) + eps).squareRoot()
                pinv[r] = ri
                for j in 0..<c { py[base + j] = pw[j] * (px[base + j] * ri) }
            }
        }
    }
    return (Tensor(shape: x.shape, data: out[0]), out[1])
}

/// dy: [T, C], x: [T, C], weight: [C], invRms: [T] -> dx: [T, C]
/// With g = weight * dy and r = invRms: dx = r * g - x * r^3 * mean(g * x).
@inlinable
public func rmsNormBackward<T: BLASScalar>(_ dy: Tensor<T>, x: Tensor<T>, weight: Tensor<T>, invRms: [T]) -> Tensor<T> {
    let rows = x.rows, c = x.cols
    precondition(dy.shape == x.shape && invRms.count == rows, "rmsNormBackward: shapes \(dy.shape), \(x.shape)")
    var out = [[T]](arrayLiteral: [T](repeating: 0, count: x.count))  // dx
    withBuffers([x.data, dy.data, weight.data, invRms], writing: &out) { r, w in
        let (px, pdy, pw, pinv) = (r[0], r[1], r[2], r[3]), pdx = w[0]
        parallelChunks(rows, minChunk: 16) { range in
            for r in range {
                let base = r * c
                let ri = pinv[r]
                var dot: T = 0
                for j in 0..<c { dot += pw[j] * pdy[base + j] * px[base + j] }
                let k = ri * ri * ri * dot / T(c)
                for j in 0..<c { pdx[base + j] = ri * pw[j] * pdy[base + j] - px[base + j] * k }
            }
        }
    }
    return Tensor(shape: x.shape, data: out[0])
}
