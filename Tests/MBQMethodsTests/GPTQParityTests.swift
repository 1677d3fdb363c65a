import Foundation
import MBQFormats
import MBQMethods
import MBQQuant
import MBQTensor
import XCTest

/// GPTQ against the PyTorch port of the reference (Scripts/reference/gptq_reference.py):
/// the unit cases (every option, a dead column, masked tokens) one linear at a time.
/// Codes may differ only where the two fp32 lazy updates (OpenBLAS and PyTorch's GEMM sum
/// in different orders) put a weight on the other side of a rounding boundary; the test
/// bounds that fraction and prints it per case.
final class GPTQParityTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/gptq").path

    static let unitCases: [(name: String, bits: Int, group: Int, block: Int, act: Bool, staticGroups: Bool)] = [
        ("w4g128", 4, 128, 128, false, false), ("w3g128", 3, 128, 128, false, false), ("w4pc", 4, -1, 128, false, false),
        ("w2g64", 2, 64, 128, false, false), ("w8g32", 8, 32, 128, false, false), ("w4g32_block64", 4, 32, 64, false, false),
        ("w4g128_block32", 4, 128, 32, false, false), ("w4g128_act", 4, 128, 128, true, false), ("w3g64_act", 3, 64, 128, true, false),
        ("w4pc_act", 4, -1, 128, true, false), ("w4g128_act_static", 4, 128, 128, true, true),
        ("w3g32_act_static", 3, 32, 128, true, true),
    ]

    /// The unit fixture and its Hessian: two samples of 150 tokens, added as the port adds them.
    func unit() throws -> (SafetensorsFile, [Double]) {
        let f = try SafetensorsFile(path: Self.fixtures + "/unit.safetensors")
        let x = try f.floatTensor("x"), tw = try f.floatTensor("tw").data
        var acc = HessianAccumulator(cols: x.cols)
        for half in [0..<150, 150..<300] {
            acc.add(Tensor(shape: [half.count, x.cols], data: Array(x.data[(half.lowerBound * x.cols)..<(half.upperBound * x.cols)])),
                    weights: Array(tw[half]))
        }
        return (f, acc.hessian)
    }

    func testEachCaseMatchesTheReference() throws {
        let (f, h) = try unit()
        var table: [String] = []
        for c in Self.unitCases {
            let w = try f.floatTensor(c.name + ".w")
            let r = try GPTQ.quantize(w, hessian: h, settings: GPTQSettings(bits: c.bits, group: c.group, blockSize: c.block,
                                                                            actOrder: c.act, staticGroups: c.staticGroups))
            let want = try f.intValues(c.name + ".codes").values
            let differ = zip(r.codes.codes, want).filter { Int64($0) != $1 }.count
            let frac = Double(differ) / Double(want.count)
            let scales = try f.floatTensor(c.name + ".scales").data
            let zeros = try f.intValues(c.name + ".zeros").values
            let scaleRel = zip(r.codes.scales, scales).map { abs($0 - $1) / max(abs($1), 1e-12) }.max() ?? 0
            let zerosDiffer = zip(r.codes.zeros, zeros).filter { Int64($0) != $1 }.count
            let wantLoss = try f.floatTensor(c.name + ".loss").data[0]
            let lossRel = abs(r.loss - Double(wantLoss)) / Double(wantLoss)
            table.append(String(format: "%-20@ codes differ %.4f%%  scales rel %.1e  zeros differ %d  loss rel %.1e",
                                c.name as NSString, 100 * frac, scaleRel, zerosDiffer, lossRel))
            XCTAssertLessThan(frac, 0.002, "\(c.name): \(differ) of \(want.count) codes differ from the reference")
            XCTAssertLessThan(scaleRel, 1e-4, "\(c.name): scales")
            XCTAssertLessThanOrEqual(zerosDiffer, max(1, zeros.count / 500), "\(c.name): zero points")
            XCTAssertLessThan(lossRel, 1e-3, "\(c.name): GPTQ's loss")
            if c.act && c.group > 0 && !c.staticGroups {
                let g = try f.intValues(c.name + ".g_idx").values
                XCTAssertEqual(r.codes.gIdx?.map(Int64.init), g, "\(c.name): g_idx")
            } else {
                XCTAssertNil(r.codes.gIdx, "\(c.name): no g_idx without dynamic groups in activation order")
            }
        }
        print("GPTQ against the PyTorch reference, unit cases:\n" + table.joined(separator: "\n"))
    }

    /// The dead column is zero in the result, as the reference leaves it, and the
    /// dequantized weight follows g_idx (each column its own group's scale).
    func testDeadColumnsAndActivationOrderDequantize() throws {
        let (f, h) = try unit()
        let w = try f.floatTensor("w4g128_act.w")
        let r = try GPTQ.quantize(w, hessian: h, settings: GPTQSettings(bits: 4, group: 128, actOrder: true))
        let q = r.codes.dequantized()
        for row in 0..<w.rows { XCTAssertEqual(q.data[row * w.cols + 5], 0, accuracy: r.codes.scales[row * 2] * 0.5 + 1e-6) }
        let gi = try XCTUnwrap(r.codes.gIdx)
        XCTAssertEqual(Set(gi), [0, 1], "two groups of 128 columns")
        XCTAssertEqual(gi.filter { $0 == 0 }.count, 128)
        // Column c dequantizes with scale[row, g_idx[c]]: check one column of each group.
        for c in [gi.firstIndex(of: 0)!, gi.firstIndex(of: 1)!] {
            let k = Int(gi[c])
            let want = (Float(r.codes.codes[c]) - Float(r.codes.zeros[k])) * r.codes.scales[k]
            XCTAssertEqual(q.data[c], want)
        }
    }

    /// GPTQ's error on its own Hessian is lower than round-to-nearest's (the reason it
    /// exists), on the unit input.
    func testLowersTheHessianWeightedError() throws {
        let (f, h) = try unit()
        let w = try f.floatTensor("w3g128.w")
        let r = try GPTQ.quantize(w, hessian: h, settings: GPTQSettings(bits: 3, group: 128))
        let rtn = QuantReference.groupAsymmetric(w, bits: 3, group: 128)
        let before = GPTQ.weightedError(w, rtn, hessian: h), after = GPTQ.weightedError(w, r.codes.dequantized(), hessian: h)
        XCTAssertLessThan(after, 0.8 * before, "GPTQ \(after) vs round-to-nearest \(before)")
    }
}
