import Foundation

/// A fresh directory under the system temp dir, removed when the test ends.
final class TempDir {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "mbq-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    /// Writes a raw safetensors file: an 8-byte length, the header text as given, then `data`.
    func rawSafetensors(_ name: String, header: String, data: [UInt8], claimedLength: UInt64? = nil) -> String {
        var bytes: [UInt8] = []
        var len = (claimedLength ?? UInt64(header.utf8.count)).littleEndian
        withUnsafeBytes(of: &len) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: Array(header.utf8))
        bytes.append(contentsOf: data)
        FileManager.default.createFile(atPath: file(name), contents: Data(bytes))
        return file(name)
    }
}
