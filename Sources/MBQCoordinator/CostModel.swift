import Foundation
import MBQFormats
import MBQMethods
import MBQWire

/// Predicts a distributed job's time per phase (memory: MemoryNeeds) from the model's
/// shape, the calibration set and the workers' measured speeds.
///
/// Every GEMM of a phase is counted (a block's q/k/v/o and MLP products, attention's
/// per-head products, the loss head's on the labelled rows; the search's grid points
/// per group, the token-wise groups only on the rows the loss reads) and timed at the rate the worker measured for a GEMM of that size
/// (`rates`, GFLOP/s on n x n x n for n in `curveSizes`, interpolated at the cube root
/// of m·k·n), so small models pay for small GEMMs. Loops that are not GEMMs (norms,
/// RoPE, softmax, SiLU, quantization) are charged as bytes at `elementwiseGBps`. Workers
/// sharing a host's cores run at `share` of their rate. The constants were calibrated
/// against runs on this machine (README "Cost model").
public struct CostModel: Sendable {
    /// The square GEMM sizes a worker measures at registration.
    public static let curveSizes = GEMMRateSizes.all
    /// rate(n) / rate(512) of a CPU worker (docs/BENCHMARKS.md, "Cost model constants"),
    /// for workers known by one number (`mbq plan --workers 16x64GiB@1000`).
    public static let referenceCurve: [Double] = [1.05, 0.89, 1.04, 1.0, 1.0]

    /// Bytes per second that non-GEMM loops move, per thread, on the machine the
    /// constants were calibrated on (a worker that measured its loops runs at
    /// `loopGBps / referenceLoopGBps` of this).
    public var elementwiseGBps = 1.35
    /// What `ComputeBackend.measureLoopGBps` gave on the machine the loop constants
    /// below (load, widen, apply) were last fitted on.
    public var referenceLoopGBps = 2.55
    /// Bytes moved per weight element each time the search quantizes a candidate
    /// (scale, group min/max, round, unscale).
    public var quantizeBytesPerWeight = 8.0
    /// Backward phase per block and sample, in forwards: the recompute with saved
    /// activations plus the input gradients.
    public var backwardFactor = 2.1
    /// Fixed cost per phase (commands, ZeroMQ round trips, thread wake-up), seconds.
    public var phaseOverhead = 0.03
    /// Reading a block (and the last stage's head) from the checkpoint at assignment:
    /// page faults and file reads more than loops, so seconds per weight, neither scaled
    /// by the loop rate nor split over threads (fitted on 7B- and 72B-shaped layers:
    /// docs/BENCHMARKS.md, "Cost model constants").
    public var loadSecondsPerWeight = 9e-9
    /// Widening a bf16-held block's linears to fp32 (one thread), seconds per weight; a
    /// block used again right after is not widened again (CPUBackend.WidenedBlock).
    public var widenSecondsPerWeight = 1.9e-9
    /// Apply per layer: scaling and quantizing the weights, packing and writing the shard:
    /// seconds per weight, not scaled by the loop rate (page faults and the disk set it
    /// more than loops do), and a fixed part (the shard's fsync and rename). No intercept:
    /// one would charge every small layer of the demo model as much (docs/BENCHMARKS.md,
    /// "Cost model constants").
    public var applyFixedSeconds = 0.01
    public var applySecondsPerWeight = 16.4e-9

    public struct Shape: Sendable {
        public var layers, hidden, intermediate, heads, kvHeads, headDim, vocab: Int
        public init(layers: Int, hidden: Int, intermediate: Int, heads: Int, kvHeads: Int, headDim: Int, vocab: Int) {
            self.layers = layers; self.hidden = hidden; self.intermediate = intermediate; self.heads = heads
            self.kvHeads = kvHeads; self.headDim = headDim; self.vocab = vocab
        }
        public init(_ c: LanguageModelConfig) {
            self.init(layers: c.numLayers, hidden: c.hiddenSize, intermediate: c.intermediateSize, heads: c.numHeads,
                      kvHeads: c.numKVHeads, headDim: c.headDim, vocab: c.vocabSize)
        }
        public var paramsPerLayer: Double {
            let h = Double(hidden), q = Double(heads * headDim), kv = Double(kvHeads * headDim), i = Double(intermediate)
            return h * (q + 2 * kv) + q * h + 3 * h * i
        }
        /// Forward FLOPs of one block on `tokens` tokens (causal attention counted half).
        public func blockFLOPs(tokens: Int) -> Double {
            let t = Double(tokens)
            return 2 * t * paramsPerLayer + 2 * 2 * t * (t / 2) * Double(heads * headDim)
        }
        /// Whether the o_proj group is searched (`SearchGroupSpec.isSearched`).
        var searchesO: Bool {
            ScaleSearch.groups(vShape: [kvHeads * headDim, hidden], oShape: [hidden, heads * headDim]).contains(.o)
        }
    }

    /// What the job computes on.
    public struct Workload: Sendable {
        public var samples: Int
        public var tokens: Int
        /// Share of rows the search loss reads (vision + caption with reweighting, else
        /// every non-padding row): the token-wise groups compute only those.
        public var lossRowFraction = 1.0
        /// Labelled rows per sample (the loss head's logits).
        public var labelRows = 0.0
        public var needsStats = true
        /// Evaluations per group in the search phase: the grid's points for the grid
        /// search, 0 when the phase only captures activations (SmoothQuant), nil when there
        /// is none (RTN).
        public var searchEvaluations: Double? = Double(SearchOptions.defaultGrid)
        public var distort = false
        /// Bytes per weight the workers hold their blocks in: 2 when they keep a bf16
        /// checkpoint's linears as bf16 and widen them for every use.
        public var weightBytes = 4
        public init(samples: Int, tokens: Int) { self.samples = samples; self.tokens = tokens }
    }

    public struct Worker: Sendable {
        /// GFLOP/s on 512-cubed products.
        public var gflops: Double
        public var memoryBytes: Double
        /// Measured rates at `curveSizes` (nil: `referenceCurve` scaled to `gflops`).
        public var rates: [Double]?
        /// Workers on one host share its cores (0: unknown, nothing shared).
        public var host = ""
        public var threads = 1
        public var cores = 0
        /// Block inputs past its budget go to --scratch (else the backward recomputes them).
        public var spills = false
        /// Fraction of its rate the worker gets (set per phase from who is busy).
        var share = 1.0
        /// Its measured loop rate, GB/s per thread (`ComputeBackend.measureLoopGBps`; nil:
        /// the calibration machine's).
        public var loopGBps: Double?
        /// Threads its non-GEMM loops use on this job's tensors (set by `predict`).
        var loopThreads = 1.0
        public init(gflops: Double, memoryBytes: Double, rates: [Double]? = nil, host: String = "", threads: Int = 1, cores: Int = 0) {
            self.gflops = gflops; self.memoryBytes = memoryBytes; self.rates = rates
            self.host = host; self.threads = threads; self.cores = cores
        }

        /// GFLOP/s for a GEMM of m·k·n multiply-adds (log-log interpolation in size).
        public func rate(_ m: Double, _ k: Double, _ n: Double) -> Double {
            let curve = rates ?? CostModel.referenceCurve.map { $0 * gflops }
            let sizes = CostModel.curveSizes.map(Double.init)
            let s = cbrt(max(m * k * n, 1))
            guard s > sizes[0] else { return curve[0] }
            guard s < sizes.last! else { return curve.last! }
            let i = sizes.lastIndex { $0 <= s }!
            let u = log(s / sizes[i]) / log(sizes[i + 1] / sizes[i])
            return exp(log(curve[i]) * (1 - u) + log(curve[i + 1]) * u)
        }
    }

    public struct Prediction: Sendable {
        public var plan: [Range<Int>]
        public var seconds: [(phase: String, seconds: Double)]
        public var transferBytes: Double
        public var total: Double { seconds.reduce(0) { $0 + $1.seconds } }
    }

    public init() {}

    // MARK: per-sample costs on one worker

    func gemm(_ m: Double, _ k: Double, _ n: Double, _ w: Worker) -> Double {
        guard m > 0 else { return 0 }
        return 2 * m * k * n / (w.rate(m, k, n) * 1e9 * w.share)
    }

    func bytes(_ b: Double, _ w: Worker) -> Double {
        b / (elementwiseGBps * loopSpeed(w) * 1e9 * w.loopThreads * w.share)
    }

    /// The worker's loops against the calibration machine's.
    func loopSpeed(_ w: Worker) -> Double { w.loopGBps.map { $0 / referenceLoopGBps } ?? 1 }

    /// One thread's loop of `seconds` on the calibration machine, on `w`.
    func loopSeconds(_ seconds: Double, _ w: Worker) -> Double { seconds / (loopSpeed(w) * w.share) }

    /// Self-attention on `t` rows: projections, per-head products, softmax and RoPE; in
    /// a block also its norm, residual and copies, in a search evaluation the loss.
    func attention(_ s: Shape, _ t: Double, _ w: Worker, evaluation: Bool = false) -> Double {
        let h = Double(s.hidden), q = Double(s.heads * s.headDim), kv = Double(s.kvHeads * s.headDim), d = Double(s.headDim)
        let proj = gemm(t, h, q, w) + 2 * gemm(t, h, kv, w) + gemm(t, q, h, w)
        let core = Double(s.heads) * 2 * gemm(t, d, t / 2, w)
        let softmax = Double(s.heads) * t * t / 2 * 4 * 3
        let rows = evaluation ? t * (2 * q + 2 * h) * 4 : t * (6 * h + 3 * q) * 4
        return proj + core + bytes(rows + softmax, w)
    }

    /// The MLP on `r` rows.
    func mlp(_ s: Shape, _ r: Double, _ w: Worker) -> Double {
        let h = Double(s.hidden), i = Double(s.intermediate)
        return 2 * gemm(r, h, i, w) + gemm(r, i, h, w) + bytes(r * (4 * h + 4 * i) * 4, w)
    }

    func block(_ s: Shape, _ t: Double, _ w: Worker) -> Double { attention(s, t, w) + mlp(s, t, w) }

    /// One layer's search on one sample: the captures, then every evaluation of each
    /// group (qkv: the whole attention on all rows; o, gate_up, down: the loss rows).
    func searchLayer(_ s: Shape, _ t: Double, _ f: Double, evaluations: Double, _ w: Worker) -> Double {
        let h = Double(s.hidden), q = Double(s.heads * s.headDim), i = Double(s.intermediate), r = f * t
        let o = s.searchesO ? gemm(r, q, h, w) : 0
        let perEval = attention(s, t, w, evaluation: true) + o + mlp(s, r, w) + gemm(r, i, h, w) + bytes(r * (h + i) * 4 * 2, w)
        return block(s, t, w) + evaluations * perEval
    }

    // MARK: sharing cores

    /// Each busy worker's share of its host's cores (threads beyond the cores slow
    /// every busy worker there alike).
    static func shares(_ ws: [Worker], busy: [Bool]) -> [Double] {
        var threads: [String: Int] = [:]
        for (w, b) in zip(ws, busy) where b { threads[w.host, default: 0] += max(1, w.threads) }
        return ws.map { w in w.cores > 0 ? min(1, Double(w.cores) / Double(max(1, threads[w.host] ?? 1))) : 1 }
    }

    /// When independent jobs of `work` seconds (each at full speed) finish if the
    /// workers run them at once, a host's cores shared among its busy workers.
    public static func makespan(_ ws: [Worker], work: [Double]) -> Double {
        var left = work
        var t = 0.0
        while left.contains(where: { $0 > 1e-12 }) {
            let busy = left.map { $0 > 1e-12 }
            let sh = shares(ws, busy: busy)
            let dt = zip(left, sh).filter { $0.0 > 1e-12 }.map { $0.0 / $0.1 }.min()!
            t += dt
            for i in left.indices where busy[i] { left[i] = max(0, left[i] - dt * sh[i]) }
        }
        return t
    }

    // MARK: phases

    /// `memory`: what the workers hold (`MemoryNeeds`); a worker whose budget does not keep
    /// every layer's inputs recomputes the others in the backward, a block forward each.
    public func predict(_ s: Shape, workers: [Worker], workload j: Workload, bandwidthBytesPerSecond: Double,
                        plan given: [Range<Int>]? = nil, memory: MemoryNeeds? = nil) -> Prediction {
        let plan = given ?? Planner.proportional(layers: s.layers, workers: workers.enumerated().map { ("w\($0.offset)", $0.element.gflops) })
            .map(\.range)
        let t = Double(j.tokens), n = Double(j.samples), stages = plan.count
        let actBytes = t * Double(s.hidden) * 4
        // Pipelined phases keep every stage busy; the search is timed by makespan.
        var workers = Array(workers.prefix(stages))
        let allBusy = Self.shares(workers, busy: workers.map { _ in true })
        for k in workers.indices {
            workers[k].share = allBusy[k]
            // Non-GEMM loops split over threads only when their tensors are large (the
            // engine's parallel loops have minimum chunk sizes): a T x hidden fp32 tensor
            // of 4 MB or more uses every thread, a small one about one (measured: the demo
            // job's search, hidden 256 x 128 tokens, takes 1.66 s per layer on one thread,
            // 1.61 s on two).
            workers[k].loopThreads = 1 + Double(max(0, workers[k].threads - 1)) * min(1, actBytes / 4e6)
        }
        let hop = stages > 1 ? actBytes / bandwidthBytesPerSecond : 0
        // A pipeline of per-sample stage times: the slowest stage sets the pace, the
        // others fill and drain it.
        func pipeline(_ st: [Double]) -> Double {
            let slow = st.max() ?? 0
            return n * (slow + hop) + st.reduce(0, +) - slow + phaseOverhead
        }
        // A bf16-held block is widened to fp32 when used after another block
        // (CPUBackend.WidenedBlock): a stage of one layer widens once, on its first use, a longer
        // one each layer per sample in the forward, each recomputed and each
        // differentiated layer in the backward.
        let widen = { (w: Worker) in j.weightBytes < 4 ? self.loopSeconds(self.widenSecondsPerWeight * s.paramsPerLayer, w) : 0 }
        // Workers read their blocks when assigned, inside the forward phase, all at once:
        // the forward starts when the first stage has its blocks.
        let load = plan.enumerated().map { k, r in
            let w = workers[k]
            let head = k == stages - 1 ? Double(s.vocab * s.hidden) : 0
            // A stage of one layer widens it once, on its first use, and keeps it.
            return (Double(r.count) * s.paramsPerLayer + head) * loadSecondsPerWeight / w.share + (r.count == 1 ? widen(w) : 0)
        }.max() ?? 0
        let widened = { (r: Range<Int>, uses: Int) in r.count > 1 ? Double(uses) : 0 }
        let fwdStage = plan.enumerated().map { k, r in Double(r.count) * block(s, t, workers[k]) + widened(r, r.count) * widen(workers[k]) }
        var seconds: [(String, Double)] = [("forward", load + pipeline(fwdStage))]
        if j.needsStats {
            // Backward recomputes each block's forward with saved activations, then the
            // input gradients (no weight gradients); the last stage also runs the loss head.
            let head = { (w: Worker) in 2 * self.gemm(j.labelRows, Double(s.hidden), Double(s.vocab), w) }
            let bwdStage = plan.enumerated().map { k, r in
                let kept = memory?.inputLayersKept(memory: workers[k].memoryBytes, layers: r.count, spills: workers[k].spills) ?? r.count
                return (backwardFactor * Double(r.count) + Double(r.count - kept)) * block(s, t, workers[k])
                    + widened(r, 2 * r.count - kept) * widen(workers[k])
                    + (k == stages - 1 ? head(workers[k]) : 0)
            }
            seconds.append(("backward", pipeline(bwdStage)))
        }
        if let evaluations = j.searchEvaluations {
            var alone = workers
            for k in alone.indices { alone[k].share = 1 }
            // Per layer: every sample's evaluations, and each evaluation's quantization of
            // the group's weights (once per candidate, whatever the sample count).
            let perStage = plan.enumerated().map { k, r in
                Double(r.count) * (n * searchLayer(s, t, j.lossRowFraction, evaluations: evaluations, alone[k])
                                   + bytes(evaluations * s.paramsPerLayer * quantizeBytesPerWeight, alone[k]))
            }
            // Stages search at once, sharing cores until the first ones finish; with
            // --distort one after another (a pipeline of layers).
            let search = j.distort ? perStage.reduce(0, +) + Double(stages - 1) * n * hop : Self.makespan(alone, work: perStage)
            seconds.append(("search", search + phaseOverhead))
        }
        // Apply: each stage scales and quantizes its weights (a few passes over fp32) and
        // writes its layers' shards.
        let apply = plan.enumerated().map { k, r in
            Double(r.count) * ((applyFixedSeconds + s.paramsPerLayer * applySecondsPerWeight) / workers[k].share)
        }.max() ?? 0
        seconds.append(("apply", apply + phaseOverhead))
        let transfer = n * actBytes * Double(stages - 1) * (j.needsStats ? 2 : 1)
        return Prediction(plan: plan, seconds: seconds, transferBytes: transfer)
    }

    /// GPUs `mbq plan --workers 8xH100` knows by name: the memory they are sold with, and
    /// a fp32 GEMM rate (strict fp32, no TF32: about three quarters of the FP32 peak) and
    /// a memory bandwidth for the loops that are STATED, not measured: no GPU backend has
    /// run here yet (docs/BENCHMARKS.md, "GPU workers in the plan").
    public static let gpuKinds: [String: (memoryBytes: Double, gflops: Double, loopGBps: Double)] = [
        "H100": (80 * 1073741824, 50_000, 2_000),
        "H200": (141 * 1073741824, 50_000, 3_000),
        "A100": (80 * 1073741824, 14_500, 1_300),
    ]

    public static let presets: [String: Shape] = [
        "llama-7b": Shape(layers: 32, hidden: 4096, intermediate: 11008, heads: 32, kvHeads: 32, headDim: 128, vocab: 32000),
        "qwen2-7b": Shape(layers: 28, hidden: 3584, intermediate: 18944, heads: 28, kvHeads: 4, headDim: 128, vocab: 152064),
        "qwen2-72b": Shape(layers: 80, hidden: 8192, intermediate: 29568, heads: 64, kvHeads: 8, headDim: 128, vocab: 152064),
    ]
}
