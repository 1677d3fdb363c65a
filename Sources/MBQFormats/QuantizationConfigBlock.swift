/// The `quantization_config` each packed format puts into config.json, field for field
/// as its library defines it (../shared/FORMATS.md), and the modules it must leave alone.
public enum QuantizationConfigBlock {
    /// compressed-tensors: only fields every version from 0.11 to 0.20 accepts
    /// (`extra="forbid"`; `scale_dtype`/`zp_dtype` exist only from 0.13, so they are left
    /// out). `group` -1: one scale per output channel.
    /// `actOrder`: "weight" for GPTQ's activation order with static groups (no g_idx).
    public static func compressedTensors(bits: Int, group: Int, symmetric: Bool, activationBits: Int?,
                                         ignore: [String], actOrder: String? = nil) -> JSONText {
        let format = PackedLinear.compressedPacking(bits: bits, symmetric: symmetric)
        var weights: [(String, JSONText)] = [("num_bits", .int(bits)), ("type", "int"), ("symmetric", .bool(symmetric)),
                                              ("strategy", group > 0 ? "group" : "channel")]
        weights.append(("group_size", group > 0 ? .int(group) : .null))
        weights += [("dynamic", false), ("actorder", actOrder.map { .string($0) } ?? .null), ("observer", "minmax")]
        let acts: JSONText = activationBits.map {
            .object([("num_bits", .int($0)), ("type", "int"), ("symmetric", true), ("strategy", "token"), ("dynamic", true)])
        } ?? .null
        let group0: JSONText = .object([("targets", .array(["Linear"])), ("weights", .object(weights)),
                                        ("input_activations", acts), ("output_activations", .null), ("format", .string(format))])
        // vLLM and compressed-tensors apply "re:" entries with re.match: start them with ".*".
        return .object([
            ("quant_method", "compressed-tensors"), ("format", .string(format)), ("quantization_status", "compressed"),
            ("version", "0.11.0"),
            ("ignore", .array(ignore.map { .string("re:.*" + $0 + ".*") })),
            ("kv_cache_scheme", .null), ("sparsity_config", .object([])),
            ("config_groups", .object([("group_0", group0)])),
        ])
    }

    /// AutoAWQ GEMM. Engines skip a module when any listed name is a substring of its name.
    public static func awq(bits: Int, group: Int, ignore: [String]) -> JSONText {
        .object([("quant_method", "awq"), ("bits", .int(bits)), ("group_size", .int(group)), ("zero_point", true),
                 ("version", "gemm"), ("modules_to_not_convert", .array(ignore.map { .string($0) }))])
    }

    /// GPTQ with raw zero points (`gptq_v2`: v1 stores z - 1 and cannot hold z = 0).
    /// `descAct`: columns in activation order; `g_idx` gives each column's group.
    /// `trueSequential`: GPTQModel's flag for rounding a layer's linears one after another;
    /// our GPTQ rounds them all from one forward of the layer (docs/DESIGN.md §2.7).
    public static func gptq(bits: Int, group: Int, ignore: [String], descAct: Bool = false, trueSequential: Bool = true) -> JSONText {
        .object([("quant_method", "gptq"), ("bits", .int(bits)), ("group_size", .int(group)), ("sym", false),
                 ("desc_act", .bool(descAct)), ("checkpoint_format", "gptq_v2"), ("true_sequential", .bool(trueSequential)),
                 ("modules_to_not_convert", .array(ignore.map { .string($0) }))])
    }
}

extension Checkpoint {
    /// The modules outside the decoder blocks that hold linear-shaped weights, by their
    /// last name component ("vision_tower", "multi_modal_projector", "visual", "lm_head"):
    /// what a packed format must leave unquantized. Found from the tensor names, so each
    /// architecture's own module names come out; `lm_head` is always listed (a tied head
    /// is still a Linear module). None of them is a substring of a decoder linear's name,
    /// so AutoAWQ's substring rule cannot skip a decoder layer.
    public func nonDecoderModules() throws -> [String] {
        let decoder = (names.base + "layers").split(separator: ".").map(String.init)
        let embed = String(names.embedTokens.dropLast(".weight".count))
        var roots: [String] = []
        for name in allTensorNames where !name.hasPrefix(names.base + "layers.") {
            let parts = name.split(separator: ".").map(String.init)
            var common = 0
            while common < min(decoder.count, parts.count - 1) && parts[common] == decoder[common] { common += 1 }
            let root = parts[0...min(common, parts.count - 1)].joined(separator: ".")
            guard root != embed, let e = try? entry(name).entry, e.shape.count >= 2, name.hasSuffix(".weight") else { continue }
            let last = String(root.split(separator: ".").last!)
            if !roots.contains(last) { roots.append(last) }
        }
        if !roots.contains("lm_head") { roots.append("lm_head") }
        let probe = blockNames(0).all
        for r in roots where probe.contains(where: { $0.contains(r) }) {
            throw FormatsError.invalidConfig(path: directory, reason: "module '\(r)' outside the decoder is also part of a decoder name: cannot list it as not quantized")
        }
        return roots.sorted()
    }
}
