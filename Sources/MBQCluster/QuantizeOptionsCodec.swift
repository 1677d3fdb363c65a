import Foundation
import MBQFormats
import MBQMethods

/// QuantizeOptions as the JSON the coordinator sends in every assignment.
public enum QuantizeOptionsCodec {
    public static func encode(_ o: QuantizeOptions) -> String {
        var d: [String: Any] = ["method": o.method.rawValue, "w_bit": o.wBit, "group": o.group, "loss": o.loss.rawValue,
                                "distort": o.distort]
        if let a = o.aBit { d["a_bit"] = a }
        if let r = o.reweight { d["reweight"] = r }
        d["format"] = o.resolvedFormat.rawValue
        d["weight_dtype"] = o.weightDType.rawValue
        return String(decoding: try! JSONSerialization.data(withJSONObject: d, options: [.sortedKeys]), as: UTF8.self)
    }

    public static func decode(_ s: String) throws -> QuantizeOptions {
        guard let d = (try? JSONSerialization.jsonObject(with: Data(s.utf8))) as? [String: Any],
              let m = d["method"] as? String, let method = QuantMethod(rawValue: m),
              let w = d["w_bit"] as? Int, let g = d["group"] as? Int,
              let l = d["loss"] as? String, let loss = SearchLoss(rawValue: l) else {
            throw ProtocolError.malformed("assignment options are not valid QuantizeOptions JSON")
        }
        var o = QuantizeOptions()
        o.method = method; o.wBit = w; o.group = g; o.loss = loss
        o.aBit = d["a_bit"] as? Int
        o.reweight = d["reweight"] as? Bool
        o.distort = d["distort"] as? Bool ?? false
        if let f = d["format"] {
            guard let s = f as? String, let format = CheckpointFormat(rawValue: s) else {
                throw ProtocolError.malformed("assignment options: unknown format \(f)")
            }
            o.format = format
        }
        if let t = d["weight_dtype"] {
            guard let s = t as? String, let dtype = DType(rawValue: s), dtype.isFloatingPoint else {
                throw ProtocolError.malformed("assignment options: weight_dtype \(t) is not a float dtype")
            }
            o.weightDType = dtype
        }
        return o
    }
}
