/// Everything that can be wrong with a file the tool reads or writes. Every case names
/// the file and, where there is one, the tensor or field at fault.
public enum FormatsError: Error, CustomStringConvertible, Equatable {
    case unreadable(path: String, reason: String)
    case truncated(path: String, reason: String)
    case invalidHeader(path: String, reason: String)
    case invalidTensorEntry(path: String, tensor: String, reason: String)
    case overlappingTensors(path: String, first: String, second: String)
    case missingTensor(name: String, in: String)
    case dtypeMismatch(path: String, tensor: String, expected: String, found: String)
    case shapeMismatch(path: String, tensor: String, expected: [Int], found: [Int])
    case nonFinite(path: String, tensor: String, index: Int)
    case invalidConfig(path: String, reason: String)
    case unsupportedModelType(path: String, modelType: String)
    case invalidBundle(path: String, reason: String)
    case writeFailed(path: String, reason: String)

    public var description: String {
        switch self {
        case let .unreadable(path, reason): return "\(path): cannot read: \(reason)"
        case let .truncated(path, reason): return "\(path): truncated file: \(reason)"
        case let .invalidHeader(path, reason): return "\(path): invalid safetensors header: \(reason)"
        case let .invalidTensorEntry(path, tensor, reason):
            return "\(path): tensor '\(tensor)': \(reason)"
        case let .overlappingTensors(path, first, second):
            return "\(path): tensors '\(first)' and '\(second)' overlap in the data section"
        case let .missingTensor(name, place): return "\(place): missing tensor '\(name)'"
        case let .dtypeMismatch(path, tensor, expected, found):
            return "\(path): tensor '\(tensor)' has dtype \(found), expected \(expected)"
        case let .shapeMismatch(path, tensor, expected, found):
            return "\(path): tensor '\(tensor)' has shape \(found), expected \(expected)"
        case let .nonFinite(path, tensor, index):
            return "\(path): tensor '\(tensor)' holds a NaN or Inf at flat index \(index)"
        case let .invalidConfig(path, reason): return "\(path): invalid config: \(reason)"
        case let .unsupportedModelType(path, modelType):
            return "\(path): unsupported model_type '\(modelType)' (supported: \(ModelFamily.supportedTypes.joined(separator: ", ")))"
        case let .invalidBundle(path, reason): return "\(path): invalid calibration bundle: \(reason)"
        case let .writeFailed(path, reason): return "\(path): cannot write: \(reason)"
        }
    }
}
