import Foundation
import MBQFormats
import MBQModel
import MBQTensor
import XCTest

/// A reference fixture written by Scripts/reference/make_fixtures.py.
struct Fixture {
    let name: String
    let directory: String
    let checkpoint: Checkpoint
    let bundle: CalibrationBundle
    let expected: SafetensorsFile

    static let architectures = ["llava15", "onevision", "qwen2vl", "onevision_mha", "qwen2_5_vl", "internvl", "internvl2"]

    static var root: String {
        Bundle.module.resourcePath! + "/Fixtures"
    }

    init(_ name: String) throws {
        self.name = name
        directory = Fixture.root + "/" + name
        checkpoint = try Checkpoint(directory: directory + "/model")
        bundle = try CalibrationBundle.load(path: directory + "/calib.safetensors",
                                            hiddenSize: checkpoint.config.hiddenSize,
                                            vocabSize: checkpoint.config.vocabSize)
        expected = try SafetensorsFile(path: directory + "/expected.safetensors")
    }

    /// Sample `s` of an expected [N, T, C] tensor, as [T, C].
    func expected(_ name: String, sample s: Int) throws -> Tensor<Float> {
        let t = try expected.floatTensor(name)
        return t.reshaped([t.shape[0] * t.shape[1], t.shape[2]]).rowSlice(s * t.shape[1], t.shape[1])
    }
}

/// Comparison of a computed tensor with a reference: max abs diff, and that diff
/// relative to the reference's largest magnitude (the scale the numbers live at).
struct Diff: CustomStringConvertible {
    var maxAbs: Float = 0
    var refScale: Float = 0
    var rel: Float { maxAbs / max(refScale, 1e-30) }
    var description: String { String(format: "max abs %.3e, rel %.3e (ref scale %.3e)", maxAbs, rel, refScale) }

    mutating func merge(_ o: Diff) {
        maxAbs = max(maxAbs, o.maxAbs)
        refScale = max(refScale, o.refScale)
    }

    /// Compares rows where `rows[i]` is true (all rows when nil).
    static func of(_ a: Tensor<Float>, _ b: Tensor<Float>, rows: [Bool]? = nil) -> Diff {
        precondition(a.shape == b.shape, "\(a.shape) vs \(b.shape)")
        var d = Diff()
        let c = a.cols
        for r in 0..<a.rows where rows?[r] ?? true {
            for j in 0..<c {
                d.maxAbs = max(d.maxAbs, abs(a.data[r * c + j] - b.data[r * c + j]))
                d.refScale = max(d.refScale, abs(b.data[r * c + j]))
            }
        }
        return d
    }
}

func assertClose(_ d: Diff, rel tol: Float, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssert(d.rel <= tol && d.maxAbs.isFinite, "\(what): \(d) exceeds rel tolerance \(tol)", file: file, line: line)
}
