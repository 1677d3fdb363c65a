import ArgumentParser
import CBLAS
import Foundation
import MBQCluster
import MBQCoordinator
import MBQDevice
import MBQFormats
import MBQMethods
import MBQModel
import MBQQuant
import MBQTensor
import MBQWire
import MBQWorker

/// `mbq bench`: GEMM through the wrapper vs raw cblas_sgemm, and one Llama-7B-shaped
/// decoder block forward and forward+backward, optionally next to PyTorch's time for
/// the same block, tokens and threads (Scripts/bench_torch_block.py).
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Benchmark GEMM and a Llama-7B-shaped decoder block (prints figures and ratios).")

    @Option(help: "Tokens in the block benchmark.") var tokens = 2048
    @Option(help: "Hidden size.") var hidden = 4096
    @Option(help: "MLP intermediate size.") var intermediate = 11008
    @Option(help: "Attention heads.") var heads = 32
    @Option(help: "Timed repetitions (the best is reported).") var reps = 2
    @Option(help: "A Python with torch + transformers: also time PyTorch on the same block.") var torch: String?
    @Flag(help: "Skip the GEMM part.") var noGemm = false
    @Flag(help: "Skip the block forward/backward part.") var noBlock = false
    @Flag(help: "Also time the MBQ search (W4 g128) of the block, next to the PyTorch port of the authors' search.") var search = false
    @Flag(help: "Only GPTQ (W4 g128) on one layer of this shape: Hessians from --tokens random tokens in samples of 512, then the 7 linears; with --torch, next to the PyTorch port.")
    var gptq = false
    @Flag(help: "Only the worker-to-worker activation streaming benchmark (64 MiB tensors over loopback).") var transport = false
    @Flag(help: "Only the quantizer and packing benchmark (one 11008x4096 weight): the search's fused candidate, codes, dequantization, each format's packing.")
    var quant = false
    @Flag(help: "Only the distributed benchmarks: streaming, then the demo job on 3 local workers (transfer share, cost model vs measured).")
    var cluster = false
    @Option(help: "Run the block and search parts on this device (cuda, cuda:N, cuda-emulated) with the CUDA backend.") var device = "cpu"
    @Option(help: "With --device: also write the figures as JSON to this file.") var json: String?
    @Option(help: "With --device: the GEMMs' precision, strict or bf16.") var precision: GEMMPrecision = .strict
    @Option(help: .hidden) var transportSend: String?
    @OptionGroup var common: CommonOptions

    /// Eight different 64 MiB windows (identical inputs would let the optimizer fold the
    /// calls into one, which once made this print a rate 8x too high).
    func checksumRate() -> Double {
        var rng = SeededRandom(seed: 3)
        let buf = (0..<((64 << 20) + 8) / 4).map { _ in Float(rng.normal()) }
        let (sums, ct) = timed {
            (0..<8).map { i in buf.withUnsafeBytes { Checksum64.of(UnsafeRawBufferPointer(rebasing: $0[i..<(i + (64 << 20))])) } }
        }
        precondition(Set(sums).count == 8)
        return 8 * 64 * 1.048576e-3 / ct
    }

    /// GB/s of fp32 weight processed (4 bytes per element) by each quantizer path and each
    /// format's packing of one MLP-sized weight; the best of `reps` runs.
    func quantBench() {
        var rng = SeededRandom(seed: 11)
        let w = Tensor<Float>(shape: [intermediate, hidden], data: (0..<(intermediate * hidden)).map { _ in Float(rng.normal()) })
        let s = (0..<hidden).map { _ in Float(0.5 + rng.uniform()) }
        let gb = Double(w.count * 4) / 1e9
        func rate(_ label: String, _ body: () -> Void) {
            print(label.padding(toLength: 58, withPad: " ", startingAt: 0) + String(format: " %6.2f GB/s", gb / best(reps, body)))
        }
        print("quantizer and packing, one \(intermediate)x\(hidden) fp32 weight, \(EngineThreads.count) engine threads:")
        rate("search candidate Q(W diag s) diag(s)^-1, w4 g128 (fused)") { _ = Quantize.groupAsymmetric(w, bits: 4, group: 128, columnScales: s) }
        rate("codes, w4 g128 asymmetric") { _ = Quantize.groupAsymmetricCodes(w, bits: 4, group: 128) }
        rate("codes, w8 symmetric per channel") { _ = Quantize.rowSymmetricCodes(w, bits: 8) }
        let q = Quantize.groupAsymmetricCodes(w, bits: 4, group: 128)
        rate("dequantize, fp32 scales") { _ = q.dequantized() }
        rate("dequantize, bf16 scales") { _ = q.dequantized(precision: .bf16) }
        for (format, label) in [(CheckpointFormat.compressedTensors, "pack compressed-tensors w4 g128"), (.awq, "pack AutoAWQ w4 g128"),
                                (.gptq, "pack GPTQ w4 g128")] {
            rate(label) {
                var writer = SafetensorsWriter()
                PackedLinear.add(q, module: "m", format: format, scaleDType: .bf16, to: &writer)
            }
        }
    }

    /// Two processes, as two workers: this one receives and checks, a child sends.
    func streamingBench() throws {
        let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        print(String(format: "activation streaming worker-to-worker (two processes, ZeroMQ PUSH/PULL over loopback, 64 MiB tensors in 1 MiB frames, checksummed): %.2f GB/s (target >= 2 GB/s)",
                     try TransportBenchmark.run(sender: [me, "bench", "--transport-send"])))
    }

    /// Streaming throughput, then `mbq quantize --workers 3` on the demo model and data,
    /// with what its coordinator logged about transfers and the cost model.
    func clusterBench() throws {
        try streamingBench()
        let dir = NSTemporaryDirectory() + "mbq-bench-cluster-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (_, model, calib) = try SyntheticDemoData.write(to: dir)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        p.arguments = ["quantize", "--model", model, "--calib", calib, "--w-bit", "3", "--workers", "3", "--out", dir + "/out",
                       "--log-format", "json"]
        let pipe = Pipe()
        p.standardError = pipe
        p.standardOutput = FileHandle.nullDevice
        let t0 = Date()
        try p.run()
        let log = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw ValidationError("the 3-worker demo job failed:\n\(log.suffix(3000))") }
        print(String(format: "demo job (mbq demo's model: 4 layers, hidden 256; 32 samples x 128 tokens; W3 g128 mbq) on 3 local workers: %.2f s wall", Date().timeIntervalSince(t0)))
        // The coordinator's events (one JSON object per line), shown as the text log renders them.
        for line in log.split(separator: "\n") where line.hasPrefix("{") {
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let name = o["event"] as? String, ["planned", "job_done", "cost_model_predicted", "cost_model_measured"].contains(name) else { continue }
            print("  " + String(line))
        }
    }

    func best(_ n: Int, _ body: () -> Void) -> Double {
        (0..<max(1, n)).map { _ in timed(body).1 }.min()!
    }

    func run() throws {
        common.apply()
        try runReportingErrors {
            print("OpenBLAS core \(BLASRuntime.coreName), threads \(BLASRuntime.threads), engine threads \(EngineThreads.count)")
            print("OpenBLAS config: \(BLASRuntime.config)")
            print("OPENBLAS_CORETYPE=\(ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] ?? "(unset)")")
            if let endpoint = transportSend {
                // The sending process of the streaming benchmark: send, then stay until the
                // receiver stops it (exiting would drop what ZeroMQ has not sent yet).
                try TransportBenchmark.send(to: endpoint)
                sleep(300)
                return
            }
            if cluster {
                try clusterBench()
                return
            }
            if quant {
                quantBench()
                return
            }
            if gptq {
                try gptqBench()
                return
            }
            if transport {
                print(String(format: "Checksum64: %.1f GB/s", checksumRate()))
                try streamingBench()
                return
            }
            if let dev = try DeviceSelection(parsing: device).open() {
                let report = try deviceBench(makeBlock(), device: dev, label: device)
                if let json {
                    try AtomicFile.write(data: try JSONSerialization.data(withJSONObject: report, options: [.prettyPrinted, .sortedKeys]), to: json)
                }
                return
            }
            if !noGemm {
                gemmBench(m: 4096, k: 4096, n: 4096, label: "4096x4096x4096")
                gemmBench(m: 2048, k: 4096, n: 11008, label: "2048x4096 -> 11008 (linear)")
            }
            let w = makeBlock()
            if !noBlock { try blockBench(w) }
            if search { try searchBench(w) }
        }
    }

    /// Runs a Python script from Scripts/ and returns its last stdout line as JSON.
    /// The script is looked up under the working directory's Scripts/ first (a bundle run
    /// beside a copy of them, as the device check does), then in the source tree mbq was built from.
    func python(_ py: String, _ script: String, _ args: [String]) throws -> [String: Any] {
        let local = FileManager.default.currentDirectoryPath + "/Scripts/" + script
        let path = FileManager.default.fileExists(atPath: local) ? local
            : URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("Scripts/" + script).path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: py.contains("/") ? py : "/usr/bin/env")
        let prefix = py.contains("/") ? [] : [py]   // a bare name ("python3") through PATH
        p.arguments = prefix + [path] + args
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0, let line = String(data: data, encoding: .utf8)?.split(separator: "\n").last,
              let obj = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw ValidationError("PyTorch benchmark failed (\(path)); its output: \(String(decoding: data, as: UTF8.self))")
        }
        return obj
    }

    /// GPTQ W4 g128 on one layer's 7 linears (Llama-shaped by default): the Hessians of
    /// the four captured inputs from `tokens` random rows in samples of 512 (token weight
    /// 1), then each linear rounded; the PyTorch port does the same on the same shapes.
    func gptqBench() throws {
        var rng = SeededRandom(seed: 11)
        func random(_ shape: [Int], _ scale: Float) -> Tensor<Float> {
            var t = Tensor<Float>(zeros: shape)
            for j in 0..<t.count { t.data[j] = Float(rng.normal()) * scale }
            return t
        }
        let shapes: [(String, Int, Int, String)] = [("q", hidden, hidden, "qkv"), ("k", hidden, hidden, "qkv"), ("v", hidden, hidden, "qkv"),
                                                     ("o", hidden, hidden, "o"), ("gate", intermediate, hidden, "gate_up"),
                                                     ("up", intermediate, hidden, "gate_up"), ("down", hidden, intermediate, "down")]
        let weights = shapes.map { random([$0.1, $0.2], 0.02) }
        let inputs = [("qkv", hidden), ("o", hidden), ("gate_up", hidden), ("down", intermediate)].map { ($0.0, random([tokens, $0.1], 1)) }
        // The best of --reps runs: a job's later layers reuse the first one's buffers (their
        // page faults are paid once), which a single cold run would charge to every layer.
        var best: (hessians: Double, factors: Double, quant: Double, perLinear: [String])? = nil
        for _ in 0..<max(1, reps) {
            var hessians: [String: [Double]] = [:]
            var hessianSeconds = 0.0
            for (input, x) in inputs {
                let cols = x.cols
                let (h, t) = timed { () -> [Double] in
                    var acc = HessianAccumulator(cols: cols)
                    for s in stride(from: 0, to: tokens, by: 512) {
                        let n = min(512, tokens - s)
                        acc.add(Tensor(shape: [n, cols], data: Array(x.data[(s * cols)..<((s + n) * cols)])), weights: [Float](repeating: 1, count: n))
                    }
                    return acc.hessian
                }
                hessians[input] = h
                hessianSeconds += t
            }
            // As the job does: one factorization per Hessian, shared by the linears reading it.
            var factorSeconds = 0.0, quantSeconds = 0.0
            var factors: [String: GPTQ.Factor] = [:]
            var perLinear: [String] = []
            let settings = GPTQSettings(bits: 4, group: 128)
            for ((role, _, cols, input), w) in zip(shapes, weights) {
                if factors[input] == nil {
                    let (f, t) = try timed { try GPTQ.factor(hessian: hessians[input]!, cols: cols, damp: settings.damp, actOrder: false) }
                    factors[input] = f
                    factorSeconds += t
                }
                let (_, t) = timed { GPTQ.quantize(w, factor: factors[input]!, settings: settings) }
                quantSeconds += t
                perLinear.append("\(role) \(String(format: "%.2f", t))")
            }
            if best == nil || hessianSeconds + factorSeconds + quantSeconds < best!.hessians + best!.factors + best!.quant {
                best = (hessianSeconds, factorSeconds, quantSeconds, perLinear)
            }
        }
        let b = best!
        let total = b.hessians + b.factors + b.quant
        print(String(format: "GPTQ W4 g128, %d tokens (best of %d): Hessians %.2f s, 4 factorizations %.2f s, rounding 7 linears %.2f s (%@), layer %.2f s; peak RSS %.2f GiB",
                     tokens, max(1, reps), b.hessians, b.factors, b.quant, b.perLinear.joined(separator: ", "), total,
                     Double(peakRSSBytes()) / 1073741824))
        guard let py = torch else { return }
        let obj = try python(py, "reference/gptq_reference.py", ["--bench", "--threads", "\(BLASRuntime.threads)", "--tokens", "\(tokens)",
                                                                   "--hidden", "\(hidden)", "--intermediate", "\(intermediate)",
                                                                   "--reps", "\(max(1, reps))"])
        guard let pt = obj["layer_s"] as? Double, let ph = obj["hessians_s"] as? Double, let pq = obj["gptq_s"] as? Double else {
            throw ValidationError("PyTorch GPTQ benchmark printed no layer_s")
        }
        print(String(format: "PyTorch port of the reference GPTQ (best of %d): Hessians %.2f s, 7 linears %.2f s, layer %.2f s", max(1, reps), ph, pq, pt))
        print(String(format: "ratio Swift/PyTorch GPTQ layer: %.2fx (target <= 0.5x)", total / pt))
    }

    /// The process's peak resident set (VmHWM), bytes.
    func peakRSSBytes() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kb = Int(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
        return kb * 1024
    }

    /// MBQ's search of every group of the block (W4 g128, mae, reweighted with ratio 0.5)
    /// on one sequence: half image tokens, the last eighth caption, as the PyTorch port does.
    func searchBench(_ w: DecoderBlockWeights<Float>) throws {
        var rng = SeededRandom(seed: 5)
        var x = Tensor<Float>(zeros: [tokens, hidden])
        for j in 0..<x.count { x.data[j] = Float(rng.normal()) }
        let mask = [Bool](repeating: true, count: tokens)
        var vis = [Bool](repeating: false, count: tokens), cap = vis
        for i in 16..<min(tokens, 16 + tokens / 2) { vis[i] = true }
        for i in (tokens - tokens / 8)..<tokens { cap[i] = true }
        let rope = RoPETable<Float>(positions: [Array(0..<tokens)], headDim: hidden / heads, theta: 10000)
        let (f, fwdT) = timed { decoderBlockForward(x, weights: w, rope: rope, mask: mask, capture: true) }
        let sample = LayerSample(captures: f.captures!, rope: rope, attention: mask, vision: vis, caption: cap)
        let options = SearchOptions(weights: .groupAsymmetric(bits: 4, group: 128), reweight: true)
        var groupTimes: [(SearchGroup, Double)] = []
        for g in ScaleSearch.groups(for: w) {
            let (_, t) = try timed { try ScaleSearch.searchGroup(g, layer: 0, weights: w, samples: [sample], ratio: 0.5, options: options) }
            groupTimes.append((g, t))
        }
        let total = groupTimes.map(\.1).reduce(0, +)
        print(String(format: "MBQ search W4 g128, %d tokens: %.3f s (%@); captures forward %.4f s", tokens, total,
                     groupTimes.map { "\($0.0.rawValue) \(String(format: "%.3f", $0.1))" }.joined(separator: ", "), fwdT))
        guard let py = torch else { return }
        let obj = try python(py, "reference/mbq_reference.py", ["--bench", "--threads", "\(BLASRuntime.threads)", "--tokens", "\(tokens)",
                                                                  "--hidden", "\(hidden)", "--intermediate", "\(intermediate)", "--heads", "\(heads)"])
        guard let ts = obj["search_s"] as? Double, let groups = obj["groups_s"] as? [String: Double] else {
            throw ValidationError("PyTorch search benchmark printed no search_s")
        }
        print(String(format: "PyTorch port of the authors' search: %.1f s (%@)", ts,
                     groups.sorted { $0.key < $1.key }.map { "\($0.key) \(String(format: "%.1f", $0.value))" }.joined(separator: ", ")))
        print(String(format: "ratio Swift/PyTorch search: %.2fx (target <= 0.7x)", total / ts))
    }

    func gemmBench(m: Int, k: Int, n: Int, label: String) {
        var rng = SeededRandom(seed: 1)
        let a: Tensor<Float> = rng.normalTensor([m, k])
        let w: Tensor<Float> = rng.normalTensor([n, k])
        var c = [Float](repeating: 0, count: m * n)
        let flops = 2.0 * Double(m) * Double(n) * Double(k)
        // Raw: cblas_sgemm straight on preallocated buffers, y = a w^T, with OpenBLAS's own
        // threading. Wrapper: linearForward, which allocates its output, checks shapes and
        // runs the thread-count-invariant tiles (TiledGEMM), as the engine uses it. The
        // two alternate so that clock changes hit both alike; best of each.
        func rawOnce() {
            BLASRuntime.withOpenBLASThreads(BLASRuntime.threads) {
                a.data.withUnsafeBufferPointer { pa in
                    w.data.withUnsafeBufferPointer { pw in
                        c.withUnsafeMutableBufferPointer { pc in
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1,
                                        pa.baseAddress, Int32(k), pw.baseAddress, Int32(k), 0, pc.baseAddress, Int32(n))
                        }
                    }
                }
            }
        }
        var sink: Float = 0
        rawOnce()
        var raw = Double.infinity, wrapped = Double.infinity
        for _ in 0..<max(3, reps + 1) {
            raw = min(raw, timed { rawOnce() }.1)
            wrapped = min(wrapped, timed { sink += linearForward(a, weight: w).data[0] }.1)
        }
        let g1 = flops / raw / 1e9, g2 = flops / wrapped / 1e9
        print(String(format: "GEMM %@: raw cblas_sgemm %.1f GFLOP/s, wrapper %.1f GFLOP/s, wrapper/raw %.1f%%", label, g1, g2, 100 * g2 / g1))
        _ = sink
    }

    func makeBlock() -> DecoderBlockWeights<Float> {
        let d = hidden / heads
        var rng = SeededRandom(seed: 2)
        func lin(_ o: Int, _ i: Int) -> Tensor<Float> {
            let s = 1 / Float(i).squareRoot()
            var t = Tensor<Float>(zeros: [o, i])
            for j in 0..<t.count { t.data[j] = s * (Float(rng.uniform()) * 2 - 1) }
            return t
        }
        let w = DecoderBlockWeights<Float>(
            inputNorm: Tensor(shape: [hidden], repeating: 1), postAttentionNorm: Tensor(shape: [hidden], repeating: 1),
            q: lin(hidden, hidden), k: lin(hidden, hidden), v: lin(hidden, hidden), o: lin(hidden, hidden),
            qBias: nil, kBias: nil, vBias: nil, oBias: nil,
            gate: lin(intermediate, hidden), up: lin(intermediate, hidden), down: lin(hidden, intermediate),
            shape: AttentionShape(heads: heads, kvHeads: heads, headDim: d), rmsNormEps: 1e-6)
        return w
    }

    func blockBench(_ w: DecoderBlockWeights<Float>) throws {
        let d = hidden / heads
        var rng = SeededRandom(seed: 3)
        var x = Tensor<Float>(zeros: [tokens, hidden])
        for j in 0..<x.count { x.data[j] = Float(rng.uniform()) * 2 - 1 }
        let mask = [Bool](repeating: true, count: tokens)
        let rope = RoPETable<Float>(positions: [Array(0..<tokens)], headDim: d, theta: 10000)
        let dy = x
        var sink: Float = 0
        let fwd = best(reps) { sink += decoderBlockForward(x, weights: w, rope: rope, mask: mask).output.data[0] }
        let fwdBwd = best(reps) {
            let f = decoderBlockForward(x, weights: w, rope: rope, mask: mask, save: true)
            sink += decoderBlockBackward(dy, saved: f.saved!, weights: w, rope: rope, mask: mask).input.data[0]
        }
        _ = sink
        print(String(format: "block %dx%d (inter %d, %d heads, %d tokens, fp32): forward %.4f s, forward+backward %.4f s",
                     hidden, hidden, intermediate, heads, tokens, fwd, fwdBwd))
        guard let py = torch else {
            print("(pass --torch PYTHON to time PyTorch on the same block)")
            return
        }
        let obj = try python(py, "bench_torch_block.py", ["--threads", "\(BLASRuntime.threads)", "--tokens", "\(tokens)",
                                                         "--hidden", "\(hidden)", "--intermediate", "\(intermediate)",
                                                         "--heads", "\(heads)", "--reps", "\(reps)"])
        guard let tf = obj["forward_s"] as? Double, let tfb = obj["forward_backward_s"] as? Double else {
            throw ValidationError("PyTorch block benchmark printed no times")
        }
        print(String(format: "PyTorch %@ (%@ attention): forward %.2f s, forward+backward %.2f s",
                     obj["torch"] as? String ?? "?", obj["attention"] as? String ?? "?", tf, tfb))
        print(String(format: "ratio Swift/PyTorch: forward %.2fx, forward+backward %.2fx (target forward <= 1.0x)", fwd / tf, fwdBwd / tfb))
    }
}
