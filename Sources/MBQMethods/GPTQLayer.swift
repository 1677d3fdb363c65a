import Foundation
import MBQFormats
import MBQModel
import MBQQuant
import MBQTensor

/// How GPTQ weighs each token in a linear's Hessian H = (2/n) Σₜ wₜ xₜxₜᵀ
/// (docs/DESIGN.md §2.7).
public enum HessianWeights: String, CaseIterable, Sendable {
    /// wₜ = 1 on every attended token (plain GPTQ).
    case none
    /// MBQ's ratios: a vision token weighs its layer's clamped vision/caption ratio (the
    /// attention one for q, k, v, o; the MLP one for gate, up, down), a caption token 1,
    /// every other token 0 — the rows and weights of MBQ's reweighted search loss.
    case modality
    /// wₜ = ‖∂L/∂yₜ‖² of the linear's own output y from the gradient pass (Fisher-style,
    /// close to VLMQ, arXiv 2508.03351); samples the pass leaves out weigh 0.
    case gradient
}

/// What GPTQ did to one linear.
public struct GPTQLinearReport: Sendable, Equatable {
    public var layer: Int
    public var role: String
    /// Rows of the Hessian's inputs (tokens with a weight above 0).
    public var tokens: Int
    /// Mean over rows of (w - q)ᵀ H (w - q), H undamped, for round-to-nearest with the
    /// job's quantizer (before) and for GPTQ (after); on up to 256 rows spread evenly.
    public var errorBefore: Double
    public var errorAfter: Double

    public init(layer: Int, role: String, tokens: Int, errorBefore: Double, errorAfter: Double) {
        self.layer = layer; self.role = role; self.tokens = tokens; self.errorBefore = errorBefore; self.errorAfter = errorAfter
    }
}

/// Per-token weights of one sample for one layer, by linear role ("q", ..., "down"). [T]
public typealias TokenWeightSet = [String: [Float]]

/// The linears that read each captured input: the search groups' (`SearchGroupSpec`).
var gptqInputs: [(input: SearchGroup, roles: [String])] { SearchGroupSpec.table.map { ($0.group, $0.roles) } }

/// One Hessian summed sample by sample in fp64 (docs/DESIGN.md §2.7): each sample's
/// weighted rows x·√w (fp32 products, as the reference scales its rows by √(2/n))
/// widened to fp64 and multiplied with `TiledGEMM.dgemm`, so neither the chunking of the
/// samples nor the thread count changes a bit.
public struct HessianAccumulator: Sendable {
    public let cols: Int
    /// Σ wₜ xₜxₜᵀ [cols, cols]
    var sum: [Double]
    /// Tokens with a weight above 0.
    public private(set) var tokens = 0

    public init(cols: Int) {
        self.cols = cols
        sum = [Double](repeating: 0, count: cols * cols)
    }

    /// One sample. x: [T, cols]; w: [T] token weights (rows with w = 0 do not enter).
    public mutating func add(_ x: Tensor<Float>, weights w: [Float]) {
        precondition(w.count == x.rows && x.cols == cols, "\(w.count) token weights for \(x.shape), Hessian of \(cols)")
        let kept = w.indices.filter { w[$0] > 0 }
        tokens += kept.count
        guard !kept.isEmpty else { return }
        var rows = [Double](repeating: 0, count: kept.count * cols)
        for (k, r) in kept.enumerated() {
            let s = w[r].squareRoot()
            for j in 0..<cols { rows[k * cols + j] = Double(x.data[r * cols + j] * s) }
        }
        let cols = cols
        rows.withUnsafeBufferPointer { pr in
            sum.withUnsafeMutableBufferPointer { ps in
                // The lower half (whole tiles on the diagonal); `hessian` mirrors it.
                TiledGEMM.dgemm(transA: true, transB: false, m: cols, n: cols, k: kept.count, alpha: 1, a: pr.baseAddress!, lda: cols,
                                b: pr.baseAddress!, ldb: cols, beta: 1, c: ps.baseAddress!, ldc: cols, lowerTiles: true)
            }
        }
    }

    /// H = (2/n) Σ wₜ xₜxₜᵀ, n = `tokens`, symmetric (the lower half mirrored). [cols, cols]
    public var hessian: [Double] {
        let f = tokens > 0 ? 2 / Double(tokens) : 0
        var h = sum.map { $0 * f }
        // Upper from lower in 64 x 64 blocks (a column walk of a [C, C] array misses the
        // cache on every element).
        let n = cols
        h.withUnsafeMutableBufferPointer { p in
            for i0 in stride(from: 0, to: n, by: 64) {
                for j0 in stride(from: i0, to: n, by: 64) {
                    for i in i0..<Swift.min(i0 + 64, n) {
                        for j in Swift.max(j0, i + 1)..<Swift.max(Swift.max(j0, i + 1), Swift.min(j0 + 64, n)) { p[i * n + j] = p[j * n + i] }
                    }
                }
            }
        }
        return h
    }
}

/// The Hessians of one layer's linears. Linears whose token weights are the same share
/// one (q, k, v and gate, up, unless the weights are per linear).
public final class LayerHessians {
    /// Per Hessian key (a role, or the first role of the linears sharing it).
    var sums: [String: HessianAccumulator] = [:]
    /// Role -> the key of the Hessian it reads.
    public let keyOf: [String: String]

    public init(perLinear: Bool) {
        var k: [String: String] = [:]
        for (_, roles) in gptqInputs { for r in roles { k[r] = perLinear ? r : roles[0] } }
        keyOf = k
    }

    /// Adds one sample: its captures and its token weights ([T] per role).
    public func add(_ c: BlockCaptures<Float>, weights: TokenWeightSet) {
        for (input, roles) in gptqInputs {
            let x = c[keyPath: input.spec.input]
            for key in Set(roles.map { keyOf[$0]! }).sorted() {
                guard let w = weights[key] else { preconditionFailure("no token weights for \(key)") }
                sums[key, default: HessianAccumulator(cols: x.cols)].add(x, weights: w)
            }
        }
    }

    /// `role`'s H and its weighted token count.
    public func hessian(_ role: String) -> (h: [Double], tokens: Int) {
        guard let a = sums[keyOf[role]!] else { return ([], 0) }
        return (a.hessian, a.tokens)
    }

    /// What one layer's Hessians take at most, plus the largest linear's GPTQ working set:
    /// its fp32 weight copy and, while factorizing, three [in, in] fp64 arrays (the Hessian
    /// taken from the sums, kept for the error report; its damped copy; the inverse — the
    /// fp32 factor replaces the copy).
    public static func predictedBytes(_ cfg: LanguageModelConfig, perLinear: Bool) -> Int {
        predictedBytes(hidden: cfg.hiddenSize, intermediate: cfg.intermediateSize, attention: cfg.numHeads * cfg.headDim,
                       kv: cfg.numKVHeads * cfg.headDim, perLinear: perLinear)
    }

    /// The same from the shape (`mbq plan`): `attention` = heads · head_dim, `kv` = KV heads · head_dim.
    public static func predictedBytes(hidden c: Int, intermediate i: Int, attention q: Int, kv: Int, perLinear: Bool) -> Int {
        // Per captured input: its width, and the output widths of the linears reading it.
        let inputs = [(c, [q, kv, kv]), (q, [c]), (c, [i, i]), (i, [c])]
        var total = 0, work = 0
        for (cols, outs) in inputs {
            total += (perLinear ? outs.count : 1) * cols * cols * 8
            for rows in outs { work = Swift.max(work, rows * cols * 4 + cols * cols * 24) }
        }
        return total + work
    }
}

public enum GPTQLayer {
    /// Per-token squared L2 norms of x's rows, summed in fp64. x: [T, N] -> [T]
    public static func rowSquaredNorms(_ x: Tensor<Float>) -> [Float] {
        (0..<x.rows).map { r in
            var s = 0.0
            for j in 0..<x.cols { let v = Double(x.data[r * x.cols + j]); s += v * v }
            return Float(s)
        }
    }

    /// One sample's token weights for layer `l` (docs/DESIGN.md §2.7). `gradientNorms`:
    /// the sample's per-role ‖∂L/∂y‖² from the gradient pass (nil: the pass left it out).
    public static func tokenWeights(_ mode: HessianWeights, attention: [Bool], vision: [Bool], caption: [Bool],
                                    attnRatio: Double, mlpRatio: Double, gradientNorms: TokenWeightSet?) -> TokenWeightSet {
        var out: TokenWeightSet = [:]
        for (input, roles) in gptqInputs {
            for role in roles {
                switch mode {
                case .none:
                    out[role] = attention.map { $0 ? 1 : 0 }
                case .modality:
                    let r = Float(input.isAttention ? attnRatio : mlpRatio)
                    out[role] = attention.indices.map { t in
                        guard attention[t] else { return 0 }
                        return vision[t] ? r : (caption[t] ? 1 : 0)
                    }
                case .gradient:
                    if let g = gradientNorms?[role] {
                        out[role] = attention.indices.map { attention[$0] ? g[$0] : 0 }
                    } else {
                        out[role] = [Float](repeating: 0, count: attention.count)
                    }
                }
            }
        }
        return out
    }

    /// GPTQ on every linear of a (scaled) block with the layer's Hessians: the block with
    /// each linear replaced by its codes dequantized in `precision`, the codes by role,
    /// and each linear's report.
    public static func quantize(_ w: DecoderBlockWeights<Float>, layer: Int, hessians: LayerHessians, settings: GPTQSettings,
                                rtn: WeightQuantizer, precision: ScalePrecision) throws
        -> (block: DecoderBlockWeights<Float>, codes: [String: QuantizedWeight], reports: [GPTQLinearReport]) {
        var out = w
        var codes: [String: QuantizedWeight] = [:]
        var reports: [GPTQLinearReport] = []
        // One Hessian and one factorization per key, shared by the linears that read it.
        var factors: [String: GPTQ.Factor] = [:]
        var held: [String: (h: [Double], tokens: Int)] = [:]
        for (role, path) in DecoderBlockWeights<Float>.linears {
            let original = w[keyPath: path]
            let key = hessians.keyOf[role]!
            if held[key] == nil {
                held = [:]   // the linears sharing a Hessian are consecutive: one held at a time
                held[key] = hessians.hessian(role)
            }
            let (h, n) = held[key]!
            guard n > 0 else {
                throw MethodsError.invalidOptions("GPTQ, layer \(layer) \(role): no token has a weight above 0 (every sample masked or left out of the gradient pass)")
            }
            if factors[key] == nil {
                factors = [:]
                do {
                    factors[key] = try GPTQ.factor(hessian: h, cols: original.cols, damp: settings.damp, actOrder: settings.actOrder)
                } catch let e as Cholesky.NotPositiveDefinite {
                    throw MethodsError.invalidOptions("GPTQ, layer \(layer) \(role): the damped Hessian \(e); raise --damp")
                }
            }
            let r = GPTQ.quantize(original, factor: factors[key]!, settings: settings)
            let before = GPTQ.weightedError(original, rtn.codes(original).dequantized(), hessian: h)
            let after = GPTQ.weightedError(original, r.codes.dequantized(), hessian: h)
            reports.append(GPTQLinearReport(layer: layer, role: role, tokens: n, errorBefore: before, errorAfter: after))
            out[keyPath: path] = r.codes.dequantized(precision: precision)
            codes[role] = r.codes
        }
        return (out, codes, reports)
    }
}
