import Foundation

/// A JSON value whose objects keep their key order: what we write into files other
/// tools read (`quantization_config`), so the text comes out in the order written.
public indirect enum JSONText: Sendable, Equatable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByBooleanLiteral {
    case string(String), int(Int), double(Double), bool(Bool), null
    case array([JSONText])
    case object([(String, JSONText)])

    public init(stringLiteral s: String) { self = .string(s) }
    public init(integerLiteral i: Int) { self = .int(i) }
    public init(booleanLiteral b: Bool) { self = .bool(b) }

    public static func == (a: JSONText, b: JSONText) -> Bool { a.rendered(indent: "", level: 0) == b.rendered(indent: "", level: 0) }

    /// Pretty-printed with `indent` per level, starting at nesting `level` (the caller
    /// has already written the first line's indentation).
    public func rendered(indent: String, level: Int) -> String {
        let pad = String(repeating: indent, count: level + 1), end = String(repeating: indent, count: level)
        let nl = indent.isEmpty ? "" : "\n"
        switch self {
        case let .string(s): return JSONText.quote(s)
        case let .int(i): return String(i)
        case let .double(d):
            // A float stays a float: 1.0 is written "1.0", never "1". JSON has no NaN or Inf.
            guard d.isFinite else { return "null" }
            return d == d.rounded() && abs(d) < 1e15 ? String(format: "%.1f", d) : "\(d)"
        case let .bool(b): return b ? "true" : "false"
        case .null: return "null"
        case let .array(a):
            if a.isEmpty { return "[]" }
            return "[" + nl + a.map { pad + $0.rendered(indent: indent, level: level + 1) }.joined(separator: "," + nl) + nl + end + "]"
        case let .object(o):
            if o.isEmpty { return "{}" }
            return "{" + nl + o.map { pad + JSONText.quote($0.0) + ": " + $0.1.rendered(indent: indent, level: level + 1) }
                .joined(separator: "," + nl) + nl + end + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var r = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": r += "\\\""
            case "\\": r += "\\\\"
            case "\n": r += "\\n"
            case "\t": r += "\\t"
            case "\r": r += "\\r"
            default:
                if u.value < 0x20 { r += String(format: "\\u%04x", u.value) } else { r.unicodeScalars.append(u) }
            }
        }
        return r + "\""
    }
}

/// Edits a `config.json` as text: one top-level key is added and every byte of the
/// input stays as it was, so 1.0 stays 1.0 and key order is kept (transformers 5's
/// strict config classes reject a float that a JSON round trip turned into an int).
public enum ConfigEdit {
    /// `text` with `"key": value` added as the last top-level member, indented like the
    /// existing members. Throws when the text is not a JSON object or already has `key`.
    public static func addingTopLevelKey(_ key: String, value: JSONText, to text: String, path: String) throws -> String {
        guard let obj = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] else {
            throw FormatsError.invalidConfig(path: path, reason: "not a JSON object")
        }
        guard obj[key] == nil else {
            throw FormatsError.invalidConfig(path: path, reason: "already has '\(key)' (is this model already quantized? quantize the original checkpoint)")
        }
        let chars = Array(text.unicodeScalars)
        func isSpace(_ c: Unicode.Scalar) -> Bool { c == " " || c == "\n" || c == "\r" || c == "\t" }
        guard var close = chars.lastIndex(where: { !isSpace($0) }), chars[close] == "}" else {
            throw FormatsError.invalidConfig(path: path, reason: "does not end with '}'")
        }
        var last = close - 1
        while last >= 0 && isSpace(chars[last]) { last -= 1 }
        // Indentation of the members: the white space before the first key.
        guard let open = chars.firstIndex(of: "{") else { throw FormatsError.invalidConfig(path: path, reason: "no '{'") }
        var i = open + 1
        var lead = ""
        while i < close && isSpace(chars[i]) { lead.unicodeScalars.append(chars[i]); i += 1 }
        let multiline = lead.contains("\n") || obj.isEmpty
        let indent = multiline ? String(lead.split(separator: "\n", omittingEmptySubsequences: false).last ?? "  ") : ""
        let unit = indent.isEmpty ? (multiline ? "  " : "") : indent
        let member = JSONText.quote(key) + ": " + value.rendered(indent: unit, level: 1)
        let head = String(String.UnicodeScalarView(chars[0...last]))
        let sep = chars[last] == "{" ? "" : ","
        let insert = multiline ? sep + "\n" + unit + member + "\n" : sep + " " + member
        if !multiline { close = last + 1 }
        let tail = String(String.UnicodeScalarView(chars[close...]))
        let edited = head + insert + tail
        // The result must parse and hold every input key plus the new one.
        guard let back = (try? JSONSerialization.jsonObject(with: Data(edited.utf8))) as? [String: Any],
              back.count == obj.count + 1, back[key] != nil else {
            throw FormatsError.invalidConfig(path: path, reason: "could not add '\(key)' to the config text")
        }
        return edited
    }
}
