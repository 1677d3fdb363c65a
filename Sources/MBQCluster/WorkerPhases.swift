import Foundation
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor

/// The four phases as a worker runs them on its blocks (DESIGN.md §3), in the same
/// order of operations as the one-process QuantizeJob so that the output is identical.
extension Worker {
    func rope(_ s: CalibrationSample) -> RoPETable<Float> {
        let cfg = ckpt!.config
        return RoPETable(positions: s.positions, headDim: cfg.headDim, theta: cfg.ropeTheta, mropeSection: cfg.mropeSection)
    }

    /// The calibration samples of this job (the first `assignment.samples` of the bundle).
    var samples: [CalibrationSample] { Array(bundle!.samples.prefix(Int(assignment.samples))) }

    // MARK: data sockets

    /// Waits for tensor `name` of the current epoch on the data socket.
    /// -> the tensor and the seconds spent moving it (taking it off the socket and
    /// checking it; time waiting for the upstream stage to compute is not counted).
    func receive(_ name: String, what: String) throws -> (Tensor<Float>, Double) {
        while true {
            if currentEpoch != assignment.epoch { throw Aborted(what: what) }
            guard let raw = try pull.receiveRaw(timeoutMs: 200, maxFrameBytes: maxFrameBytes) else { continue }
            let t0 = Self.now()
            let m: WireMessage
            do {
                m = try Wire.decode(raw)
            } catch {
                logger.error("data socket: dropped a bad message: \(error)")
                continue
            }
            let moving = pull.lastReceiveSeconds + (Self.now() - t0)
            guard case let .tensor(h) = m.envelope.body, let t = m.tensor else { continue }
            if let secret = options.secret, !Wire.verifyTag(h, job: jobID, secret: secret) {
                logger.error("data socket: dropped tensor '\(h.name)' with a wrong shared-secret tag")
                continue
            }
            if h.epoch != assignment.epoch { continue }  // stale traffic from an earlier plan
            guard h.name == name else { throw ProtocolError.tensor(name: h.name, reason: "expected '\(name)'") }
            return (t, moving)
        }
    }

    func send(_ sock: ZMQSocket, _ name: String, _ t: Tensor<Float>) throws -> (UInt64, Double) {
        let t0 = Self.now()
        try Wire.send(sock, job: jobID, name: name, tensor: t, epoch: assignment.epoch, secret: options.secret)
        return (UInt64(t.count * 4), Self.now() - t0)
    }

    // MARK: forward

    func forward() throws -> (UInt64, Double) {
        let samples = self.samples
        var moved: UInt64 = 0, transfer = 0.0
        inputs.reset()
        finalHidden = []
        for (s, sample) in samples.enumerated() {
            var x: Tensor<Float>
            if range.lowerBound == 0 {
                x = sample.embeds
            } else {
                let (t, dt) = try receive("act/\(s)", what: "forward")
                x = t
                transfer += dt
            }
            let r = rope(sample)
            for l in range {
                try inputs.put(layer: l, sample: s, x)
                x = backend.blockForward(x, blocks[l]!, rope: r, mask: sample.attention, save: false, capture: false).output
                guard allFinite(x) else { throw ModelError.nonFinite(what: "block output", layer: l) }
            }
            if let down {
                let (b, dt) = try send(down, "act/\(s)", x)
                moved += b; transfer += dt
            } else {
                finalHidden.append(x)
            }
        }
        if inputs.spilledBytes > 0 {
            logger.info("forward: \(String(format: "%.1f", Double(inputs.spilledBytes) / 1048576)) MiB of block inputs spilled to scratch (\(String(format: "%.1f", Double(inputs.residentBytes) / 1048576)) MiB in memory)")
        }
        return (moved, transfer)
    }

    // MARK: backward

    /// A sample enters the statistics when it has vision and caption positions and at
    /// least one caption token is predicted (as GradientStatistics.compute decides).
    static func usable(_ s: CalibrationSample) -> String? {
        let vis = zip(s.vision, s.attention).contains { $0 && $1 }
        let cap = zip(s.caption, s.attention).contains { $0 && $1 }
        if !vis { return "no vision positions" }
        if !cap { return "no caption positions" }
        if !(0..<max(0, s.length - 1)).contains(where: { s.labels[$0 + 1] != -100 }) { return "no caption token is predicted" }
        return nil
    }

    func backward() throws -> (UInt64, Double) {
        let samples = self.samples
        var moved: UInt64 = 0, transfer = 0.0
        var sums = [Int: GradientStatistics.Layer]()
        for l in range { sums[l] = GradientStatistics.Layer() }
        var used = 0
        var skipped: [String] = []
        if head != nil && finalHidden.count != samples.count { throw ClusterError.missingInput(layer: range.upperBound, sample: finalHidden.count) }
        for (s, sample) in samples.enumerated() {
            if let why = Self.usable(sample) { skipped.append("sample \(s): \(why)"); continue }
            used += 1
            var dy: Tensor<Float>
            if let h = head {
                let f = lossHeadForward(finalHidden[s], norm: h.norm, lmHead: h.lm, labels: sample.labels, eps: h.eps)
                dy = lossHeadBackward(saved: f.saved, norm: h.norm, lmHead: h.lm)
            } else {
                let (t, dt) = try receive("grad/\(s)", what: "backward")
                dy = t
                transfer += dt
            }
            let r = rope(sample)
            let vis = zip(sample.vision, sample.attention).map { $0 && $1 }
            let cap = zip(sample.caption, sample.attention).map { $0 && $1 }
            for l in range.reversed() {
                let f = backend.blockForward(try inputs.get(layer: l, sample: s), blocks[l]!, rope: r, mask: sample.attention,
                                             save: true, capture: false)
                let g = backend.blockBackward(dy, f.saved!, blocks[l]!, rope: r, mask: sample.attention)
                sums[l]!.accumulate(attentionGrad: g.attentionOutput, mlpGrad: g.mlpOutput, vision: vis, caption: cap)
                dy = g.input
            }
            if let up {
                let (b, dt) = try send(up, "grad/\(s)", dy)
                moved += b; transfer += dt
            }
        }
        for l in range {
            var st = Mbq_LayerStats()
            st.layer = UInt32(l)
            st.attnVis = sums[l]!.attnVis; st.attnCap = sums[l]!.attnCap; st.mlpVis = sums[l]!.mlpVis; st.mlpCap = sums[l]!.mlpCap
            st.samples = UInt32(used)
            st.skipped = skipped
            st.epoch = assignment.epoch
            post(.layerStats(st))
        }
        return (moved, transfer)
    }

    // MARK: search

    /// Every owned layer in order: its groups searched (or SmoothQuant's scales taken)
    /// on the layer's inputs, each result reported as soon as it exists. Without
    /// --distort the inputs are the cached fp inputs and stages search in parallel; with
    /// it, a pipeline: the first layer's input is what the upstream stage's quantized
    /// blocks produced, and each quantized block feeds the next (QuantizeJob's order).
    func search(skip: Set<Int>) throws -> (UInt64, Double) {
        let samples = self.samples
        let opts = quantOptions.searchOptions
        let distort = quantOptions.distort
        var moved: UInt64 = 0, transfer = 0.0
        var xs: [Tensor<Float>] = []
        if distort {
            for (s, sample) in samples.enumerated() {
                if range.lowerBound == 0 {
                    xs.append(sample.embeds)
                } else {
                    let (t, dt) = try receive("dist/\(s)", what: "search")
                    xs.append(t)
                    transfer += dt
                }
            }
        }
        for l in range {
            if currentEpoch != assignment.epoch { throw Aborted(what: "search") }
            if skip.contains(l) {
                // Finished before a re-plan or a coordinator restart; with --distort its
                // quantized output is still needed (the coordinator sent its scales).
                if distort { xs = try distortedOutputs(l, xs) }
                continue
            }
            try testDelay("search")
            logger.info("searching layer \(l)")
            var layerSamples: [LayerSample] = []
            for (s, sample) in samples.enumerated() {
                let r = rope(sample)
                let x = distort ? xs[s] : try inputs.get(layer: l, sample: s)
                let f = backend.blockForward(x, blocks[l]!, rope: r, mask: sample.attention, save: false, capture: true)
                layerSamples.append(LayerSample(captures: f.captures!, rope: r, attention: sample.attention,
                                                vision: sample.vision, caption: sample.caption))
            }
            let found: [GroupResult]
            if quantOptions.method == .smoothquant {
                found = smoothQuantScales(l, layerSamples)
            } else {
                let ar = ratios?.attn[l] ?? 1, mr = ratios?.mlp[l] ?? 1
                found = backend.searchLayer(l, blocks[l]!, samples: layerSamples, attnRatio: ar, mlpRatio: mr, options: opts)
            }
            for g in found {
                var m = Mbq_GroupResult()
                m.layer = UInt32(g.layer); m.group = g.group.rawValue; m.bestIdx = UInt32(g.bestIndex)
                m.alpha = g.alpha; m.loss = g.losses; m.ratio = g.ratio; m.scales = g.scales
                m.epoch = assignment.epoch
                results[l, default: [:]][m.group] = m
                post(.groupResult(m))
            }
            if distort { xs = try distortedOutputs(l, xs) }
        }
        if distort, let down {
            for (s, x) in xs.enumerated() {
                let (b, dt) = try send(down, "dist/\(s)", x)
                moved += b; transfer += dt
            }
        }
        return (moved, transfer)
    }

    /// SmoothQuant (alpha 0.5) from max |x| per channel of the qkv and gate/up inputs,
    /// as QuantizeJob computes it; reported like search results (alpha 0.5, no curve).
    func smoothQuantScales(_ l: Int, _ layerSamples: [LayerSample]) -> [GroupResult] {
        let s = ApplyScales.smoothQuantLayer(blocks[l]!, samples: layerSamples)
        return [GroupResult(layer: l, group: .qkv, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.qkv),
                GroupResult(layer: l, group: .gateUp, bestIndex: 0, alpha: 0.5, losses: [], ratio: 1, scales: s.gateUp)]
    }

    /// Block `l` with its scales applied, before quantization.
    func scaledBlock(_ l: Int) throws -> DecoderBlockWeights<Float> {
        var w = blocks[l]!
        // The order QuantizeJob applies them in (it matters bit for bit: v_proj takes
        // both the qkv column scales and the o row scales).
        for group in SearchGroup.allCases {
            if let g = results[l]?[group.rawValue] { ApplyScales.apply(group, scales: g.scales, to: &w) }
        }
        if let unknown = results[l]?.keys.first(where: { SearchGroup(rawValue: $0) == nil }) {
            throw ProtocolError.malformed("unknown group '\(unknown)'")
        }
        return w
    }

    /// Block `l` with its scales applied and quantized (the apply phase's arithmetic):
    /// the weights the output holds and every linear's codes.
    func quantizedBlock(_ l: Int) throws -> (block: DecoderBlockWeights<Float>, codes: [String: QuantizedWeight]) {
        var w = try scaledBlock(l)
        let codes = ApplyScales.quantizeLinears(&w, with: quantOptions.weightQuantizer,
                                                precision: quantOptions.scaleDType.scalePrecision)
        return (w, codes)
    }

    /// --distort: the quantized block's output on `xs` (activations quantized as the
    /// model will run them).
    func distortedOutputs(_ l: Int, _ xs: [Tensor<Float>]) throws -> [Tensor<Float>] {
        let w = try quantizedBlock(l).block
        return zip(samples, xs).map { s, x in
            decoderBlockForward(x, weights: w, rope: rope(s), mask: s.attention, actBits: quantOptions.aBit).output
        }
    }

    // MARK: apply

    /// Scales applied, weights quantized; each block written straight into the shared
    /// output directory when this worker sees it, else its scaled block streamed to the
    /// coordinator, which quantizes and writes it with the same functions.
    func apply() throws {
        let shared = try outputIsShared()
        for l in range {
            if shared {
                let q = try quantizedBlock(l)
                let (file, bytes) = try QuantizedCheckpointWriter.writeLayer(ckpt!, layer: l, block: q.block, codes: q.codes,
                                                                             options: quantOptions, into: assignment.outputDir)
                var b = Mbq_BlockWritten()
                b.layer = UInt32(l); b.file = file; b.bytes = bytes; b.epoch = assignment.epoch
                post(.blockWritten(b))
            } else {
                for (role, t) in BlockTensors.roles(try scaledBlock(l)) {
                    outbox.post(try Wire.encode(job: jobID, name: "block/\(l)/\(role)", tensor: t, epoch: assignment.epoch))
                }
            }
        }
    }

    /// The output directory is shared when its marker file holds this job's token.
    func outputIsShared() throws -> Bool {
        let a = assignment
        if a.outputVia == "coordinator" || a.outputDir.isEmpty { return false }
        let marker = a.outputDir + "/" + OutputMarker.name
        let seen = (try? String(contentsOfFile: marker, encoding: .utf8)) == a.outputToken
        if !seen && a.outputVia == "shared" {
            throw ClusterError.output(path: a.outputDir, reason: "--output-via shared, but this worker does not see the coordinator's output directory (no \(OutputMarker.name) with this job's token)")
        }
        if !seen { logger.info("output directory \(a.outputDir) not visible here: streaming blocks to the coordinator") }
        return seen
    }
}

/// The file by which workers recognise the coordinator's output directory.
public enum OutputMarker {
    public static let name = ".mbq-output"
}
