import Foundation
import MBQFormats
@testable import MBQMethods
import MBQModel
import XCTest

/// The committed demo VLM (`Demo/`, written by Scripts/train_demo_vlm.py; docs/DEMO.md):
/// what `mbq eval` measures on it, in fp and after naive RTN, equals what PyTorch measured
/// when it was saved; the fp model solves the task and naive W3 breaks it.
final class DemoModelTests: XCTestCase {
    static let demo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Demo").path

    func load() throws -> (Checkpoint, LanguageModel<Float>, CalibrationBundle, [String: Any]) {
        let ckpt = try Checkpoint(directory: Self.demo + "/model")
        let model = try LanguageModel<Float>.load(ckpt)
        let held = try CalibrationBundle.load(path: Self.demo + "/heldout.safetensors", for: ckpt.config)
        let info = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Self.demo + "/training.json"))) as! [String: Any]
        return (ckpt, model, held, info)
    }

    /// `method` at W`bits` g128 on `calibration`, evaluated on the held-out bundle.
    func quantized(_ model: LanguageModel<Float>, _ ckpt: Checkpoint, _ method: QuantMethod, bits: Int,
                   calibration: [CalibrationSample], heldOut held: CalibrationBundle) throws -> EvalResult {
        var o = QuantizeOptions()
        o.method = method; o.wBit = bits; o.group = 128; o.weightDType = ckpt.weightDType
        let r = try QuantizeJob.run(model: model, samples: calibration, options: o)
        let q = LanguageModel(config: model.config, blocks: r.blocks, finalNorm: model.finalNorm, lmHead: model.lmHead)
        return try Evaluate.run(model: q, actBits: nil, samples: held.samples)
    }

    /// Teacher-forced accuracy and caption CE of the bf16 checkpoint on the held-out
    /// bundle, against transformers' LlavaForConditionalGeneration on the same inputs.
    func testEvalMatchesPyTorchOnTheTrainedModel() throws {
        let (_, model, held, info) = try load()
        let e = try Evaluate.run(model: model, actBits: nil, samples: held.samples)
        let torchCorrect = info["heldout_caption_correct"] as! Int, torchTokens = info["heldout_caption_tokens"] as! Int
        let torchCE = info["heldout_caption_ce"] as! Double
        XCTAssertEqual(e.captionTokens, torchTokens)
        // An argmax may flip where two logits agree to float rounding; none did when this
        // was written, and more than one would mean the forward pass is off.
        XCTAssertLessThanOrEqual(abs(e.captionCorrect - torchCorrect), 1, "caption tokens right: ours \(e.captionCorrect), PyTorch \(torchCorrect) of \(torchTokens)")
        XCTAssertEqual(e.captionCE, torchCE, accuracy: 1e-4 * max(1, torchCE), "caption CE: ours \(e.captionCE), PyTorch \(torchCE), diff \(abs(e.captionCE - torchCE))")
    }

    /// The trained model solves the task (issue: at least 90% of held-out caption tokens).
    func testTrainedModelSolvesTheTask() throws {
        let (_, model, held, _) = try load()
        let fp = try Evaluate.run(model: model, actBits: nil, samples: held.samples)
        XCTAssertGreaterThanOrEqual(fp.captionAccuracy, 0.90, "fp accuracy \(fp.captionAccuracy) (\(fp.captionCorrect) of \(fp.captionTokens))")
    }

    /// Naive W4 and W3 g128: our RTN and eval give the accuracy PyTorch measured with the
    /// authors' pseudo-quantizer on the same checkpoint (training.json, rtn_sensitivity).
    /// Ours quantizes bf16-rounded weights where PyTorch keeps fp32, so a token whose two
    /// best logits nearly agree may flip: at most 2 of the held-out caption tokens.
    func testRTNAccuracyMatchesPyTorch() throws {
        let (ckpt, model, held, info) = try load()
        let sensitivity = info["rtn_sensitivity"] as! [String: Any]
        for bits in [4, 3] {
            let e = try quantized(model, ckpt, .rtn, bits: bits, calibration: [], heldOut: held)
            let torchCorrect = (sensitivity["rtn_w\(bits)_g128"] as! [String: Any])["caption_correct"] as! Int
            XCTAssertLessThanOrEqual(abs(e.captionCorrect - torchCorrect), 2,
                                     "rtn W\(bits) g128: ours \(e.captionCorrect), PyTorch \(torchCorrect) of \(e.captionTokens) caption tokens right")
        }
    }

    /// The model as shipped (trained, then channel-spread; docs/DEMO.md): naive W3 g128
    /// costs at least 10 points of held-out accuracy (issue 13's bar), and awq's scale
    /// search, calibrated on one bundle, wins back all but 2 points of it.
    func testNaiveW3LosesWhatTheScaleSearchWinsBack() throws {
        let (ckpt, model, held, _) = try load()
        let fp = try Evaluate.run(model: model, actBits: nil, samples: held.samples)
        let calib = try CalibrationBundle.load(path: Self.demo + "/calib-seed0.safetensors", for: ckpt.config)
        var accuracy: [QuantMethod: Double] = [:]
        for method in [QuantMethod.rtn, .awq] {
            accuracy[method] = try quantized(model, ckpt, method, bits: 3, calibration: method == .rtn ? [] : calib.samples,
                                             heldOut: held).captionAccuracy
        }
        XCTAssertLessThanOrEqual(accuracy[.rtn]!, fp.captionAccuracy - 0.10, "rtn W3 g128 \(accuracy[.rtn]!) against fp \(fp.captionAccuracy)")
        XCTAssertGreaterThanOrEqual(accuracy[.awq]!, fp.captionAccuracy - 0.02, "awq W3 g128 \(accuracy[.awq]!) against fp \(fp.captionAccuracy)")
    }

    /// Accuracy counts the first of equal maxima, as torch.argmax does.
    func testArgmaxTakesTheFirstOfEqualMaxima() {
        XCTAssertEqual(Evaluate.argmax([0, 3, 1, 3, 3, -1], row: 0, cols: 3), 1)
        XCTAssertEqual(Evaluate.argmax([0, 3, 1, 3, 3, -1], row: 1, cols: 3), 0)
        XCTAssertEqual(Evaluate.argmax([-5, -2, -2], row: 0, cols: 3), 1)
    }
}
