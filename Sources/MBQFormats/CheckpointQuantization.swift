import Foundation
import MBQQuant

/// The checkpoint formats `mbq quantize` writes and `mbq eval` reads
/// (docs/FORMATS.md; facts in ../shared/FORMATS.md).
public enum CheckpointFormat: String, CaseIterable, Sendable {
    /// Dequantized weights in the model's dtype, under the original names.
    case fake
    /// compressed-tensors `pack-quantized` (int4/int8 codes in int32 words) or
    /// `int-quantized` (W8A8: int8 weights).
    case compressedTensors = "compressed-tensors"
    /// AutoAWQ GEMM: 4-bit, interleaved, fp16 scales.
    case awq
    /// GPTQ, `checkpoint_format: gptq_v2` (raw zero points), fp16 scales.
    case gptq
}

extension DType {
    /// The precision scales take when stored in this dtype.
    public var scalePrecision: ScalePrecision {
        switch self {
        case .bf16: return .bf16
        case .f16: return .f16
        default: return .f32
        }
    }
}

/// What a checkpoint's `quantization_config` says about its decoder's linears: enough
/// to decode them (and to run W-A checkpoints with activation quantization).
public struct CheckpointQuantization: Sendable, Equatable {
    public var format: CheckpointFormat
    public var bits: Int
    /// Input columns per scale; -1 = one scale per output channel.
    public var group: Int
    public var symmetric: Bool
    /// Dynamic per-token activation bits of W-A schemes; nil = weight-only.
    public var activationBits: Int?
    /// compressed-tensors: "pack-quantized" or "int-quantized".
    public var packing: String?
    /// GPTQ v1 stores zero points minus one.
    public var gptqV1 = false
    /// GPTQ `desc_act`: `g_idx` may give the inputs' groups out of order.
    public var descAct = false

    public init(format: CheckpointFormat, bits: Int, group: Int, symmetric: Bool, activationBits: Int?,
                packing: String? = nil, gptqV1: Bool = false, descAct: Bool = false) {
        self.format = format; self.bits = bits; self.group = group; self.symmetric = symmetric
        self.activationBits = activationBits; self.packing = packing; self.gptqV1 = gptqV1
        self.descAct = descAct
    }

    /// "w4 g128 asym, compressed-tensors pack-quantized", "w4a8 (w sym per channel) ...".
    public var description: String {
        let w = "w\(bits)" + (activationBits.map { "a\($0)" } ?? "")
        let g = group > 0 ? "g\(group)" : "per channel"
        let f = format.rawValue + (packing.map { " " + $0 } ?? "") + (format == .gptq ? (gptqV1 ? " (v1)" : " (gptq_v2)") : "")
        return "\(w) \(g) \(symmetric ? "sym" : "asym"), \(f)"
    }

    /// Reads `quantization_config` from config.json's text. nil: an unquantized model.
    public static func parse(_ data: Data, path: String) throws -> CheckpointQuantization? {
        guard let top = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw FormatsError.invalidConfig(path: path, reason: "not a JSON object")
        }
        guard let q = top["quantization_config"] else { return nil }
        func bad(_ why: String) -> FormatsError { .invalidConfig(path: path, reason: "quantization_config: \(why)") }
        guard let qc = q as? [String: Any] else { throw bad("not an object") }
        func int(_ o: [String: Any], _ k: String) throws -> Int {
            guard let v = o[k] as? Int else { throw bad("missing integer '\(k)'") }
            return v
        }
        let method = qc["quant_method"] as? String ?? "(none)"
        switch method {
        case "mbq-fake":
            let a = qc["a_bit"] as? Int
            return CheckpointQuantization(format: .fake, bits: try int(qc, "bits"), group: qc["group_size"] as? Int ?? -1,
                                          symmetric: a != nil && a! < 16, activationBits: (a ?? 16) < 16 ? a : nil)
        case "compressed-tensors":
            guard let groups = qc["config_groups"] as? [String: Any], groups.count == 1,
                  let g0 = groups.values.first as? [String: Any], let w = g0["weights"] as? [String: Any] else {
                throw bad("expected exactly one entry in config_groups with a 'weights' scheme")
            }
            let packing = (g0["format"] as? String) ?? (qc["format"] as? String) ?? "pack-quantized"
            guard ["pack-quantized", "int-quantized"].contains(packing) else {
                throw bad("compressed-tensors format '\(packing)' is not read by mbq (pack-quantized, int-quantized)")
            }
            guard (w["type"] as? String ?? "int") == "int" else { throw bad("weights type '\(w["type"]!)' (int only)") }
            let strategy = w["strategy"] as? String ?? "group"
            guard strategy == "group" || strategy == "channel" else { throw bad("weights strategy '\(strategy)' (group, channel)") }
            // "weight" (static groups, GPTQ's activation order during calibration) keeps the
            // layout; "group" (g_idx) was removed from compressed-tensors.
            if let order = w["actorder"], !(order is NSNull), (order as? String) != "weight" && (order as? String) != "static" {
                throw bad("activation ordering '\(order)' is not read by mbq (null or \"weight\")")
            }
            var act: Int? = nil
            if let a = g0["input_activations"] as? [String: Any] {
                guard (a["dynamic"] as? Bool) == true, (a["strategy"] as? String) == "token" else {
                    throw bad("input_activations: only dynamic per-token activation quantization is read")
                }
                act = try int(a, "num_bits")
            }
            return CheckpointQuantization(format: .compressedTensors, bits: try int(w, "num_bits"),
                                          group: strategy == "group" ? try int(w, "group_size") : -1,
                                          symmetric: w["symmetric"] as? Bool ?? true, activationBits: act, packing: packing)
        case "awq":
            guard (qc["version"] as? String ?? "gemm").lowercased() == "gemm" else { throw bad("AWQ version '\(qc["version"]!)' (gemm only)") }
            guard (qc["zero_point"] as? Bool ?? true) else { throw bad("AWQ without zero points is not read") }
            let bits = try int(qc, "bits")
            guard bits == 4 else { throw bad("AWQ GEMM with \(bits) bits (4 only)") }
            return CheckpointQuantization(format: .awq, bits: bits, group: try int(qc, "group_size"), symmetric: false, activationBits: nil)
        case "gptq":
            let v = qc["checkpoint_format"] as? String ?? "gptq"
            guard v == "gptq" || v == "gptq_v2" else { throw bad("GPTQ checkpoint_format '\(v)'") }
            return CheckpointQuantization(format: .gptq, bits: try int(qc, "bits"), group: try int(qc, "group_size"),
                                          symmetric: qc["sym"] as? Bool ?? true, activationBits: nil, gptqV1: v == "gptq",
                                          descAct: qc["desc_act"] as? Bool ?? false)
        default:
            throw bad("unknown quant_method '\(method)' (mbq reads compressed-tensors, awq, gptq and its own mbq-fake)")
        }
    }
}
