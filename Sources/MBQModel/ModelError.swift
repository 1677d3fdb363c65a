import MBQFormats

/// Errors of the model layer: inputs that do not fit the model, numbers that went bad.
public enum ModelError: Error, CustomStringConvertible {
    case layerOutOfRange(layer: Int, layers: Int)
    case inputShape(what: String, expected: [Int], found: [Int])
    case nonFinite(what: String, layer: Int?)
    case format(FormatsError)

    public var description: String {
        switch self {
        case let .layerOutOfRange(layer, layers): return "layer \(layer) is out of range (model has \(layers) layers)"
        case let .inputShape(what, expected, found): return "\(what) has shape \(found), expected \(expected)"
        case let .nonFinite(what, layer):
            return "\(what)\(layer.map { " at layer \($0)" } ?? "") holds NaN or Inf"
        case let .format(e): return e.description
        }
    }
}
