import Foundation
import MBQFormats
import MBQMessages
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import MBQWire

/// The four phases as a worker runs them on its blocks (docs/DESIGN.md §3), in the same
/// order of operations as the one-process QuantizeJob so that the output is identical.
extension Worker {
    func rope(_ s: CalibrationSample) -> RoPETable<Float> {
        let cfg = ckpt!.config
        return RoPETable(positions: s.positions, config: cfg)
    }

    /// The calibration samples of this job (the first `assignment.samples` of the bundle).
    var samples: [CalibrationSample] { Array(bundle!.samples.prefix(Int(assignment.samples))) }

    // MARK: data sockets

    /// Waits for tensor `name` of the current epoch on the data socket.
    /// -> the tensor and the seconds spent moving it (taking it off the socket and
    /// checking it; time waiting for the upstream stage to compute is not counted).
    func receive(_ name: TensorName, what: String) throws -> (Tensor<Float>, Double) {
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
            guard TensorName(wire: h.name) == name else { throw ProtocolError.tensor(name: h.name, reason: "expected '\(name)'") }
            return (t, moving)
        }
    }

    func send(_ sock: ZMQSocket, _ name: TensorName, _ t: Tensor<Float>) throws -> (UInt64, Double) {
        let t0 = Self.now()
        try Wire.send(sock, job: jobID, name: name, tensor: t, epoch: assignment.epoch, secret: options.secret)
        return (UInt64(t.count * 4), Self.now() - t0)
    }

    // MARK: forward

    func forward() throws -> (UInt64, Double) {
        let samples = self.samples
        var moved: UInt64 = 0, transfer = 0.0
        var dropped = 0
        inputs.reset()
        finalHidden = []
        for (s, sample) in samples.enumerated() {
            var x: Tensor<Float>
            if range.lowerBound == 0 {
                x = sample.embeds
            } else {
                let (t, dt) = try receive(.activation(sample: s), what: "forward")
                x = t
                transfer += dt
            }
            // Block inputs are cached on the host: the first layer's always (in memory, or
            // past the budget in --scratch), the others while the budget holds them (the
            // backward recomputes the rest from the layer below).
            let first = range.lowerBound
            let y = try GradientPass.forward(try backend.upload(x), layers: range, blocks: { self.blocks[$0]! }, rope: rope(sample),
                                             mask: sample.attention, backend: backend) { l, input in
                let t = try self.backend.download(input)
                if l == first {
                    try self.inputs.put(layer: l, sample: s, t)
                } else if try !self.inputs.putIfRoom(layer: l, sample: s, t) {
                    dropped += 1
                }
            }
            if let down {
                let (b, dt) = try send(down, .activation(sample: s), try backend.download(y))
                moved += b; transfer += dt
            } else {
                finalHidden.append(y)
            }
        }
        if dropped > 0 {
            logger.info("forward: \(dropped) of \(samples.count * range.count) block inputs past the budget not kept (the backward recomputes them)")
        }
        if inputs.spilledBytes > 0 {
            logger.info("forward: \(String(format: "%.1f", Double(inputs.spilledBytes) / 1048576)) MiB of block inputs spilled to scratch (\(String(format: "%.1f", Double(inputs.residentBytes) / 1048576)) MiB in memory)")
        }
        return (moved, transfer)
    }

    // MARK: backward

    func backward() throws -> (UInt64, Double) {
        let samples = self.samples
        var moved: UInt64 = 0, transfer = 0.0
        var sums = [GradientStatistics.Layer](repeating: GradientStatistics.Layer(), count: range.count)
        var used = 0
        var skipped: [String] = []
        if head != nil && finalHidden.count != samples.count { throw MethodsError.missingInput(layer: range.upperBound, sample: finalHidden.count) }
        for (s, sample) in samples.enumerated() {
            if let why = GradientStatistics.skipReason(sample) { skipped.append("sample \(s): \(why)"); continue }
            used += 1
            var dy: BackendTensor
            if let h = head {
                dy = try backend.lossGradient(finalHidden[s], h, labels: sample.labels).grad
            } else {
                let (t, dt) = try receive(.gradient(sample: s), what: "backward")
                dy = try backend.upload(t)
                transfer += dt
            }
            let r = rope(sample)
            let xs = try GradientPass.inputs(sample: s, layers: range, blocks: { self.blocks[$0]! }, rope: r, mask: sample.attention,
                                             backend: backend) { l in
                self.inputs.contains(layer: l, sample: s) ? try self.backend.upload(try self.inputs.get(layer: l, sample: s)) : nil
            }
            let keepNorms = quantOptions.usesGPTQ && quantOptions.hessianWeights == .gradient
            dy = try GradientPass.backward(dy, layers: range, blocks: { self.blocks[$0]! }, input: { xs[$0 - self.range.lowerBound] },
                                           sample: sample, rope: r, backend: backend, sums: &sums,
                                           outputNorms: keepNorms ? { l, n in self.tokenNorms[l, default: [:]][s] = n } : nil)
            if let up {
                let (b, dt) = try send(up, .gradient(sample: s), try backend.download(dy))
                moved += b; transfer += dt
            }
        }
        for l in range {
            post(.layerStats(Mbq_LayerStats(layer: l, sums: sums[l - range.lowerBound], samples: used, skipped: skipped, epoch: assignment.epoch)))
        }
        return (moved, transfer)
    }

    // MARK: search

    /// Every owned layer in order: its groups searched (or SmoothQuant's scales taken)
    /// on the layer's inputs, each result reported as soon as it exists. Without
    /// --distort the first layer's inputs are the forward phase's and stages search in
    /// parallel; with it, a pipeline: they are what the upstream stage's quantized blocks
    /// produced. Each layer's outputs (fp, or quantized with --distort) are the next
    /// one's inputs (`LayerInputs`, QuantizeJob's order): two layers' inputs at a time.
    func search(skip: Set<Int>) throws -> (UInt64, Double) {
        let samples = self.samples
        let distort = quantOptions.sequential
        var moved: UInt64 = 0, transfer = 0.0
        let first = range.lowerBound
        if distort {
            inputs.reset()
            for (s, sample) in samples.enumerated() {
                if first == 0 {
                    try inputs.put(layer: first, sample: s, sample.embeds)
                } else {
                    let (t, dt) = try receive(.distorted(sample: s), what: "search")
                    try inputs.put(layer: first, sample: s, t)
                    transfer += dt
                }
            }
        }
        let walk = LayerInputs(layer: first, samples: samples.count, store: inputs, backend: backend)
        for l in range {
            if currentEpoch != assignment.epoch { throw Aborted(what: "search") }
            // The last layer's outputs are needed only downstream with --distort.
            let next = l < range.upperBound - 1 || (distort && down != nil)
            if skip.contains(l) {
                // Finished before a re-plan or a coordinator restart: only its outputs
                // are needed (with --distort, the quantized ones: the coordinator sent
                // its scales). GPTQ's codes are rounded again (the same bits: the same
                // inputs and scales) for its outputs and the apply phase.
                if quantOptions.usesGPTQ {
                    let q = try gptqLayer(l, walk: walk)
                    if next { try LayerStep.distort(q.block, inputs: walk, samples: samples, rope: rope, options: quantOptions) }
                } else if distort {
                    try LayerStep.distort(try quantizedBlock(l).block, inputs: walk, samples: samples, rope: rope, options: quantOptions)
                } else if next {
                    try walk.forward(blocks[l]!, samples: samples, rope: rope)
                }
                if next { try walk.advance() }
                continue
            }
            try testDelay("search")
            logger.info("searching layer \(l)")
            let found = try LayerStep.search(layer: l, block: blocks[l]!, samples: samples, input: walk.input,
                                             output: distort || !next ? nil : walk.keepOutput, rope: rope, chunkTokens: chunkTokens,
                                             attnRatio: ratios?.attn[l] ?? 1, mlpRatio: ratios?.mlp[l] ?? 1,
                                             options: quantOptions, backend: backend)
            for g in found {
                let m = Mbq_GroupResult(g, epoch: assignment.epoch)
                results[l, default: [:]][g.group] = m
                post(.groupResult(m))
            }
            if quantOptions.usesGPTQ {
                let q = try gptqLayer(l, walk: walk)
                post(.gptqReport(Mbq_GptqReport(layer: l, q.reports, epoch: assignment.epoch)))
                if next { try LayerStep.distort(q.block, inputs: walk, samples: samples, rope: rope, options: quantOptions) }
            } else if distort {
                try LayerStep.distort(try quantizedBlock(l).block, inputs: walk, samples: samples, rope: rope, options: quantOptions)
            }
            if next { try walk.advance() }
        }
        if distort, let down {
            for s in samples.indices {
                let (b, dt) = try send(down, .distorted(sample: s), try backend.download(try walk.input(s)))
                moved += b; transfer += dt
            }
        }
        inputs.reset()
        return (moved, transfer)
    }

    /// GPTQ on block `l` with its scales applied (`LayerStep.gptq`, the one-process
    /// arithmetic), on the layer's inputs in `walk`; kept for the apply phase.
    func gptqLayer(_ l: Int, walk: LayerInputs) throws -> (block: BackendBlock, codes: [String: QuantizedWeight], reports: [GPTQLinearReport]) {
        let samples = self.samples
        let (attn, mlp) = (ratios?.attn[l] ?? 1, ratios?.mlp[l] ?? 1)
        if quantOptions.hessianWeights == .modality && ratios == nil {
            throw ProtocolError.malformed("GPTQ with modality weights, but no ratios reached this worker before layer \(l)")
        }
        let norms = tokenNorms.removeValue(forKey: l) ?? [:]
        if quantOptions.hessianWeights == .gradient && norms.isEmpty {
            throw ProtocolError.malformed("GPTQ with gradient weights, but this worker holds no token gradients of layer \(l) (no backward in this plan)")
        }
        let q = try LayerStep.gptq(layer: l, scaled: try scaledBlock(l), samples: samples, input: walk.input, rope: rope,
                                   chunkTokens: chunkTokens, attnRatio: attn, mlpRatio: mlp, gradientNorms: norms,
                                   options: quantOptions, backend: backend)
        gptqDone[l] = q.codes
        return q
    }

    /// Block `l` with its scales applied, before quantization (`LayerStep.applied`).
    func scaledBlock(_ l: Int) throws -> BackendBlock {
        var scales: [SearchGroup: [Float]] = [:]
        for (g, r) in results[l] ?? [:] { scales[g] = r.scales }
        return try LayerStep.applied(blocks[l]!, scales: scales, backend: backend)
    }

    /// Block `l` with its scales applied and quantized (the apply phase's arithmetic):
    /// the weights the output holds and every linear's codes.
    func quantizedBlock(_ l: Int) throws -> (block: BackendBlock, codes: [String: QuantizedWeight]) {
        try LayerStep.quantized(try scaledBlock(l), options: quantOptions, backend: backend)
    }

    // MARK: apply

    /// Scales applied, weights quantized; each layer's shard written straight into the
    /// shared output directory when this worker sees it, else the shard's bytes (exactly
    /// what the writer would have put on disk) streamed to the coordinator, which writes
    /// them as they came: one path to a byte-identical output.
    func apply() throws {
        let shared = try outputIsShared()
        for l in range {
            let block: DecoderBlockWeights<Float>, codes: [String: QuantizedWeight]
            if quantOptions.usesGPTQ {
                // The scaled block with each linear its GPTQ codes dequantized, as
                // `GPTQLayer.quantize` made it.
                guard let done = gptqDone.removeValue(forKey: l) else {
                    throw ProtocolError.malformed("apply: layer \(l)'s GPTQ codes were not made by this worker's search")
                }
                var b = try backend.downloadBlock(try scaledBlock(l))
                for (role, path) in ApplyScales.linears {
                    guard let c = done[role] else { throw ProtocolError.malformed("apply: layer \(l) has no GPTQ codes for \(role)") }
                    b[keyPath: path] = c.dequantized(precision: quantOptions.scaleDType.scalePrecision)
                }
                (block, codes) = (b, done)
            } else {
                let q = try quantizedBlock(l)
                (block, codes) = (try backend.downloadBlock(q.block), q.codes)
            }
            let shard = try QuantizedCheckpointWriter.layerShard(ckpt!, layer: l, block: block, codes: codes, options: quantOptions)
            if shared {
                try QuantizedCheckpointWriter.writeShard(shard.file, shard.bytes, into: assignment.outputDir)
                var b = Mbq_BlockWritten()
                b.layer = UInt32(l); b.file = shard.file; b.bytes = UInt64(shard.bytes.count); b.epoch = assignment.epoch
                post(.blockWritten(b))
            } else {
                outbox.post(try Wire.encode(job: jobID, name: .shard(layer: l, file: shard.file), bytes: shard.bytes, epoch: assignment.epoch))
            }
        }
    }

    /// The output directory is shared when its marker file holds this job's token.
    func outputIsShared() throws -> Bool {
        let a = assignment
        if a.outputVia == .coordinator || a.outputDir.isEmpty { return false }
        let marker = a.outputDir + "/" + OutputMarker.name
        let seen = (try? String(contentsOfFile: marker, encoding: .utf8)) == a.outputToken
        if !seen && a.outputVia == .shared {
            throw WorkerError.output(path: a.outputDir, reason: "--output-via shared, but this worker does not see the coordinator's output directory (no \(OutputMarker.name) with this job's token)")
        }
        if !seen { logger.info("output directory \(a.outputDir) not visible here: streaming blocks to the coordinator") }
        return seen
    }
}
