import MBQFormats
import MBQQuant

public enum QuantMethod: String, CaseIterable, Sendable {
    /// Round to nearest, no search.
    case rtn
    /// Activation-aware scale search with a uniform loss.
    case awq
    /// The same search with MBQ's modality-reweighted loss.
    case mbq
    /// W8A8 with SmoothQuant's migration (alpha 0.5).
    case smoothquant
}

/// Everything `mbq quantize` is asked to do, validated against the model before any work.
public struct QuantizeOptions: Sendable {
    public var method: QuantMethod = .mbq
    public var wBit = 4
    /// Group size along the input dim for weight-only schemes; -1 = per row.
    public var group = 128
    /// 8 for weight-activation schemes (W4A8, W8A8); nil = weight-only.
    public var aBit: Int?
    public var loss: SearchLoss = .mae
    /// nil: on for mbq, off otherwise.
    public var reweight: Bool?
    public var distort = false

    public init() {}

    public var effectiveReweight: Bool { reweight ?? (method == .mbq) }

    public var weightQuantizer: WeightQuantizer {
        aBit != nil ? .channelSymmetric(bits: wBit) : .groupAsymmetric(bits: wBit, group: group)
    }

    public var searchOptions: SearchOptions {
        SearchOptions(weights: weightQuantizer, actBits: aBit, loss: loss, reweight: effectiveReweight)
    }

    /// Refuses combinations that cannot work, saying why.
    public func validate(for cfg: LanguageModelConfig) throws {
        func no(_ why: String) -> MethodsError { .invalidOptions(why) }
        guard (2...8).contains(wBit) else { throw no("--w-bit \(wBit): supported are 2 to 8 bits") }
        if let a = aBit, a != 8 { throw no("--a-bit \(a): only 8-bit activations are supported (W4A8, W8A8)") }
        if method == .smoothquant && (aBit == nil || wBit != 8) {
            throw no("smoothquant is a W8A8 method: use --w-bit 8 --a-bit 8 (weight-only w\(wBit) is refused)")
        }
        if reweight == true && method != .mbq && method != .awq {
            throw no("--reweight applies to the scale search (awq, mbq), not to \(method.rawValue)")
        }
        if distort && (method == .rtn) { throw no("--distort needs a search method (awq, mbq, smoothquant)") }
        if aBit == nil {
            guard group == -1 || [32, 64, 128].contains(group) else {
                throw no("--group \(group): use 32, 64, 128 or -1 (per row)")
            }
            if group > 0 {
                let dims = [("hidden_size", cfg.hiddenSize), ("intermediate_size", cfg.intermediateSize),
                            ("num_attention_heads * head_dim", cfg.numHeads * cfg.headDim)]
                for (name, d) in dims where d % group != 0 {
                    throw no("--group \(group) does not divide \(name) = \(d) (every linear's input dim must be a multiple)")
                }
            }
        }
    }

    /// The `quantization_config` block written into the output's config.json.
    public var configBlock: [String: Any] {
        var o: [String: Any] = ["quant_method": "mbq-fake", "method": method.rawValue, "bits": wBit,
                                "a_bit": aBit ?? 16, "loss": loss.rawValue, "reweight": effectiveReweight,
                                "distort": distort, "fake_quantized": true]
        if aBit == nil {
            o["group_size"] = group
            o["zero_point"] = true
        } else {
            o["weight_granularity"] = "per_channel_symmetric"
            o["activation_granularity"] = "per_token_symmetric"
        }
        return o
    }
}
