import MBQFormats
import MBQTensor

/// Rotary position embedding tables for one sequence: cos and sin, [T, D] each
/// (D = head_dim, the D/2 frequencies repeated for both halves, as transformers builds
/// them). For Qwen2-VL M-RoPE the frequencies are split by `mrope_section` into a
/// temporal, a height and a width part, each driven by its own row of position ids
/// (transformers' Qwen2VLRotaryEmbedding.recomposition_frequencies).
public struct RoPETable<T: BLASScalar>: Sendable {
    public let length: Int
    public let headDim: Int
    public let cos: [T]
    public let sin: [T]

    /// positions: [rows][T] with rows = 1, or 3 when `mropeSection` is set.
    public init(positions: [[Int]], headDim: Int, theta: Double, mropeSection: [Int]? = nil) {
        precondition(!positions.isEmpty && headDim % 2 == 0, "RoPE needs positions and an even head_dim")
        let t = positions[0].count
        let half = headDim / 2
        // inv_freq = 1 / theta^(2i/D), computed in T's precision as transformers does in fp32.
        let base = T(theta)
        let invFreq: [T] = (0..<half).map { i in 1 / T.pow(base, T(2 * i) / T(headDim)) }
        // Which position row drives frequency i.
        var rowOf = [Int](repeating: 0, count: half)
        if let sections = mropeSection {
            precondition(positions.count == 3 && sections.reduce(0, +) == half,
                         "M-RoPE needs 3 position rows and mrope_section summing to head_dim/2")
            var i = 0
            for (s, n) in sections.enumerated() {
                for _ in 0..<n { rowOf[i] = s % 3; i += 1 }
            }
        }
        var c = [T](repeating: 0, count: t * headDim)
        var s = [T](repeating: 0, count: t * headDim)
        for p in 0..<t {
            for i in 0..<half {
                let angle = T(positions[rowOf[i]][p]) * invFreq[i]
                let cv = T.cos(angle), sv = T.sin(angle)
                c[p * headDim + i] = cv; c[p * headDim + half + i] = cv
                s[p * headDim + i] = sv; s[p * headDim + half + i] = sv
            }
        }
        length = t
        self.headDim = headDim
        cos = c
        sin = s
    }
}

/// In place: x = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], per head.
/// x: [T, heads * D]
@inlinable
public func ropeForward<T: BLASScalar>(_ x: inout Tensor<T>, table: RoPETable<T>) {
    let d = table.headDim, h = d / 2, t = x.rows
    precondition(t == table.length && x.cols % d == 0, "rope: input \(x.shape) vs table [\(table.length), \(d)]")
    let heads = x.cols / d, width = x.cols
    x.data.withUnsafeMutableBufferPointer { px in
        for p in 0..<t {
            for head in 0..<heads {
                let b = p * width + head * d
                for j in 0..<h {
                    let x1 = px[b + j], x2 = px[b + j + h]
                    px[b + j] = x1 * table.cos[p * d + j] - x2 * table.sin[p * d + j]
                    px[b + j + h] = x2 * table.cos[p * d + j + h] + x1 * table.sin[p * d + j + h]
                }
            }
        }
    }
}

/// In place: the transpose of `ropeForward` applied to a gradient.
/// dy: [T, heads * D] -> dx (same buffer)
@inlinable
public func ropeBackward<T: BLASScalar>(_ dy: inout Tensor<T>, table: RoPETable<T>) {
    let d = table.headDim, h = d / 2, t = dy.rows
    precondition(t == table.length && dy.cols % d == 0, "rope backward: \(dy.shape) vs table [\(table.length), \(d)]")
    let heads = dy.cols / d, width = dy.cols
    dy.data.withUnsafeMutableBufferPointer { pg in
        for p in 0..<t {
            for head in 0..<heads {
                let b = p * width + head * d
                for j in 0..<h {
                    let g1 = pg[b + j], g2 = pg[b + j + h]
                    pg[b + j] = g1 * table.cos[p * d + j] + g2 * table.sin[p * d + j + h]
                    pg[b + j + h] = g2 * table.cos[p * d + j + h] - g1 * table.sin[p * d + j]
                }
            }
        }
    }
}

extension RoPETable {
    /// The table a model with this config uses for `positions` ([rows][T]).
    public init(positions: [[Int]], config c: LanguageModelConfig) {
        self.init(positions: positions, headDim: c.headDim, theta: c.ropeTheta, mropeSection: c.mropeSection)
    }
}
