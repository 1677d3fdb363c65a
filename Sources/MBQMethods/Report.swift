import Foundation

/// The human-readable report: a per-layer table and an SVG of the modality ratios and of
/// the chosen alpha per group.
public enum Report {
    public static func markdown(_ r: QuantizeResult) -> String {
        let o = r.options
        var s = "# MBQ quantization report\n\n"
        s += "method **\(o.method.rawValue)\(o.thenGPTQ ? " + gptq" : "")**, w\(o.wBit)\(o.aBit.map { "a\($0)" } ?? " g\(o.group)"), loss \(o.loss.rawValue), reweight \(o.effectiveReweight), distort \(o.distort); format \(o.resolvedFormat.rawValue), scales in \(o.scaleDType.rawValue)\n\n"
        for (k, v) in r.seconds.sorted(by: { $0.key < $1.key }) { s += "- \(k): \(String(format: "%.2f", v)) s\n" }
        if let g = r.gradStats { s += "- gradient statistics over \(g.samplesUsed) samples; skipped: \(g.skipped.isEmpty ? "none" : g.skipped.joined(separator: "; "))\n" }
        s += "\n![ratios and alphas](ratios.svg)\n\n"
        let layers = Set(r.groups.map(\.layer)).union(r.gradStats.map { Set($0.layers.indices) } ?? []).sorted()
        s += "| layer | attn vis/cap | mlp vis/cap | qkv α | o α | gate_up α | down α |\n|---|---|---|---|---|---|---|\n"
        for l in layers {
            let st = r.gradStats?.layers[l]
            func a(_ g: SearchGroup) -> String {
                r.groups.first { $0.layer == l && $0.group == g }.map { String(format: "%.2f", $0.alpha) } ?? "—"
            }
            let ar = st.map { String(format: "%.3f", $0.attnRatio) } ?? "—", mr = st.map { String(format: "%.3f", $0.mlpRatio) } ?? "—"
            s += "| \(l) | \(ar) | \(mr) | \(a(.qkv)) | \(a(.o)) | \(a(.gateUp)) | \(a(.down)) |\n"
        }
        if o.usesGPTQ {
            s += "\n## GPTQ\n\n\(o.thenGPTQ ? "after the scales, " : "")token weights \(o.hessianWeights.rawValue), damp \(o.damp), block \(o.blockSize), act-order \(o.actOrder)\(o.gptqSettings.staticGroups ? " (static groups)" : "")\n\n"
            s += "Hessian-weighted error per row, (w - q)ᵀ H (w - q), of round-to-nearest and of GPTQ:\n\n"
            s += "| layer | linear | tokens | rtn | gptq | rtn / gptq |\n|---|---|---|---|---|---|\n"
            for g in r.gptq {
                s += "| \(g.layer) | \(g.role) | \(g.tokens) | \(String(format: "%.4g", g.errorBefore)) | \(String(format: "%.4g", g.errorAfter)) | \(String(format: "%.2f", g.errorBefore / max(g.errorAfter, .leastNonzeroMagnitude))) |\n"
            }
        }
        return s
    }

    /// Two panels: clamped ratios per layer (attention, MLP); chosen alpha per group.
    public static func svg(_ r: QuantizeResult) -> String {
        let w = 640.0, h = 220.0, pad = 40.0
        let layers = max(r.gradStats?.layers.count ?? 0, (r.groups.map(\.layer).max() ?? -1) + 1, 1)
        func x(_ l: Int) -> Double { pad + (w - 2 * pad) * (layers > 1 ? Double(l) / Double(layers - 1) : 0.5) }
        func panel(_ y0: Double, title: String, series: [(String, String, [Double?])], yMax: Double) -> String {
            var s = "<text x=\"\(pad)\" y=\"\(y0 + 16)\" font-size=\"13\">\(title)</text>\n"
            s += "<line x1=\"\(pad)\" y1=\"\(y0 + h - pad)\" x2=\"\(w - pad)\" y2=\"\(y0 + h - pad)\" stroke=\"#888\"/>\n"
            s += "<text x=\"4\" y=\"\(y0 + pad)\" font-size=\"10\">\(String(format: "%.2g", yMax))</text>"
            s += "<text x=\"4\" y=\"\(y0 + h - pad)\" font-size=\"10\">0</text>\n"
            for (li, (name, color, values)) in series.enumerated() {
                var pts: [String] = []
                for (l, v) in values.enumerated() {
                    guard let v else { continue }
                    let yy = y0 + h - pad - (h - 2 * pad) * (yMax > 0 ? v / yMax : 0)
                    pts.append(String(format: "%.1f,%.1f", x(l), yy))
                }
                if !pts.isEmpty {
                    s += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(pts.joined(separator: " "))\"/>\n"
                }
                s += "<text x=\"\(w - pad - 90)\" y=\"\(y0 + 16 + 12 * Double(li))\" font-size=\"11\" fill=\"\(color)\">\(name)</text>\n"
            }
            s += "<text x=\"\(w / 2 - 15)\" y=\"\(y0 + h - 10)\" font-size=\"11\">layer</text>\n"
            return s
        }
        var body = ""
        if let g = r.gradStats {
            let a = g.layers.map { Optional($0.attnRatio) }, m = g.layers.map { Optional($0.mlpRatio) }
            let mx = max((a + m).compactMap { $0 }.max() ?? 1, 1e-9) * 1.1
            body += panel(0, title: "vision/caption gradient ratio (clamped)", series: [("attention", "#1f77b4", a), ("mlp", "#d62728", m)], yMax: mx)
        }
        let colors: [SearchGroup: String] = [.qkv: "#1f77b4", .o: "#ff7f0e", .gateUp: "#2ca02c", .down: "#d62728"]
        let series = SearchGroup.allCases.map { g -> (String, String, [Double?]) in
            (g.rawValue, colors[g]!, (0..<layers).map { l in r.groups.first { $0.layer == l && $0.group == g }?.alpha })
        }
        body += panel(r.gradStats == nil ? 0 : h, title: "chosen alpha per group", series: series, yMax: 1)
        let total = r.gradStats == nil ? h : 2 * h
        return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(total))\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\(body)</svg>\n"
    }
}
