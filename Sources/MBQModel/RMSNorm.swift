import MBQTensor

// RMSNorm as in transformers' LlamaRMSNorm / Qwen2RMSNorm:
//   y = weight * (x * rsqrt(mean(x^2) + eps))      (statistics over the last dim)

/// x: [T, C], weight: [C] -> y: [T, C], invRms: [T] (the only thing backward needs besides x)
@inlinable
public func rmsNormForward<T: BLASScalar>(_ x: Tensor<T>, weight: Tensor<T>, eps: T) -> (y: Tensor<T>, invRms: [T]) {
    let rows = x.rows, c = x.cols
    precondition(weight.count == c, "rmsNorm: weight \(weight.shape) vs input \(x.shape)")
    var y = Tensor<T>(zeros: x.shape)
    var inv = [T](repeating: 0, count: rows)
    x.data.withUnsafeBufferPointer { px in
        weight.data.withUnsafeBufferPointer { pw in
            y.data.withUnsafeMutableBufferPointer { py in
                inv.withUnsafeMutableBufferPointer { pinv in
                    let px = px, pw = pw, py = py, pinv = pinv
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
            }
        }
    }
    return (y, inv)
}

/// dy: [T, C], x: [T, C], weight: [C], invRms: [T] -> dx: [T, C]
/// With g = weight * dy and r = invRms: dx = r * g - x * r^3 * mean(g * x).
@inlinable
public func rmsNormBackward<T: BLASScalar>(_ dy: Tensor<T>, x: Tensor<T>, weight: Tensor<T>, invRms: [T]) -> Tensor<T> {
    let rows = x.rows, c = x.cols
    precondition(dy.shape == x.shape && invRms.count == rows, "rmsNormBackward: shapes \(dy.shape), \(x.shape)")
    var dx = Tensor<T>(zeros: x.shape)
    x.data.withUnsafeBufferPointer { px in
        dy.data.withUnsafeBufferPointer { pdy in
            weight.data.withUnsafeBufferPointer { pw in
                dx.data.withUnsafeMutableBufferPointer { pdx in
                    let px = px, pdy = pdy, pw = pw, pdx = pdx
                    parallelChunks(rows, minChunk: 16) { range in
                        for r in range {
                            let base = r * c
                            let ri = invRms[r]
                            var dot: T = 0
                            for j in 0..<c { dot += pw[j] * pdy[base + j] * px[base + j] }
                            let k = ri * ri * ri * dot / T(c)
                            for j in 0..<c { pdx[base + j] = ri * pw[j] * pdy[base + j] - px[base + j] * k }
                        }
                    }
                }
            }
        }
    }
    return dx
}
