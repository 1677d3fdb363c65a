import Foundation
import MBQModel
import MBQQuant
import MBQTensor

// The arithmetic of a job behind one interface (docs/DESIGN.md "Compute backends"), so
// that a GPU backend can be added without touching the layer step, the protocol or the
// coordinator. The backend owns its memory: a layer's weights are loaded into it once
// and referred to by a handle; activations cross the boundary only through `upload` and
// `download`. A GPU backend keeps weights and activations on the device; a bf16 backend
// keeps weights in bf16. `CPUBackend` is the reference every backend is held to
// (`BackendConformance`).

/// A tensor the backend holds (an activation, a gradient, a captured input), in host
/// memory on the CPU, in device memory on a GPU, freed when its last reference goes.
/// Only the backend that made it may read it.
public protocol BackendTensor: AnyObject, Sendable {
    var shape: [Int] { get }
}

/// A decoder block's weights loaded into a backend.
public protocol BackendBlock: AnyObject, Sendable {
    /// Parameters.
    var parameterCount: Int { get }
    /// Bytes the block holds while loaded (for memory accounting).
    var residentBytes: Int { get }
    /// Each linear's weight shape [out, in] by role ("q", ..., "down").
    var linearShapes: [String: [Int]] { get }
}

/// One grid point's weights of a search group's linears (`ComputeBackend.candidateWeights`).
public protocol BackendCandidate: AnyObject, Sendable {}

/// The final norm and output projection loaded into a backend (the stage holding the
/// last layer computes the caption loss's gradient with it).
public protocol BackendHead: AnyObject, Sendable {}

/// What a forward with `save` keeps for its backward.
public protocol BackendSaved: AnyObject, Sendable {}

/// The searched modules' inputs and outputs of one forward (`BlockCaptures`, held by
/// the backend).
public struct BackendCaptures: Sendable {
    public var qkvInput: BackendTensor         // [T, C]
    public var oInput: BackendTensor           // [T, heads*D]
    public var gateUpInput: BackendTensor      // [T, C]
    public var downInput: BackendTensor        // [T, I]
    public var attentionOutput: BackendTensor  // [T, C]
    public var mlpOutput: BackendTensor        // [T, C]

    public init(qkvInput: BackendTensor, oInput: BackendTensor, gateUpInput: BackendTensor, downInput: BackendTensor,
                attentionOutput: BackendTensor, mlpOutput: BackendTensor) {
        self.qkvInput = qkvInput; self.oInput = oInput; self.gateUpInput = gateUpInput; self.downInput = downInput
        self.attentionOutput = attentionOutput; self.mlpOutput = mlpOutput
    }

    /// Host captures as a backend's handles (`wrap`: upload, or a host handle).
    public init(_ c: BlockCaptures<Float>, _ wrap: (Tensor<Float>) throws -> BackendTensor) rethrows {
        self.init(qkvInput: try wrap(c.qkvInput), oInput: try wrap(c.oInput), gateUpInput: try wrap(c.gateUpInput),
                  downInput: try wrap(c.downInput), attentionOutput: try wrap(c.attentionOutput), mlpOutput: try wrap(c.mlpOutput))
    }

    /// The captures on the host (`unwrap`: download, or a host handle's value).
    public func host(_ unwrap: (BackendTensor) throws -> Tensor<Float>) rethrows -> BlockCaptures<Float> {
        BlockCaptures(qkvInput: try unwrap(qkvInput), oInput: try unwrap(oInput), gateUpInput: try unwrap(gateUpInput),
                      downInput: try unwrap(downInput), attentionOutput: try unwrap(attentionOutput), mlpOutput: try unwrap(mlpOutput))
    }

    /// The capture a search group names (`SearchGroupSpec.input`, `.judged`).
    public subscript(_ path: WritableKeyPath<BlockCaptures<Float>, Tensor<Float>>) -> BackendTensor {
        switch path {
        case \BlockCaptures<Float>.qkvInput: return qkvInput
        case \BlockCaptures<Float>.oInput: return oInput
        case \BlockCaptures<Float>.gateUpInput: return gateUpInput
        case \BlockCaptures<Float>.downInput: return downInput
        case \BlockCaptures<Float>.attentionOutput: return attentionOutput
        case \BlockCaptures<Float>.mlpOutput: return mlpOutput
        default: preconditionFailure("BlockCaptures has no capture \(path)")
        }
    }
}

public struct BackendForward: Sendable {
    public var output: BackendTensor  // [T, C]
    public var saved: BackendSaved?
    public var captures: BackendCaptures?
    public init(output: BackendTensor, saved: BackendSaved?, captures: BackendCaptures?) {
        self.output = output; self.saved = saved; self.captures = captures
    }
}

public struct BackendGradients: Sendable {
    public var input: BackendTensor            // dL/dx [T, C]
    public var attentionOutput: BackendTensor  // dL/d(o_proj out) [T, C]
    public var mlpOutput: BackendTensor        // dL/d(down_proj out) [T, C]
    /// When asked for: per linear role ("q", ..., "down"), ‖dL/d(its output)_t‖² per
    /// token t ([T], on the host; GPTQ's gradient token weights).
    public var outputSquaredNorms: [String: [Float]]
    public init(input: BackendTensor, attentionOutput: BackendTensor, mlpOutput: BackendTensor,
                outputSquaredNorms: [String: [Float]] = [:]) {
        self.input = input; self.attentionOutput = attentionOutput; self.mlpOutput = mlpOutput
        self.outputSquaredNorms = outputSquaredNorms
    }
}

/// One calibration sample as the search sees one layer: the backend's captures and the
/// sample's rows (vision and caption restricted to attended positions).
public struct BackendLayerSample: Sendable {
    public var captures: BackendCaptures
    public var rope: RoPETable<Float>
    public var attention: [Bool]
    public var vision: [Bool]
    public var caption: [Bool]

    public init(captures: BackendCaptures, rope: RoPETable<Float>, attention: [Bool], vision: [Bool], caption: [Bool]) {
        self.captures = captures; self.rope = rope; self.attention = attention
        self.vision = zip(vision, attention).map { $0 && $1 }
        self.caption = zip(caption, attention).map { $0 && $1 }
    }
}

/// The square GEMM sizes a worker measures at registration (`measureGEMMRates`): the
/// cost model interpolates between them, the planner reads the rate at `planSize`.
public enum GEMMRateSizes {
    public static let all = [64, 128, 256, 512, 1024]
    public static let planSize = 512
}

public protocol ComputeBackend: Sendable {
    var name: String { get }
    /// What it computes on, as a worker registers it ("AMD EPYC 9B14 (2 cores)", a GPU's name).
    var device: String { get }
    /// Bytes of device memory free for the job's layers, captures and working set (a
    /// GPU's); nil when they live in host memory. A worker's budget is the smaller of this
    /// and --max-memory, so the plan gives it no more layers than its device holds.
    var deviceMemoryBytes: UInt64? { get }

    // MARK: memory

    func loadBlock(_ w: DecoderBlockWeights<Float>) throws -> BackendBlock
    func loadHead(norm: Tensor<Float>, lmHead: Tensor<Float>, eps: Float) throws -> BackendHead
    func upload(_ x: Tensor<Float>) throws -> BackendTensor
    func download(_ x: BackendTensor) throws -> Tensor<Float>
    /// The block's weights on the host (what the output writer stores).
    func downloadBlock(_ b: BackendBlock) throws -> DecoderBlockWeights<Float>

    // MARK: the model

    /// x: [T, C]. `actBits`: per-token activation quantization of every linear's input
    /// (the `--distort` forward of W-A schemes).
    func blockForward(_ x: BackendTensor, _ b: BackendBlock, rope: RoPETable<Float>, mask: [Bool],
                      save: Bool, capture: Bool, actBits: Int?) throws -> BackendForward
    /// dy: [T, C], the gradient of the block's output. `outputNorms`: also every linear's
    /// per-token squared output-gradient norm (`BackendGradients.outputSquaredNorms`).
    func blockBackward(_ dy: BackendTensor, _ saved: BackendSaved, _ b: BackendBlock,
                       rope: RoPETable<Float>, mask: [Bool], outputNorms: Bool) throws -> BackendGradients
    /// The mean caption cross-entropy of the final hidden states h ([T, C]) and its
    /// gradient w.r.t. h ([T, C]).
    func lossGradient(_ h: BackendTensor, _ head: BackendHead, labels: [Int]) throws -> (loss: Float, count: Int, grad: BackendTensor)
    /// Mean |x| over the rows where `rows` is true, all columns (x: [T, C]); sums in
    /// a fixed order so that it is deterministic.
    func meanAbs(_ x: BackendTensor, rows: [Bool]) throws -> Double
    func allFinite(_ x: BackendTensor) throws -> Bool

    // MARK: the method

    // The MBQ search's ops: `ScaleSearch.searchLayer` runs the grid, the batching and the
    // loss over them, the same code for every backend (docs/DESIGN.md §2.2).

    /// sums[j] += Σ |x[r, j]| over the rows where `rows` is true, in Double, rows in order
    /// (x: [T, C]; the search's channel means).
    func addColumnAbsSums(_ x: BackendTensor, rows: [Bool], into sums: inout [Double]) throws
    /// The listed rows of each tensor, in order, stacked: [Σ rows, C] (the loss rows).
    func gatherRows(_ parts: [(BackendTensor, [Int])]) throws -> BackendTensor
    /// a's rows followed by b's.
    func concatRows(_ a: BackendTensor, _ b: BackendTensor) throws -> BackendTensor
    /// The first n rows and the rest.
    func splitRows(_ x: BackendTensor, at n: Int) throws -> (BackendTensor, BackendTensor)
    /// Group g's linears as the search sees them with scales s (`ScaleSearch.searchWeight`):
    /// weight-only Q(W diag(s)) diag(s)⁻¹, W-A Q(W diag(s)).
    func candidateWeights(_ g: SearchGroup, _ b: BackendBlock, scales: [Float], options: SearchOptions) throws -> BackendCandidate
    /// Group g's module (`SearchGroupSpec.module`) with the candidate's weights on x (the
    /// group's captured input, [T, C_in]; with activation bits divided by s and quantized
    /// per token first) -> [T, C]. `rope` and `mask` for the attention group's whole samples.
    func runCandidate(_ g: SearchGroup, _ b: BackendBlock, _ c: BackendCandidate, input x: BackendTensor, scales: [Float],
                      rope: RoPETable<Float>?, mask: [Bool], options: SearchOptions) throws -> BackendTensor
    /// Each row's Σ (a − b)² (`squared`) or Σ |a − b|, in fp32 and column order ([T], on the host).
    func rowErrors(_ a: BackendTensor, _ b: BackendTensor, squared: Bool) throws -> [Float]

    /// SmoothQuant's migration scales (alpha 0.5) for norm -> q/k/v and norm -> gate/up.
    func smoothQuantScales(_ b: BackendBlock, samples: SampleChunks<BackendLayerSample>) throws -> (qkv: [Float], gateUp: [Float])
    /// A new block: `b` with each group's scales folded in, in the order given.
    func applyScales(_ scales: [(group: SearchGroup, scales: [Float])], to b: BackendBlock) throws -> BackendBlock
    /// A new block: `b`'s linears quantized and dequantized with scales in `precision`;
    /// and every linear's codes by role, on the host.
    func quantize(_ b: BackendBlock, with q: WeightQuantizer, precision: ScalePrecision) throws
        -> (block: BackendBlock, codes: [String: QuantizedWeight])

    /// GPTQ on every linear of `b` (docs/DESIGN.md §2.7): Hessians summed over the samples
    /// (each with its token weights by role; one Hessian per captured input unless
    /// `perLinear`), then each linear quantized; `rtn` is the round-to-nearest the report
    /// compares with. The chunking must not change a bit.
    func gptqLayer(_ l: Int, _ b: BackendBlock, samples: SampleChunks<(sample: BackendLayerSample, weights: TokenWeightSet)>,
                   settings: GPTQSettings, perLinear: Bool, rtn: WeightQuantizer,
                   precision: ScalePrecision) throws -> (block: BackendBlock, codes: [String: QuantizedWeight], reports: [GPTQLinearReport])

    /// GEMM rate (GFLOP/s) on n x n x n products for each n of `sizes`, with the threads
    /// this worker computes with: the cost model reads the efficiency of small GEMMs
    /// from it, the plan the speed of large ones.
    func measureGEMMRates(sizes: [Int]) -> [Double]
    /// GB/s per thread of the loops that are not GEMMs, measured on the search's
    /// quantizer (8 bytes per weight: read and written in fp32): the cost model scales
    /// every loop it charges by this, against what the machine it was calibrated on measured.
    func measureLoopGBps() -> Double
}

extension ComputeBackend {
    public var deviceMemoryBytes: UInt64? { nil }

    /// Every searched group of layer `l` (docs/DESIGN.md §2.2): losses of the 20 grid
    /// points, the best, its scales (`ScaleSearch.searchLayer` over this backend's ops).
    /// The samples come in chunks (`SampleChunks`): the result does not depend on how
    /// they are chunked.
    public func searchLayer(_ l: Int, _ b: BackendBlock, samples: SampleChunks<BackendLayerSample>, attnRatio: Double, mlpRatio: Double,
                            options: SearchOptions) throws -> [GroupResult] {
        try ScaleSearch.searchLayer(l, b, samples: samples, attnRatio: attnRatio, mlpRatio: mlpRatio, options: options, backend: self)
    }

    public func blockBackward(_ dy: BackendTensor, _ saved: BackendSaved, _ b: BackendBlock,
                              rope: RoPETable<Float>, mask: [Bool]) throws -> BackendGradients {
        try blockBackward(dy, saved, b, rope: rope, mask: mask, outputNorms: false)
    }
}
