import ArgumentParser
import Foundation
import MBQCUDABackend
import MBQDevice
import MBQMethods
import MBQModel
import MBQTensor

/// `mbq bench --device cuda|cuda-emulated`: the GEMM wrapper against the device's raw
/// GEMM, and the Llama-7B-shaped block's forward, forward+backward and MBQ W4 g128 search
/// on the CUDA backend; with --torch, the authors' search in PyTorch on the same device.
/// Every figure is measured here, on the device named in the output.
extension BenchCommand {
    func deviceBench(_ w: DecoderBlockWeights<Float>, device dev: Device, label: String) throws -> [String: Any] {
        let backend = CUDABackend(device: dev, precision: precision)
        var report: [String: Any] = ["device": backend.device, "selection": label, "precision": precision.rawValue, "tokens": tokens, "hidden": hidden,
                                     "intermediate": intermediate, "heads": heads]
        print("device: \(backend.device)")
        func seconds(_ body: () throws -> Void) throws -> Double {
            var best = Double.infinity
            for _ in 0..<max(2, reps) {
                try dev.synchronize()
                let t0 = DispatchTime.now().uptimeNanoseconds
                try body()
                try dev.synchronize()
                best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
            }
            return best
        }
        // GEMM: y = x Wᵀ for x [T, 4096], W [11008, 4096]; raw = one cuBLAS call on buffers
        // made beforehand, wrapper = DeviceOps.linear with its output allocated per call.
        var rng = SeededRandom(seed: 1)
        let x = try DeviceArray(dev, rng.normalTensor([tokens, hidden]).data)
        let wt = try DeviceArray(dev, rng.normalTensor([intermediate, hidden]).data)
        let y = try DeviceArray(dev, count: tokens * intermediate)
        let flops = 2 * Double(tokens) * Double(hidden) * Double(intermediate)
        let raw = try seconds {
            try dev.gemm(GEMM(transA: .transpose, transB: .none, m: intermediate, n: tokens, k: hidden, a: wt.pointer, lda: hidden,
                              b: x.pointer, ldb: hidden, c: y.pointer, ldc: intermediate, precision: precision))
        }
        let wrapped = try seconds {
            let out = try DeviceArray(dev, count: tokens * intermediate)
            try backend.ops.linear(x.pointer, weight: wt.pointer, into: out.pointer, rows: tokens, inFeatures: hidden, outFeatures: intermediate)
        }
        print(String(format: "GEMM %dx%d -> %d (linear), \(precision.rawValue): raw %.1f GFLOP/s, wrapper %.1f GFLOP/s, wrapper/raw %.1f%%",
                     tokens, hidden, intermediate, flops / raw / 1e9, flops / wrapped / 1e9, 100 * raw / wrapped))
        report["gemm_raw_gflops"] = flops / raw / 1e9
        report["gemm_wrapper_gflops"] = flops / wrapped / 1e9

        // The block and its search, on one sequence as the CPU bench runs it.
        var r2 = SeededRandom(seed: 5)
        let xs: Tensor<Float> = r2.normalTensor([tokens, hidden])
        let mask = [Bool](repeating: true, count: tokens)
        var vis = [Bool](repeating: false, count: tokens), cap = vis
        for i in 16..<min(tokens, 16 + tokens / 2) { vis[i] = true }
        for i in (tokens - tokens / 8)..<tokens { cap[i] = true }
        let rope = RoPETable<Float>(positions: [Array(0..<tokens)], headDim: hidden / heads, theta: 10000)
        let b = try backend.loadBlock(w)
        let bx = try backend.upload(xs)
        let fwd = try seconds { _ = try backend.blockForward(bx, b, rope: rope, mask: mask, save: false, capture: false, actBits: nil) }
        let dy = try backend.upload(r2.normalTensor([tokens, hidden]))
        let fb = try seconds {
            let f = try backend.blockForward(bx, b, rope: rope, mask: mask, save: true, capture: false, actBits: nil)
            _ = try backend.blockBackward(dy, f.saved!, b, rope: rope, mask: mask)
        }
        print(String(format: "block %d tokens: forward %.4f s, forward+backward %.4f s", tokens, fwd, fb))
        report["forward_s"] = fwd
        report["forward_backward_s"] = fb
        let captured = try backend.blockForward(bx, b, rope: rope, mask: mask, save: false, capture: true, actBits: nil)
        let sample = BackendLayerSample(captures: captured.captures!, rope: rope, attention: mask, vision: vis, caption: cap)
        let options = SearchOptions(weights: .groupAsymmetric(bits: 4, group: 128), reweight: true)
        let (groups, search) = try timed {
            try backend.searchLayer(0, b, samples: .captured([sample]), attnRatio: 0.5, mlpRatio: 0.5, options: options)
        }
        print(String(format: "MBQ search W4 g128, %d tokens: %.3f s (grid points %@)", tokens, search,
                     groups.map { "\($0.group.rawValue) \($0.bestIndex)" }.joined(separator: ", ")))
        report["search_s"] = search
        report["search_best"] = Dictionary(uniqueKeysWithValues: groups.map { ($0.group.rawValue, $0.bestIndex) })
        guard let py = torch else { return report }
        let obj = try python(py, "reference/mbq_reference.py", ["--bench", "--threads", "\(BLASRuntime.threads)", "--tokens", "\(tokens)",
                                                                  "--hidden", "\(hidden)", "--intermediate", "\(intermediate)", "--heads", "\(heads)",
                                                                  "--device", dev is CUDADevice ? "cuda" : "cpu"])
        guard let ts = obj["search_s"] as? Double else { throw ValidationError("PyTorch search benchmark printed no search_s") }
        print(String(format: "PyTorch port of the authors' search on %@: %.2f s; ratio Swift/PyTorch %.2fx (target <= 0.5x)",
                     obj["device"] as? String ?? "?", ts, search / ts))
        report["torch_search_s"] = ts
        report["torch"] = obj
        return report
    }
}
