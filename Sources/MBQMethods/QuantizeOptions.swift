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
    /// GPTQ (docs/DESIGN.md §2.7): no scales; each linear rounded through its Hessian.
    case gptq
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
    /// The checkpoint format written; nil = the one vLLM serves for the scheme
    /// (`defaultFormat`).
    public var format: CheckpointFormat?
    /// The source's decoder weight dtype: the output keeps it, and the formats that store
    /// scales in the model's dtype (fake, compressed-tensors) round them to it.
    public var weightDType: DType = .f32
    /// `--then gptq`: the searched scales applied, then GPTQ instead of round-to-nearest.
    public var thenGPTQ = false
    public var hessianWeights: HessianWeights = .none
    public var damp = 0.01
    public var blockSize = 128
    public var actOrder = false

    public init() {}

    /// GPTQ rounds the weights (`--method gptq` or `--then gptq`). Its layers are
    /// quantized in order, each on the inputs the quantized layers before it produce.
    public var usesGPTQ: Bool { method == .gptq || thenGPTQ }

    /// The walk over layers feeds each layer the quantized layers' outputs.
    public var sequential: Bool { distort || usesGPTQ }

    /// The gradient pass runs: MBQ's ratios, AWQ with --reweight, GPTQ's token weights.
    public var needsGradientPass: Bool {
        method == .mbq || (method == .awq && effectiveReweight) || (usesGPTQ && hessianWeights != .none)
    }

    /// What GPTQ runs with. compressed-tensors stores no `g_idx` (its library removed
    /// `actorder: "group"`), so there activation order keeps static groups
    /// (`actorder: "weight"`); GPTQ's own format stores `g_idx` (`desc_act`).
    public var gptqSettings: GPTQSettings {
        GPTQSettings(bits: wBit, group: group, damp: damp, blockSize: blockSize, actOrder: actOrder,
                     staticGroups: actOrder && resolvedFormat == .compressedTensors)
    }

    /// The format written: `format`, or the default for the scheme.
    public var resolvedFormat: CheckpointFormat { format ?? defaultFormat }

    /// What vLLM serves for each scheme (README "Formats"): compressed-tensors for W4/W8
    /// weight-only (pack-quantized, zero points via Marlin), W4A8 (pack-quantized +
    /// int8 dynamic per-token activations) and W8A8 (int-quantized); GPTQ for 3- and
    /// 2-bit weight-only; fake quantization for schemes no engine kernel serves.
    public var defaultFormat: CheckpointFormat {
        if aBit != nil { return 32 % wBit == 0 ? .compressedTensors : .fake }
        if wBit == 4 || wBit == 8 { return .compressedTensors }
        if wBit == 3 || wBit == 2 { return .gptq }
        return .fake
    }

    /// The dtype the output stores scales in, and in which its dequantization multiplies:
    /// fp16 for AutoAWQ and GPTQ, the model's dtype otherwise (fp32 for fp32 models, so
    /// their fake output is exactly the search's fp32 fake quantization).
    public var scaleDType: DType {
        switch resolvedFormat {
        case .awq, .gptq: return .f16
        case .fake, .compressedTensors: return [.bf16, .f16].contains(weightDType) ? weightDType : .f32
        }
    }

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
        if thenGPTQ && method != .mbq && method != .awq {
            throw no("--then gptq follows a scale search: use it with --method mbq or awq (--method gptq alone quantizes without scales)")
        }
        if usesGPTQ {
            if aBit != nil { throw no("GPTQ quantizes weights only: --a-bit is refused with --method gptq / --then gptq") }
            guard [2, 3, 4, 8].contains(wBit) else { throw no("GPTQ: --w-bit \(wBit); supported are 2, 3, 4 and 8 bits") }
            guard damp > 0 && damp < 1 else { throw no("--damp \(damp): a fraction of the mean Hessian diagonal in (0, 1)") }
            // Groups and blocks must nest: a block holds whole groups, or a group whole blocks.
            guard blockSize > 0 && (group <= 0 || blockSize % group == 0 || group % blockSize == 0) else {
                throw no("--block-size \(blockSize): a positive multiple or divisor of the group size \(group)")
            }
            if actOrder && resolvedFormat == .awq { throw no("--act-order: the AWQ format has no g_idx; use --format gptq or compressed-tensors") }
        } else {
            if actOrder { throw no("--act-order is a GPTQ option (--method gptq or --then gptq)") }
            if hessianWeights != .none { throw no("--hessian-weights is a GPTQ option (--method gptq or --then gptq)") }
        }
        if format == nil && defaultFormat == .fake {
            // Fake quantization writes dequantized weights: the size of the fp model and
            // nothing an engine runs as 'schemeName'. Only on request.
            throw no("\(schemeName): no serving format holds this scheme (compressed-tensors: 2/4/8-bit codes; GPTQ: 2/3/4/8 bits weight-only); pass --format fake to write fake-quantized (dequantized) weights for evaluation")
        }
        for (role, shape) in cfg.linearShapes {
            if let why = PackedLinear.unsupported(format: resolvedFormat, bits: wBit, group: aBit == nil ? group : -1,
                                                  symmetric: aBit != nil, rows: shape[0], cols: shape[1]) {
                throw no("--format \(resolvedFormat.rawValue) cannot hold \(schemeName) (\(role)): \(why)")
            }
        }
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

    /// "w4 g128", "w4a8", "w8a8".
    public var schemeName: String {
        aBit.map { "w\(wBit)a\($0)" } ?? "w\(wBit) " + (group > 0 ? "g\(group)" : "per-channel")
    }

    /// The `quantization_config` added to the output's config.json for the resolved format.
    /// `ignore`: the modules outside the decoder (vision tower, projector, lm_head).
    public func configBlock(ignore: [String]) -> JSONText {
        switch resolvedFormat {
        case .fake:
            // Our own marker (keys in the order JSONSerialization's sortedKeys wrote them
            // before): `mbq eval` reads a_bit from it.
            var o: [(String, JSONText)] = [("a_bit", .int(aBit ?? 16))]
            if aBit != nil { o.append(("activation_granularity", "per_token_symmetric")) }
            o += [("bits", .int(wBit)), ("distort", .bool(distort)), ("fake_quantized", true)]
            if aBit == nil { o.append(("group_size", .int(group))) }
            o += [("loss", .string(loss.rawValue)), ("method", .string(method.rawValue)), ("quant_method", "mbq-fake"),
                  ("reweight", .bool(effectiveReweight))]
            if usesGPTQ {
                o += [("gptq", .object([("act_order", .bool(actOrder)), ("block_size", .int(blockSize)), ("damp", .double(damp)),
                                        ("hessian_weights", .string(hessianWeights.rawValue))]))]
            }
            if aBit != nil { o.append(("weight_granularity", "per_channel_symmetric")) } else { o.append(("zero_point", true)) }
            return .object(o)
        case .compressedTensors:
            return QuantizationConfigBlock.compressedTensors(bits: wBit, group: aBit == nil ? group : -1, symmetric: aBit != nil,
                                                             activationBits: aBit, ignore: ignore,
                                                             actOrder: usesGPTQ && actOrder && group > 0 ? "weight" : nil)
        case .awq:
            return QuantizationConfigBlock.awq(bits: wBit, group: group, ignore: ignore)
        case .gptq:
            return QuantizationConfigBlock.gptq(bits: wBit, group: group, ignore: ignore, descAct: usesGPTQ && actOrder && group > 0,
                                                trueSequential: !usesGPTQ)
        }
    }
}
