import Foundation
import MBQFormats
import MBQTensor

/// `mbq_results.json`, `mbq_scales.safetensors` and `report.md` + `ratios.svg`.
public enum ResultsFile {
    public static func json(_ r: QuantizeResult) -> [String: Any] {
        let o = r.options
        var j: [String: Any] = ["method": o.method.rawValue, "w_bit": o.wBit, "group_size": o.aBit == nil ? o.group : -1,
                                "a_bit": o.aBit ?? 16, "loss": o.loss.rawValue, "reweight": o.effectiveReweight,
                                "distort": o.distort, "seconds": r.seconds,
                                // How the output stores the codes: the fake weights and every
                                // packed format dequantize (q - z) * scale in this precision.
                                "format": o.resolvedFormat.rawValue, "scale_dtype": o.scaleDType.rawValue]
        if let s = r.gradStats {
            j["grad_stats"] = [
                "samples_used": s.samplesUsed, "skipped": s.skipped,
                "layers": s.layers.enumerated().map { i, l in
                    ["layer": i, "attn_vis": l.attnVis, "attn_cap": l.attnCap, "mlp_vis": l.mlpVis, "mlp_cap": l.mlpCap,
                     "attn_ratio": l.attnRatio, "mlp_ratio": l.mlpRatio,
                     "attn_ratio_raw": l.rawAttnRatio, "mlp_ratio_raw": l.rawMlpRatio] as [String: Any]
                },
            ] as [String: Any]
        }
        j["groups"] = r.groups.map { g in
            ["layer": g.layer, "group": g.group.rawValue, "best_idx": g.bestIndex, "alpha": g.alpha,
             "ratio": g.ratio, "loss": g.losses] as [String: Any]
        }
        if o.usesGPTQ {
            // Per linear: the Hessian-weighted error of round-to-nearest and of GPTQ
            // (docs/DESIGN.md §2.7).
            j["gptq"] = [
                "then": o.thenGPTQ, "hessian_weights": o.hessianWeights.rawValue, "damp": o.damp, "block_size": o.blockSize,
                "act_order": o.actOrder, "static_groups": o.gptqSettings.staticGroups,
                "linears": r.gptq.map { g in
                    ["layer": g.layer, "linear": g.role, "tokens": g.tokens, "error_rtn": g.errorBefore, "error_gptq": g.errorAfter]
                        as [String: Any]
                },
            ] as [String: Any]
        }
        let layers = Set(r.groups.map(\.layer))
        let skippedO = layers.sorted().filter { l in !r.groups.contains { $0.layer == l && $0.group == .o } }
        if !skippedO.isEmpty {
            j["notes"] = ["group 'o' (v_proj -> o_proj) not searched in layers \(skippedO): grouped-query attention gives v_proj and o_proj different shapes, as in the authors' code"]
        }
        return j
    }

    public static func writeAll(_ r: QuantizeResult, into dir: String) throws {
        let data = try JSONSerialization.data(withJSONObject: json(r), options: [.prettyPrinted, .sortedKeys])
        try AtomicFile.write(data: data, to: dir + "/mbq_results.json")
        if !r.groups.isEmpty {
            var w = SafetensorsWriter()
            for g in r.groups { w.add("layers.\(g.layer).\(g.group.rawValue).scales", floats: g.scales, shape: [g.scales.count]) }
            try w.write(to: dir + "/mbq_scales.safetensors", metadata: ["format": "mbq-scales", "method": r.options.method.rawValue])
        }
        try AtomicFile.write(data: Data(Report.markdown(r).utf8), to: dir + "/report.md")
        try AtomicFile.write(data: Data(Report.svg(r).utf8), to: dir + "/ratios.svg")
    }
}
